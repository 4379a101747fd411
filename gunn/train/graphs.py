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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def capture_training_step(model: nn.Module, example: Tensor, amp_dtype: torch.dtype | None, warmup: int = 3) -> None:
    """Replaces ``model``'s training-mode forward and backward with CUDA graph replays.

    ``example`` is a batch of the shape, dtype and memory format of every later batch; the
    forward in eval mode stays eager. The warm-up passes (cuDNN's algorithm search and
    lazy initialisation must not be captured) would count as training batches in the
    BatchNorm statistics; they are put back as they were.
    """
    if not model.training:
        raise ValueError("capture the training step with the model in train mode")
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is None for m in model.modules()):
        # Its factor 1/batches changes every step, but a graph replays the first step's.
        raise ValueError("CUDA graphs cannot replay BatchNorm with momentum=None (a cumulative average)")
    if example.device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got an input on {example.device}")
    saved = [b.detach().clone() for b in model.buffers()]
    with torch.autocast("cuda", dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                        cache_enabled=False):
        torch.cuda.make_graphed_callables(model, (example.detach().clone(),), num_warmup_iters=warmup)
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)
