"""``--help`` of every recipe script, and the parsers behind it (issue 8, item 1: text handed to a formatter).

argparse formats every help string with ``%`` (``help % {"default": ...}``), so a bare ``%`` in any
field's help ("k% lowest") crashes ``--help`` with ``TypeError: %o format``. Every script in
``recipes/`` that has a command line (a ``__main__`` block) is found by globbing, so a new recipe is
covered without editing this file. A second case of the same kind: a YAML value that is a mapping
handed to a JSON option (``model_kwargs: {depth: 1}``) must reach the recipe as JSON, not as Python's
``repr`` (which JSON cannot parse).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import HfArgumentParser

from sbtrainer import SharpBalanceConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
sys.path.insert(0, str(RECIPES))

SCRIPTS = sorted(p.name for p in RECIPES.glob("*.py") if 'if __name__ == "__main__"' in p.read_text())


def _init_fields(cls: type) -> list[str]:
    """The fields HfArgumentParser turns into flags (``init=True`` ones)."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _expected_flags(script: str) -> set[str]:
    """Every flag the script's ``--help`` must list: its argument dataclasses' fields, SharpBalanceConfig's
    fields when it parses with ``recipe_utils.parse_args``, and every ``add_argument("--x")`` of its source."""
    module = importlib.import_module(script.removesuffix(".py"))
    flags: set[str] = set()
    for obj in vars(module).values():
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == module.__name__:
            flags |= set(_init_fields(obj))
    import recipe_utils

    if getattr(module, "parse_args", None) is recipe_utils.parse_args:
        flags |= set(_init_fields(SharpBalanceConfig))
    flags |= set(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", (RECIPES / script).read_text()))
    return flags


def _listed(help_text: str, name: str) -> bool:
    return re.search(rf"(?<![\w-])--{re.escape(name)}(?![\w-])", help_text) is not None


def test_the_glob_finds_the_recipes():
    assert {"albert_mrpc.py", "cifar_resnet.py", "quickstart.py", "tradeoff.py", "vit_cifar100.py"} <= set(SCRIPTS)
    assert "recipe_utils.py" not in SCRIPTS and "cifar_data.py" not in SCRIPTS  # helpers, no command line


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_lists_every_field(script):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RECIPES / script), "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    missing = sorted(f for f in _expected_flags(script) if not _listed(proc.stdout, f))
    assert missing == [], f"{script} --help does not list {missing}"
    if getattr(importlib.import_module(script.removesuffix(".py")), "parse_args", None).__module__ == "recipe_utils":
        for name in ("sam_fraction", "scoring_start_epoch", "rho", "member_seeds", "subset_seed", "num_threads"):
            assert _listed(proc.stdout, name), name


def test_sharpbalance_config_help_lists_every_field():
    text = HfArgumentParser(SharpBalanceConfig).format_help()
    missing = [f for f in _init_fields(SharpBalanceConfig) if not _listed(text, f)]
    assert missing == []
    own = [f.name for f in dataclasses.fields(SharpBalanceConfig) if f.name not in
           {g.name for g in dataclasses.fields(SharpBalanceConfig.__mro__[1])}]
    assert {"sam_fraction", "scoring_start_epoch", "selection", "residual"} <= set(own)


@pytest.mark.parametrize("cls_path", ["cifar_resnet.CifarArgs", "tradeoff.TradeoffArgs", "vit_cifar100.VitArgs",
                                      "albert_mrpc.MrpcArgs"])
def test_every_recipe_help_string_survives_argparse_formatting(cls_path):
    """The recipe's own fields alone (independent of SharpBalanceConfig): no help text breaks argparse's ``%``."""
    module, name = cls_path.split(".")
    cls = getattr(importlib.import_module(module), name)
    text = HfArgumentParser(cls).format_help()
    assert [f for f in _init_fields(cls) if not _listed(text, f)] == []
    for f in dataclasses.fields(cls):
        help_text = f.metadata.get("help", "")
        assert re.search(r"%(?!\()", help_text.replace("%%", "")) is None, f"bare % in the help of {f.name}"


def test_yaml_mapping_reaches_a_json_option_as_json(tmp_path):
    """``model_kwargs: {depth: 1, embed_dim: 24}`` in a YAML, read alone or with flags, gives the same dict."""
    import vit_cifar100
    from recipe_utils import _yaml_argv, parse_args

    cfg = tmp_path / "vit.yaml"
    cfg.write_text(f"model_kwargs: {{depth: 1, embed_dim: 24}}\npretrained: false\noutput_dir: {tmp_path}\n")
    assert _yaml_argv(str(cfg))[:2] == ["--model_kwargs", '{"depth": 1, "embed_dim": 24}']
    alone, _ = parse_args(vit_cifar100.VitArgs, [str(cfg)])
    with_flags, config = parse_args(vit_cifar100.VitArgs, [str(cfg), "--image_size", "32"])
    assert with_flags.image_size == 32 and config.output_dir == str(tmp_path)
    assert vit_cifar100.model_kwargs(alone.model_kwargs) == {"depth": 1, "embed_dim": 24}
    assert vit_cifar100.model_kwargs(with_flags.model_kwargs) == {"depth": 1, "embed_dim": 24}
