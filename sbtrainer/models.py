"""Model builders the recipes, tests and benchmarks share.

`cifar_resnet`: a timm ResNet with the CIFAR stem of the paper's ResNet18 (He et al., 2016; the
authors' release): a 3x3 stride-1 first convolution and no max-pool, so a 32x32 input ends as a
4x4 map. timm has no such variant; its Hub format cannot express the change, so `sbtrainer.hub`
saves these kwargs next to the weights.
"""

from __future__ import annotations

import timm
from torch import nn


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Replace a timm ResNet's 7x7/2 stem conv by a 3x3/1 conv (same channels) and its max-pool by Identity."""
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def cifar_resnet(
    arch: str = "resnet18", num_classes: int = 10, width: int = 64, cifar_stem: bool = True, **kwargs
) -> nn.Module:
    """A timm ResNet (random init) with stage widths ``(w, 2w, 4w, 8w)`` and, by default, the CIFAR stem.

    ``width=64`` is the standard ResNet18 (11.17M parameters with the CIFAR stem and 10 classes).
    """
    channels = (width, 2 * width, 4 * width, 8 * width)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, channels=channels,
                              stem_width=width, **kwargs)
    return apply_cifar_stem(model) if cifar_stem else model
