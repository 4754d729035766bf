"""recipes/tradeoff.py's sweeps: Fig. 5a (width), Fig. 5b (sparsity, global magnitude pruning), Fig. 15 (ensemble
size) and Fig. 14 (curvature ranking), tiny and offline on made data, plus the pruning and fitting pieces in process.

The tiny runs use `test_recipes`' made CIFAR-10 folder and its tiny flags, and call the recipe's ``main()`` in this
process (`_run`: a subprocess would spend most of its time importing torch/transformers again); each checks the numbers it can recompute
(β from the points, the pruned fraction and zero pattern of the saved members, the calibration of a saved
ensemble, the Spearman rho and per-sample scores of the saved member), the figures' axes (stored in the PNG's
``Axes`` text chunk) and that the JSON values are finite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from test_recipes import OOD, TINY, _image_batch, _results, cifar10_dir  # noqa: F401 (fixture)
from torch import nn

from sbtrainer import EnsembleModel
from sbtrainer.metrics import ensemble_ece, ensemble_nll
from sbtrainer.models import cifar_resnet
from sbtrainer.scoring import batch_scores_hooks_checked, per_sample_sharpness

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
import tradeoff

TWO = ["--num_members", "2", "--member_seeds", "13", "17"]
CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
SMALL = ["--max_train_samples", "32"]  # 2 steps per epoch at test_recipes' batch of 16


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in this file's tests (small tensors; a second thread on a busy machine only slows them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> list[dict]:
    """``tradeoff.main()`` on ``argv`` in this process, one torch thread (as ``accelerate launch`` with one process
    sets it; two threads on a busy two-core machine are several times slower); the thread count, the logging set-up
    and accelerate's state are put back after."""
    import transformers
    from accelerate.state import AcceleratorState

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("sbtrainer").level,
             transformers.utils.logging.get_verbosity(), torch.get_num_threads())
    monkeypatch.setattr(sys, "argv", ["tradeoff.py", *argv, "--num_threads", "1"])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    try:
        return tradeoff.main()
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("sbtrainer").setLevel(saved[2])
        transformers.utils.logging.set_verbosity(saved[3])
        torch.set_num_threads(saved[4])
        AcceleratorState._reset_state(reset_partial_state=True)


def _config(name: str) -> str:
    """The sweep's YAML (the tiny runs start from it, flags override): ``tradeoff_<name>[_cifar10].yaml``."""
    stem = name if name.endswith("cifar100") else f"{name}_cifar10"
    return str(CONFIGS / f"tradeoff_{stem}.yaml")


def _axes(png: Path) -> list[dict]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, png
    return json.loads(Image.open(png).text["Axes"])


def _all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return value is not None


def _prunable(member: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _zero_digest(member: nn.Module) -> str:
    digest = hashlib.sha256()
    for w in _prunable(member):
        digest.update((w == 0).numpy().astype(np.uint8).tobytes())
    return digest.hexdigest()


def _hand_slope(points: list[dict]) -> float:
    x, y = np.log([p["sharpness"] for p in points]), np.log([p["der"] for p in points])
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def _tiny_member(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cifar_resnet("resnet18", num_classes=10, width=4).eval()


# ----------------------------------------------------------------------------- pruning, in process


def test_global_magnitude_pruning_counts_ranks_and_keeps_masks():
    """round(0.8 N) of the N Conv2d/Linear weights masked, ranked by |w| across layers (every kept |w| >= every
    pruned |w|; layer densities differ), the mask a buffer beside weight_orig; two SGD steps with weight decay
    move weight_orig everywhere but the effective weights stay zero exactly where they were masked."""
    member = _tiny_member()
    dense = [w.clone() for w in _prunable(member)]
    total = sum(w.numel() for w in dense)
    facts = tradeoff.prune_member(member, 0.8)
    modules = [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = [m.weight_mask.clone() for m in modules]
    assert all("weight_mask" in dict(m.named_buffers()) and "weight_orig" in dict(m.named_parameters())
               for m in modules)
    assert sum(int((k == 0).sum()) for k in masks) == round(0.8 * total)
    assert facts["pruned_fraction"] == round(0.8 * total) / total and facts["prunable_weights"] == total
    kept = torch.cat([w[k == 1].abs() for w, k in zip(dense, masks)])
    pruned = torch.cat([w[k == 0].abs() for w, k in zip(dense, masks)])
    assert kept.min() >= pruned.max()
    densities = [float(k.mean()) for k in masks]
    assert max(densities) - min(densities) > 0.3 and facts["min_layer_density"] == pytest.approx(min(densities))

    member.train()
    opt = torch.optim.SGD(member.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    orig_before = [m.weight_orig.detach().clone() for m in modules]
    for _ in range(2):
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
        opt.zero_grad()
        nn.functional.cross_entropy(member(x), y).backward()
        opt.step()
    for m, k, before in zip(modules, masks, orig_before):
        assert torch.equal(m.weight_mask, k)
        assert not torch.equal(m.weight_orig.detach()[k == 0], before[k == 0])  # weight decay moved them...
        assert torch.all((m.weight_orig * m.weight_mask)[k == 0] == 0)  # ...and the forward never sees them
    assert tradeoff.pruning_facts(member)["zero_pattern_sha256"] == facts["zero_pattern_sha256"]


def test_pruned_member_scoring_refuses_hooks_and_auto_is_exact():
    """Hooks scoring refuses a pruned module (weight_orig * mask is a derived weight); ``auto`` falls back to vmap and
    equals the hand value: the squared gradient norm over the trainable parameters, ``||mask ⊙ ∇_W l||^2`` for the
    pruned weights plus every other parameter's, from a dense copy holding W = weight_orig * mask."""
    member = _tiny_member(1)
    tradeoff.prune_member(member, 0.8)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([1, 4, 7])
    with pytest.raises(NotImplementedError, match="computes its weight from other tensors"):
        batch_scores_hooks_checked(member, {"pixel_values": x, "labels": y}, "pixel_values",
                                   nn.functional.cross_entropy)
    rows = [{"pixel_values": x[i], "labels": y[i]} for i in range(3)]
    auto = per_sample_sharpness(member, rows, method="auto", progress=False)

    dense = _tiny_member(1)
    pruned_mods = [m for m in member.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    dense_mods = [m for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():  # the same seed built the same member; only the pruned weights differ
        for p_mod, d_mod in zip(pruned_mods, dense_mods):
            d_mod.weight.copy_(p_mod.weight_orig * p_mod.weight_mask)
    masks = {id(d.weight): p.weight_mask for p, d in zip(pruned_mods, dense_mods)}
    hand = []
    for i in range(3):
        loss = nn.functional.cross_entropy(dense(x[i:i + 1]), y[i:i + 1])
        grads = torch.autograd.grad(loss, list(dense.parameters()))
        hand.append(sum(float((g * masks.get(id(p), 1)).pow(2).sum()) for p, g in zip(dense.parameters(), grads)))
    torch.testing.assert_close(auto, torch.tensor(hand, dtype=torch.float32), rtol=1e-5, atol=0)
    unmasked = sum(float(g.pow(2).sum()) for g in torch.autograd.grad(
        nn.functional.cross_entropy(dense(x[:1]), y[:1]), list(dense.parameters())))
    assert unmasked > hand[0] * 1.01  # the pruned coordinates' gradients are NOT counted


def test_permanent_copy_reloads_and_computes_the_same():
    """`permanent`: prune.remove on a copy: plain ``weight`` zeros where masked, no weight_orig/mask left; the same
    outputs as the pruned ensemble; the pruned ensemble itself keeps its masks."""
    ensemble = EnsembleModel.from_factory(lambda _: cifar_resnet("resnet18", num_classes=10, width=4), 2, [13, 17])
    tradeoff.prune_ensemble(ensemble, 0.9, 0)
    ensemble.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        live = ensemble(pixel_values=x).member_logits
    final = tradeoff.permanent(ensemble).eval()
    assert not any(k.endswith(("weight_orig", "weight_mask")) for k in final.state_dict())
    assert any(k.endswith("weight_mask") for k in ensemble.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(final(pixel_values=x).member_logits, live, rtol=0, atol=0)
    for member in final.members:
        total = sum(w.numel() for w in _prunable(member))
        assert sum(int((w == 0).sum()) for w in _prunable(member)) == round(0.9 * total)


def test_prune_callback_prunes_once_at_its_epoch():
    ensemble = EnsembleModel.from_factory(lambda _: cifar_resnet("resnet18", num_classes=10, width=4), 2, [13, 17])
    record: dict = {}
    callback = tradeoff.PruneAtEpoch(ensemble, 0.5, 2, record)
    for epoch in (0.0, 1.0):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=epoch), None)
    assert record == {} and not hasattr(ensemble.members[0].conv1, "weight_mask")
    callback.on_epoch_begin(None, SimpleNamespace(epoch=2.0), None)
    callback.on_epoch_begin(None, SimpleNamespace(epoch=3.0), None)  # not pruned twice (masks would compose)
    assert record["pruned_at_epoch"] == 2 and len(record["at_pruning"]) == 2
    assert all(f["pruned_fraction"] == pytest.approx(0.5, abs=1e-4) for f in record["at_pruning"])


def test_loglog_fit_on_hand_points():
    """β and c of ln DER = c + β ln s: two points e^0 -> 1, e^2 -> e^1 give β = 0.5, c = 0; three points by hand;
    points without a positive sharpness or DER are skipped; < 2 distinct sharpness values give None."""
    pts = [{"sharpness": 1.0, "der": 1.0}, {"sharpness": math.e ** 2, "der": math.e}]
    assert tradeoff.loglog_fit(pts) == pytest.approx((0.5, 0.0), abs=1e-12)
    three = [{"sharpness": math.e ** a, "der": math.e ** b} for a, b in [(0, 0), (1, 1), (2, 1)]]
    # x = 0 1 2, y = 0 1 1: β = Σ(x - 1)(y - 2/3) / Σ(x - 1)^2 = (2/3 + 1/3) / 2 = 0.5, c = 2/3 - 0.5 = 1/6
    assert tradeoff.loglog_fit(three) == pytest.approx((0.5, 1 / 6), abs=1e-12)
    assert tradeoff.loglog_fit([*pts, {"sharpness": 0.0, "der": 3.0}, {"sharpness": 2.0, "der": None}]) == \
        pytest.approx((0.5, 0.0), abs=1e-12)
    assert tradeoff.loglog_fit([pts[0], {"sharpness": 1.0, "der": 2.0}]) is None
    levels = tradeoff.level_fits([{**p, "level": "w=8"} for p in pts] + [{**p, "level": "w=16"} for p in three])
    assert list(levels) == ["w=8", "w=16"] and levels["w=16"] == pytest.approx((0.5, 1 / 6), abs=1e-12)


@pytest.mark.parametrize(("argv", "message"), [
    (["--sweep", "depth"], "--sweep must be one of"),
    (["--sweep", "sparsity", "--sparsities", "0", "1.0"], "--sparsities must be one or more fractions in"),
    (["--sweep", "sparsity", "--prune_epoch", "3", "--num_train_epochs", "3"], "--prune_epoch must be in"),
    (["--sweep", "width", "--arch", "wrn-16-2"], "is a WideResNet"),
    (["--sweep", "ensemble_size", "--ensemble_sizes", "1", "3"], "--ensemble_sizes must be one or more sizes"),
    (["--sweep", "ensemble_size", "--size_methods", "sam", "gsam"], "--size_methods must be one or more of"),
    (["--sweep", "ensemble_size", "--ensemble_sizes", "2", "--seed_pool", "1", "1", "2"], "--seed_pool must not repeat"),
    (["--sweep", "curvature"], "--sweep curvature needs --curvature_samples > 0"),
    (["--curvature_samples", "10", "--curvature_member", "3"], "--curvature_member must be in"),
])
def test_bad_sweep_options_are_refused(tmp_path, argv, message):
    from recipe_utils import RecipeError, parse_args

    args, config = parse_args(tradeoff.TradeoffArgs, [*argv, "--output_dir", str(tmp_path)])
    with pytest.raises(RecipeError, match=message.replace("(", r"\(")):
        tradeoff.check_args(args, config)


# ----------------------------------------------------------------------------- the configs

OURS = {  # keys each sweep config labels "# ours: ..." (the paper is silent on them)
    "tradeoff_cifar10.yaml": {"sharpbalance_rhos"},
    "tradeoff_width_cifar10.yaml": set(),
    "tradeoff_sparsity_cifar10.yaml": {"prune_epoch"},
    "tradeoff_ensemble_size_cifar100.yaml": {"seed_pool"},
    "tradeoff_curvature_cifar10.yaml": {"curvature_member", "curvature_h", "curvature_directions", "ensemble_method"},
}


@pytest.mark.parametrize("name", sorted(OURS))
def test_sweep_configs_hold_the_papers_values_and_label_ours(name):
    """App. D.2 (Fig. 5 radii, γ = 0.5), Fig. 5a/5b levels, Fig. 15 sizes and seeds, App. F.3's 1000 rows, Table 1's
    ρ/k/Td, App. D.3's SGD; every key the paper does not give carries an inline ``# ours:`` comment, no other."""
    import re

    import yaml
    from recipe_utils import parse_args

    args, config = parse_args(tradeoff.TradeoffArgs, [str(CONFIGS / name)])
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert config.output_dir == f"outputs/{name.removesuffix('.yaml')}"
    assert (config.num_train_epochs, config.per_device_train_batch_size, config.learning_rate) == (200, 128, 0.1)
    assert (args.momentum, config.weight_decay, args.lr_milestones, args.lr_gamma) == (0.9, 5e-4, [100, 150], 0.1)
    assert (args.sharpness_batches, args.sharpness_steps, args.sharpness_rho0) == (100, 20, 0.5)  # γ = 0.5, App. D.2
    assert (args.arch, args.model_width, config.num_members, config.member_seeds) == ("resnet18", 64, 3, [13, 17, 27])
    assert config.scoring_start_epoch == 100 and config.sam_fraction == (0.5 if "cifar100" in name else 0.4)
    sweep = {"tradeoff_cifar10.yaml": "rho"}.get(name, name.split("_")[1] if "size" not in name else "ensemble_size")
    assert args.sweep == sweep
    if sweep in ("width", "sparsity"):
        assert args.rhos == tradeoff.FIG5_RHOS == [0.01, 0.015, 0.02, 0.025, 0.03, 0.05, 0.1, 0.2, 0.3, 0.4]
    assert args.widths == [8, 16, 64, 128] and args.sparsities == [0.0, 0.8, 0.95, 0.99]  # Fig. 5a, 5b
    if sweep == "ensemble_size":
        assert args.ensemble_sizes == [2, 3, 4, 5, 6] and args.size_methods == ["deep_ensemble", "sam", "sharpbalance"]
        assert args.seed_pool == [13, 17, 27, 113, 117, 127, 43, 59, 223]  # Table 1 caption
        assert (args.dataset_name, args.label_column, config.rho) == ("uoft-cs/cifar100", "fine_label", 0.2)  # App. F.5
    else:
        assert (args.dataset_name, args.label_column) == ("uoft-cs/cifar10", "label")
    if sweep == "curvature":
        assert (args.curvature_samples, config.ensemble_method, config.rho) == (1000, "sharpbalance", 0.2)
    found = (re.match(r"^(\w+):[^#]*#\s*(.*)$", line) for line in (CONFIGS / name).read_text().splitlines())
    labelled = {m.group(1) for m in found if m and m.group(2).startswith("ours:")}
    assert labelled == OURS[name] & set(raw) == OURS[name]


# ----------------------------------------------------------------------------- the tiny runs


def test_width_sweep_fig5a(tmp_path, cifar10_dir, monkeypatch):  # noqa: F811
    """Two widths x two SAM radii: four points, β per width equal to the hand least-squares slope of ln DER on
    ln sharpness, the Fig. 5 panel with labelled log axes and β in the legend, members built at their width."""
    out = tmp_path / "out"
    _run(monkeypatch, [_config("width"), "--widths", "2", "4", "--rhos", "0.02", "0.5", "--dataset_name",
                       cifar10_dir, "--output_dir", str(out), "--lr_milestones", "1", *TWO, *TINY, *SMALL, *OOD])
    results = _results(out)
    points = results["points"]
    assert [(p["width"], p["rho"], p["method"]) for p in points] == [(2, 0.02, "sam"), (2, 0.5, "sam"),
                                                                    (4, 0.02, "sam"), (4, 0.5, "sam")]
    assert results["sweep"] == "width" and results["slope_axes"].startswith("least-squares slope of ln DER")
    assert _all_finite(points) and all(p["sharpness"] > 0 and p["der"] > 0 for p in points)
    for level in ("width=2", "width=4"):
        group = [p for p in points if p["level"] == level]
        assert results["slopes"][level] == pytest.approx(_hand_slope(group), rel=1e-9, abs=1e-9)
    (axes,) = [a for a in _axes(out / "tradeoff_width.png") if a["xlabel"]]
    assert axes["xlabel"].startswith("Sharpness") and axes["ylabel"].startswith("Diversity (DER")
    assert axes["legend"] == [f"width={w} (β = {results['slopes'][f'width={w}']:.2f})" for w in (2, 4)]
    assert "width=4 ρ=0.5" in (out / "tradeoff_width.md").read_text()
    meta = json.loads((out / "ensemble" / "width2_sam_rho0.5" / "ensemble_config.json").read_text())
    assert meta["members"][0]["builder"]["kwargs"]["width"] == 2 and meta["config"]["rho"] == 0.5


def test_sparsity_sweep_fig5b_prunes_globally_and_keeps_masks(tmp_path, cifar10_dir, monkeypatch):  # noqa: F811
    """Sparsity 0 and 0.8, pruned at the start of epoch 1 of 2: every saved 0.8 member has exactly round(0.8 N) of
    its N Conv2d/Linear weights zero, in the very pattern recorded when pruning (masks kept through training);
    the dense members have none; β per sparsity is the hand slope; the Fig. 5b panel has labelled axes."""
    out = tmp_path / "out"
    _run(monkeypatch, [_config("sparsity"), "--sparsities", "0", "0.8", "--prune_epoch", "1", "--rhos", "0.02",
                       "0.5", "--model_width", "4", "--dataset_name", cifar10_dir, "--output_dir", str(out),
                       "--lr_milestones", "1", *TWO, *TINY, *SMALL, *OOD])
    results = _results(out)
    points = results["points"]
    assert [(p["sparsity"], p["rho"]) for p in points] == [(0, 0.02), (0, 0.5), (0.8, 0.02), (0.8, 0.5)]
    assert results["prune_epoch"] == 1 and _all_finite(points)
    for p in points:
        name = f"sparsity{p['sparsity']:g}_sam_rho{p['rho']:g}"
        ensemble = EnsembleModel.from_pretrained(out / "ensemble" / name)
        if p["sparsity"] == 0:
            assert "pruning" not in p
            assert all(int((w == 0).sum()) == 0 for m in ensemble.members for w in _prunable(m))
            continue
        assert p["pruning"]["pruned_at_epoch"] == 1
        for member, at, after in zip(ensemble.members, p["pruning"]["at_pruning"], p["pruning"]["after_training"]):
            total = sum(w.numel() for w in _prunable(member))
            assert sum(int((w == 0).sum()) for w in _prunable(member)) == round(0.8 * total)
            assert at["pruned_fraction"] == after["pruned_fraction"] == round(0.8 * total) / total
            assert _zero_digest(member) == at["zero_pattern_sha256"] == after["zero_pattern_sha256"]
    for level in ("sparsity=0", "sparsity=0.8"):
        group = [p for p in points if p["level"] == level]
        assert results["slopes"][level] == pytest.approx(_hand_slope(group), rel=1e-9, abs=1e-9)
    (axes,) = [a for a in _axes(out / "tradeoff_sparsity.png") if a["xlabel"]]
    assert axes["xlabel"].startswith("Sharpness") and axes["ylabel"].startswith("Diversity (DER")
    assert axes["title"].startswith("Fig. 5b") and len(axes["legend"]) == 2


def test_ensemble_size_sweep_fig15(tmp_path, cifar10_dir, monkeypatch):  # noqa: F811
    """m = 2, 3 x deep_ensemble, sharpbalance (16 training rows, one step per epoch; 'sam' runs the same code under
    another method name, and the YAML test checks the three default methods): four runs, seeds the first m of the
    paper's list, ECE and NLL finite on the corrupted sets; a saved ensemble's in-distribution ECE/NLL recomputed
    from its weights equal the reported ones; two panels (ECE, NLL against m) with one line per method."""
    out = tmp_path / "out"
    _run(monkeypatch, [_config("ensemble_size_cifar100"), "--ensemble_sizes", "2", "3", "--size_methods",
                       "deep_ensemble", "sharpbalance", "--rho", "0.5", "--sam_fraction", "0.4", "--label_column",
                       "label", "--model_width", "4", "--dataset_name", cifar10_dir, "--output_dir", str(out),
                       "--lr_milestones", "1", *TINY, "--max_train_samples", "16", *OOD])
    results = _results(out)
    points = results["points"]
    methods = ["deep_ensemble", "sharpbalance"]
    assert [(p["num_members"], p["method"]) for p in points] == [(m, k) for m in (2, 3) for k in methods]
    assert _all_finite(points) and results["sweep"] == "ensemble_size"
    for p in points:
        assert p["member_seeds"] == [13, 17, 27][: p["num_members"]] and p["measured_on"] == "cifar10c_all"
        assert 0 <= p["ece"] <= 1 and p["nll"] > 0
    from cifar_data import cifar_transforms

    batch, labels = _image_batch(cifar10_dir, cifar_transforms(10)[1], "label")
    for name, p in (("m3_sharpbalance", points[3]), ("m2_deep_ensemble", points[0])):
        ensemble = EnsembleModel.from_pretrained(out / "ensemble" / name)
        assert ensemble.num_members == p["num_members"]
        with torch.no_grad():
            logits = ensemble(**batch).member_logits
        assert p["id_ensemble_nll"] == pytest.approx(ensemble_nll(logits, labels, ensemble.reduction), rel=1e-5)
        assert p["id_ensemble_ece"] == pytest.approx(ensemble_ece(logits, labels, ensemble.reduction), abs=1e-6)
    ece_ax, nll_ax = _axes(out / "ensemble_size.png")
    assert ece_ax["xlabel"] == nll_ax["xlabel"] == "Number of models in the ensemble"
    assert ece_ax["ylabel"].startswith("ECE") and nll_ax["ylabel"].startswith("NLL")
    assert ece_ax["legend"] == nll_ax["legend"] == methods


def test_curvature_sweep_fig14(tmp_path, cifar10_dir, monkeypatch):  # noqa: F811
    """One SharpBalance ensemble, then 16 training rows ranked both ways on member 1: the stored per-sample sharpness
    and input curvature equal those recomputed from the saved member on the same rows; Spearman's rho equals
    scipy's on the stored vectors; the scatter's axes are labelled."""
    out = tmp_path / "out"
    _run(monkeypatch, [_config("curvature"), "--curvature_samples", "16", "--curvature_member", "1",
                       "--curvature_directions", "2", "--ensemble_method", "sharpbalance", "--rho", "0.5",
                       "--sam_fraction", "0.4", "--model_width", "4", "--dataset_name", cifar10_dir,
                       "--output_dir", str(out), "--lr_milestones", "1", *TWO, *TINY, *SMALL, *OOD])
    results = _results(out)
    assert [(p["method"], p["rho"]) for p in results["points"]] == [("sharpbalance", 0.5)]
    curv = json.loads((out / "curvature.json").read_text())
    assert results["curvature"]["spearman"] == curv["spearman"] and results["curvature"]["samples"] == 16
    assert _all_finite(curv) and len(curv["rows"]) == 16 == len(set(curv["rows"])) and curv["rows"] == sorted(curv["rows"])
    sharp, bend = np.array(curv["sharpness_values"]), np.array(curv["curvature_values"])
    assert (sharp >= 0).all() and (bend >= 0).all()
    assert curv["spearman"] == pytest.approx(spearmanr(bend, sharp).statistic, abs=1e-12)

    from cifar_data import batch_transform, cifar_transforms
    from recipe_utils import random_subset

    from sbtrainer.curvature import input_curvature_dataset

    train = random_subset(datasets.load_dataset(cifar10_dir)["train"], 32, 0, "--max_train_samples")  # SMALL's rows
    score = train.with_transform(batch_transform(cifar_transforms(10)[1], "img", "label"))
    member = EnsembleModel.from_pretrained(out / "ensemble" / "sharpbalance_rho0.5").members[1]
    again = per_sample_sharpness(member, score, rows=curv["rows"], batch_size=64, progress=False)
    np.testing.assert_allclose(again.numpy(), sharp, rtol=1e-4)
    bend_again = input_curvature_dataset(member, score, rows=curv["rows"], batch_size=64, seed=0, h=1e-3,
                                         num_directions=2)
    np.testing.assert_allclose(bend_again.numpy(), bend, rtol=1e-4)
    (axes,) = _axes(out / "curvature.png")
    assert axes["xlabel"].startswith("Loss curvature around the input")
    assert axes["ylabel"].startswith("Sharpness (Fisher trace")
    assert axes["legend"] == [f"Spearman ρ = {curv['spearman']:.2f} (N = 16)"]
