"""The paper's bottleneck update unit (Figure 4): ``Bottleneck`` and ``UpdateUnit``, G_i of one segment.

A bottleneck declares its arithmetic as data (``Bottleneck.STEPS``) and its forward runs exactly
those steps. The layer's faster paths, which compute the unit their own way (SUNN's grouped
convolutions, the fast path and its C++ kernels), read the steps and use themselves only where they
implement them (``unit_difference``); docs/architecture.md, "Changing the paper's unit".
"""

from __future__ import annotations

from typing import Callable, ClassVar, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gunn.layers.fused import conv_bn_many, fusable


def conv1x1(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, 1, bias=False, groups=groups)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and without bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """conv1x1 in -> K*out, BN, ReLU, conv3x3, BN, ReLU, conv1x1 -> out, BN (no final ReLU).

    ``STEPS`` (a class attribute) is that arithmetic and ``forward`` runs it, step by step: a step
    names one of the block's modules (applied as the module) or a function of ``torch.nn.functional``.
    A subclass changes the unit by declaring other steps (``("conv1", "bn1", "gelu", ...)``).
    """

    STEPS: ClassVar[tuple[str, ...]] = ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3")

    def __init__(self, in_channels: int, out_channels: int, expansion: int) -> None:
        super().__init__()
        hidden = expansion * out_channels
        self.conv1 = conv1x1(in_channels, hidden)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = conv3x3(hidden, hidden)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.conv3 = conv1x1(hidden, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x, type(self).STEPS)

    def run(self, h: Tensor, steps: Sequence[str]) -> Tensor:
        """Applies ``steps`` (``STEPS`` or a part of it) to h, in order."""
        for name in steps:
            h = self.step(name)(h)
        return h

    def step(self, name: str) -> Callable[[Tensor], Tensor]:
        """What step ``name`` applies: the block's module of that name, else the function of ``torch.nn.functional``."""
        module = self._modules.get(name)
        if module is not None:
            return module
        function = getattr(F, name, None)
        if not callable(function):
            raise ValueError(f"{type(self).__name__}.STEPS: {name!r} names neither a module of the block nor a "
                             "function of torch.nn.functional")
        return function


class UpdateUnit(nn.Module):
    """G_i of one segment: the full state (N channels) to the update of s channels.

    ``depth`` (the paper's M) stacks bottlenecks (``block``, the paper's by default): the first maps
    N -> s, each further one adds a residual s -> s refinement. ``projection`` adds a conv1x1 N -> s
    with BN.
    """

    def __init__(self, channels: int, width: int, expansion: int = 2, depth: int = 1, projection: bool = True,
                 block: type[Bottleneck] = Bottleneck) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [block(channels, width, expansion)] + [block(width, width, expansion) for _ in range(depth - 1)]
        )
        self.proj = nn.Sequential(conv1x1(channels, width), nn.BatchNorm2d(width)) if projection else None

    def forward(self, state: Tensor) -> Tensor:
        first = self.blocks[0]
        if self.proj is None:
            h, p = first(state), None
        elif fusable(self) and starts_with_conv_bn(first):
            # The first conv and the projection read the same state: one conv reads it once.
            steps = type(first).STEPS
            conv, norm = first.step(steps[0]), first.step(steps[1])
            hp = conv_bn_many(state, [conv, self.proj[0]], [norm, self.proj[1]])
            h, p = hp.split([conv.out_channels, self.proj[0].out_channels], 1)
            h = first.run(h, steps[2:])
        else:
            h, p = first(state), self.proj(state)
        for block in self.blocks[1:]:
            h = h + block(h)
        return h if p is None else h + p


def starts_with_conv_bn(block: Bottleneck) -> bool:
    """Whether the block's first steps are a plain ``Conv2d`` and a plain ``BatchNorm2d`` (what ``conv_bn_many`` fuses)."""
    steps = type(block).STEPS
    return (len(steps) >= 2 and type(block._modules.get(steps[0])) is nn.Conv2d
            and type(block._modules.get(steps[1])) is nn.BatchNorm2d)


def unit_difference(kind: type, steps: Sequence[str] | None = None) -> str | None:
    """How units of the class ``kind`` (a unit, ``UpdateUnit``, or a bottleneck, ``Bottleneck``, or a subclass)
    differ from the paper's unit as a faster path implements it, naming the class; None where they do not.

    They differ where the class is neither, overrides a method that computes the unit (its arithmetic is then
    no longer what its steps say), or, a bottleneck, declares other ``STEPS`` than ``steps`` (None: any).
    """
    if issubclass(kind, UpdateUnit):
        return f"{kind.__name__} overrides UpdateUnit.forward" if kind.forward is not UpdateUnit.forward else None
    if not issubclass(kind, Bottleneck):
        return f"the unit {kind.__name__} is not an UpdateUnit"
    for method in ("forward", "run", "step"):
        if getattr(kind, method) is not getattr(Bottleneck, method):
            return f"{kind.__name__} overrides Bottleneck.{method} instead of declaring its STEPS"
    if steps is not None and tuple(kind.STEPS) != tuple(steps):
        return f"{kind.__name__}.STEPS {_first_difference(tuple(kind.STEPS), tuple(steps))}"
    return None


def _first_difference(got: tuple[str, ...], want: tuple[str, ...]) -> str:
    for k, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return f"has {a!r} at step {k}, not {b!r}"
    return f"has {len(got)} steps, not {len(want)}"
