"""`cifar_resnet`'s width: a width-w ResNet has a w-channel stem (timm fixes its plain stem at 64 channels)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sbtrainer.models import build_from_recipe, build_recipe, cifar_resnet, set_stem_channels


def _basic_resnet18_parameters(w: int, num_classes: int = 10) -> int:
    """ResNet18 (BasicBlock, 2-2-2-2) with a 3x3 w-channel stem and stages w, 2w, 4w, 8w, counted by hand.

    Convs have no bias; each BatchNorm has 2 parameters per channel; stages 2-4 open with a 1x1/2
    projection + BN; the head is a linear layer 8w -> num_classes with bias.
    """
    total = 3 * 9 * w + 2 * w  # stem conv + BN
    cin = w
    for i, c in enumerate((w, 2 * w, 4 * w, 8 * w)):
        for b in range(2):
            total += cin * 9 * c + 2 * c + c * 9 * c + 2 * c  # conv1 + bn1 + conv2 + bn2
            if b == 0 and i > 0:
                total += cin * c + 2 * c  # projection shortcut
            cin = c
    return total + 8 * w * num_classes + num_classes


@pytest.mark.parametrize("width", [4, 8, 16, 64])
def test_width_w_resnet18_has_a_w_channel_stem_and_the_hand_counted_parameters(width):
    model = cifar_resnet(width=width)
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride) == (
        3, width, (3, 3), (1, 1))
    assert model.bn1.num_features == width and model.layer1[0].conv1.in_channels == width
    assert model.layer1[0].downsample is None  # w -> w at stride 1: no projection
    assert sum(p.numel() for p in model.parameters()) == _basic_resnet18_parameters(width)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_standard_resnet18_is_unchanged():
    """width 64: timm's own stem already has 64 channels; 11,173,962 parameters (the paper's CIFAR ResNet18)."""
    model = cifar_resnet(width=64)
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert set_stem_channels(model, 64) is model


def test_bottleneck_first_block_keeps_a_rebuilt_projection():
    """ResNet50 at width 8: the first block maps 8 -> 32 channels, so its projection stays, now from 8 channels."""
    model = cifar_resnet("resnet50", width=8)
    shortcut = model.layer1[0].downsample
    assert model.conv1.out_channels == 8 and model.layer1[0].conv1.in_channels == 8
    assert (shortcut[0].in_channels, shortcut[0].out_channels) == (8, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_avg_down_shortcut_is_handled():
    """timm's avg_down shortcut is [Identity or AvgPool, conv, norm]: ResNet18 w8 drops it, ResNet50 w8 rebuilds its conv."""
    assert cifar_resnet(width=8, avg_down=True).layer1[0].downsample is None
    model = cifar_resnet("resnet50", width=8, avg_down=True)
    conv = next(m for m in model.layer1[0].downsample if isinstance(m, nn.Conv2d))
    assert (conv.in_channels, conv.out_channels) == (8, 32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_rebuilt_stem_layers_follow_timms_init():
    """Kaiming normal (fan-out, ReLU gain) for the new convs, BN weight 1 and bias 0."""
    torch.manual_seed(0)
    model = cifar_resnet(width=16)
    w = model.layer1[0].conv1.weight  # 16 out channels x 3 x 3: fan-out 144, std sqrt(2 / 144)
    assert w.std().item() == pytest.approx((2 / 144) ** 0.5, rel=0.1)
    assert torch.equal(model.bn1.weight, torch.ones(16)) and torch.equal(model.bn1.bias, torch.zeros(16))


def test_recipe_rebuilds_the_same_shapes():
    model = cifar_resnet(width=8, num_classes=4)
    rebuilt = build_from_recipe(build_recipe(model))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())


def test_set_stem_channels_refuses_a_model_without_a_plain_stem():
    with pytest.raises(ValueError, match=r"^set_stem_channels: expected a timm ResNet with a single-conv stem .*Linear"):
        set_stem_channels(nn.Linear(2, 2), 8)
