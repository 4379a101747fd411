"""Plain reference implementations that the tests hold the library to."""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch
from torch import Tensor, nn

# GUNN_TEST_DEVICE=cuda runs the layer tests on a GPU (see .ci/gpu-check).
DEVICE = torch.device(os.environ.get("GUNN_TEST_DEVICE", "cpu"))


def gradual_reference(units: nn.ModuleList, x: Tensor, residual: bool = True, dim: int = 1) -> Tensor:
    """Eq. 4 as a plain autograd loop: a new state per unit, segment i replaced in order."""
    state, start = x, 0
    for unit in units:
        delta = unit(state)
        width = delta.shape[dim]
        new = state.narrow(dim, start, width) + delta if residual else delta
        rest = state.shape[dim] - start - width
        state = torch.cat([state.narrow(dim, 0, start), new, state.narrow(dim, start + width, rest)], dim)
        start += width
    return state


def simultaneous_reference(units: nn.ModuleList, x: Tensor, residual: bool = True, dim: int = 1) -> Tensor:
    """Every unit sees the input; their updates are concatenated."""
    delta = torch.cat([unit(x) for unit in units], dim)
    return x + delta if residual else delta


def forward_backward(fn: Callable[[Tensor], Tensor], module: nn.Module, x: Tensor, grad_seed: int = 1) -> dict:
    """Output, input gradient, parameter gradients and buffers after one forward + backward."""
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)  # units with dropout draw the same masks in every run
    out = fn(x)
    generator = torch.Generator(device=out.device).manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
    out.backward(grad)
    return {
        "out": out.detach(),
        "x.grad": x.grad,
        **{f"grad {name}": p.grad for name, p in module.named_parameters()},
        **{f"buffer {name}": b.clone() for name, b in module.named_buffers()},
    }


def assert_same_training_step(
    layer: nn.Module, reference: Callable[..., Tensor], x: Tensor, atol: float = 1e-12, rtol: float = 1e-12
) -> None:
    """``layer`` and ``reference`` over a copy of ``layer.units`` agree on one training step (in float64: to
    rounding, relative too, since the two sum in other orders, and the order depends on the CPU's kernels)."""
    twin = copy.deepcopy(layer)
    got = forward_backward(layer, layer, x)
    want = forward_backward(lambda t: reference(twin.units, t, twin.residual, twin.dim), twin, x)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] is not None, f"{key} is missing"
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=rtol, msg=lambda m, key=key: f"{key}: {m}")
