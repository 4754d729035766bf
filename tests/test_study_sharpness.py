"""Smoke test of the sharpness study driver (`recipes/studies/sharpness_digits.py`) at its ``--tiny`` size.

The study itself (about 30 CPU minutes) never runs here; this runs the driver on one method (a 2-member deep
ensemble, 1 epoch) and checks its numbers: the closed forms it verifies, the temperature matching, the
equivalences it relies on, the reproduction of the quickstart's measure, and that a rerun recomputes nothing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "recipes" / "studies"))

import sharpness_digits as study  # noqa: E402

from sbtrainer.sharpness import ensemble_sharpness, worst_case_sharpness  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharpness_study")
    argv = ["--tiny", "--methods", "deep_ensemble", "--results", str(out / "r.json"),
            "--checkpoint_dir", str(out / "ckpt")]
    threads = torch.get_num_threads()  # the driver runs on 1 thread (as do the direct recomputations here)
    try:
        yield argv, out, study.main(argv)
    finally:
        torch.set_num_threads(threads)


def _members(out: Path) -> list[torch.nn.Module]:
    return study.load_members(torch.load(out / "ckpt" / "deep_ensemble.pt", weights_only=True)["final"])


def _train() -> study.DigitsDataset:
    x_train, _, y_train, _ = study.load_data()
    return study.DigitsDataset(x_train, y_train)


def test_trust_region_max_hand_values():
    diag = lambda *v: torch.diag(torch.tensor(v, dtype=torch.float64))  # noqa: E731
    vec = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    # b = 0: ½ρ²λmax = ½·1·2
    assert study.trust_region_max(diag(2.0, 0.0), vec(0.0, 0.0), 1.0) == pytest.approx(1.0, rel=1e-12)
    # A = 0: ρ‖b‖ = 0.5·5
    assert study.trust_region_max(diag(0.0, 0.0), vec(3.0, 4.0), 0.5) == pytest.approx(2.5, rel=1e-9)
    # A = diag(4, 0), b = (0, 1), ρ = 1: max_t t + 2(1 − t²) at t = 1/4: 0.25 + 1.875
    assert study.trust_region_max(diag(4.0, 0.0), vec(0.0, 1.0), 1.0) == pytest.approx(2.125, rel=1e-9)
    # A = diag(1, 0), b = (0, 1), ρ = 1: t + (1 − t²)/2 is maximal at t = 1: 1
    assert study.trust_region_max(diag(1.0, 0.0), vec(0.0, 1.0), 1.0) == pytest.approx(1.0, rel=1e-6)


def test_quadratic_check_against_closed_forms(tiny):
    _, _, data = tiny
    q = data["quadratic_check"]
    worst = q["worst_case"]
    for rows in worst.values():
        for v in rows.values():  # a point of the ball never beats the maximum
            assert v["measured"] <= v["closed_form"] * (1 + 1e-9)
    # with a gradient, 10 ascent steps reach >= 99% of the trust-region maximum at rho0 = 0.1, >= 95% at 0.5
    assert worst["gradient"]["rho0=0.1,steps=10"]["ratio"] >= 0.99
    assert worst["gradient"]["rho0=0.5,steps=10"]["ratio"] >= 0.95
    # at a minimum the problem is homogeneous in rho0: the same fraction of ½ρ0²λmax(THT) at every rho0
    assert worst["minimum"]["rho0=0.1,steps=10"]["ratio"] == pytest.approx(worst["minimum"]["rho0=0.5,steps=10"]["ratio"],
                                                                           rel=1e-9)
    assert worst["minimum"]["rho0=0.5,steps=10"]["closed_form"] == pytest.approx(0.5 * 0.25 * q["lambda_max_THT"])
    for v in q["average_case"].values():  # ½σ² tr(THT), within 4 Monte Carlo standard errors
        assert abs(v["measured"] - v["closed_form"]) <= 4 * v["stderr"]
    assert q["hutchinson_diagonal_THT"]["estimate"] == pytest.approx(q["hutchinson_diagonal_THT"]["closed_form"],
                                                                     rel=1e-12)  # exact for a diagonal Hessian
    assert q["power_iteration_lambda_max_THT"] == pytest.approx(q["lambda_max_THT"], rel=1e-6)


def test_temperature_matches_the_loss_and_equals_a_scaled_head(tiny):
    _, out, data = tiny
    target = study.TINY["matched_nll"][0]
    node = data["methods"]["deep_ensemble"][f"temperature_nll={target}"]
    for stats in node["stats"]["members"]:
        assert stats["loss"] == pytest.approx(target, abs=1e-5)
    # the adaptive worst case of logits / τ is that of the member with its linear head divided by τ
    rho0, steps = study.TINY["matched_rho0"][0], study.TINY["curve_steps"]
    train = _train()
    for member, tau, expected in zip(_members(out), node["tau"],
                                     node[f"worst_adaptive_rho0={rho0}_steps={steps}"]["members"]):
        with torch.no_grad():
            member[8].weight.div_(tau), member[8].bias.div_(tau)
        got = worst_case_sharpness(member, train, rho0=rho0, steps=steps, batch_size=5,
                                   num_batches=study.TINY["batches"], seed=0, disable_tqdm=True).value
        assert got == pytest.approx(expected, rel=1e-4)


def test_quickstart_measure_reproduced_and_checkpoint_epoch(tiny):
    _, out, data = tiny
    res = data["methods"]["deep_ensemble"]
    qs = study.QUICKSTART_SETTING
    key = f"worst_adaptive_rho0={qs['rho0']}_steps={qs['steps']}_batches={study.TINY['quickstart_batches']}"
    direct = ensemble_sharpness(_members(out), _train(), rho0=qs["rho0"], steps=qs["steps"], batch_size=5,
                                num_batches=study.TINY["quickstart_batches"], seed=0, disable_tqdm=True)
    assert res["final"][key]["mean"] == pytest.approx(direct["sharpness"], rel=1e-12)
    # 1 epoch: the final members are the epoch-1 snapshot, and it is the equal-loss checkpoint (NLL <= 1.5)
    assert [s["nll"] for s in res["final"]["stats"]["members"]] == pytest.approx(res["epoch_train_nll"][0], rel=1e-9)
    assert res[f"checkpoint_nll={study.TINY['checkpoint_nll']}"]["epoch"] == 1
    assert all(0 < v < study.TINY["checkpoint_nll"] for v in res["epoch_train_nll"][0])
    # the key table prints the JSON's numbers
    assert f"{res['final']['stats']['mean']['nll']:.4g}" in data["tables"]["key"]


def test_rerun_recomputes_nothing(tiny, monkeypatch):
    argv, out, _ = tiny
    before = json.loads((out / "r.json").read_text())

    def boom(*args, **kwargs):
        raise AssertionError("a finished part was recomputed")

    for name in ("train_method", "worst_case_sharpness", "average_case_sharpness", "quadratic_check", "curvature"):
        monkeypatch.setattr(study, name, boom)
    again = study.main(argv)
    assert again["methods"] == before["methods"] and again["quadratic_check"] == before["quadratic_check"]
    assert math.isfinite(again["total_compute_seconds"])
