"""The house: no import loop among sbtrainer modules, a light package face, one home per fact."""

import ast
import pathlib
import subprocess
import sys

import torch
from helpers import mlp

from sbtrainer import EnsembleModel

PACKAGE = pathlib.Path(__file__).parents[1] / "sbtrainer"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every sbtrainer module -> the sbtrainer modules it imports anywhere in its code (lazy imports included)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    deps.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("sbtrainer.")}
        graph[name] = {d for d in deps if d in modules and d != "sbtrainer"}  # `from . import __version__`: a leaf
    return graph


def test_no_import_loop_among_sbtrainer_modules():
    graph = _import_graph()

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for dep in graph[todo.pop()]:
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    loops = sorted(m for m in graph if m in reachable(m))
    assert loops == [], f"modules on an import loop: {loops}"
    assert "sbtrainer.hub" in graph["sbtrainer.ensemble"] and "sbtrainer.ensemble" not in graph["sbtrainer.hub"]


def test_pure_modules_do_not_import_the_hf_trainer():
    code = ("import sbtrainer.metrics, sbtrainer.partition, sbtrainer.sam, sbtrainer.scoring, sbtrainer.sharpness, "
            "sbtrainer.sampling, sbtrainer.ghost_norm, sys; "
            "bad = [m for m in ('transformers.trainer', 'sbtrainer.trainer', 'sbtrainer.config') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_package_face_is_lazy_and_versioned():
    code = ("import sys, sbtrainer; assert 'sbtrainer.trainer' not in sys.modules; "
            "from importlib.metadata import version; assert sbtrainer.__version__ == version('sbtrainer'); "
            "sbtrainer.SharpBalanceTrainer; assert 'sbtrainer.trainer' in sys.modules; print(sorted(sbtrainer.__all__))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SharpBalanceTrainer" in proc.stdout and "score_members" in proc.stdout


def test_the_caller_can_pass_the_model_card_text(tmp_path):
    torch.manual_seed(0)
    ens = EnsembleModel([mlp(), mlp()], reduction="probs")
    folder = ens.save_pretrained(str(tmp_path / "e"), model_card="# My card\n\nTrained by hand.\n")
    assert (tmp_path / "e" / "README.md").read_text() == "# My card\n\nTrained by hand.\n"
    loaded = EnsembleModel.from_pretrained(folder, factory=lambda _seed: mlp())
    assert type(loaded) is EnsembleModel and loaded.reduction == "probs" and not loaded.training
    x = torch.randn(4, 5)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=x).logits, ens.eval()(pixel_values=x).logits)
