"""Whole training steps (forward, loss, backward, SGD) of GUNN, SUNN and the paper's peers.

What a user's GPU hours buy: images per second of the step the training engine takes, the
peak memory it needs, how many kernels it launches and ATen operations it dispatches, run
eagerly, as CUDA graphs or compiled. The paper's speed peer is torchvision's ResNeXt-50
(32x4d); DenseNet-169 is the other peer of its ImageNet table.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gunn.models import create_model, list_models

PEERS = ("resnext50_32x4d", "densenet169", "resnet18")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# How the model's forward and backward run; graphs-stages: a GunnNet captured stage by stage, as the engine
# captures it with several ranks (so that DDP's all-reduce overlaps the backward).
MODES = ("eager", "graphs", "graphs-stages", "compile")


@dataclass
class StepResult:
    """One configuration's measured training step."""

    model: str
    batch: int
    precision: str  # as run: "fp32 (TF32)" where float32 products used TF32 tensor cores
    mode: str  # eager, graphs (CUDA graphs of the forward and backward), graphs-stages, or compile (torch.compile)
    images_per_s: float
    step_ms: float
    peak_mb: float  # CUDA: max_memory_allocated over the timed steps (reset after warm-up); CPU: peak RSS
    memory_mb: float  # what the step needs: peak_mb plus the graph pools' memory the allocator does not count
    pool_mb: float | None  # CUDA graphs' private memory pools (graphs, compile's reduce-overhead), else None
    kernels: int | None  # device kernels (CUDA) or operators (CPU) of one profiled step
    launches: int | None  # host calls that launch work on the device (CUDA), else None
    ops: int | None  # ATen operations one step dispatches (eager rows; views not counted)

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
    """The engine's step on a fixed random batch: autocast forward, cross entropy, backward, the engine's SGD
    (``gunn.train.optimizer.sgd``: fused on CUDA; ``fused_sgd`` chooses). ``graphs``: the forward and backward
    captured as CUDA graphs (``captured`` says what and the pool's size), with ``graph_stages`` a GunnNet stage by
    stage; ``compile_options``: the model compiled, ``torch.compile(model, **compile_options)``."""

    def __init__(self, model: nn.Module, batch: int, image_size: int, device: torch.device, precision: str,
                 graphs: bool = False, channels_last: bool = True, num_classes: int = 1000,
                 compile_options: dict[str, Any] | None = None, fused_sgd: bool | None = None,
                 graph_stages: bool = False) -> None:
        from gunn.config import OptimConfig
        from gunn.train.optimizer import sgd

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if graphs and compile_options is not None:
            raise ValueError("graphs and compile exclude each other: choose one")
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.device, self.dtype, self.graphs = device, PRECISIONS[precision], graphs
        self.model = model.to(device, memory_format=layout).train()
        self.x = torch.randn(batch, 3, image_size, image_size, device=device).to(memory_format=layout)
        self.y = torch.randint(0, num_classes, (batch,), device=device)
        self.optimizer = sgd(self.model.parameters(), OptimConfig(lr=1e-3), device, fused=fused_sgd)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        self.captured: Any = None  # gunn.train.graphs.CapturedStep
        # Compiled with CUDA graphs (cudagraph trees): each step is a new replay, whose outputs may overwrite
        # the last one's (none is kept from one step to the next).
        self.new_graph_step = (compile_options or {}).get("mode") == "reduce-overhead"
        if compile_options is not None:
            self.forward = torch.compile(self.model, **compile_options)
        if graphs:
            from gunn.train.graphs import capture_training_step

            self.captured = capture_training_step(self.model, self.x, self.dtype, stages=graph_stages)

    def __call__(self) -> None:
        if self.new_graph_step:
            torch.compiler.cudagraph_mark_step_begin()
        autocast = contextlib.nullcontext() if self.dtype is None else torch.autocast(
            self.device.type, dtype=self.dtype, cache_enabled=not self.graphs)
        with autocast:
            logits = self.forward(self.x)
        loss = F.cross_entropy(logits.float(), self.y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    """Starts the device's peak memory afresh (CUDA; the CPU's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def time_steps(step: Callable[[], None], device: torch.device, warmup: int, steps: int,
               reset: Callable[[torch.device], None] = reset_peak) -> tuple[float, float]:
    """(seconds per step, peak memory in MB) over ``steps`` steps after ``warmup`` steps. The peak is ``reset``
    after the warm-up: cuDNN's algorithm search and first allocations are not the step's."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    reset(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    return seconds, peak_memory_mb(device)


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


def count_ops(step: Callable[[], None], device: torch.device) -> int:
    """ATen operations one call of ``step`` dispatches (views not counted). On the CPU the GUNN fast path's
    C++ kernels are turned off for it (after one step to warm up without them): the count is then what a
    GPU runs."""
    from gunn.bench.measure import dispatched_ops
    from gunn.layers import cpu_kernels

    if device.type == "cuda":
        return sum(dispatched_ops(step).values())
    enabled, cpu_kernels.ENABLED = cpu_kernels.ENABLED, False
    try:
        step()
        return sum(dispatched_ops(step).values())
    finally:
        cpu_kernels.ENABLED = enabled


def peak_memory_mb(device: torch.device) -> float:
    """The allocator's peak since the last reset (CUDA), or the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release(device: torch.device) -> None:
    """Returns the memory of what is gone to the device (CUDA): the next measurement starts from it."""
    if device.type == "cuda":
        gc.collect()  # a graphed model's forward refers back to the model: a cycle holding the graphs' memory
        torch.cuda.empty_cache()


def graph_pools(device: torch.device) -> tuple[int, int]:
    """(bytes, unseen bytes) of every private memory pool on ``device`` (CUDA graphs' pools, compile's in
    reduce-overhead mode): what they reserve, and of it what no live tensor holds. Replays use the
    unseen bytes, but the allocator's counters (``max_memory_allocated``) never see them."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    segments = [s for s in torch.cuda.memory_snapshot()
                if s.get("device", index) == index and tuple(s["segment_pool_id"]) != (0, 0)]  # (0, 0): the default
    total = sum(s["total_size"] for s in segments)
    return total, total - sum(s["allocated_size"] for s in segments)


def measure(name: str, batch: int, image_size: int, device: torch.device, precision: str, mode: str = "eager",
            warmup: int = 3, steps: int = 10, kernels: bool = True, ops: bool = True, tf32: bool = False,
            compile_options: dict[str, Any] | None = None) -> StepResult:
    """Builds ``name`` and measures its training step (see ``StepResult``). ``mode``: eager, graphs, or
    compile (``compile_options``, by default mode reduce-overhead on CUDA and default on the CPU). ``tf32``:
    float32 products run on TF32 tensor cores (the label says so). ``ops``: count the dispatched operations
    (eager rows)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "compile" and compile_options is None:
        compile_options = {"mode": "reduce-overhead" if device.type == "cuda" else "default"}
    torch.manual_seed(0)
    step = TrainingStep(build(name), batch, image_size, device, precision, graphs=mode.startswith("graphs"),
                        compile_options=compile_options if mode == "compile" else None,
                        graph_stages=mode == "graphs-stages")
    try:
        seconds, peak = time_steps(step, device, warmup, steps)
        pool = unseen = None
        if device.type == "cuda" and mode != "eager":
            captured = step.captured
            if captured is not None and hasattr(captured, "pool_bytes"):  # its own pool, exactly
                pool, unseen = captured.pool_bytes, captured.unseen_bytes
            else:
                pool, unseen = graph_pools(device)
        counted, launches = count_kernels(step, device) if kernels else (None, None)
        dispatched = count_ops(step, device) if ops and mode == "eager" else None
    finally:
        del step
        if mode == "compile":
            torch.compiler.reset()  # its compiled graphs (and their CUDA graphs' pools)
        release(device)
    label = "fp32 (TF32)" if precision == "fp32" and tf32 else precision
    return StepResult(name, batch, label, mode, batch / seconds, seconds * 1e3, peak, peak + (unseen or 0) / 2**20,
                      None if pool is None else pool / 2**20, counted, launches, dispatched)
