"""The generic GUNN container: any list of update units run gradually or simultaneously.

Paper, Eq. 4: GUNN(x) = (U_cP o ... o U_c1)(x), where U_ci replaces the channels of
segment c_i with x[c_i] + G_i(state). Each update unit here is a module that maps the
full state to the update G_i of its own segment; the container owns the ordering, the
residual identity term and the memory-saving backward of the paper's Algorithm 1.

Memory. A plain autograd loop keeps a copy of the N-channel state for every unit. Here
the gradual forward writes every segment in place into one state tensor, and the copies
that the units' operators would save for backward are replaced, by saved-tensor hooks,
with a reference to their position in that tensor. The state before unit i is exactly
``[y[c_1..c_(i-1)], x[c_i..c_P]]`` (y the layer output), so the backward rebuilds it from
x and y, moving one segment per unit because units run backward in reverse order. All
other activations of a unit are kept as autograd keeps them: nothing is recomputed and
BatchNorm statistics are updated once. ``memory="recompute"`` also drops the units'
internal activations and recomputes each unit's forward in the backward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Literal

import torch
import torch.utils.checkpoint as checkpoint_policy
from torch import Tensor, nn

Mode = Literal["gunn", "sunn"]
Memory = Literal["efficient", "recompute", "autograd"]

MODES: tuple[str, ...] = ("gunn", "sunn")
MEMORY_MODES: tuple[str, ...] = ("efficient", "recompute", "autograd")


def check_mode(mode: object) -> Mode:
    """Returns ``mode`` if it names an update order, else raises ValueError naming it."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode  # type: ignore[return-value]


def check_memory(memory: object) -> Memory:
    """Returns ``memory`` if it names a backward strategy, else raises ValueError naming it."""
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory  # type: ignore[return-value]


class GradualUpdate(nn.Module):
    """Turns update units into a gradually (GUNN) or simultaneously (SUNN) updated layer.

    ``units[i]`` maps the full state (all channels along ``dim``) to the update of segment
    ``i``; segments are contiguous and follow the units' output widths in order, which
    must add up to the input's channel count. ``mode`` and ``memory`` may be changed on
    a built layer: the weights stay the same.
    """

    def __init__(
        self,
        units: Iterable[nn.Module],
        *,
        residual: bool = True,
        mode: Mode = "gunn",
        memory: Memory = "efficient",
        dim: int = 1,
    ) -> None:
        super().__init__()
        self.units = units if isinstance(units, nn.ModuleList) else nn.ModuleList(units)
        if len(self.units) == 0:
            raise ValueError("units must hold at least one update unit, got none")
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be a bool, got {residual!r}")
        self.residual = residual
        self.mode = mode
        self.memory = memory
        self.dim = dim

    @property
    def mode(self) -> Mode:
        """``"gunn"``: unit i sees segments < i already updated; ``"sunn"``: all see the input."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        self._mode = check_mode(mode)

    @property
    def memory(self) -> Memory:
        """How the gradual mode keeps activations for backward (see the module docstring)."""
        return self._memory

    @memory.setter
    def memory(self, memory: Memory) -> None:
        self._memory = check_memory(memory)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, residual={self.residual}, memory={self.memory!r}"

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "sunn":
            delta = self.simultaneous_update(x)
            self._check_width(x, delta.shape[self.dim])
            return x + delta if self.residual else delta
        if not torch.is_grad_enabled():
            return self._gradual_inplace(x)
        if self.memory == "autograd" or not self.training:
            # Evaluation runs a plain forward (still differentiable, e.g. for saliency).
            return self._gradual_autograd(x)
        if torch.compiler.is_compiling():
            return self._gradual_compiled(x)
        return self._gradual_efficient(x)

    def simultaneous_update(self, x: Tensor) -> Tensor:
        """All segments' updates computed from the input (SUNN); subclasses may fuse them."""
        return torch.cat([unit(x) for unit in self.units], self.dim)

    def _check_width(self, x: Tensor, width: int) -> None:
        check_width(x, width, self.dim)

    def _gradual_inplace(self, x: Tensor) -> Tensor:
        """Eq. 4 without autograd: one copy of the input, segments overwritten in order."""
        state = x.clone()
        start = 0
        for unit in self.units:
            delta = unit(state)
            _write_segment(state, delta, self.dim, start, self.residual)
            start += delta.shape[self.dim]
        self._check_width(x, start)
        return state

    def _gradual_autograd(self, x: Tensor) -> Tensor:
        """Eq. 4 as a plain autograd loop: a new state tensor per unit, all kept for backward."""
        updated: list[Tensor] = []
        state, start, channels = x, 0, x.shape[self.dim]
        for unit in self.units:
            delta = unit(state)
            width = delta.shape[self.dim]
            check_fits(channels, start, width, self.dim)
            updated.append(x.narrow(self.dim, start, width) + delta if self.residual else delta)
            start += width
            rest = [x.narrow(self.dim, start, channels - start)] if start < channels else []
            state = torch.cat(updated + rest, self.dim)
        self._check_width(x, start)
        return state

    def _gradual_compiled(self, x: Tensor) -> Tensor:
        """Eq. 4 as torch.compile (or torch.export) traces it: the plain loop, each unit in a region of
        selective activation checkpointing whose state (a concatenation of y's and x's segments) is
        recomputed in the backward pass instead of saved: Algorithm 1's memory, planned by the
        compiler. With ``memory="recompute"`` the whole unit is recomputed."""
        policy = _recompute_all if self.memory == "recompute" else _recompute_states
        context = functools.partial(checkpoint_policy.create_selective_checkpoint_contexts, policy)
        updated: list[Tensor] = []
        start, channels = 0, x.shape[self.dim]
        for unit in self.units:
            delta = checkpoint_policy.checkpoint(
                _unit_on_state, unit, self.dim, start, x, *updated, use_reentrant=False, context_fn=context)
            width = delta.shape[self.dim]
            check_fits(channels, start, width, self.dim)
            updated.append(x.narrow(self.dim, start, width) + delta if self.residual else delta)
            start += width
        self._check_width(x, start)
        return torch.cat(updated, self.dim)

    def _gradual_efficient(self, x: Tensor) -> Tensor:
        """Eq. 4 with the paper's Algorithm 1 memory: in-place segment writes, states rebuilt."""
        recompute = self.memory == "recompute"
        state = x.clone()
        tape = _StateTape(x, state, self.dim, recompute)
        with torch.autograd.graph.saved_tensors_hooks(tape.pack, tape.unpack):
            for index, unit in enumerate(self.units):
                tape.begin_unit(index, unit, state)
                version = state._version
                delta = unit(state)
                if state._version != version:
                    raise RuntimeError(
                        f"update unit {index} ({type(unit).__name__}) modified its input in "
                        "place; update units must leave the state unchanged"
                    )
                state = _SegmentUpdate.apply(state, delta, self.dim, tape.start, self.residual)
                tape.end_unit(delta.shape[self.dim])
        self._check_width(x, tape.start)
        tape.seal(state)
        return state


def _unit_on_state(unit: nn.Module, dim: int, start: int, x: Tensor, *updated: Tensor) -> Tensor:
    """Unit ``len(updated)``'s update of the state it sees: the updated segments, then x's from ``start``."""
    rest = [x.narrow(dim, start, x.shape[dim] - start)] if start < x.shape[dim] else []
    return unit(torch.cat([*updated, *rest], dim))


def _recompute_states(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> checkpoint_policy.CheckpointPolicy:
    """Selective checkpointing: the state's concatenation is recomputed, everything else saved."""
    if op is torch.ops.aten.cat.default:
        return checkpoint_policy.CheckpointPolicy.PREFER_RECOMPUTE
    return checkpoint_policy.CheckpointPolicy.MUST_SAVE


def _recompute_all(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> checkpoint_policy.CheckpointPolicy:
    return checkpoint_policy.CheckpointPolicy.PREFER_RECOMPUTE


def check_width(x: Tensor, width: int, dim: int) -> None:
    """Raises ValueError unless the units' output widths add up to ``width`` = x's channels along ``dim``."""
    if width != x.shape[dim]:
        raise ValueError(
            f"the update units' output widths add up to {width} channels but the input "
            f"has {x.shape[dim]} along dim {dim}"
        )


def check_fits(channels: int, start: int, width: int, dim: int) -> None:
    """Raises ValueError if a segment of ``width`` at ``start`` runs past ``channels``."""
    if start + width > channels:
        raise ValueError(
            f"the update units' output widths add up to more than the input's {channels} "
            f"channels along dim {dim}"
        )


def _write_segment(state: Tensor, delta: Tensor, dim: int, start: int, residual: bool) -> None:
    """state[c_i] += delta_i (residual, Eq. 5) or state[c_i] = delta_i, in place."""
    width = delta.shape[dim]
    check_fits(state.shape[dim], start, width, dim)
    segment = state.narrow(dim, start, width)
    if residual:
        segment.add_(delta)
    else:
        segment.copy_(delta)


class _SegmentUpdate(torch.autograd.Function):
    """state[c_i] = x[c_i] + delta_i (or delta_i without residual), written in place."""

    @staticmethod
    def forward(ctx: Any, state: Tensor, delta: Tensor, dim: int, start: int, residual: bool) -> Tensor:
        _write_segment(state, delta, dim, start, residual)
        ctx.mark_dirty(state)
        ctx.dim, ctx.start, ctx.width, ctx.residual = dim, start, delta.shape[dim], residual
        ctx.delta_dtype = delta.dtype
        return state

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        grad_delta = grad.narrow(ctx.dim, ctx.start, ctx.width).to(ctx.delta_dtype)
        if ctx.residual:
            # The identity term passes the whole gradient through (the paper's Eq. 6).
            return grad, grad_delta, None, None, None
        grad_state = grad.clone()
        grad_state.narrow(ctx.dim, ctx.start, ctx.width).zero_()
        return grad_state, grad_delta, None, None, None


class _StateView:
    """A saved tensor that aliased the state tensor while unit ``level`` ran."""

    __slots__ = ("level", "size", "stride", "offset")

    def __init__(self, level: int, t: Tensor) -> None:
        self.level = level
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


class _UnitSaved:
    """The k-th tensor that unit ``level`` saved for backward, recomputed on demand."""

    __slots__ = ("level", "k")

    def __init__(self, level: int, k: int) -> None:
        self.level, self.k = level, k


class _StateTape:
    """Packs what the units save for backward and rebuilds it from the layer's x and y."""

    def __init__(self, x: Tensor, state: Tensor, dim: int, recompute: bool) -> None:
        # Detached aliases: holding the output's graph from its own saved tensors would
        # make a reference cycle through C++ that Python's collector cannot free.
        self.x = x.detach()
        self.state = state.detach()
        self.dim = dim
        self.recompute = recompute
        self.starts: list[int] = []
        self.start = 0
        self.level = -1
        self.unit: nn.Module | None = None
        self.units: list[nn.Module] = []
        self.counts: list[int] = []
        self.requires_grad: list[bool] = []
        self.rng: list[tuple[Tensor, Tensor | None]] = []
        self.autocast = _autocast_state(x.device.type)
        self.state_ptr = state.data_ptr()
        self.state_end = self.state_ptr + state.untyped_storage().nbytes()
        self.buffer: Tensor | None = None
        self.buffer_level = -1
        self.cache: dict[int, list[Tensor]] = {}
        self.unpacked: dict[int, int] = {}
        self.versions: tuple[int, int] | None = None

    # -- forward -------------------------------------------------------------------------
    def begin_unit(self, index: int, unit: nn.Module, state: Tensor) -> None:
        self.level, self.unit = index, unit
        self.starts.append(self.start)
        if self.recompute:
            self.units.append(unit)
            self.counts.append(0)
            self.requires_grad.append(state.requires_grad)
            self.rng.append(_rng_state(self.x.device))

    def end_unit(self, width: int) -> None:
        self.start += width
        self.unit = None

    def seal(self, y: Tensor) -> None:
        """Records the final output; backward refuses to run if x or y change afterwards."""
        self.starts.append(self.start)
        self.versions = (self.x._version, y._version)

    def pack(self, t: Tensor) -> Any:
        if self.unit is None:  # saved by the segment write itself: nothing, kept as is
            return t
        if self.recompute:
            self.counts[self.level] += 1
            return _UnitSaved(self.level, self.counts[self.level] - 1)
        if (
            t.layout == torch.strided
            and t.device == self.state.device
            and t.dtype == self.state.dtype
            and self.state_ptr <= t.data_ptr() < self.state_end
        ):
            return _StateView(self.level, t)
        return t

    # -- backward ------------------------------------------------------------------------
    def unpack(self, packed: Any) -> Tensor:
        if isinstance(packed, _StateView):
            base = self.state_at(packed.level)
            return base.as_strided(packed.size, packed.stride, packed.offset)
        if isinstance(packed, _UnitSaved):
            return self.recomputed(packed.level, packed.k)
        return packed

    def _check_versions(self) -> None:
        assert self.versions is not None, "backward through a GUNN layer whose forward failed"
        check_unchanged(self.x, self.state, self.versions)

    def state_at(self, level: int) -> Tensor:
        """The state that unit ``level`` saw: segments < level from y, the rest from x."""
        self._check_versions()
        if torch.is_grad_enabled():
            # create_graph=True: the result may be saved again, so never reuse a buffer.
            return self._fresh_state(level)
        if self.buffer is None:
            self.buffer = self._fresh_state(level)
            self.buffer_level = level
        # Units run backward in reverse order, so this moves one segment per unit.
        while self.buffer_level > level:
            self.buffer_level -= 1
            self._copy_segment(self.x, self.buffer_level)
        while self.buffer_level < level:
            self._copy_segment(self.state, self.buffer_level)
            self.buffer_level += 1
        return self.buffer

    def _fresh_state(self, level: int) -> Tensor:
        buffer = torch.empty_strided(
            self.state.size(), self.state.stride(), dtype=self.state.dtype, device=self.state.device
        )
        split = self.starts[level]
        channels = self.state.shape[self.dim]
        buffer.narrow(self.dim, 0, split).copy_(self.state.narrow(self.dim, 0, split))
        buffer.narrow(self.dim, split, channels - split).copy_(
            self.x.narrow(self.dim, split, channels - split)
        )
        return buffer

    def _copy_segment(self, source: Tensor, index: int) -> None:
        start, width = self.starts[index], self.starts[index + 1] - self.starts[index]
        assert self.buffer is not None
        self.buffer.narrow(self.dim, start, width).copy_(source.narrow(self.dim, start, width))

    def recomputed(self, level: int, k: int) -> Tensor:
        """Runs unit ``level`` forward again (once per backward) and returns its k-th saved tensor."""
        saved = self.cache.get(level)
        if saved is None:
            saved = self._recompute(level)
            self.cache[level] = saved
            self.unpacked[level] = 0
        self.unpacked[level] += 1
        if self.unpacked[level] == len(saved):
            del self.cache[level]  # every saved tensor of this unit has been handed out
        return saved[k]

    def _recompute(self, level: int) -> list[Tensor]:
        unit = self.units[level]
        state = self.state_at(level).detach().requires_grad_(self.requires_grad[level])
        saved: list[Tensor] = []

        def record(t: Tensor) -> Tensor:
            saved.append(t)
            return t

        # BatchNorm statistics count the batch once: the recomputation updates copies, dropped
        # afterwards (restoring values in place would bump version counters that the graph it
        # builds, under create_graph=True, has saved; and statistics tied into one tensor share one).
        originals = [(m, dict(m._buffers)) for m in unit.modules() if m._buffers]
        for module, buffers in originals:
            module._buffers.update({k: None if b is None else b.clone() for k, b in buffers.items()})
        cpu_rng, device_rng = self.rng[level]
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=True):
                torch.set_rng_state(cpu_rng)
                if device_rng is not None:
                    torch.cuda.set_rng_state(device_rng, self.x.device)
                with (
                    torch.enable_grad(),
                    torch.autocast(self.x.device.type, **self.autocast),
                    torch.autograd.graph.saved_tensors_hooks(record, lambda t: t),
                ):
                    unit(state)
        finally:
            for module, buffers in originals:
                module._buffers.update(buffers)
        if len(saved) != self.counts[level]:
            raise RuntimeError(
                f"update unit {level} saved {len(saved)} tensors when recomputed but "
                f"{self.counts[level]} in the forward pass; memory='recompute' needs units "
                "whose forward is deterministic in structure"
            )
        return saved


def check_unchanged(x: Tensor, y: Tensor, versions: tuple[int, int]) -> None:
    """Raises if the layer's input ``x`` or output ``y`` changed in place since the forward pass."""
    if (x._version, y._version) != versions:
        raise RuntimeError(
            "the input or output of a GUNN layer was modified in place after its forward "
            "pass (for example by nn.ReLU(inplace=True)); its memory-saving backward "
            "rebuilds the intermediate states from both. Use an out-of-place operation "
            "there, or memory='autograd' on the layer."
        )


def _autocast_state(device_type: str) -> dict[str, Any]:
    if not torch.amp.is_autocast_available(device_type):  # e.g. the meta device
        return {"enabled": False}
    return {
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    device_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), device_state


def set_mode(module: nn.Module, mode: Mode) -> nn.Module:
    """Switches every GUNN/SUNN layer inside ``module`` to ``mode``; weights are unchanged."""
    check_mode(mode)
    for layer in module.modules():
        if isinstance(layer, GradualUpdate):
            layer.mode = mode
    return module


def set_memory(module: nn.Module, memory: Memory) -> nn.Module:
    """Sets the backward strategy of every GUNN layer inside ``module``."""
    check_memory(memory)
    for layer in module.modules():
        if isinstance(layer, GradualUpdate):
            layer.memory = memory
    return module
