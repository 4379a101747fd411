"""The paper's bottleneck update units (Figure 4) and the GUNN layer built from them."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gunn.layers import fastpath
from gunn.layers.fused import TiedStatistics, conv_bn_many
from gunn.layers.gradual import GradualUpdate, Memory, Mode, check_memory, check_mode


def conv1x1(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_channels, out_channels, 1, bias=False, groups=groups)


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and without bias."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class Bottleneck(nn.Module):
    """conv1x1 in -> K*out, BN, ReLU, conv3x3, BN, ReLU, conv1x1 -> out, BN (no final ReLU)."""

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
        return self.tail(F.relu(self.bn1(self.conv1(x))))

    def tail(self, h: Tensor) -> Tensor:
        """Everything after the first conv + BN + ReLU."""
        h = F.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))


class UpdateUnit(nn.Module):
    """G_i of one segment: the full state (N channels) to the update of s channels.

    ``depth`` (the paper's M) stacks bottlenecks: the first maps N -> s, each further one
    adds a residual s -> s refinement. ``projection`` adds a conv1x1 N -> s with BN.
    """

    def __init__(self, channels: int, width: int, expansion: int = 2, depth: int = 1, projection: bool = True) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [Bottleneck(channels, width, expansion)]
            + [Bottleneck(width, width, expansion) for _ in range(depth - 1)]
        )
        self.proj = nn.Sequential(conv1x1(channels, width), nn.BatchNorm2d(width)) if projection else None

    def forward(self, state: Tensor) -> Tensor:
        first = self.blocks[0]
        if self.proj is None:
            h, p = first(state), None
        elif _batch_norms_fusable(self):
            # The first conv and the projection read the same state: one conv reads it once.
            hp = conv_bn_many(state, [first.conv1, self.proj[0]], [first.bn1, self.proj[1]])
            h, p = hp.split([first.conv1.out_channels, self.proj[0].out_channels], 1)
            h = first.tail(F.relu(h))
        else:
            h, p = first(state), self.proj(state)
        for block in self.blocks[1:]:
            h = h + block(h)
        return h if p is None else h + p


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class GunnLayer(GradualUpdate):
    """GUNN{N, P, K, M}: ``channels`` split into ``segments`` updated by bottleneck units.

    ``mode="gunn"`` updates the segments one after the other (each sees the earlier ones
    already updated), ``mode="sunn"`` all at once from the input, with the same weights.
    ``residual=False`` replaces each segment by its update (the paper's NoRes ablation).

    Training in GUNN mode with ``memory="efficient"`` runs a hand-written backward for these
    units (``gunn.layers.fastpath``) where ``fast_path_applies`` says so; ``fast_path = False``
    makes the layer use the generic container's path instead (same numbers, slower).

    The running statistics of the units' BatchNorms of one kind (every unit's first, second,
    third, projection norm) are views of one tensor per kind (``fused.TiedStatistics``), so that
    the fused SUNN path and the fast path update them with one call per kind, not one per unit.
    The modules, their ``state_dict`` and checkpoints look as without: each norm holds its own
    ``running_mean`` and ``running_var``. The layer ties them again after ``.to()`` and after
    ``load_state_dict``; where they were replaced otherwise, it writes each module's back.
    """

    def __init__(
        self,
        channels: int,
        segments: int,
        expansion: int = 2,
        depth: int = 1,
        projection: bool = True,
        residual: bool = True,
        mode: Mode = "gunn",
        memory: Memory = "efficient",
    ) -> None:
        _check_positive_int("channels", channels)
        _check_positive_int("segments", segments)
        _check_positive_int("expansion", expansion)
        _check_positive_int("depth", depth)
        if channels % segments:
            raise ValueError(f"segments must divide channels={channels}, got segments={segments}")
        if not isinstance(projection, bool):
            raise ValueError(f"projection must be a bool, got {projection!r}")
        check_mode(mode)
        check_memory(memory)
        width = channels // segments
        units = [UpdateUnit(channels, width, expansion, depth, projection) for _ in range(segments)]
        super().__init__(units, residual=residual, mode=mode, memory=memory)
        self.channels, self.segments, self.expansion, self.depth = channels, segments, expansion, depth
        self.projection = projection
        self.fast_path = True
        self._tied: dict[str, TiedStatistics] = {}
        self.tie_statistics()
        self.register_load_state_dict_post_hook(_tie_after_load)

    def tie_statistics(self) -> None:
        """Makes the BatchNorm statistics of each kind views of one tensor (see the class docstring)."""
        units = list(self.units)
        tied = {}
        for d in range(self.depth):
            blocks = [u.blocks[d] for u in units]
            for name in ("bn1", "bn2", "bn3"):
                tied[f"{name}.{d}"] = TiedStatistics([getattr(b, name) for b in blocks])
        if self.projection:
            tied["proj"] = TiedStatistics([u.proj[1] for u in units])
        self._tied = tied

    def tied_statistics(self) -> dict[str, TiedStatistics]:
        """The tied statistics by kind (``bn1.0``, ``bn2.0``, ``bn3.0``, ``bn1.1``, ..., ``proj``)."""
        if "_tied" not in self.__dict__:  # a layer pickled before statistics were tied
            self.tie_statistics()
        return self._tied

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> GunnLayer:
        # .to(), .cuda(), .double() replace the buffers: the per-kind tensors are tied anew.
        super()._apply(fn, recurse)
        if "_tied" in self.__dict__:  # not while the constructor builds the units
            self.tie_statistics()
        return self

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, segments={self.segments}, expansion={self.expansion}, "
            f"depth={self.depth}, projection={self.projection}, " + super().extra_repr()
        )

    def fast_path_applies(self, x: Tensor) -> bool:
        """Whether training in GUNN mode with ``memory="efficient"`` runs x through the
        hand-written backward (``gunn.layers.fastpath``), which then computes exactly what the
        generic path would.

        The layer's side: ``fast_path`` on, ``depth`` 1, units made of nothing but the
        paper's bottleneck and projection (plain ``Conv2d`` and ``BatchNorm2d``, no module
        swapped in) and no hooks, on these modules or global ones (the fast path calls no
        module's forward). ``fastpath.supported`` adds what it can compute: the input, the
        convolutions' and BatchNorms' settings.
        """
        if not getattr(self, "fast_path", False) or self.depth != 1 or _global_hooks():
            return False
        convs: list[nn.Conv2d] = []
        norms: list[nn.BatchNorm2d] = []
        for module in _submodules(self.units):
            if _has_hooks(module):
                return False
            kind = type(module)
            if kind is nn.BatchNorm2d:
                norms.append(module)
            elif kind is nn.Conv2d:
                convs.append(module)
            elif kind not in _CONTAINERS:
                return False
        return fastpath.supported(x, convs, norms)

    def _gradual_efficient(self, x: Tensor) -> Tensor:
        if self.memory == "efficient" and self.fast_path_applies(x):
            units = [_unit_modules(unit) for unit in self.units]
            tied = self.tied_statistics()
            first = [tied.get("bn1.0"), tied.get("proj")] if self.projection else [tied.get("bn1.0")]
            return fastpath.gradual_update(x, units, self.residual, self._gradual_autograd, first)
        return super()._gradual_efficient(x)

    def simultaneous_update(self, x: Tensor) -> Tensor:
        """All units at once, as a ResNeXt block with the same weights (SUNN): one wide 1x1 conv over
        the input, then grouped 3x3 and 1x1 convs (groups = segments), each followed by one
        BatchNorm over the concatenated channels."""
        if not _batch_norms_fusable(self):
            return super().simultaneous_update(x)
        units, tied = list(self.units), self.tied_statistics()
        groups = len(units)
        firsts = [u.blocks[0] for u in units]
        h = F.relu(conv_bn_many(x, [b.conv1 for b in firsts], [b.bn1 for b in firsts], tied=tied.get("bn1.0")))
        h = _bottleneck_tail_many(h, firsts, groups, tied, 0)
        for d in range(1, self.depth):
            blocks = [u.blocks[d] for u in units]
            r = F.relu(conv_bn_many(h, [b.conv1 for b in blocks], [b.bn1 for b in blocks], groups,
                                    tied.get(f"bn1.{d}")))
            h = h + _bottleneck_tail_many(r, blocks, groups, tied, d)
        if not self.projection:
            return h
        return h + conv_bn_many(x, [u.proj[0] for u in units], [u.proj[1] for u in units], tied=tied.get("proj"))


def _bottleneck_tail_many(h: Tensor, blocks: Sequence[Bottleneck], groups: int, tied: dict[str, TiedStatistics],
                          depth: int) -> Tensor:
    """``Bottleneck.tail`` of every unit at once, as grouped convs."""
    h = F.relu(conv_bn_many(h, [b.conv2 for b in blocks], [b.bn2 for b in blocks], groups, tied.get(f"bn2.{depth}")))
    return conv_bn_many(h, [b.conv3 for b in blocks], [b.bn3 for b in blocks], groups, tied.get(f"bn3.{depth}"))


def _tie_after_load(layer: Any, incompatible_keys: Any) -> None:
    """``load_state_dict``'s hook: ``assign=True`` replaces the buffers, so tie them again."""
    layer.tie_statistics()


# Modules of the units that only arrange the convs and norms (their forwards add nothing).
_CONTAINERS = (nn.ModuleList, nn.Sequential, UpdateUnit, Bottleneck)


def _unit_modules(unit: UpdateUnit) -> fastpath.UnitModules:
    """A unit with one bottleneck (depth 1) as the fast path reads it."""
    block = unit.blocks[0]
    proj_conv, proj_bn = (None, None) if unit.proj is None else (unit.proj[0], unit.proj[1])
    return fastpath.UnitModules(
        block.conv1, block.bn1, block.conv2, block.bn2, block.conv3, block.bn3, proj_conv, proj_bn
    )


def _submodules(root: nn.Module) -> list[nn.Module]:
    """Every module under root (root included), like ``root.modules()`` at a fraction of its cost."""
    found, stack = [], [root]
    while stack:
        module = stack.pop()
        found.append(module)
        stack.extend(m for m in module._modules.values() if m is not None)
    return found


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _global_hooks() -> bool:
    hooks = nn.modules.module
    return bool(
        hooks._global_forward_hooks
        or hooks._global_forward_pre_hooks
        or hooks._global_backward_hooks
        or getattr(hooks, "_global_backward_pre_hooks", None)
    )


def _batch_norms_fusable(module: nn.Module) -> bool:
    # Only plain BatchNorm2d can be fused; SyncBatchNorm and others run unit by unit.
    return all(type(m) is nn.BatchNorm2d for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase))
