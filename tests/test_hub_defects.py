"""Issue 8, items 10 (card part), 11, 17 (figure labels, card, packaging, docstrings) and tied weights in the hub format.

Kinds: metadata captured at construction and trusted after the model changed (11); one fact with two
homes (10: the reduction); text a user reads that is wrong or not self-contained (17); aliased tensors in
what is written (tied weights).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import safetensors
import timm
import torch
from helpers import make_args, tiny_albert_factory
from torch import nn

import sbtrainer
import sbtrainer.report as R
from sbtrainer import EnsembleModel
from sbtrainer.ensemble import reduce_member_logits
from sbtrainer.hub import CONFIG_NAME, MEMBER_CONFIG_NAME, WEIGHTS_NAME
from sbtrainer.models import build_recipe, cifar_resnet, register_builder, small_cnn, timm_model

ROOT = Path(__file__).resolve().parents[1]


def _images(side: int = 16, n: int = 5) -> dict:
    return {"pixel_values": torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(3))}


def _warm(ens: EnsembleModel, batch: dict) -> None:
    """One train-mode forward so BatchNorm running statistics are not their init values."""
    ens.train()
    with torch.no_grad():
        ens(**batch)
    ens.eval()


def _round_trip(tmp_path, members, batch, **load_kw):
    """Save an ensemble of ``members`` and load it back; return (saved, loaded, folder)."""
    ens = EnsembleModel(members, seeds=list(range(len(members))), input_name=next(iter(batch)))
    _warm(ens, batch)
    folder = Path(ens.save_pretrained(tmp_path / "ens"))
    return ens, EnsembleModel.from_pretrained(folder, **load_kw), folder


def _assert_same_logits(saved, loaded, batch, classes):
    with torch.no_grad():
        a, b = saved(**batch), loaded(**batch)
    assert a.logits.shape[-1] == classes
    assert torch.equal(a.member_logits, b.member_logits) and torch.equal(a.logits, b.logits)


def _member_info(folder: Path, i: int = 0) -> dict:
    return json.loads((folder / f"member_{i}" / MEMBER_CONFIG_NAME).read_text())


# ----------------------------------------------------------------------------- item 11: stale build metadata


@pytest.mark.parametrize("build", [
    lambda: cifar_resnet("resnet18", num_classes=10, width=4),
    lambda: timm_model("resnet10t", num_classes=10),
], ids=["cifar_resnet", "timm_model"])
def test_reset_classifier_after_build_round_trips(tmp_path, build):
    """The issue's input: built with 10 classes, reset_classifier(3): loads (was: size mismatch for fc.weight)."""
    members = [build(), build()]
    for m in members:
        m.reset_classifier(3)
    assert build_recipe(members[0])["kwargs"]["num_classes"] == 10  # the construction-time recipe is stale
    saved, loaded, folder = _round_trip(tmp_path, members, _images())
    _assert_same_logits(saved, loaded, _images(), classes=3)
    assert _member_info(folder)["builder"]["kwargs"]["num_classes"] == 3
    assert loaded.members[0].fc.weight.shape[0] == 3 and loaded.members[0].num_classes == 3


def test_reset_classifier_pooling_only_is_saved(tmp_path):
    """Same shapes, new pooling: the stale recipe used to load silently with avg pooling (other logits)."""
    member = cifar_resnet("resnet18", num_classes=4, width=4)
    member.reset_classifier(4, global_pool="max")
    saved, loaded, folder = _round_trip(tmp_path, [member], _images())
    _assert_same_logits(saved, loaded, _images(), classes=4)
    assert loaded.members[0].global_pool.pool_type == "max"
    assert _member_info(folder)["builder"]["kwargs"] == {"arch": "resnet18", "num_classes": 4, "width": 4,
                                                         "cifar_stem": True, "global_pool": "max"}


def _vit():
    return timm_model("vit_tiny_patch16_224", num_classes=5, img_size=16, patch_size=8, depth=1, embed_dim=24,
                      num_heads=2)


def test_vit_set_input_size_after_build(tmp_path):
    """set_input_size(32) after building at 16 changes pos_embed (1, 5, 24) -> (1, 17, 24): the recipe must follow."""
    member = _vit()
    member.set_input_size(img_size=32)
    batch = _images(side=32, n=2)
    saved, loaded, folder = _round_trip(tmp_path, [member], batch)
    _assert_same_logits(saved, loaded, batch, classes=5)
    assert tuple(loaded.members[0].pos_embed.shape) == (1, 17, 24)
    assert _member_info(folder)["builder"]["kwargs"]["img_size"] == [32, 32]
    alone = timm.create_model(f"local-dir:{folder}/member_0", pretrained=True).eval()  # timm's own config too
    with torch.no_grad():
        assert torch.equal(alone(batch["pixel_values"]), saved.members[0](batch["pixel_values"]))


def test_vit_reset_classifier_with_new_pooling(tmp_path):
    member = _vit()
    member.reset_classifier(3, global_pool="avg")
    saved, loaded, _ = _round_trip(tmp_path, [member], _images())
    _assert_same_logits(saved, loaded, _images(), classes=3)
    assert loaded.members[0].global_pool == "avg"


def test_plain_timm_reset_classifier_keeps_dropout(tmp_path):
    """A plain timm member: timm's current args are recorded (3 classes) plus the construction drop rate."""
    member = timm.create_model("resnet10t", pretrained=False, num_classes=10, drop_rate=0.25)
    member.reset_classifier(3)
    saved, loaded, folder = _round_trip(tmp_path, [member], _images())
    _assert_same_logits(saved, loaded, _images(), classes=3)
    args = _member_info(folder)["model_args"]
    assert args["num_classes"] == 3 and args["drop_rate"] == 0.25 and loaded.members[0].drop_rate == 0.25


def test_small_cnn_with_a_replaced_head(tmp_path):
    """A builder without timm: its refresh reads the head (num_classes 10 -> 3)."""
    member = small_cnn(3, 10, 4, 16)
    member[-1] = nn.Linear(member[-1].in_features, 3)
    saved, loaded, folder = _round_trip(tmp_path, [member], _images())
    _assert_same_logits(saved, loaded, _images(), classes=3)
    assert _member_info(folder)["builder"]["kwargs"] == {"in_chans": 3, "num_classes": 3, "width": 4,
                                                         "image_size": 16}


def test_a_change_no_recipe_records_is_refused_at_save(tmp_path):
    """A hand-replaced timm head leaves model.num_classes at 10: saving refuses, naming the tensor, and writes nothing."""
    member = cifar_resnet("resnet18", num_classes=10, width=4)
    member.fc = nn.Linear(32, 3)
    with pytest.raises(ValueError, match=r"member_0 .* was changed after it was built") as err:
        EnsembleModel([member]).save_pretrained(tmp_path / "ens")
    assert "tensor fc.weight: model [3, 32], rebuilt [10, 32]" in str(err.value)
    assert "reset_classifier" in str(err.value)
    assert list(tmp_path.iterdir()) == []
    member.num_classes = 3  # what timm's own reset_classifier would have set: now the recipe follows
    saved, loaded, _ = _round_trip(tmp_path, [member], _images())
    _assert_same_logits(saved, loaded, _images(), classes=3)

    cnn = small_cnn(3, 10, 4, 16)
    cnn[3] = nn.Conv2d(4, 8, 5, padding=2, bias=False)
    with pytest.raises(ValueError, match=r"3\.kernel_size: model \(5, 5\), rebuilt \(3, 3\)"):
        EnsembleModel([cnn]).save_pretrained(tmp_path / "cnn")


def test_transformers_member_whose_config_is_stale(tmp_path):
    """A replaced classifier with config.num_labels left at 3 is refused; fixing the config round-trips."""
    member = tiny_albert_factory(dropout=0.0)()
    member.classifier = nn.Linear(16, 5)
    ens = EnsembleModel([member], input_name="input_ids", seeds=[0])
    with pytest.raises(ValueError, match=r"no longer matches its config.*classifier\.weight: model \[5, 16\], "
                                         r"rebuilt \[3, 16\].*num_labels"):
        ens.save_pretrained(tmp_path / "ens")
    member.config.num_labels = 5
    loaded = EnsembleModel.from_pretrained(ens.save_pretrained(tmp_path / "ens"))
    batch = {"input_ids": torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(0))}
    _assert_same_logits(ens.eval(), loaded, batch, classes=5)


# ----------------------------------------------------------------------------- tied weights in the hub format


class TiedLM(nn.Module):
    """Token ids (B, L) -> logits (B, V); the output layer may share the embedding matrix (V, d)."""

    def __init__(self, vocab: int = 11, dim: int = 6, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.emb(ids).mean(dim=1))))


@register_builder("test_hub_defects_tied_lm")
def _tied_lm_builder(vocab: int = 11, dim: int = 6) -> nn.Module:
    from sbtrainer.models import record_build

    return record_build(TiedLM(vocab, dim), "test_hub_defects_tied_lm", {"vocab": vocab, "dim": dim})


IDS = {"input_ids": torch.randint(0, 11, (4, 5), generator=torch.Generator().manual_seed(4))}


def _assert_tie_round_trip(saved, loaded, folder):
    for m in loaded.members:
        assert m.out.weight is m.emb.weight  # one tensor, not two
    with torch.no_grad():
        assert torch.equal(saved(**IDS).member_logits, loaded(**IDS).member_logits)
    info = _member_info(folder)
    assert info["tied"] == [["emb.weight", "out.weight"]]
    with safetensors.safe_open(str(folder / "member_0" / WEIGHTS_NAME), "pt") as f:
        assert len(set(f.keys()) & {"emb.weight", "out.weight"}) == 1  # written once
    assert torch.equal(loaded.members[0].emb.weight, saved.members[0].emb.weight)


@pytest.mark.parametrize("factory_ties", [True, False], ids=["factory_ties", "factory_does_not_tie"])
def test_tied_plain_module_round_trip(tmp_path, factory_ties):
    """Tied as the brief says (out.weight = emb.weight); the tie holds on reload even if the factory does not tie."""
    saved, loaded, folder = _round_trip(tmp_path, [TiedLM(), TiedLM()], IDS,
                                        factory=lambda seed: TiedLM(tie=factory_ties))
    _assert_tie_round_trip(saved, loaded, folder)


def test_tied_member_with_a_build_recipe(tmp_path):
    saved, loaded, folder = _round_trip(tmp_path, [_tied_lm_builder(), _tied_lm_builder()], IDS)
    _assert_tie_round_trip(saved, loaded, folder)


def test_untied_member_loads_untied_into_a_tying_factory(tmp_path):
    """The converse: saved untied (two different matrices), a factory that ties must not merge them."""
    member = TiedLM(tie=False)
    with torch.no_grad():
        member.out.weight.add_(1.0)
    saved, loaded, folder = _round_trip(tmp_path, [member], IDS, factory=lambda seed: TiedLM(tie=True))
    m = loaded.members[0]
    assert m.out.weight is not m.emb.weight and _member_info(folder)["tied"] == []
    assert torch.equal(m.out.weight, member.out.weight) and torch.equal(m.emb.weight, member.emb.weight)
    with torch.no_grad():
        assert torch.equal(saved(**IDS).logits, loaded(**IDS).logits)


# ----------------------------------------------------------------------------- item 10: the reduction's one home


@pytest.mark.parametrize("reduction", ["logits", "probs"])
def test_card_config_and_reload_state_the_saved_ensembles_reduction(tmp_path, reduction):
    """The config says the OTHER reduction: card, ensemble_config.json and the reload follow ensemble.reduction."""
    other = {"logits": "probs", "probs": "logits"}[reduction]
    config = make_args(tmp_path, ensemble_method="sam", num_members=2, member_seeds=[7, 8], ensemble_reduction=other)
    ens = EnsembleModel.from_factory(lambda s: small_cnn(3, 4, 4, 16), 2, [7, 8], reduction=reduction)
    batch = _images()
    _warm(ens, batch)
    folder = Path(ens.save_pretrained(tmp_path / "ens", config=config))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["reduction"] == reduction and "ensemble_reduction" not in meta["config"]
    assert "num_members" not in meta["config"] and meta["config"]["rho"] == config.rho
    card = (folder / "README.md").read_text()
    assert f"The ensemble's prediction is {R.REDUCTION_TEXT[reduction]}." in card
    assert f'reduction="{reduction}"' in card and f'reduction="{other}"' not in card
    assert "ensemble_reduction" not in card
    loaded = EnsembleModel.from_pretrained(folder)
    assert loaded.reduction == reduction
    with torch.no_grad():
        out, got = ens(**batch), loaded(**batch)
    assert torch.equal(got.logits, out.logits)
    assert torch.equal(got.logits, reduce_member_logits(out.member_logits, reduction))
    assert not torch.allclose(got.logits, reduce_member_logits(out.member_logits, other))


def test_config_num_members_that_disagrees_is_not_recorded(tmp_path, caplog):
    """Same kind: a config for 3 members saved with a 2-member ensemble records 2, once, and logs why."""
    ens = EnsembleModel.from_factory(lambda s: small_cnn(3, 4, 4, 16), 2, [0, 1])
    with caplog.at_level("WARNING", logger="sbtrainer.hub"):
        folder = Path(ens.save_pretrained(tmp_path / "ens", config={"num_members": 3, "rho": 0.1}))
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["num_members"] == 2 and meta["config"] == {"rho": 0.1}
    assert "config.num_members=3 differs from the ensemble being saved (2)" in caplog.text
    assert "| num_members |" not in (folder / "README.md").read_text()


# ----------------------------------------------------------------------------- item 17: what a user reads


def _table(card: str, heading: str) -> list[list[str]]:
    block = card.split(f"## {heading}\n\n")[1].split("\n## ")[0]
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in rows if not line.startswith("|:")]


def test_card_without_a_config_reads_right(tmp_path):
    """Was: '(method `ensemble`): method `ensemble`' and an empty hyper-parameters table."""
    ens = EnsembleModel.from_factory(lambda s: small_cnn(3, 4, 4, 16), 2, [7, 8])
    folder = Path(ens.save_pretrained(tmp_path / "ens"))
    card = (folder / "README.md").read_text()
    assert "method `ensemble`" not in card and "(method" not in card
    assert "# sbtrainer ensemble\n\nAn ensemble saved with `sbtrainer`. How it was trained was not recorded: it was " \
           "saved without its training config.\n" in card
    assert "2 members (module). The ensemble's prediction is the mean of the members' logits " \
           "(`reduction=\"logits\"`). Non-transformers members read the batch column `pixel_values`." in card
    recipe = "`torch.nn.modules.container.Sequential`, built by `sbtrainer.models.small_cnn(in_chans=3, " \
             "num_classes=4, width=4, image_size=16)`"
    assert _table(card, "Ensemble") == [["member", "kind", "architecture", "seed"],
                                        ["member_0", "module", recipe, "7"], ["member_1", "module", recipe, "8"]]
    assert "## Hyper-parameters\n\nNot recorded: the ensemble was saved without its training config.\n" in card
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["method"] is None and meta["config"] == {} and meta["member_seeds"] == [7, 8]


def test_card_with_an_unknown_method_and_unknown_seeds(tmp_path):
    """Same kind: a method sbtrainer does not describe, and members built without recorded seeds."""
    members = [small_cnn(3, 4, 4, 16), small_cnn(3, 4, 4, 16)]
    ens = EnsembleModel(members)  # no seeds
    folder = Path(ens.save_pretrained(tmp_path / "ens", config={"ensemble_method": "swa", "lr": 0.1}))
    card = (folder / "README.md").read_text()
    assert "# swa ensemble\n\nAn ensemble trained with `sbtrainer`, with the method named `swa`.\n" in card
    assert "method `swa`: method" not in card
    assert [row[3] for row in _table(card, "Ensemble")[1:]] == ["not recorded", "not recorded"]  # not a made-up 0, 1
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["member_seeds"] is None and [m["seed"] for m in meta["members"]] == [None, None]
    seen = []
    loaded = EnsembleModel.from_pretrained(folder, factory=lambda s: seen.append(s) or small_cnn(3, 4, 4, 16))
    assert seen == [0, 1] and loaded.seeds is None  # a factory gets the member index when no seed is known


def _figure_of(monkeypatch, results, tmp_path):
    captured = {}
    save = R._save

    def keep(fig, path, dpi):
        captured["fig"] = fig
        return save(fig, path, dpi)

    monkeypatch.setattr(R, "_save", keep)
    R.plot_member_vs_ensemble(results, tmp_path / "fig.png")
    return captured["fig"].axes[0]


def test_member_vs_ensemble_labels_match_bar_heights(monkeypatch, tmp_path):
    """The issue's input (member 98.22, ensemble 98.00: the top was labelled 98.00) and a positive gain."""
    results = {"sam": {"eval_member_accuracy": 0.9822, "eval_ensemble_accuracy": 0.9800},
               "sharpbalance": {"eval_member_accuracy": 0.9573, "eval_ensemble_accuracy": 0.9618}}
    ax = _figure_of(monkeypatch, results, tmp_path)
    bars = [p for p in ax.patches if p.get_width() > 0]
    tops = {}
    for bar in bars:  # the top edge of everything drawn at each x (a negative-height bar's top is its y)
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, -1e9), bar.get_y(), bar.get_y() + bar.get_height())
    assert tops == pytest.approx({0: 98.22, 1: 96.18})
    labels = {t.get_gid(): t for t in ax.texts}
    expect = {"member-0": 98.22, "ensemble-0": 98.00, "gain-0": -0.22,
              "member-1": 95.73, "ensemble-1": 96.18, "gain-1": 0.45}
    for gid, value in expect.items():
        text = labels[gid].get_text()
        assert float(text) == pytest.approx(value, abs=5e-3), gid
        if not gid.startswith("gain"):
            assert labels[gid].xy[1] == pytest.approx(value), gid  # each number sits at its own height
    for x in (0, 1):  # the label above the bars reads the top of the bars
        above = [t for t in ax.texts if t.get_gid() != f"gain-{x}" and t.get_gid().endswith(f"-{x}")
                 and t.get_va() == "bottom"]
        assert len(above) == 1 and float(above[0].get_text()) == pytest.approx(tops[x], abs=5e-3)


def test_pyproject_license_is_spdx():
    toml = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")
    project = toml.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["license"] == "MIT"  # the SPDX form: no setuptools deprecation warning
    requires = project["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires)


def test_no_docstring_cites_design_md():
    """Users do not have DESIGN.md: no module of the installed package may send them there."""
    package = Path(sbtrainer.__file__).parent
    cited = [str(p.relative_to(package)) for p in package.rglob("*.py") if "DESIGN" in p.read_text()]
    assert cited == []


def test_an_unregistered_builder_is_saved_unchecked(tmp_path, caplog):
    """A recipe whose builder is not registered cannot be checked: saved with a warning, loaded with factory=."""
    from sbtrainer.models import record_build

    member = record_build(TiedLM(tie=False), "test_hub_defects_not_registered", {"vocab": 11})
    with caplog.at_level("WARNING", logger="sbtrainer.hub"):
        folder = EnsembleModel([member], input_name="input_ids").save_pretrained(tmp_path / "ens")
    assert "'test_hub_defects_not_registered', which is not registered here" in caplog.text
    loaded = EnsembleModel.from_pretrained(folder, factory=lambda seed: TiedLM(tie=False))
    with torch.no_grad():
        assert torch.equal(loaded(**IDS).logits, EnsembleModel([member], input_name="input_ids")(**IDS).logits)
