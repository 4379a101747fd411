"""The networks GUNN is compared with (paper, Tables 3 and 4) that torchvision has no builder for.

CIFAR (32x32 input, conv3x3 stem at full resolution, as in their papers): ResNet-110, WideResNet-28-10 and
-40-10, ResNeXt-29 (16x64d), DenseNet-BC (L=190, k=40). ImageNet: DenseNet-264 and ResNeXt-101 (32x4d),
made from torchvision's classes. All are initialised as their official code (fb.resnet.torch's) does.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gunn.models.gunn import resnet_init
from gunn.models.registry import InputChannels, register_model


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, groups=groups, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)


class _Classifier(nn.Module):
    """The shared skeleton: ``stem``, ``stages``, ``head`` (a final BN-ReLU or nothing), then global average
    pooling and ``fc``."""

    stem: nn.Module
    stages: nn.Module
    head: nn.Module
    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map before global pooling."""
        return self.head(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        """Global average pooling and the classifier."""
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _finish(self, num_features: int, num_classes: int) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.fc = nn.Linear(num_features, num_classes)
        resnet_init(self)


def _bn_relu(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


# ResNet for CIFAR (He et al., 2016a, Section 4.2).


class _ShortcutA(nn.Module):
    """Option A shortcut: identity, subsampled by ``stride`` and zero-padded to ``out_channels`` (no parameters;
    the zeros follow the input's channels, as fb.resnet.torch's)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride, self.extra = stride, out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))


class _BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels)
        self.conv2, self.bn2 = _conv3x3(out_channels, out_channels), nn.BatchNorm2d(out_channels)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = _ShortcutA(in_channels, out_channels, stride) if changes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class CifarResNet(_Classifier):
    """ResNet-(6n+2) for CIFAR: conv3x3 16, three stages of n basic blocks of widths 16, 32, 64 (the second and
    third start at stride 2) with option A shortcuts, global pooling, fc."""

    def __init__(self, n: int, num_classes: int = 10, in_chans: int = 3,
                 widths: Sequence[int] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_chans, widths[0]), *_bn_relu(widths[0]))
        blocks, channels = [], widths[0]
        for index, width in enumerate(widths):
            for block in range(n):
                blocks.append(_BasicBlock(channels, width, 2 if index > 0 and block == 0 else 1))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Identity()
        self._finish(channels, num_classes)


# WideResNet (Zagoruyko & Komodakis, 2016).


class _PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the shortcut: identity, or a 1x1 convolution of the
    activated input when the shape changes (the official code's ``convdim``)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), _conv3x3(in_channels, out_channels, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(out_channels), _conv3x3(out_channels, out_channels)
        self.drop_rate = drop_rate
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = _conv1x1(in_channels, out_channels, stride) if changes else None

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(activated)), inplace=True)
        out = self.conv2(F.dropout(out, self.drop_rate, self.training) if self.drop_rate else out)
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(_Classifier):
    """WRN-depth-k: conv3x3 16, three stages of (depth - 4) / 6 pre-activation blocks of widths 16k, 32k, 64k,
    final BN-ReLU, global pooling, fc."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 10, in_chans: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got depth={depth}")
        n = (depth - 4) // 6
        self.stem = _conv3x3(in_chans, 16)
        blocks, channels = [], 16
        for index, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            for block in range(n):
                blocks.append(_PreActBlock(channels, width, 2 if index > 0 and block == 0 else 1, drop_rate))
                channels = width
        self.stages = nn.Sequential(*blocks)
        self.head = _bn_relu(channels)
        self._finish(channels, num_classes)


# ResNeXt for CIFAR (Xie et al., 2017, Section 5.3; facebookresearch/ResNeXt, models/resnext.lua).


class _ResNeXtBlock(nn.Module):
    """conv1x1-BN-ReLU, grouped conv3x3-BN-ReLU, conv1x1-BN, plus the shortcut (identity, or conv1x1-BN when
    the shape changes), then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, inner: int, cardinality: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv1x1(in_channels, inner), nn.BatchNorm2d(inner)
        self.conv2, self.bn2 = _conv3x3(inner, inner, stride, groups=cardinality), nn.BatchNorm2d(inner)
        self.conv3, self.bn3 = _conv1x1(inner, out_channels), nn.BatchNorm2d(out_channels)
        changes = stride != 1 or in_channels != out_channels
        self.shortcut = (nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
                         if changes else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x), inplace=True)


class CifarResNeXt(_Classifier):
    """ResNeXt-(9n+2) for CIFAR, C x d: conv3x3 64, three stages of n blocks whose grouped convolutions have
    C groups of d, 2d, 4d channels and whose outputs are 256, 512, 1024 wide, global pooling, fc."""

    def __init__(self, n: int, cardinality: int, base_width: int, num_classes: int = 10, in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_chans, 64), *_bn_relu(64))
        blocks, channels = [], 64
        for index, planes in enumerate((64, 128, 256)):
            inner = cardinality * (planes * base_width // 64)
            for block in range(n):
                blocks.append(_ResNeXtBlock(channels, 4 * planes, inner, cardinality,
                                            2 if index > 0 and block == 0 else 1))
                channels = 4 * planes
        self.stages = nn.Sequential(*blocks)
        self.head = nn.Identity()
        self._finish(channels, num_classes)


# DenseNet-BC for CIFAR (Huang et al., 2017b, Section 3; liuzhuang13/DenseNet, models/densenet.lua).


class _DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (4k), BN-ReLU-conv3x3 (k); its k new channels are concatenated to its input."""

    def __init__(self, in_channels: int, growth_rate: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(in_channels), _conv1x1(in_channels, 4 * growth_rate)
        self.bn2, self.conv2 = nn.BatchNorm2d(4 * growth_rate), _conv3x3(4 * growth_rate, growth_rate)

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        return torch.cat([x, self.conv2(F.relu(self.bn2(out), inplace=True))], 1)


class CifarDenseNetBC(_Classifier):
    """DenseNet-BC (L, k) for CIFAR: conv3x3 2k, three dense blocks of (L - 4) / 6 bottleneck layers with
    transitions BN-ReLU-conv1x1 (compression 0.5)-avgpool 2 between them, final BN-ReLU, global pooling, fc."""

    def __init__(self, depth: int, growth_rate: int, num_classes: int = 10, in_chans: int = 3,
                 compression: float = 0.5) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n+4, got depth={depth}")
        n = (depth - 4) // 6
        channels = 2 * growth_rate
        self.stem = _conv3x3(in_chans, channels)
        parts: list[nn.Module] = []
        for index in range(3):
            if index > 0:
                reduced = math.floor(channels * compression)
                parts += [*_bn_relu(channels), _conv1x1(channels, reduced), nn.AvgPool2d(2)]
                channels = reduced
            for _ in range(n):
                parts.append(_DenseLayer(channels, growth_rate))
                channels += growth_rate
        self.stages = nn.Sequential(*parts)
        self.head = _bn_relu(channels)
        self._finish(channels, num_classes)


@register_model
def resnet110(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """ResNet-110 (He et al., 2016a, Section 4.2): 6n+2 layers with n=18, option A shortcuts; 1,727,962 parameters
    on CIFAR-10 (1.7M)."""
    return CifarResNet(18, num_classes=num_classes, in_chans=in_chans)


@register_model
def wrn28_10(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """WRN-28-10 (Zagoruyko & Komodakis, 2016): depth 28, widen factor 10, no dropout; 36,479,194
    parameters on CIFAR-10 (36.5M)."""
    return WideResNet(28, 10, num_classes=num_classes, in_chans=in_chans)


@register_model
def wrn40_10(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """WRN-40-10 (Zagoruyko & Komodakis, 2016): depth 40, widen factor 10, no dropout; 55,841,754
    parameters on CIFAR-10 (55.8M)."""
    return WideResNet(40, 10, num_classes=num_classes, in_chans=in_chans)


@register_model
def resnext29_16x64d(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """ResNeXt-29 (Xie et al., 2017, Table 7): 3 blocks per stage, cardinality 16, width 64d; 68,155,210
    parameters on CIFAR-10 (68.1M in the paper, truncated)."""
    return CifarResNeXt(3, 16, 64, num_classes=num_classes, in_chans=in_chans)


@register_model
def densenet_bc190(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """DenseNet-BC (Huang et al., 2017b, Table 2): L=190, k=40, compression 0.5; 25,624,430 parameters
    on CIFAR-10 (25.6M)."""
    return CifarDenseNetBC(190, 40, num_classes=num_classes, in_chans=in_chans)


@register_model
def densenet264(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """DenseNet-264 (Huang et al., 2017b, Table 1): k=32, blocks of 6, 12, 64, 48 layers; 33,337,704 parameters
    (33.3M)."""
    from torchvision.models import DenseNet

    network = DenseNet(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64, num_classes=num_classes)
    resnet_init(network)  # the official code's: torchvision draws convolutions by fan-in
    return network if in_chans == 3 else InputChannels(in_chans, network)


@register_model
def resnext101_32x4d(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    """ResNeXt-101 (Xie et al., 2017): 32x4d, blocks of 3, 4, 23, 3; 44,177,704 parameters (44.1M in GUNN's
    Table 4, truncated)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    network = ResNet(Bottleneck, [3, 4, 23, 3], num_classes=num_classes, groups=32, width_per_group=4)
    resnet_init(network)  # the official code's: torchvision leaves the classifier's bias random
    return network if in_chans == 3 else InputChannels(in_chans, network)
