"""The paper's optimiser: SGD with momentum and weight decay, fused on CUDA."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from gunn.config import OptimConfig


def sgd(params: Iterable[nn.Parameter], optim: OptimConfig, device: torch.device,
        fused: bool | None = None) -> torch.optim.SGD:
    """The paper's SGD (``optim``) for parameters on ``device``. On CUDA its fused kernel: one launch for every
    parameter, and GradScaler hands it the scale and the inf/NaN flag as tensors instead of reading them on the
    host (the other kernels' ``.item()`` makes fp16 wait for the device at every step). On the CPU the plain
    loop, whose results the fused kernel does not repeat bit for bit. ``fused``: the fused kernel or not,
    whatever the device (the benchmark counts the CPU's operations of a GPU's step)."""
    if fused is None:
        fused = device.type == "cuda"
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, dampening=0.0,
                                weight_decay=optim.weight_decay, nesterov=optim.nesterov, fused=True if fused else None)
    momentum_from_zero(optimizer)
    return optimizer


def momentum_from_zero(optimizer: torch.optim.Optimizer) -> None:
    """Gives every parameter of a fused SGD that has none a momentum buffer of zeros.

    Without buffers the fused kernel allocates them empty and lets its first step fill them;
    a first step that GradScaler skips (an inf gradient: usual in fp16's first steps, at the
    initial scale 65536) returns before filling them, and the next steps take whatever that
    memory held as momentum. From zeros, the first step gives the same buffer (0.9 * 0 + g = g,
    as dampening is 0) and a skipped one keeps them zero. (Called again after a checkpoint is
    loaded: a state saved before any step has no buffers.)
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") and group["momentum"]):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
