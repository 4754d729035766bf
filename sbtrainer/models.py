"""Model builders the recipes, tests and benchmarks share, each recording how to rebuild what it built.

`cifar_resnet`: a timm ResNet with the CIFAR stem of the paper's ResNet18 (He et al., 2016; the
authors' release): a 3x3 stride-1 first convolution and no max-pool, so a 32x32 input ends as a
4x4 map. timm has no such variant and its Hub format cannot express the change, so every builder
here attaches its *build recipe* ``{"builder": name, "kwargs": {...}}`` to the module it returns
(attribute :data:`BUILD_ATTR`). `sbtrainer.hub` saves the recipe next to the weights and
:func:`build_from_recipe` rebuilds the module before the weights are loaded.

A recipe is written when the module is built, but the module can change afterwards (timm's
``reset_classifier(3)``, ``set_input_size(...)``, a replaced head). So a saved recipe is never the
construction-time one as is: :func:`current_recipe` updates it from the module as it is at save time
(each builder may register a ``refresh`` function for that), and :func:`architecture_differences`
compares the module with one rebuilt from the recipe (submodule classes and their plain settings,
tensor names and shapes, which names share one tensor), so a change no recipe can express is
reported instead of being saved as a folder that does not load.

Builders: :func:`cifar_resnet` (CIFAR ResNets), :func:`cifar_wide_resnet` (CIFAR WideResNets such as
WRN-40-2, the paper's Fig. 13), :func:`timm_model` (any timm architecture, e.g.
``vit_tiny_patch16_224``), :func:`small_cnn` (the quickstart's CNN for small grayscale or colour
images). Register your own with :func:`register_builder`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

BUILD_ATTR = "sbtrainer_build"
"""Name of the attribute holding a module's build recipe ``{"builder": str, "kwargs": dict}``."""

BUILDERS: dict[str, Callable[..., nn.Module]] = {}
Refresh = Callable[[nn.Module, dict[str, Any]], dict[str, Any]]
REFRESHERS: dict[str, Refresh] = {}
"""``refresh(model, kwargs) -> kwargs``: a builder's recipe kwargs updated to describe ``model`` as it is now."""


def register_builder(
    name: str, *, refresh: Refresh | None = None
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: make ``fn`` rebuildable by name (``build_from_recipe({"builder": name, ...})``).

    The decorated function must take JSON-serialisable keyword arguments and build the same
    architecture (random init) every time it is called with the same arguments. ``refresh(model,
    kwargs)``, when given, returns the kwargs that rebuild ``model`` as it is now (after changes made
    since it was built, e.g. a new classifier); :func:`current_recipe` calls it before a save.
    """

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BUILDERS and BUILDERS[name] is not fn:
            raise ValueError(f"register_builder: a builder named {name!r} is already registered")
        BUILDERS[name] = fn
        if refresh is not None:
            REFRESHERS[name] = refresh
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
    """The build recipe recorded on ``model`` when it was built (a copy), or ``None`` if it was not built here.

    It describes the module at construction; use :func:`current_recipe` for the module as it is now.
    """
    recipe = getattr(model, BUILD_ATTR, None)
    return copy.deepcopy(recipe) if recipe is not None else None


def current_recipe(model: nn.Module) -> dict[str, Any] | None:
    """The build recipe of ``model`` as it is now, or ``None`` if it was not built by a registered builder.

    The construction-time recipe passed through the builder's ``refresh`` function (if it has one),
    so e.g. ``cifar_resnet(num_classes=10)`` followed by ``reset_classifier(3)`` gives
    ``num_classes=3``. Whether the recipe really rebuilds ``model`` is checked separately by
    :func:`architecture_differences` (`sbtrainer.hub` does both before writing a member).
    """
    recipe = build_recipe(model)
    if recipe is None:
        return None
    refresh = REFRESHERS.get(recipe.get("builder"))
    if refresh is not None:
        kwargs = refresh(model, copy.deepcopy(recipe.get("kwargs", {})))
        try:
            recipe["kwargs"] = json.loads(json.dumps(kwargs))
        except (TypeError, ValueError) as err:
            raise ValueError(f"current_recipe: refreshed kwargs of builder {recipe['builder']!r} are not "
                             f"JSON-serialisable: {kwargs!r}") from err
    return recipe


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its tensors on the meta device (no memory, no init cost); on the CPU if that fails.

    Used to compare architectures only: a meta module has shapes but no values.
    """
    try:
        with torch.device("meta"):
            return build()
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError) as err:
        logger.debug("building on the meta device failed (%s); building on the CPU", err)
        return build()


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


def set_stem_channels(model: nn.Module, channels: int) -> nn.Module:
    """Give a timm ResNet's single-conv stem ``channels`` output channels (timm fixes it at 64).

    A width-``w`` ResNet (stage widths ``w, 2w, 4w, 8w``, as in the width sweeps of Nakkiran et al.,
    2020, and the SharpBalance paper's Fig. 5b) has a ``w``-channel stem; timm's plain stem is 64
    channels whatever the stage widths, which at ``w = 8`` on 32x32 inputs made the stem and the
    projection shortcut it forces on the first block ~60% of a training step. The stem conv, its norm
    and the first block's input (its first conv and its shortcut) are rebuilt at ``channels`` with
    timm's init (Kaiming normal, fan-out; norm weight 1, bias 0); the first block's projection
    shortcut is dropped where it now maps ``channels`` to ``channels`` at stride 1. A no-op where the
    stem already has ``channels`` outputs (``w = 64``: the standard ResNet18 is unchanged).

    Raises:
        ValueError: ``model`` has no ``conv1``/``bn1``/``layer1`` (not a timm ResNet with a plain stem).
    """
    conv, norm = getattr(model, "conv1", None), getattr(model, "bn1", None)
    layer1 = getattr(model, "layer1", None)
    if not isinstance(conv, nn.Conv2d) or not isinstance(norm, nn.BatchNorm2d) or not layer1:
        raise ValueError(f"set_stem_channels: expected a timm ResNet with a single-conv stem (conv1, bn1, layer1); "
                         f"got {type(model).__name__}")
    if conv.out_channels == channels:
        return model

    def conv_like(old: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
        new = nn.Conv2d(in_channels, out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        return new

    model.conv1 = conv_like(conv, conv.in_channels, channels)
    model.bn1 = nn.BatchNorm2d(channels, eps=norm.eps, momentum=norm.momentum)
    block = layer1[0]
    block.conv1 = conv_like(block.conv1, channels, block.conv1.out_channels)
    shortcut = getattr(block, "downsample", None)
    if shortcut is not None:  # [conv, norm] or, with timm's avg_down, [pool or Identity, conv, norm]
        at = next((i for i, m in enumerate(shortcut) if isinstance(m, nn.Conv2d)), None)
        if at is None:
            raise ValueError(f"set_stem_channels: the first block's shortcut has no conv to rebuild: {shortcut}")
        old = shortcut[at]
        if (old.out_channels == channels and tuple(old.stride) == (1, 1)
                and all(isinstance(m, (nn.Identity, nn.Conv2d, nn.BatchNorm2d)) for m in shortcut)):
            block.downsample = None
        else:
            shortcut[at] = conv_like(old, channels, old.out_channels)
    for info in getattr(model, "feature_info", []) or []:
        if info.get("module") == "act1":
            info["num_chs"] = channels
    return model


# ----------------------------------------------------------------------------- what a module is now


def timm_model_args(model: nn.Module) -> dict[str, Any]:
    """timm's reconstruction arguments of ``model`` as it is now (JSON-serialisable values only).

    With timm's ``get_model_args`` (timm >= 1.0.2x), which follows ``reset_classifier`` and
    ``set_input_size``: the ``create_model`` keyword arguments plus the current ``num_classes``,
    ``in_chans``, ``global_pool`` and ``img_size``; dropout rates are added from the construction
    arguments (timm leaves them out). With an older timm: the current ``num_classes`` only.
    """
    try:
        from timm.models._input import get_model_args
    except ImportError:
        args: dict[str, Any] = {"num_classes": getattr(model, "num_classes", None)}
    else:
        built = getattr(model, "_model_args", {}) or {}
        drops = {k: v for k, v in built.items() if k.endswith("drop_rate")}
        args = get_model_args(model, drops)
    out = {}
    for key, value in args.items():
        try:
            out[key] = json.loads(json.dumps(value))
        except (TypeError, ValueError):
            logger.debug("timm model arg %s=%r is not serialisable: not recorded", key, value)
    return out


def _refresh_timm_recipe(builder: str, skip: tuple[str, ...] = ()) -> Refresh:
    """A ``refresh`` for builders over ``timm.create_model``: copy every timm argument that differs now.

    The live module's :func:`timm_model_args` are compared with those of a module rebuilt (on the
    meta device) from the construction recipe; each argument that differs, except ``skip`` (ones the
    builder sets itself), is written into the recipe, where the builder passes it to ``create_model``.
    """

    def refresh(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        now = timm_model_args(model)
        built = json.loads(_built_timm_args(builder, json.dumps(kwargs, sort_keys=True)))
        for key, value in now.items():
            if key not in skip and built.get(key) != value:
                kwargs[key] = value
        return kwargs

    return refresh


@functools.lru_cache(maxsize=32)
def _built_timm_args(builder: str, kwargs_json: str) -> str:
    """JSON of :func:`timm_model_args` of ``BUILDERS[builder](**kwargs)`` (a builder is deterministic: cached)."""
    return json.dumps(timm_model_args(build_on_meta(lambda: BUILDERS[builder](**json.loads(kwargs_json)))))


def _refresh_small_cnn(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """in_chans, width, num_classes and image_size read from the first conv and the linear head."""
    first, head = (model[0], model[-1]) if isinstance(model, nn.Sequential) and len(model) else (None, None)
    if not isinstance(first, nn.Conv2d) or not isinstance(head, nn.Linear):
        return kwargs  # restructured: architecture_differences reports it
    width = first.out_channels
    kwargs.update(in_chans=first.in_channels, width=width, num_classes=head.out_features)
    side = math.isqrt(head.in_features // (2 * width)) if head.in_features % (2 * width) == 0 else 0
    if side and 2 * width * side * side == head.in_features:
        kwargs["image_size"] = 2 * side
    return kwargs


_IGNORED_ATTRS = frozenset({"training"})
"""Module attributes that are run state, not architecture."""


def _plain(value: Any) -> Any:
    """``value`` if it is plain data (numbers, strings, None, tuples/lists of them; lists as tuples), else a miss."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        items = tuple(_plain(v) for v in value)
        return _MISS if _MISS in items else items
    return _MISS


_MISS = object()


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Groups of ``state_dict`` names that hold one tensor (tied weights), each sorted, e.g. ``[["emb.weight", "out.weight"]]``."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


def architecture_summary(model: nn.Module, settings: bool = True) -> dict[str, Any]:
    """What a rebuilt module must match: tensor names and shapes, tied groups and (``settings``) submodules.

    ``"modules"``: ``{name: (class, {attribute: value})}`` over every submodule, with its plain-data
    attributes (e.g. a pooling type, a kernel size, a patch grid) that are not private; ``"tensors"``:
    ``{state_dict name: shape}``; ``"tied"``: :func:`tied_groups`.
    """
    summary: dict[str, Any] = {
        "tensors": {n: tuple(t.shape) for n, t in model.state_dict(keep_vars=True).items()},
        "tied": tied_groups(model),
    }
    if settings:
        modules = {}
        for name, module in model.named_modules():
            attrs = {k: _plain(v) for k, v in vars(module).items() if not k.startswith("_") and k not in _IGNORED_ATTRS}
            modules[name] = (type(module).__qualname__, {k: v for k, v in attrs.items() if v is not _MISS})
        summary["modules"] = modules
    return summary


def architecture_differences(model: nn.Module, rebuilt: nn.Module | dict[str, Any], settings: bool = True,
                             limit: int = 5) -> list[str]:
    """How ``rebuilt`` (e.g. from a saved recipe) differs from ``model``: at most ``limit`` lines, ``[]`` if none.

    Compares :func:`architecture_summary` of both (with ``settings=False``: tensors and ties only, for
    modules whose attributes are not all architecture, such as transformers models). ``rebuilt`` may
    be given as its summary already.
    """
    now = architecture_summary(model, settings)
    new = rebuilt if isinstance(rebuilt, dict) else architecture_summary(rebuilt, settings)
    out: list[str] = []
    for name in sorted(set(now["tensors"]) | set(new["tensors"])):
        a, b = now["tensors"].get(name), new["tensors"].get(name)
        if a != b:
            out.append(f"tensor {name}: model {'absent' if a is None else list(a)}, rebuilt "
                       f"{'absent' if b is None else list(b)}")
    if now["tied"] != new["tied"]:
        out.append(f"tied tensors: model {now['tied']}, rebuilt {new['tied']}")
    if settings:
        for name in sorted(set(now["modules"]) | set(new["modules"])):
            a, b = now["modules"].get(name), new["modules"].get(name)
            if a is None or b is None or a[0] != b[0]:
                out.append(f"submodule {name or '<root>'}: model {a[0] if a else 'absent'}, rebuilt {b[0] if b else 'absent'}")
                continue
            for key in sorted(set(a[1]) | set(b[1])):
                if a[1].get(key, _MISS) != b[1].get(key, _MISS):
                    out.append(f"{name or '<root>'}.{key}: model {a[1].get(key, 'absent')!r}, rebuilt "
                               f"{b[1].get(key, 'absent')!r}")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else [])


# ----------------------------------------------------------------------------- builders


@register_builder("cifar_resnet", refresh=_refresh_timm_recipe("cifar_resnet", skip=("channels", "stem_width")))
def cifar_resnet(
    arch: str = "resnet18", num_classes: int = 10, width: int = 64, cifar_stem: bool = True, **kwargs
) -> nn.Module:
    """A timm ResNet (random init) with stage widths ``(w, 2w, 4w, 8w)`` and, by default, the CIFAR stem.

    ``width=64`` is the standard ResNet18 (11.17M parameters with the CIFAR stem and 10 classes).
    Input ``(B, 3, H, W)``, logits ``(B, num_classes)``. The module carries its build recipe.
    """
    channels = (width, 2 * width, 4 * width, 8 * width)
    import timm  # lazy: importing the ensemble (hub -> models) must not cost timm's import time

    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, channels=channels,
                              stem_width=width, **kwargs)
    model = apply_cifar_stem(model) if cifar_stem else model
    set_stem_channels(model, width)
    recipe = {"arch": arch, "num_classes": num_classes, "width": width, "cifar_stem": cifar_stem, **kwargs}
    return record_build(model, "cifar_resnet", recipe)


@register_builder("timm_model", refresh=_refresh_timm_recipe("timm_model"))
def timm_model(model_name: str, pretrained: bool = False, num_classes: int | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(model_name, pretrained, num_classes, **kwargs)``, carrying its build recipe.

    The recipe records ``pretrained=False``: a rebuilt module gets its weights from the saved file, not
    from the Hub. E.g. ``timm_model("vit_tiny_patch16_224", pretrained=True, num_classes=100)``.
    """
    extra = {"num_classes": num_classes} if num_classes is not None else {}
    import timm

    model = timm.create_model(model_name, pretrained=pretrained, **extra, **kwargs)
    return record_build(model, "timm_model", {"model_name": model_name, "pretrained": False, **extra, **kwargs})


@register_builder("small_cnn", refresh=_refresh_small_cnn)
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


class WideBasicBlock(nn.Module):
    """The pre-activation basic block of a WideResNet (Zagoruyko & Komodakis, 2016, Fig. 1c with dropout, "B(3,3)").

    ``out = conv2(drop(relu(bn2(conv1(relu(bn1(x))))))) + shortcut``, where both convolutions are 3x3
    (``conv1`` with ``stride``) and the shortcut is ``x`` itself when the shape is kept, else a 1x1
    convolution (with ``stride``) of the pre-activated ``relu(bn1(x))``. Input ``(B, in_channels, H, W)``,
    output ``(B, out_channels, H / stride, W / stride)``. Convolutions have no bias (BatchNorm follows).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.conv2(self.drop(self.relu2(self.bn2(self.conv1(pre)))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class CifarWideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs (Zagoruyko & Komodakis, 2016, Table 1).

    A 3x3 stem of 16 channels, three groups of ``(depth - 4) / 6`` :class:`WideBasicBlock` s with
    ``16k, 32k, 64k`` channels (``k = widen_factor``; the first block of groups 2 and 3 has stride 2),
    then BatchNorm-ReLU, global average pooling and a linear head (``fc``). Input ``(B, in_chans, H, W)``
    (32x32: the last map is 8x8), logits ``(B, num_classes)``. Built by :func:`cifar_wide_resnet`.
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int, dropout: float = 0.0,
                 in_chans: int = 3) -> None:
        super().__init__()
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.stem = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g in range(3):
            blocks = [WideBasicBlock(widths[g] if b == 0 else widths[g + 1], widths[g + 1],
                                     stride=(1 if g == 0 or b > 0 else 2), dropout=dropout) for b in range(n)]
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():  # the WRN authors' init: He normal (fan_out) convs, zero linear bias
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group3(self.group2(self.group1(self.stem(x))))
        return self.fc(self.flatten(self.pool(self.relu(self.bn(x)))))


def _refresh_wide_resnet(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``num_classes`` read from the linear head ``fc`` (e.g. after it was replaced)."""
    head = getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        kwargs["num_classes"] = head.out_features
    return kwargs


@register_builder("cifar_wide_resnet", refresh=_refresh_wide_resnet)
def cifar_wide_resnet(depth: int = 40, widen_factor: int = 2, num_classes: int = 10, dropout: float = 0.0,
                      in_chans: int = 3) -> nn.Module:
    """A CIFAR WideResNet WRN-``depth``-``widen_factor`` (random init), carrying its build recipe.

    The standard definition (Zagoruyko & Komodakis, 2016; see :class:`CifarWideResNet`). The default is
    WRN-40-2, the WideResNet of the SharpBalance paper's Fig. 13: 6 blocks per group, widths 32, 64, 128,
    2,243,546 parameters with 10 classes and 2,255,156 with 100. ``dropout`` is applied between the two
    convolutions of every block (0: none, as in the paper's runs and the authors' release).

    Raises:
        ValueError: ``depth`` not of the form ``6n + 4`` with ``n >= 1``, ``widen_factor < 1``,
            ``num_classes < 1``, ``in_chans < 1`` or ``dropout`` outside ``[0, 1)``.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"cifar_wide_resnet: depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...); got {depth!r}")
    for name, value in (("widen_factor", widen_factor), ("num_classes", num_classes), ("in_chans", in_chans)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"cifar_wide_resnet: {name} must be an integer >= 1; got {value!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"cifar_wide_resnet: dropout must be in [0, 1); got {dropout!r}")
    model = CifarWideResNet(depth, widen_factor, num_classes, float(dropout), in_chans)
    recipe = {"depth": depth, "widen_factor": widen_factor, "num_classes": num_classes, "dropout": float(dropout),
              "in_chans": in_chans}
    return record_build(model, "cifar_wide_resnet", recipe)


def is_timm_model(model: nn.Module) -> bool:
    """True for a module built by ``timm.create_model`` (it carries timm's ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", None)
    return isinstance(cfg, dict) and "architecture" in cfg
