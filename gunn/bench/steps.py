"""Whole training steps (forward, loss, backward, SGD) of GUNN, SUNN and the paper's peers.

What a user's GPU hours buy: images per second of the step the training engine takes, the
peak memory it needs, how many kernels it launches, and whether the host ever waits for the
device inside it. The paper's speed peer is torchvision's ResNeXt-50 (32x4d); DenseNet-169
is the other peer of its ImageNet table.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gunn.models import create_model, list_models

PEERS = ("resnext50_32x4d", "densenet169", "resnet18")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepResult:
    """One configuration's measured training step."""

    model: str
    batch: int
    precision: str
    graphs: bool
    images_per_s: float
    step_ms: float
    peak_mb: float  # max_memory_allocated over the timed steps (CUDA), else the process's peak RSS
    kernels: int | None  # device kernels (CUDA) or operators (CPU) of one profiled step
    launches: int | None  # host calls that launch work on the device (CUDA), else None

    def as_dict(self) -> dict:
        return asdict(self)


def build(name: str, num_classes: int = 1000) -> nn.Module:
    """A registered GUNN/SUNN model, or one of torchvision's peers (untrained, no download)."""
    if name in list_models():
        return create_model(name, num_classes=num_classes)
    if name in PEERS:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; models: {', '.join(list_models())}, or a peer: {', '.join(PEERS)}")


class TrainingStep:
    """The engine's step on a fixed random batch: autocast forward, cross entropy, backward, SGD."""

    def __init__(self, model: nn.Module, batch: int, image_size: int, device: torch.device, precision: str,
                 graphs: bool = False, channels_last: bool = True, num_classes: int = 1000) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.device, self.dtype, self.graphs = device, PRECISIONS[precision], graphs
        self.model = model.to(device, memory_format=layout).train()
        self.x = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=layout)
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, nesterov=True,
                                         weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        if graphs:
            from gunn.train.graphs import capture_training_step

            capture_training_step(self.model, self.x, self.dtype)

    def __call__(self) -> None:
        autocast = contextlib.nullcontext() if self.dtype is None else torch.autocast(
            self.device.type, dtype=self.dtype, cache_enabled=not self.graphs)
        with autocast:
            logits = self.model(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, over ``steps`` steps after ``warmup`` (cuDNN's algorithm search, allocations)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return (time.perf_counter() - start) / steps


def count_kernels(step: Callable[[], None], device: torch.device) -> tuple[int, int | None]:
    """(kernels, launches) of one step: device kernels and the host's launch calls on CUDA
    (a replayed CUDA graph is one launch of many kernels); operators and None on the CPU."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _synchronize(device)
    events = prof.events()
    if device.type != "cuda":
        # Operators called from outside other operators (the CPU's unit of dispatch work).
        outer = [e for e in events if e.name.startswith("aten::")
                 and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
        return len(outer), None
    kernels = sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")) for e in events)
    launches = sum(e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx",
                              "cudaGraphLaunch") for e in events)
    return kernels, launches


def peak_memory_mb(device: torch.device) -> float:
    """The allocator's peak since the last reset (CUDA), or the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(name: str, batch: int, image_size: int, device: torch.device, precision: str, graphs: bool = False,
            warmup: int = 3, steps: int = 10, kernels: bool = True) -> StepResult:
    """Builds ``name`` and measures its training step (see ``StepResult``)."""
    torch.manual_seed(0)
    step = TrainingStep(build(name), batch, image_size, device, precision, graphs)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(step, device, warmup, steps)
    peak = peak_memory_mb(device)
    counted, launches = count_kernels(step, device) if kernels else (None, None)
    result = StepResult(name, batch, precision, graphs, batch / seconds, seconds * 1e3, peak, counted, launches)
    del step
    if device.type == "cuda":
        gc.collect()  # a graphed model's forward refers back to the model: a cycle holding the graphs' memory
        torch.cuda.empty_cache()
    return result


def host_syncs(step: Callable[[], None], device: torch.device) -> str | None:
    """Runs ``step`` once with CUDA's sync-debug mode set to error: the error if the host waited
    for the device inside it, else None. (Warm the step up first: cuDNN's search synchronises.)"""
    if device.type != "cuda":
        raise ValueError("host synchronisation can only be detected on CUDA")
    _synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except RuntimeError as err:
        return str(err).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _synchronize(device)
    return None
