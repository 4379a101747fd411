"""The paper's networks: GUNN-15, GUNN-24 (CIFAR), GUNN-18, Wide-GUNN-18 (ImageNet), SUNN twins.

One resolution, one representation (paper, Section 5): at each resolution a transition
conv1x1 + BN + ReLU sets the width N, then one GUNN layer updates those N channels.
Widths, segment counts and parameter counts: docs/layer.md, "The models".
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Literal, Sequence

from torch import Tensor, nn

from gunn.layers import GunnLayer
from gunn.layers.gradual import Memory, Mode
from gunn.models.registry import (
    CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD, MODEL_KNOBS, ModelDefaults, default_cfg, register_model,
)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resnet_init(model: nn.Module) -> None:
    """The ResNet initialisation (fb.resnet.torch's, which the paper's and its peers' official code use;
    docs/layer.md, "The models"): convolutions N(0, 2 / (k * k * out_channels)), BatchNorm weight 1 and bias
    0, linear biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            if m.weight.is_meta:  # no values to draw; the meta kernel of normal_ would import torch._dynamo
                continue
            k = m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class GunnNet(nn.Module):
    """Stem, then per resolution a transition and a GUNN layer, then pooling and ``fc``.

    ``stem="cifar"``: conv3x3 at full resolution; ``"imagenet"``: conv7x7/2 and maxpool/2.
    Between resolutions an avgpool 2x2 halves the size, after the next transition
    (CIFAR models) or before it (ImageNet models, ``pool_before_transition``).
    ``head_width`` adds a last transition before global pooling (CIFAR models).
    """

    def __init__(
        self,
        *,
        widths: Sequence[int],
        segments: Sequence[int],
        expansion: int = 2,
        depth: int = 1,
        projection: bool = True,
        stem: Literal["cifar", "imagenet"] = "cifar",
        stem_width: int = 64,
        head_width: int | None = None,
        pool_before_transition: bool = False,
        num_classes: int = 10,
        in_chans: int = 3,
        residual: bool = True,
        mode: Mode = "gunn",
        memory: Memory = "efficient",
    ) -> None:
        super().__init__()
        if len(segments) != len(widths):
            raise ValueError(
                f"segments must give one segment count per GUNN layer ({len(widths)} on this "
                f"model), got segments={tuple(segments)}"
            )
        for index, (width, count) in enumerate(zip(widths, segments)):
            if isinstance(count, bool) or not isinstance(count, int) or count <= 0 or width % count:
                raise ValueError(
                    f"segments[{index}] must be a positive divisor of that GUNN layer's width "
                    f"{width}, got segments={tuple(segments)}"
                )
        for name, value in (("num_classes", num_classes), ("in_chans", in_chans)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if stem == "cifar":
            self.stem = _conv_bn_relu(in_chans, stem_width, kernel=3)
        elif stem == "imagenet":
            self.stem = nn.Sequential(
                _conv_bn_relu(in_chans, stem_width, kernel=7, stride=2), nn.MaxPool2d(3, 2, padding=1)
            )
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        stages, channels = [], stem_width
        for index, (width, count) in enumerate(zip(widths, segments)):
            parts: list[tuple[str, nn.Module]] = [("transition", _conv_bn_relu(channels, width))]
            if index > 0:
                parts.insert(0 if pool_before_transition else 1, ("pool", nn.AvgPool2d(2)))
            layer = GunnLayer(width, count, expansion, depth, projection, residual, mode, memory)
            parts.append(("gunn", layer))
            stages.append(nn.Sequential(OrderedDict(parts)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.head = _conv_bn_relu(channels, head_width) if head_width else nn.Identity()
        self.num_features = head_width or channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc: nn.Module = nn.Linear(self.num_features, num_classes)
        self.num_classes = num_classes
        self.in_chans = in_chans  # read by timm (get_model_traits)
        resnet_init(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map before global pooling."""
        return self.head(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pooling and the classifier; ``pre_logits``: the pooled features (as timm's models)."""
        x = self.pool(x).flatten(1)
        return x if pre_logits else self.fc(x)

    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``; an ``nn.Identity`` after ``reset_classifier(0)``)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_classes`` classes, initialised as the network's; 0: none (the pooled
        features are the output), as timm's models. ``global_pool`` may only keep the average pooling."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' (the only pooling of GUNN) or None, got {global_pool!r}")
        if num_classes == 0:
            self.fc = nn.Identity()
        else:
            weight = next(self.stem.parameters())
            self.fc = nn.Linear(self.num_features, num_classes, device=weight.device, dtype=weight.dtype)
            nn.init.zeros_(self.fc.bias)  # as resnet_init
            self.fc.train(self.training)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


# Keyword arguments a caller may change on a registered architecture.
OVERRIDES = ("num_classes", "in_chans", *MODEL_KNOBS, "memory")


def _build(name: str, overrides: dict[str, Any], **structure: Any) -> GunnNet:
    """The model ``name`` as its default configuration (``default_cfg(name)``) and ``structure`` (the
    stem, head and transitions, which no configuration changes) describe it, with ``overrides``."""
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for model {name!r}; options: {', '.join(OVERRIDES)}")
    cfg = default_cfg(name)
    arch = dict(widths=cfg.widths, segments=cfg.segments, expansion=cfg.expansion, depth=cfg.depth,
                mode=cfg.mode, residual=cfg.residual, num_classes=cfg.num_classes, in_chans=cfg.input_size[0],
                **structure)
    segments = overrides.get("segments")
    if isinstance(segments, int) and not isinstance(segments, bool):
        overrides["segments"] = (segments,) * len(cfg.widths)
    elif segments is not None:
        if isinstance(segments, (str, bytes)) or not isinstance(segments, Sequence):
            raise ValueError(f"segments must be an int or a sequence of ints, got {segments!r}")
        overrides["segments"] = tuple(segments)
    return GunnNet(**{**arch, **overrides})


_CIFAR = dict(input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, num_classes=10)
_IMAGENET = dict(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000)
_GUNN15 = ModelDefaults(**_CIFAR, widths=(240, 300, 360), segments=(20, 25, 30), expansion=2, depth=1,
                        recipe="gunn15-cifar10")
_GUNN24 = ModelDefaults(**_CIFAR, widths=(720, 900, 1080), segments=(20, 25, 30), expansion=3, depth=2,
                        recipe="gunn24-cifar10")
_GUNN18 = ModelDefaults(**_IMAGENET, widths=(400, 800, 1600, 2000), segments=(10, 20, 40, 50),
                        recipe="gunn18-imagenet")
_WIDE_GUNN18 = ModelDefaults(**_IMAGENET, widths=(1200, 1600, 2000, 2000), segments=(30, 40, 50, 50),
                             recipe="wide-gunn18-imagenet")
# Not in the paper: the GUNN-15 skeleton at 1/7.5 of its width, for demos and tests on a CPU.
_GUNN_TINY = ModelDefaults(**_CIFAR, widths=(32, 48, 64), segments=(4, 4, 4), expansion=2, depth=1, recipe="digits")
# The stems, heads and transitions of each family (not configuration knobs).
_CIFAR_STRUCTURE = dict(stem="cifar", projection=True, pool_before_transition=False)
_IMAGENET_STRUCTURE = dict(stem="imagenet", projection=False, pool_before_transition=True, head_width=None)


def _sunn(cfg: ModelDefaults, recipe: str | None = None) -> ModelDefaults:
    """The SUNN twin of a GUNN model: simultaneous updates, same architecture otherwise."""
    return dataclasses.replace(cfg, mode="sunn", recipe=recipe)


@register_model(default_cfg=_GUNN15)
def gunn15(**overrides: Any) -> GunnNet:
    """GUNN-15 (CIFAR): 1.6M parameters."""
    return _build("gunn15", overrides, **_CIFAR_STRUCTURE, head_width=360)


@register_model(default_cfg=_sunn(_GUNN15, "sunn15-cifar10"))
def sunn15(**overrides: Any) -> GunnNet:
    """SUNN-15: GUNN-15 with simultaneous updates."""
    return _build("sunn15", overrides, **_CIFAR_STRUCTURE, head_width=360)


@register_model(default_cfg=_GUNN24)
def gunn24(**overrides: Any) -> GunnNet:
    """GUNN-24 (CIFAR): 29.5M parameters."""
    return _build("gunn24", overrides, **_CIFAR_STRUCTURE, head_width=1080, stem_width=64)


@register_model(default_cfg=_sunn(_GUNN24))
def sunn24(**overrides: Any) -> GunnNet:
    """SUNN-24: GUNN-24 with simultaneous updates."""
    return _build("sunn24", overrides, **_CIFAR_STRUCTURE, head_width=1080, stem_width=64)


@register_model(default_cfg=_GUNN18)
def gunn18(**overrides: Any) -> GunnNet:
    """GUNN-18 (ImageNet): 28.9M parameters."""
    return _build("gunn18", overrides, **_IMAGENET_STRUCTURE)


@register_model(default_cfg=_sunn(_GUNN18))
def sunn18(**overrides: Any) -> GunnNet:
    """SUNN-18: GUNN-18 with simultaneous updates."""
    return _build("sunn18", overrides, **_IMAGENET_STRUCTURE)


@register_model(default_cfg=_WIDE_GUNN18)
def wide_gunn18(**overrides: Any) -> GunnNet:
    """Wide-GUNN-18 (ImageNet): 45.6M parameters."""
    return _build("wide_gunn18", overrides, **_IMAGENET_STRUCTURE)


@register_model(default_cfg=_sunn(_WIDE_GUNN18))
def wide_sunn18(**overrides: Any) -> GunnNet:
    """Wide-SUNN-18: Wide-GUNN-18 with simultaneous updates."""
    return _build("wide_sunn18", overrides, **_IMAGENET_STRUCTURE)


@register_model(default_cfg=_GUNN_TINY)
def gunn_tiny(**overrides: Any) -> GunnNet:
    """A small GUNN-15-shaped network (not in the paper) for demos and tests on a CPU."""
    return _build("gunn_tiny", overrides, **_CIFAR_STRUCTURE, head_width=64, stem_width=16)


@register_model(default_cfg=_sunn(_GUNN_TINY))
def sunn_tiny(**overrides: Any) -> GunnNet:
    """gunn_tiny with simultaneous updates."""
    return _build("sunn_tiny", overrides, **_CIFAR_STRUCTURE, head_width=64, stem_width=16)
