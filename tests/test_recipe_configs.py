"""The recipe YAMLs hold the paper's hyper-parameters (Table 1, App. D.2-D.3) and parse with their recipe's parser."""

from __future__ import annotations

import math
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
               "albert_": MrpcArgs}
ALL = sorted(p.name for p in CONFIGS.glob("*.yaml"))
CIFAR = [n for n in ALL if n.startswith(("cifar10_", "cifar100_", "tradeoff_"))]
METHODS = ("deep_ensemble", "sam", "sharpbalance")


def _parse(name: str, tmp_path: Path | None = None):
    cls = next(c for prefix, c in RECIPE_ARGS.items() if name.startswith(prefix))
    argv = [str(CONFIGS / name)]
    if tmp_path is not None:
        argv += ["--output_dir", str(tmp_path)]
    return parse_args(cls, argv)


def _method(name: str) -> str:
    return next(m for m in METHODS if name.removesuffix(".yaml").endswith(m))


def test_every_recipe_and_method_has_a_config():
    expected = {f"{task}_{m}.yaml" for task in ("cifar10", "cifar100", "vit_cifar100", "albert_mrpc") for m in METHODS}
    assert expected | {"tradeoff_cifar10.yaml"} == set(ALL)


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
    cifar100 = name.startswith("cifar100_")
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
        assert albert_cfg.score_method == "loop"
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
