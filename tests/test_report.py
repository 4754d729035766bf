"""Tests for sbtrainer.report: exact Markdown cells, PNG size and content, model card content."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sbtrainer import report as R

RESULTS = {
    "deep_ensemble": {
        **{
            f"c10c_severity_{s}_ensemble_accuracy": v
            for s, v in zip(range(1, 6), [0.8890, 0.8367, 0.7756, 0.7037, 0.5863])
        },
        "c10c_all_ensemble_accuracy": 0.75826,
        "c10c_all_member_accuracy": 0.7201,
        "eval_ensemble_accuracy": 0.9558,
        "eval_member_accuracy": 0.9474,
    },
    "sam": {
        **{
            f"c10c_severity_{s}_ensemble_accuracy": v
            for s, v in zip(range(1, 6), [0.8944, 0.8424, 0.7816, 0.7104, 0.5877])
        },
        "c10c_all_ensemble_accuracy": 0.76330,
        "c10c_all_member_accuracy": 0.7402,
        "eval_ensemble_accuracy": 0.9606,
        "eval_member_accuracy": 0.9566,
    },
    "sharpbalance": {
        **{
            f"c10c_severity_{s}_ensemble_accuracy": v
            for s, v in zip(range(1, 6), [0.8975, 0.8480, 0.7898, 0.7225, 0.6078])
        },
        "c10c_all_ensemble_accuracy": 0.77312,
        "c10c_all_member_accuracy": 0.7411,
        "eval_ensemble_accuracy": 0.9618,
        "eval_member_accuracy": 0.9573,
    },
}


def cells(markdown: str) -> list[list[str]]:
    """The rows of a Markdown table as lists of stripped cell texts (header first, rule dropped)."""
    rows = [line.strip().strip("|").split(" | ") for line in markdown.strip().splitlines()]
    return [[c.strip() for c in row] for i, row in enumerate(rows) if i != 1]


def test_severity_table_cells():
    table = cells(R.markdown_severity_table(RESULTS, "c10c"))
    assert table[0] == ["method", "severity 1", "severity 2", "severity 3", "severity 4", "severity 5", "all"]
    assert table[1] == ["deep_ensemble", "88.90", "83.67", "77.56", "70.37", "58.63", "75.83"]
    assert table[3] == ["sharpbalance", "89.75", "84.80", "78.98", "72.25", "60.78", "77.31"]
    with_delta = cells(R.markdown_severity_table(RESULTS, "c10c", delta_vs="sam", include_all=False))
    assert with_delta[3] == [
        "sharpbalance",
        "89.75 (+0.31)",
        "84.80 (+0.56)",
        "78.98 (+0.82)",
        "72.25 (+1.21)",
        "60.78 (+2.01)",
    ]
    assert with_delta[2][1] == "89.44"  # the reference row carries no delta
    missing = cells(
        R.markdown_severity_table(
            {"x": {"c10c_severity_2_nll": 1.23456}}, "c10c", metric="nll", scale=1, digits=3
        )
    )
    assert missing[1] == ["x", "–", "1.235", "–", "–", "–", "–"]
    assert (
        R.markdown_severity_table(RESULTS, "c10c").splitlines()[1] == "|:---|---:|---:|---:|---:|---:|---:|"
    )


def test_member_vs_ensemble_table_cells():
    table = cells(R.markdown_member_vs_ensemble(RESULTS, prefix="eval"))
    assert table[0] == ["method", "member accuracy", "ensemble accuracy", "ensemble gain"]
    assert table[1] == ["deep_ensemble", "94.74", "95.58", "+0.84"]
    assert table[2] == ["sam", "95.66", "96.06", "+0.40"]
    assert table[3] == ["sharpbalance", "95.73", "96.18", "+0.45"]
    ood = cells(R.markdown_member_vs_ensemble(RESULTS, prefix="c10c_all"))
    assert ood[3] == ["sharpbalance", "74.11", "77.31", "+3.20"]


def test_comparison_table_formats():
    cols = [
        ("ID acc", "eval_ensemble_accuracy", ".2%"),
        ("OOD", "c10c_all_ensemble_accuracy", "{:.3f}"),
        ("gain", "eval_member_accuracy", lambda v: f"<{v:.1f}>"),
        ("ECE", "eval_ece", ".4f"),
    ]
    table = cells(R.markdown_comparison_table(RESULTS, cols))
    assert table[0] == ["method", "ID acc", "OOD", "gain", "ECE"]
    assert table[1] == ["deep_ensemble", "95.58%", "0.758", "<0.9>", "–"]
    with pytest.raises(ValueError, match=r"\(header, key, format\)"):
        R.markdown_comparison_table(RESULTS, [("a", "b")])


def test_write_results_json_and_markdown(tmp_path):
    results = {
        "eval_ensemble_accuracy": np.float64(0.91234),
        "eval_eir": float("nan"),
        "eval_samples": 100,
        "note": "x|y",
    }
    json_path, md_path = R.write_results(results, tmp_path / "out", name="run1")
    assert json_path.name == "run1.json" and md_path.name == "run1.md"
    assert json.loads(json_path.read_text()) == {
        "eval_ensemble_accuracy": 0.91234,
        "eval_eir": None,
        "eval_samples": 100,
        "note": "x|y",
    }
    table = md_path.read_text().split("\n\n", 1)[1]
    assert md_path.read_text().startswith("# run1\n")
    assert cells(table)[1:] == [
        ["eval_ensemble_accuracy", "0.9123"],
        ["eval_eir", "nan"],
        ["eval_samples", "100"],
        ["note", "x\\|y"],
    ]


def assert_png(path, size):
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == size
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert rgb.std() > 10  # not blank
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 20
    return rgb


def test_plot_member_vs_ensemble_png(tmp_path):
    path = R.plot_member_vs_ensemble(
        RESULTS, tmp_path / "figs" / "fig7.png", prefix="c10c_all", figsize=(6, 4), dpi=100
    )
    assert path == tmp_path / "figs" / "fig7.png"
    rgb = assert_png(path, (600, 400))
    assert np.any(np.all(rgb == [0x31, 0x82, 0xBD], axis=-1))  # the ensemble-gain colour is drawn
    with pytest.raises(ValueError, match="lacks eval_member_accuracy"):
        R.plot_member_vs_ensemble({"x": {"eval_ensemble_accuracy": 0.5}}, tmp_path / "bad.png")


def test_plot_sharpness_diversity_png(tmp_path):
    points = [
        {"sharpness": 0.2 + 0.1 * i, "der": 0.3 + 0.05 * i, "eir": 0.03 + 0.004 * i, "label": "SAM"}
        for i in range(5)
    ] + [{"sharpness": 0.3, "der": 0.6, "eir": 0.06, "label": "SharpBalance"}]
    path = R.plot_sharpness_diversity(points, tmp_path / "fig3.png", figsize=(5, 4), dpi=80)
    rgb = assert_png(path, (400, 320))
    red = (rgb[..., 0] > 150) & (rgb[..., 2] < 80)
    blue = (rgb[..., 2] > 150) & (rgb[..., 0] < 100)
    assert red.sum() > 20 and blue.sum() > 20  # both ends of the EIR colour map appear
    with pytest.raises(ValueError, match=r"point 0 lacks \['kl'\]"):
        R.plot_sharpness_diversity(points, tmp_path / "x.png", diversity_key="kl")


def test_model_card_contents():
    config = {"method": "sharpbalance", "num_members": 3, "rho": 0.05, "top_k": 0.5, "weight_decay": 5e-4}
    metrics = {
        "eval_ensemble_accuracy": 0.96181,
        "cifar10c_all_ensemble_accuracy": 0.77312,
        "eval_samples": 10000,
    }
    card = R.model_card("sharpbalance", config, metrics, base_model="timm/resnet18.a1_in1k")
    front, body = card.split("\n---\n", 1)
    assert front.splitlines() == [
        "---",
        "library_name: sbtrainer",
        "tags:",
        "- ensemble",
        "- sharpbalance",
        "- sam",
        "base_model: timm/resnet18.a1_in1k",
    ]
    hyper = cells(body.split("## Hyper-parameters\n\n")[1].split("\n\n")[0])
    assert hyper == [
        ["name", "value"],
        ["method", "sharpbalance"],
        ["num_members", "3"],
        ["rho", "0.05"],
        ["top_k", "0.5"],
        ["weight_decay", "0.0005"],
    ]
    results = cells(body.split("## Evaluation results\n\n")[1].split("\n\n")[0])
    assert results[1:] == [
        ["eval_ensemble_accuracy", "0.9618"],
        ["cifar10c_all_ensemble_accuracy", "0.7731"],
        ["eval_samples", "10000"],
    ]
    assert R.CITATION_BIBTEX in card
    assert "Sharpness-Diversity Tradeoff: Improving Flat Ensembles with SharpBalance" in R.CITATION_BIBTEX
    assert "Mahoney, Michael W. and Yan, Yujun and Yang, Huanrui and Yang, Yaoqing" in R.CITATION_BIBTEX
    assert "booktitle={Advances in Neural Information Processing Systems (NeurIPS)}" in R.CITATION_BIBTEX
    bare = R.model_card("sam", {"rho": 0.05})
    assert "## Evaluation results" not in bare and "base_model" not in bare and "```bibtex" in bare


def test_bad_input_errors():
    with pytest.raises(ValueError, match="non-empty dict"):
        R.markdown_severity_table({}, "c10c")
    with pytest.raises(ValueError, match="delta_vs='sgd' is not a method"):
        R.markdown_severity_table(RESULTS, "c10c", delta_vs="sgd")
    with pytest.raises(ValueError, match="results for method 'x' must be a dict"):
        R.markdown_member_vs_ensemble({"x": 0.5})
    with pytest.raises(ValueError, match="config must be a dict"):
        R.model_card("sam", [("rho", 0.05)])
    with pytest.raises(ValueError, match="results must be a dict"):
        R.write_results([1, 2], "/tmp")
