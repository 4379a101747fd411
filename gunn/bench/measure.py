"""Measurements shared by the benchmark and the tests: activation memory, time, FLOPs."""

from __future__ import annotations

import collections
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from gunn.models.cost import multiply_adds


def retained_bytes(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, object]:
    """Bytes that ``fn`` allocated and that are still alive when it returns, and its result.

    For a forward pass that is the activation memory kept for backward (with the output).
    On CUDA it reads the caching allocator's counter; on the CPU, which has no such counter,
    it sums the allocations and frees that the profiler attributes to the top-level events.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device) - before, result
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.events()
    return sum(e.cpu_memory_usage for e in events if e.cpu_parent is None), result


def activation_bytes(model: nn.Module, x: Tensor) -> int:
    """Activation memory a training forward of ``model`` on ``x`` keeps for backward, in bytes."""
    model.train()
    nbytes, out = retained_bytes(lambda: model(x), x.device)
    del out
    return nbytes


def flops(model: nn.Module, x: Tensor) -> int:
    """Floating-point operations (2 per multiply-add) of one eval forward of ``model`` on ``x``."""
    return 2 * multiply_adds(model, x)


def step_seconds(step: Callable[[], None], device: torch.device | str = "cpu") -> float:
    """Wall time of one call of ``step``, waiting for the device to finish."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_medians(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Median seconds per step of each candidate, timed round-robin so drift hits all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step_seconds(step, device))
    return {name: statistics.median(values) for name, values in times.items()}


class _Dispatches(TorchDispatchMode):
    """Counts the ATen operations that reach the dispatcher's Python mode, by name (views left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        # A view launches no kernel and costs no device time; the profiler's markers neither.
        if not func.is_view and not func.__name__.startswith("_record_function"):
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(fn: Callable[[], object]) -> collections.Counter[str]:
    """The ATen operations that one call of ``fn`` dispatches, by overload name (``convolution.default``).

    Views and the profiler's markers are not counted; allocations (``empty``) are. On a GPU nearly
    every other one is a kernel launch, each costing microseconds of host time in eager PyTorch:
    the count is the hardware-independent measure of how launch-bound a step is. (The C++ kernels
    of the CPU fast path are counted with the ATen operations they call inside, which are not what
    a GPU runs: turn them off, ``cpu_kernels.ENABLED`` or GUNN_CPU_KERNELS=0, to count a GPU's.)
    """
    with _Dispatches() as mode:
        fn()
    return mode.counts
