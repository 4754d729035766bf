"""The recipe YAMLs hold the paper's hyper-parameters (Table 1, App. D.2-D.3, F.2) and parse with their recipe's parser.

Where the paper is silent, a YAML value is our choice and its line says so: an inline comment starting
``ours:`` (checked here for the WRN-40-2 and TinyImageNet configs, key by key).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
sys.path.insert(0, str(ROOT / "recipes"))

from albert_mrpc import MrpcArgs  # noqa: E402
from cifar_resnet import CifarArgs  # noqa: E402
from recipe_utils import paper_sgd, parse_args  # noqa: E402
from tradeoff import TradeoffArgs  # noqa: E402
from vit_cifar100 import VitArgs  # noqa: E402

from sbtrainer import EnsembleModel, SharpBalanceTrainer  # noqa: E402

RECIPE_ARGS = {"cifar10_": CifarArgs, "cifar100_": CifarArgs, "tradeoff_": TradeoffArgs, "vit_": VitArgs,
               "albert_": MrpcArgs, "wrn40_2_": CifarArgs, "tinyimagenet_": CifarArgs}
ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
CIFAR = [n for n in ALL if n.startswith(("cifar10_", "cifar100_", "tradeoff_"))]
METHODS = ("deep_ensemble", "sam", "sharpbalance")
WRN = [f"wrn40_2_{ds}_{m}.yaml" for ds in ("cifar10", "cifar100") for m in METHODS]
TINY = [f"tinyimagenet_{m}.yaml" for m in METHODS]

# The paper's values the WRN-40-2 and TinyImageNet configs rely on.
D3_SGD = {"num_train_epochs": 200, "per_device_train_batch_size": 128, "learning_rate": 0.1, "momentum": 0.9,
          "weight_decay": 5e-4, "lr_milestones": [100, 150], "lr_gamma": 0.1}
"""App. D.3, both paragraphs (CIFAR-10/100 and TinyImageNet); App. F.2: WRN's "setup [is] the same as in D.3"."""
TABLE1 = {  # (dataset, method) -> rho, k, Td of Table 1 (ResNet18); "-" entries are absent
    ("cifar10", "sam"): {"rho": 0.2}, ("cifar10", "sharpbalance"): {"rho": 0.2, "sam_fraction": 0.4, "td": 100},
    ("cifar100", "sam"): {"rho": 0.2}, ("cifar100", "sharpbalance"): {"rho": 0.2, "sam_fraction": 0.5, "td": 100},
    ("tinyimagenet", "sam"): {"rho": 0.2}, ("tinyimagenet", "sharpbalance"): {"rho": 0.2, "sam_fraction": 0.3, "td": 100},
}
OURS = {  # the keys each config labels "# ours: ..." (the paper is silent on them)
    "wrn40_2_": {"rho", "sam_fraction", "wrn_dropout"},  # App. F.2 does not report WRN's chosen rho / k, nor dropout
    "tinyimagenet_": set(),  # every TinyImageNet value in the YAML is the paper's (App. D.3, Table 1)
}
_INLINE = re.compile(r"^(\w+):[^#]*#\s*(.*)$")


def _inline_comments(name: str) -> dict[str, str]:
    """``{key: comment}`` of the top-level ``key: value  # comment`` lines of a config."""
    found = (_INLINE.match(line) for line in (CONFIGS / name).read_text().splitlines())
    return {m.group(1): m.group(2) for m in found if m}


def _parse(name: str, tmp_path: Path | None = None):
    cls = next(c for prefix, c in RECIPE_ARGS.items() if name.startswith(prefix))
    argv = [str(CONFIGS / name)]
    if tmp_path is not None:
        argv += ["--output_dir", str(tmp_path)]
    return parse_args(cls, argv)


def _method(name: str) -> str:
    return next(m for m in METHODS if name.removesuffix(".yaml").endswith(m))


def test_every_recipe_and_method_has_a_config():
    tasks = ("cifar10", "cifar100", "vit_cifar100", "albert_mrpc", "wrn40_2_cifar10", "wrn40_2_cifar100", "tinyimagenet")
    expected = {f"{task}_{m}.yaml" for task in tasks for m in METHODS}
    assert expected | {"tradeoff_cifar10.yaml", "tradeoff_width_cifar10.yaml", "tradeoff_sparsity_cifar10.yaml",
                       "tradeoff_ensemble_size_cifar100.yaml", "tradeoff_curvature_cifar10.yaml"} == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_config_parses_with_its_recipe(name):
    args, config = _parse(name)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert set(raw) <= set(vars(args)) | set(vars(config))  # parse_yaml_file rejects unknown keys too
    assert config.num_members == 3 and config.member_seeds == [13, 17, 27]  # paper Table 1's seeds
    assert config.max_grad_norm == 0  # App. D.3's SGD does not clip
    assert config.ensemble_reduction == "logits"  # paper Sec. 2
    assert config.output_dir == f"outputs/{name.removesuffix('.yaml')}"
    assert (args.sharpness_batches, args.sharpness_steps, args.sharpness_rho0) == (100, 20, 0.5)  # Sec. 4.1, D.2
    if not name.startswith("tradeoff_"):
        assert config.ensemble_method == _method(name)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_configs_are_the_papers(name):
    args, config = _parse(name)
    cifar100 = name.startswith("cifar100_") or name.endswith("_cifar100.yaml")
    assert args.dataset_name == ("uoft-cs/cifar100" if cifar100 else "uoft-cs/cifar10")
    assert args.label_column == ("fine_label" if cifar100 else "label")
    assert (args.arch, args.model_width) == ("resnet18", 64)
    assert config.num_train_epochs == 200 and config.per_device_train_batch_size == 128
    assert config.learning_rate == 0.1 and args.momentum == 0.9 and config.weight_decay == 5e-4
    assert args.lr_milestones == [100, 150] and args.lr_gamma == 0.1
    assert config.remove_unused_columns is False
    method = "sharpbalance" if name.startswith("tradeoff_") else _method(name)
    if method != "deep_ensemble":
        assert config.rho == 0.2 or name.startswith("tradeoff_")
    if method == "sharpbalance":
        assert config.sam_fraction == (0.5 if cifar100 else 0.4)  # Table 1
        assert config.scoring_start_epoch == 100  # Td, Table 1
        assert (config.selection, config.residual) == ("highest", "none")  # the paper text


def test_tradeoff_sweeps_the_papers_radii():
    args, _ = _parse("tradeoff_cifar10.yaml")
    assert args.rhos == [0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.3]  # App. D.2, Fig. 1
    assert args.sharpbalance_rhos and all(r > 0 for r in args.sharpbalance_rhos)


@pytest.mark.parametrize("method", METHODS)
def test_vit_and_albert_configs(method):
    vit, vit_cfg = _parse(f"vit_cifar100_{method}.yaml")
    assert (vit.model_name, vit.pretrained, vit.image_size) == ("vit_tiny_patch16_224", True, 224)
    assert (vit.dataset_name, vit.label_column) == ("uoft-cs/cifar100", "fine_label")
    assert vit_cfg.per_device_train_batch_size == 128 and vit_cfg.weight_decay == 5e-4
    assert vit_cfg.optim == "sgd" and vit_cfg.optim_args == "momentum=0.9"
    albert, albert_cfg = _parse(f"albert_mrpc_{method}.yaml")
    assert albert.model_name_or_path == "albert/albert-base-v2"
    assert (albert.dataset_name, albert.dataset_config_name) == ("nyu-mll/glue", "mrpc")
    if method == "sharpbalance":
        assert vit_cfg.scoring_start_epoch == vit_cfg.num_train_epochs // 2 and vit_cfg.sam_fraction == 0.5
        assert albert_cfg.scoring_start_epoch == albert_cfg.num_train_epochs // 2
        assert albert_cfg.score_method == "auto"  # ghost norms cover ALBERT exactly (benchmarks/scoring.py)
    if method != "deep_ensemble":
        assert vit_cfg.rho == 0.2


def _tiny_ensemble():
    return EnsembleModel.from_factory(
        lambda _: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)), 3, [13, 17, 27])


def test_vit_yaml_optimizer_really_has_momentum(tmp_path):
    """transformers' optim='sgd' reads momentum from optim_args; check the optimizer the Trainer builds."""
    _, config = _parse("vit_cifar100_sharpbalance.yaml", tmp_path)
    trainer = SharpBalanceTrainer(model=_tiny_ensemble(), args=config)
    opt = trainer.create_optimizer()
    assert isinstance(opt, torch.optim.SGD)
    assert {g["momentum"] for g in opt.param_groups} == {0.9}
    assert {g["weight_decay"] for g in opt.param_groups} == {5e-4, 0.0}  # biases and LayerNorm exempt, as usual


def test_cifar_yaml_optimizer_is_the_papers(tmp_path):
    """The CIFAR recipes' own SGD: momentum 0.9, weight decay on EVERY parameter, x0.1 at epochs 100 and 150."""
    args, config = _parse("cifar10_sharpbalance.yaml", tmp_path)
    ensemble = _tiny_ensemble()
    opt, sched = paper_sgd(ensemble, config, 50_000, args.momentum, args.lr_milestones, args.lr_gamma)
    (group,) = opt.param_groups
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.1, 0.9, 5e-4, False)
    assert len(group["params"]) == len(list(ensemble.parameters()))
    steps_per_epoch = math.ceil(50_000 / 128)
    assert dict(sched.milestones) == {100 * steps_per_epoch: 1, 150 * steps_per_epoch: 1}
    assert sched.gamma == 0.1


@pytest.mark.parametrize("name", WRN + TINY)
def test_wrn_and_tinyimagenet_configs_are_the_papers(name):
    """WRN-40-2 (App. F.2, Fig. 13) and TinyImageNet (App. D.3, Table 1): the paper's values; ours labelled."""
    args, config = _parse(name)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    method, tiny = _method(name), name.startswith("tinyimagenet_")
    dataset = "tinyimagenet" if tiny else name.split("_")[2]
    got = {"num_train_epochs": config.num_train_epochs, "per_device_train_batch_size": config.per_device_train_batch_size,
           "learning_rate": config.learning_rate, "momentum": args.momentum, "weight_decay": config.weight_decay,
           "lr_milestones": args.lr_milestones, "lr_gamma": args.lr_gamma}
    assert got == D3_SGD
    assert config.remove_unused_columns is False and config.ensemble_method == method
    table = TABLE1.get((dataset, method), {})
    assert ("rho" in raw) == ("rho" in table) and ("sam_fraction" in raw) == ("sam_fraction" in table)
    if "rho" in table:
        assert config.rho == table["rho"]  # Table 1; for WRN our choice: the same dataset's ResNet18 value
    if method == "sharpbalance":
        assert config.sam_fraction == table["sam_fraction"]  # k: Table 1 (TinyImageNet 0.3); ours for WRN, as rho
        assert config.scoring_start_epoch == table["td"] == 100  # Td: Table 1 wins over App. D.3's "10" (CIFAR-10)
        assert (config.selection, config.residual) == ("highest", "none")  # the paper text
    if tiny:  # App. D.1/D.3: 64x64, 200 classes, crop pad 4 + flip; ResNet18 with the release's CIFAR stem
        assert (args.dataset_name, args.label_column) == ("zh-plus/tiny-imagenet", "label")
        assert (args.image_size, args.crop_padding) == (64, 4)
        assert (args.arch, args.model_width) == ("resnet18", 64)
        assert args.tinyimagenet_c_dir is None and args.cifar_c_dir is None and args.corrupt_offline is True
    else:
        cifar100 = dataset == "cifar100"
        assert args.dataset_name == ("uoft-cs/cifar100" if cifar100 else "uoft-cs/cifar10")
        assert args.label_column == ("fine_label" if cifar100 else "label")
        assert (args.arch, args.wrn_dropout) == ("wrn-40-2", 0.0)
        assert args.image_size is None and args.crop_padding is None  # 32 px, pad 32 // 8 = 4 (App. D.3)
    ours = next(keys for prefix, keys in OURS.items() if name.startswith(prefix)) & set(raw)
    labelled = {k for k, c in _inline_comments(name).items() if c.startswith("ours:")}
    assert labelled == ours, f"{name}: labelled ours {sorted(labelled)}, expected {sorted(ours)}"


def test_tinyimagenet_normalisation_and_crop():
    """The recipe's TinyImageNet transforms: the release's mean/std, crop 64 pad 4 (App. D.3), no resize at 64 px."""
    import numpy as np
    import torchvision.transforms as T
    from cifar_data import CIFAR_STATS, cifar_transforms
    from PIL import Image

    assert CIFAR_STATS[200] == ((0.480, 0.448, 0.397), (0.276, 0.269, 0.282))  # ours: the authors' release's values
    train_tf, eval_tf = cifar_transforms(200, 64, padding=4, resize=False)
    crop = next(t for t in train_tf.transforms if isinstance(t, T.RandomCrop))
    assert (crop.size, crop.padding) == ((64, 64), 4)
    assert not any(isinstance(t, T.Resize) for t in train_tf.transforms + eval_tf.transforms)
    image = Image.fromarray(np.full((64, 64, 3), (51, 102, 204), dtype=np.uint8))
    x = eval_tf(image)
    assert x.shape == (3, 64, 64)
    mean, std = CIFAR_STATS[200]
    expected = torch.tensor([(v / 255 - m) / s for v, m, s in zip((51, 102, 204), mean, std)])
    torch.testing.assert_close(x[:, 5, 7], expected, rtol=1e-6, atol=1e-6)
