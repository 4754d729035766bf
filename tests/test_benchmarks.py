"""Smoke tests of benchmarks/: each runs at a tiny size in its own subprocess and writes sane JSON.

They keep the benchmarks from rotting; they check keys and sane values (positive times, finite ratios,
exact scores), never wall-clock limits. The five subprocesses start together (one module fixture) so
the whole file costs about the slowest of them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RUNS = {
    "step_cost": ["step_cost.py", "--smoke"],
    "scoring": ["scoring.py", "--smoke"],
    "memory": ["memory.py", "--smoke"],
    "gpu_check": ["gpu_check.sh", "--tiny", "--bf16", "on"],  # the whole GPU campaign's script, CPU path
    "overhead": ["overhead.py", "--smoke"],
    "data_pipeline": ["data_pipeline.py", "--smoke"],
    "members_parallel": ["members_parallel.py", "--smoke"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench")
    # one thread each: five processes share the cores, and OpenMP spin-waits badly when oversubscribed
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OUT": "", "OMP_NUM_THREADS": "1"}
    env["PYTHON"] = sys.executable  # gpu_check.sh runs its scripts with $PYTHON
    procs = {name: subprocess.Popen([sys.executable if argv[0].endswith(".py") else "bash", str(BENCH / argv[0]),
                                     *argv[1:], "--out-dir", str(out)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for name, argv in RUNS.items()}
    done = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=600)
        path = out / f"{name}.json"
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{log[-4000:]}"
        assert path.is_file(), f"{name} wrote no JSON:\n{log[-2000:]}"
        done[name] = json.loads(path.read_text())
    return done


def finite_pos(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_step_cost(results):
    res = results["step_cost"]
    assert res["machine"]["nproc"] >= 1
    (model,) = res["results"]
    rows = {r["config"]: r for r in model["rows"]}
    assert set(rows) == {"sgd", "sam", "sb_k0.3"}
    assert rows["sgd"]["f"] == 0 and rows["sam"]["f"] == 1 and 0 < rows["sb_k0.3"]["f"] < 1
    for r in rows.values():
        assert finite_pos(r["median_ms"]) and finite_pos(r["images_per_s"]) and r["steps"] > 0
        assert finite_pos(r["vs_sgd"]) and finite_pos(r["vs_sam"])
        assert r["ideal_vs_sgd"] == pytest.approx(1 + r["f"])
    assert rows["sgd"]["vs_sgd"] == pytest.approx(1.0)
    assert {t["target"] for t in res["targets"]} == {"SB/SAM <= 0.85 (k=0.3)", "|SB/SGD - (1+f)| <= 0.1 (k=0.3)"}


def test_scoring(results):
    res = results["scoring"]
    rows = {r["method"]: r for r in res["results"][0]["rows"]}
    assert {"plain", "train", "loop", "vmap/4", "hooks/4"} <= set(rows)
    for r in rows.values():
        assert finite_pos(r["samples_per_s"]) and finite_pos(r["vs_plain"])
    for m in ("loop", "vmap/4", "hooks/4"):  # every implementation gives the loop's scores
        assert rows[m]["max_rel_err_vs_loop"] < 1e-3
    assert rows["hooks/4"]["peak_mib"] >= 0
    for p in res["projection"]:
        assert 0 < p["share_once"] < p["share_every_1"] < 1 and finite_pos(p["train_h"])


def test_memory(results):
    (model,) = results["memory"]["results"]
    assert [r["config"] for r in model["rows"]] == ["deep_ensemble m=1", "sharpbalance m=2"]
    for r in model["rows"]:
        assert r["train_peak_mib"] >= 0 and math.isfinite(r["vs_one_member_sgd"])
        assert finite_pos(r["params_mib"]) and finite_pos(r["total_peak_mib"])
    assert model["rows"][1]["params_mib"] == pytest.approx(2 * model["rows"][0]["params_mib"])


def test_gpu_check_cpu_path(results):
    res = results["gpu_check"]
    assert res["errors"] == {}, res["errors"]
    assert res["device"] == "cpu" and res["bf16"] is True
    steps = res["steps"]
    assert set(steps) == {"deep_ensemble", "sam", "sharpbalance_k0.3", "sharpbalance_k0.4"}
    for s in steps.values():
        assert finite_pos(s["ms_per_step"]) and finite_pos(s["vs_sgd"]) and 0 <= s["f"] <= 1
    for m in ("vmap/4", "loop", "hooks/4"):
        assert finite_pos(res["scoring"][m]["samples_per_s"]) and res["scoring"][m]["max_rel_err_vs_loop"] < 1e-3
    proj = res["projection"]
    for k in ("deep_ensemble_h", "sam_h", "sharpbalance_h"):
        assert finite_pos(proj[k])


def test_gpu_check_every_section(results):
    """The sections gpu_check.sh adds beyond the step timing: transformer scoring, the data path, the real run."""
    res = results["gpu_check"]
    trans = res["scoring_transformers"]
    assert set(trans) == {"bert:32", "albert:32", "vit:32"}
    for row in trans.values():
        for key in ("plain_samples_per_s", "ghost_samples_per_s", "loop_samples_per_s", "ghost_vs_plain"):
            assert finite_pos(row[key])
        assert row["ghost_max_rel_err_vs_loop"] < 1e-3
    for row in res["concurrent_members"].values():
        assert finite_pos(row["loop_images_per_s"]) and finite_pos(row["vmap_over_loop"])
    data = res["data_path"]
    assert data["source"] in ("cifar10", "random")
    numbers = [v for v in data.values() if isinstance(v, float)]
    assert numbers and all(math.isfinite(v) and v > 0 for v in numbers)
    real = json.loads((Path(res["config"]["out_dir"]) / "gpu_real_run.json").read_text())
    assert real["errors"] == {}, real["errors"]
    assert set(real["methods"]) == {"deep_ensemble", "sam", "sharpbalance"}
    for m in real["methods"].values():
        assert len(m["epoch_s"]) == 2 and finite_pos(m["images_per_s_steady"])
        assert 0 <= m["test"]["eval_ensemble_accuracy"] <= 1 and finite_pos(m["test"]["eval_ensemble_nll"])
    assert len(real["methods"]["sharpbalance"]["scoring_s"]) == 1  # scored once, at Td = 1


def test_overhead(results):
    res = results["overhead"]
    assert finite_pos(res["ratio_deep_ensemble"]) and finite_pos(res["ratio_sharpbalance"])
    assert 0 < res["sam_share_f"] < 1
    assert len(res["deep_ensemble"]["trainer"]) == len(res["deep_ensemble"]["bare"]) == res["config"]["epochs"]


def test_data_pipeline(results):
    res = results["data_pipeline"]
    if "skipped" in res:
        pytest.skip(res["skipped"])
    for r in res["pipelines"]:
        assert finite_pos(r["images_per_s"])
    assert any(r["pipeline"].startswith("sbtrainer w0") for r in res["pipelines"])


def test_members_parallel(results):
    (row,) = results["members_parallel"]["results"]
    assert finite_pos(row["w1_wall_s"]) and finite_pos(row["w3_wall_s"]) and finite_pos(row["ratio"])
    assert row["ratio"] == pytest.approx(row["w3_wall_s"] / row["w1_wall_s"]) and row["ideal_ratio"] == pytest.approx(1 / 3)
