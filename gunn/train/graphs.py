"""CUDA graphs of a training step: the model's forward and backward captured once, then replayed.

A GUNN layer runs its update units one after the other, each a dozen small kernels, and the
paper's ImageNet recipe gives each GPU only 32 images: a GUNN-18 step is then bound by the
host launching thousands of kernels, not by the GPU. Replaying a captured CUDA graph launches
the whole forward (and the whole backward) at once. The capture keeps the memory-saving
backward: the graph records exactly the kernels of the eager step, and its memory pool holds
what that step keeps for backward.

``torch.cuda.make_graphed_callables`` does the capture; the loss, the optimiser and DDP's
gradient all-reduce stay eager around it. What a captured step needs: the same input shape
every step (training loaders drop the last partial batch), no host synchronisation inside
the model (the fast path of the GUNN layers has none), and autocast without its cast cache.

One graph of the whole model returns every gradient at the end of its backward, so DDP can
only start its all-reduce then. With several ranks a ``GunnNet`` is therefore captured stage by
stage (stem, each stage, head): the gradients of the later stages arrive, and their buckets'
all-reduce starts, while the earlier stages' backward graphs still run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gunn.layers import GradualUpdate
from gunn.models import GunnNet


@dataclass(frozen=True)
class CapturedStep:
    """What ``capture_training_step`` captured, and the memory its graphs hold."""

    pieces: tuple[str, ...]  # the modules captured as one graph each, in the order they run ("" is the whole model)
    pool_bytes: int  # the graphs' private memory pool: what the capture reserved for their replays
    # Of the pool, the bytes no live tensor holds: replays use them, but the allocator's counters
    # (max_memory_allocated) never see them. Add them to its peak for the memory a graphed step needs.
    unseen_bytes: int


def graph_pieces(model: nn.Module, stages: bool) -> list[tuple[str, nn.Module]]:
    """The modules to capture as one graph each, by name, in the order they run: the whole model, or with
    ``stages`` (for a ``GunnNet``; any other model stays whole) its stem, each of its stages and its head
    where that has parameters. Global pooling and the classifier then stay eager."""
    if not (stages and isinstance(model, GunnNet)):
        return [("", model)]
    pieces: list[tuple[str, nn.Module]] = [("stem", model.stem)]
    pieces += [(f"stages.{index}", stage) for index, stage in enumerate(model.stages)]
    if any(True for _ in model.head.parameters()):
        pieces.append(("head", model.head))
    return pieces


def capture_training_step(model: nn.Module, example: Tensor, amp_dtype: torch.dtype | None, *,
                          stages: bool = False, warmup: int = 3) -> CapturedStep:
    """Replaces the training-mode forward and backward of ``model`` (or, with ``stages``, of its pieces: see
    ``graph_pieces``) with CUDA graph replays; returns what was captured and its memory pool's size.

    ``example`` is a batch of the shape, dtype, memory format and device of every later batch; it
    becomes the graphs' static input (later batches are copied into it). The forward in eval mode
    stays eager. First ``warmup`` eager passes (cuDNN's algorithm search and lazy initialisation
    must not be captured) run on a side stream; they would count as training batches in the
    BatchNorm statistics, so those are put back as they were. Their memory is returned to the
    device before the capture fills the graphs' pool, which otherwise comes on top of it.
    """
    _check(model, example, warmup)
    pieces = graph_pieces(model, stages)
    saved = [b.detach().clone() for b in model.buffers()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), _autocast(amp_dtype):
        outputs = _warm_up([module for _, module in pieces], example, warmup)
    torch.cuda.current_stream().wait_stream(side)
    # Each later piece takes the graphed output of the one before it: an input that requires grad.
    samples = [example, *(torch.empty_like(out).requires_grad_() for out in outputs[:-1])]
    del outputs
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)
    del saved
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the warm-up's activations and cuDNN's search workspaces
    pool = torch.cuda.graph_pool_handle()
    with _autocast(amp_dtype):
        # No warm-up of its own (done above); it captures the forwards in order, then the backwards
        # in reverse, all in one pool, on a side stream of its own after a device synchronisation.
        torch.cuda.make_graphed_callables(tuple(module for _, module in pieces), tuple((s,) for s in samples),
                                          num_warmup_iters=0, pool=pool)
    device = example.device.index if example.device.index is not None else torch.cuda.current_device()
    return CapturedStep(tuple(name for name, _ in pieces), *_pool_bytes(pool, device))


def _check(model: nn.Module, example: Tensor, warmup: int) -> None:
    """ValueError for what a capture cannot replay, before anything runs."""
    if not model.training:
        raise ValueError("capture the training step with the model in train mode")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (cuDNN's search must not be captured), got {warmup}")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None for m in model.modules()):
        # Its factor 1/batches changes every step, but a graph replays the first step's.
        raise ValueError("CUDA graphs cannot replay BatchNorm with momentum=None (a cumulative average)")
    recompute = [name for name, m in model.named_modules()
                 if isinstance(m, GradualUpdate) and m.mode == "gunn" and m.memory == "recompute"]
    if recompute:
        raise ValueError(f"CUDA graphs cannot capture the GUNN layer {recompute[0]} with memory='recompute': its "
                         "backward reads and forks the CUDA random state, which a capture forbids; use "
                         "memory='efficient'")
    if example.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got an input on {example.device}")


def _autocast(amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """Autocast as the training step runs it, without its cast cache (a graph replays the casts it captured)."""
    return torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                          cache_enabled=False)


def _warm_up(modules: list[nn.Module], example: Tensor, iterations: int) -> list[Tensor]:
    """Runs each module's forward and backward ``iterations`` times, as its capture will run them: the first
    on ``example``, each next one on the output of the one before; returns their last outputs."""
    outputs: list[Tensor] = []
    for module in modules:
        x = example if not outputs else outputs[-1].detach().requires_grad_()
        inputs = [t for t in (x, *module.parameters()) if t.requires_grad]
        for _ in range(iterations):
            out = module(x)
            torch.autograd.grad(out, inputs, grad_outputs=torch.empty_like(out))
        outputs.append(out.detach())
    return outputs


def _pool_bytes(pool: tuple[int, int], device: int) -> tuple[int, int]:
    """The bytes the private memory pool ``pool`` holds on ``device``, and those of them no live tensor holds."""
    segments = [s for s in torch.cuda.memory_snapshot()
                if tuple(s["segment_pool_id"]) == tuple(pool) and s["device"] == device]
    total = sum(s["total_size"] for s in segments)
    return total, total - sum(s["allocated_size"] for s in segments)
