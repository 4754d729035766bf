"""Model builders the recipes, tests and benchmarks share, each recording how to rebuild what it built.

`cifar_resnet`: a timm ResNet with the CIFAR stem of the paper's ResNet18 (He et al., 2016; the
authors' release): a 3x3 stride-1 first convolution and no max-pool, so a 32x32 input ends as a
4x4 map. timm has no such variant and its Hub format cannot express the change, so every builder
here attaches its *build recipe* ``{"builder": name, "kwargs": {...}}`` to the module it returns
(attribute :data:`BUILD_ATTR`). `sbtrainer.hub` saves the recipe next to the weights and
:func:`build_from_recipe` rebuilds the module before the weights are loaded.

Builders: :func:`cifar_resnet` (CIFAR ResNets), :func:`timm_model` (any timm architecture, e.g.
``vit_tiny_patch16_224``), :func:`small_cnn` (the quickstart's CNN for small grayscale or colour
images). Register your own with :func:`register_builder`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import timm
from torch import nn

BUILD_ATTR = "sbtrainer_build"
"""Name of the attribute holding a module's build recipe ``{"builder": str, "kwargs": dict}``."""

BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_builder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``fn`` rebuildable by name (``build_from_recipe({"builder": name, ...})``).

    The decorated function must take JSON-serialisable keyword arguments and build the same
    architecture (random init) every time it is called with the same arguments.
    """

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BUILDERS and BUILDERS[name] is not fn:
            raise ValueError(f"register_builder: a builder named {name!r} is already registered")
        BUILDERS[name] = fn
        return fn

    return decorate


def record_build(model: nn.Module, builder: str, kwargs: dict[str, Any]) -> nn.Module:
    """Attach the recipe ``{"builder": builder, "kwargs": kwargs}`` to ``model`` and return it.

    ``kwargs`` must be JSON-serialisable (tuples are stored as lists); raises ``ValueError`` otherwise.
    """
    try:
        stored = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as err:
        raise ValueError(f"record_build: kwargs of builder {builder!r} must be JSON-serialisable; got {kwargs!r}") from err
    setattr(model, BUILD_ATTR, {"builder": builder, "kwargs": stored})
    return model


def build_recipe(model: nn.Module) -> dict[str, Any] | None:
    """The build recipe recorded on ``model`` (a copy), or ``None`` if it was not built here."""
    recipe = getattr(model, BUILD_ATTR, None)
    return copy.deepcopy(recipe) if recipe is not None else None


def build_from_recipe(recipe: dict[str, Any]) -> nn.Module:
    """Rebuild a module (random init, same architecture) from a recipe returned by :func:`build_recipe`."""
    name = recipe.get("builder")
    if name not in BUILDERS:
        raise ValueError(f"build_from_recipe: unknown builder {name!r}; registered: {sorted(BUILDERS)}. "
                         "Register it with sbtrainer.models.register_builder, or pass factory=")
    return BUILDERS[name](**recipe.get("kwargs", {}))


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet's 7x7/2 stem conv by a 3x3/1 conv (same channels) and its max-pool by Identity."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register_builder("cifar_resnet")
def cifar_resnet(
    arch: str = "resnet18", num_classes: int = 10, width: int = 64, cifar_stem: bool = True, **kwargs
) -> nn.Module:
    """A timm ResNet (random init) with stage widths ``(w, 2w, 4w, 8w)`` and, by default, the CIFAR stem.

    ``width=64`` is the standard ResNet18 (11.17M parameters with the CIFAR stem and 10 classes).
    Input ``(B, 3, H, W)``, logits ``(B, num_classes)``. The module carries its build recipe.
    """
    channels = (width, 2 * width, 4 * width, 8 * width)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, channels=channels,
                              stem_width=width, **kwargs)
    model = apply_cifar_stem(model) if cifar_stem else model
    recipe = {"arch": arch, "num_classes": num_classes, "width": width, "cifar_stem": cifar_stem, **kwargs}
    return record_build(model, "cifar_resnet", recipe)


@register_builder("timm_model")
def timm_model(model_name: str, pretrained: bool = False, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, pretrained, num_classes, **kwargs)``, carrying its build recipe.

    The recipe records ``pretrained=False``: a rebuilt module gets its weights from the saved file, not
    from the Hub. E.g. ``timm_model("vit_tiny_patch16_224", pretrained=True, num_classes=100)``.
    """
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    model = timm.create_model(model_name, pretrained=pretrained, **extra, **kwargs)
    return record_build(model, "timm_model", {"model_name": model_name, "pretrained": False, **extra, **kwargs})


@register_builder("small_cnn")
def small_cnn(in_chans: int = 1, num_classes: int = 10, width: int = 16, image_size: int = 8) -> nn.Module:
    """Two 3x3 conv + BatchNorm + ReLU blocks, a 2x2 max-pool and a linear head (the quickstart's model).

    Input ``(B, in_chans, image_size, image_size)``, logits ``(B, num_classes)``; ``image_size`` must be even.
    """
    if image_size % 2:
        raise ValueError(f"small_cnn: image_size must be even; got {image_size}")
    model = nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * width * (image_size // 2) ** 2, num_classes),
    )
    recipe = {"in_chans": in_chans, "num_classes": num_classes, "width": width, "image_size": image_size}
    return record_build(model, "small_cnn", recipe)


def is_timm_model(model: nn.Module) -> bool:
    """True for a module built by ``timm.create_model`` (it carries timm's ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg
