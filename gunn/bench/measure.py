"""Measurements shared by the benchmark and the tests: activation memory, time, FLOPs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode


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
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


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
