"""The README's main command, `make quickstart` = `.venv/bin/python recipes/quickstart.py`, end to end, as is.

It runs with no arguments (from a temporary working directory, so its default ``outputs/quickstart``
lands there) and must print one table with every method and column; the files it writes must agree
with that table and with the ensembles it saved. Its wall time is in the README, not asserted here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sbtrainer import EnsembleModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

HEADER = "| method | member acc | ensemble acc | EIR | DER | sharpness | plain sharpness | OOD acc |"
METHODS = ("deep_ensemble", "sam", "sharpbalance")
ROW = re.compile(r"^\| (\w+) \| ([\d.]+)% \| ([\d.]+)% \| (-?[\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)% \|$")


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "recipes" / "quickstart.py")], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=400)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"quickstart failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc, cwd / "outputs" / "quickstart", seconds


def test_prints_one_table_with_every_method_and_column(quickstart):
    proc, _, _ = quickstart
    lines = proc.stdout.splitlines()
    assert lines.count(HEADER) == 1
    at = lines.index(HEADER)
    rows = [ROW.match(line) for line in lines[at + 2 : at + 5]]
    assert all(rows), lines[at : at + 5]
    assert [r.group(1) for r in rows] == list(METHODS)
    for r in rows:
        member, ensemble, eir, der, sharpness, plain, ood = map(float, r.groups()[1:])
        assert 80 < member <= 100 and 80 < ensemble <= 100 and 20 < ood <= 100
        assert -1 < eir < 1 and der > 0 and sharpness > 0 and plain > 0
    assert "quickstart: 100%" in proc.stderr  # the progress bar ran to its end
    # its wall time (the third element) is reported in the README, never asserted: speed belongs to benchmarks/


def test_writes_table_json_figures_and_ensembles(quickstart):
    proc, out, _ = quickstart
    table = json.loads((out / "comparison.json").read_text())
    assert table["columns"] == HEADER.strip("| ").split(" | ")[1:]
    printed = {m.group(1): m for m in map(ROW.match, proc.stdout.splitlines()) if m}
    for method in METHODS:
        row = table["rows"][method]
        assert f"{100 * row['ensemble acc']:.2f}" == printed[method].group(3)
        assert f"{row['sharpness']:.3f}" == printed[method].group(6)
        assert f"{row['plain sharpness']:.4f}" == printed[method].group(7)
    assert HEADER in (out / "comparison.md").read_text()
    for name in ("member_vs_ensemble.png", "member_vs_ensemble_ood.png", "sharpness_diversity.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_sharpbalance_scored_at_half_and_ensembles_reload(quickstart):
    _, out, _ = quickstart
    import quickstart as qs

    _, x_test, _, y_test = qs.load_data()
    test = qs.DigitsDataset(x_test, y_test)
    for method in METHODS:
        results = json.loads((out / method / "results.json").read_text())
        if method == "sharpbalance":
            assert results["scoring_epochs"] == [10]  # Td = 20 epochs / 2: a SAM phase, then one scoring
            assert 0.5 <= results["sam_set_fraction"] < 1.0  # k = 0.5 of each other member, united
        else:
            assert "scoring_epochs" not in results
        assert {"digits_c_severity_1_ensemble_accuracy", "digits_c_severity_5_ensemble_accuracy"} <= set(results)
        assert results["digits_c_severity_5_ensemble_accuracy"] < results["digits_c_severity_1_ensemble_accuracy"]
        ensemble = EnsembleModel.from_pretrained(out / method / "ensemble")  # small_cnn carries its build recipe
        with torch.no_grad():
            acc = (ensemble(pixel_values=test.x).logits.argmax(-1) == test.y).double().mean().item()
        assert acc == pytest.approx(results["eval_ensemble_accuracy"], abs=1e-12)
