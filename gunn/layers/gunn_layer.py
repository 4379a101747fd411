"""``GunnLayer``: the GUNN layer of the paper's bottleneck units, with its fused SUNN path and its fast path."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from gunn.layers import fastpath
from gunn.layers.bottleneck import Bottleneck, UpdateUnit, unit_difference
from gunn.layers.fused import TiedStatistics, conv_bn_many, fusable
from gunn.layers.gradual import GradualUpdate, Memory, Mode, check_memory, check_mode


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class GunnLayer(GradualUpdate):
    """GUNN{N, P, K, M}: ``channels`` split into ``segments`` updated by bottleneck units.

    ``mode="gunn"`` updates the segments one after the other (each sees the earlier ones
    already updated), ``mode="sunn"`` all at once from the input, with the same weights.
    ``residual=False`` replaces each segment by its update (the paper's NoRes ablation).
    ``block``: the units' bottleneck, the paper's by default (a subclass declares other ``STEPS``).

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
        block: type[Bottleneck] = Bottleneck,
    ) -> None:
        _check_positive_int("channels", channels)
        _check_positive_int("segments", segments)
        _check_positive_int("expansion", expansion)
        _check_positive_int("depth", depth)
        if channels % segments:
            raise ValueError(f"segments must divide channels={channels}, got segments={segments}")
        if not isinstance(projection, bool):
            raise ValueError(f"projection must be a bool, got {projection!r}")
        if not (isinstance(block, type) and issubclass(block, Bottleneck)):
            raise ValueError(f"block must be Bottleneck or a subclass of it, got {block!r}")
        check_mode(mode)
        check_memory(memory)
        width = channels // segments
        units = [UpdateUnit(channels, width, expansion, depth, projection, block) for _ in range(segments)]
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
        block = type(self.units[0].blocks[0])
        return (
            f"channels={self.channels}, segments={self.segments}, expansion={self.expansion}, "
            f"depth={self.depth}, projection={self.projection}, "
            + ("" if block is Bottleneck else f"block={block.__name__}, ")
            + super().extra_repr()
        )

    def fast_path_applies(self, x: Tensor) -> bool:
        """Whether training in GUNN mode with ``memory="efficient"`` runs x through the
        hand-written backward (``gunn.layers.fastpath``), which then computes exactly what the
        generic path would.

        The layer's side: ``fast_path`` on, ``depth`` 1, units that are the paper's unit as the fast
        path computes it (``unit_difference`` against ``fastpath.STEPS``: where they differ, the
        layer warns once and takes the generic path), made of plain ``Conv2d`` and ``BatchNorm2d``
        (no module swapped in) and without hooks, on these modules or global ones (the fast path
        calls no module's forward). ``fastpath.supported`` adds what it can compute: the input, the
        convolutions' and BatchNorms' settings.
        """
        if not getattr(self, "fast_path", False) or self.depth != 1 or _global_hooks():
            return False
        convs: list[nn.Conv2d] = []
        norms: list[nn.BatchNorm2d] = []
        units = {type(unit) for unit in self.units._modules.values()}  # the classes of the units and bottlenecks
        others: set[type] = set()  # of any other modules
        hooks = False
        for module in _submodules(self.units):
            hooks = hooks or _has_hooks(module)
            kind = type(module)
            if kind is nn.BatchNorm2d:
                norms.append(module)
            elif kind is nn.Conv2d:
                convs.append(module)
            elif kind not in _CONTAINERS:
                (units if issubclass(kind, (UpdateUnit, Bottleneck)) else others).add(kind)
        for kind in units:
            difference = unit_difference(kind, fastpath.STEPS)
            if difference is not None:
                _warn_once("GunnLayer trains on the generic path, slower (the fast path computes the paper's unit, "
                           f"fastpath.STEPS): {difference}")
                return False
        if hooks or others:  # the fast path would skip the hooks, or a module swapped in
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
        BatchNorm over the concatenated channels: the steps of the units' bottlenecks
        (``Bottleneck.STEPS``), run by ``_run_grouped``."""
        if not fusable(self):
            return super().simultaneous_update(x)
        units = list(self.units)
        plans = _grouped_plans(units, self.depth)
        if isinstance(plans, str):
            _warn_once("GunnLayer runs its units one by one in SUNN order, slower (its grouped convolutions compute "
                       f"convs followed by their BatchNorm and elementwise functions): {plans}")
            return super().simultaneous_update(x)
        tied, groups = self.tied_statistics(), len(units)
        h = _run_grouped(x, *plans[0], 1, groups, tied, 0)
        for d in range(1, self.depth):
            h = h + _run_grouped(h, *plans[d], groups, groups, tied, d)
        if not self.projection:
            return h
        return h + conv_bn_many(x, [u.proj[0] for u in units], [u.proj[1] for u in units], tied=tied.get("proj"))


# Functions of torch.nn.functional that act on each element alone (with their default arguments):
# on the units' concatenated channels they compute what they compute on each unit's.
_ELEMENTWISE = frozenset({
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish", "hardsigmoid",
    "hardtanh", "softplus",
})  # fmt: skip

# A step of SUNN's grouped path: (conv, norm), the names of a conv and the BatchNorm after it, or (function,).
_Plan = list[tuple[str, ...]]


def _grouped_plan(block: Bottleneck) -> _Plan | str:
    """``STEPS`` of ``block``'s class as ``_run_grouped`` runs them, or what in them it cannot run."""
    steps, modules = type(block).STEPS, block._modules
    plan: _Plan = []
    k = 0
    while k < len(steps):
        if steps[k] not in modules and steps[k] in _ELEMENTWISE:
            plan.append((steps[k],))
            k += 1
        elif (type(modules.get(steps[k])) is nn.Conv2d and k + 1 < len(steps)
              and type(modules.get(steps[k + 1])) is nn.BatchNorm2d):
            plan.append((steps[k], steps[k + 1]))
            k += 2
        else:
            return (f"{type(block).__name__}.STEPS has {steps[k]!r} at step {k}, neither an elementwise function "
                    "nor a Conv2d followed by its BatchNorm2d")
    return plan


def _grouped_plans(units: Sequence[nn.Module], depth: int) -> list[tuple[list[Bottleneck], _Plan]] | str:
    """The units' bottlenecks at each depth with their plan (the same for all units), or why SUNN's grouped
    path cannot run them."""
    for kind in {type(u) for u in units}:
        difference = unit_difference(kind)
        if difference is not None:
            return difference
    plans = []
    for d in range(depth):
        blocks = [u.blocks[d] for u in units]
        one_of_each = {type(b): b for b in blocks}
        for kind in one_of_each:
            difference = unit_difference(kind)
            if difference is not None:
                return difference
        found = [_grouped_plan(block) for block in one_of_each.values()]
        for plan in found:
            if isinstance(plan, str):
                return plan
        if any(plan != found[0] for plan in found):
            return f"the units' bottlenecks at depth {d} declare different STEPS"
        plans.append((blocks, found[0]))
    return plans


def _run_grouped(h: Tensor, blocks: Sequence[Bottleneck], plan: _Plan, first_groups: int, groups: int,
                 tied: dict[str, TiedStatistics], depth: int) -> Tensor:
    """``Bottleneck.run`` of every unit's block at once: each conv with its BatchNorm as one ``conv_bn_many``,
    grouped (one group per unit) but for the first, which has ``first_groups`` (1: every block reads all of h)."""
    for step in plan:
        if len(step) == 1:
            h = getattr(F, step[0])(h)
            continue
        conv, norm = step
        h = conv_bn_many(h, [getattr(b, conv) for b in blocks], [getattr(b, norm) for b in blocks], first_groups,
                         tied.get(f"{norm}.{depth}"))
        first_groups = groups
    return h


def _tie_after_load(layer: Any, incompatible_keys: Any) -> None:
    """``load_state_dict``'s hook: ``assign=True`` replaces the buffers, so tie them again."""
    layer.tie_statistics()


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Warns ``message`` the first time this process sees it (a layer asks every step)."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message + ' (docs/architecture.md, "Changing the paper\'s unit")', stacklevel=2)


# Modules of the units that only arrange the convs and norms (their forwards add nothing).
_CONTAINERS = (nn.ModuleList, nn.Sequential)


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
