"""Bottlenecks that change the paper's unit, for the tests of docs/architecture.md, "Changing the paper's unit"."""

from __future__ import annotations

import torch
from torch import Tensor

from gunn.layers import Bottleneck


class GeluBottleneck(Bottleneck):
    """GELU for each ReLU, declared: an elementwise change that SUNN's grouped path computes, the fast path not."""

    STEPS = ("conv1", "bn1", "gelu", "conv2", "bn2", "gelu", "conv3", "bn3")


class NormalizedBottleneck(Bottleneck):
    """Each pixel's hidden channels scaled to unit length: a step across channels, which SUNN's grouped
    convolutions cannot apply to the units' concatenation."""

    STEPS = ("conv1", "bn1", "relu", "conv2", "bn2", "normalize", "conv3", "bn3")


class UndeclaredBottleneck(Bottleneck):
    """A forward changed without declaring it: its STEPS no longer say what it computes."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(super().forward(x))


class RenamedBottleneck(Bottleneck):
    """The paper's unit under another name: it declares the paper's steps and computes them."""
