"""The generic GUNN container: Eq. 4 for any update units, and its memory-saving backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gunn.bench.measure import retained_bytes
from gunn.layers import GradualUpdate, GunnLayer
from tests.reference import DEVICE, assert_same_training_step, gradual_reference, simultaneous_reference

MEMORY = ["efficient", "recompute", "autograd"]


def linear_units(widths: list[int], channels: int, dropout: float = 0.0) -> list[nn.Module]:
    """Units for sequence features (channels last): each maps all features to its segment."""
    return [nn.Sequential(nn.Linear(channels, w), nn.Dropout(dropout), nn.Tanh()) for w in widths]


@pytest.mark.parametrize("memory", MEMORY)
@pytest.mark.parametrize("residual", [True, False])
def test_gradual_mode_of_custom_units_matches_plain_loop(memory: str, residual: bool) -> None:
    layer = GradualUpdate(linear_units([3, 5, 8], 16), residual=residual, memory=memory, dim=-1)
    layer = layer.to(DEVICE, torch.float64)
    assert_same_training_step(layer, gradual_reference, torch.randn(4, 7, 16, dtype=torch.float64, device=DEVICE))


def test_simultaneous_mode_of_custom_units_matches_plain_loop() -> None:
    layer = GradualUpdate(linear_units([3, 5, 8], 16), mode="sunn", dim=-1).to(DEVICE, torch.float64)
    assert_same_training_step(layer, simultaneous_reference, torch.randn(4, 7, 16, dtype=torch.float64, device=DEVICE))


def test_recompute_replays_random_draws_of_units_with_dropout() -> None:
    layer = GradualUpdate(linear_units([4, 4, 8], 16, dropout=0.5), memory="recompute", dim=-1)
    layer = layer.to(DEVICE, torch.float64)
    assert_same_training_step(layer, gradual_reference, torch.randn(4, 7, 16, dtype=torch.float64, device=DEVICE))


def test_units_whose_widths_do_not_cover_the_input_are_an_error() -> None:
    layer = GradualUpdate(linear_units([3, 5], 16), dim=-1)
    with pytest.raises(ValueError, match="add up to 8 channels but the input has 16"):
        layer(torch.randn(2, 16))


def test_an_empty_list_of_units_is_an_error() -> None:
    with pytest.raises(ValueError, match="units"):
        GradualUpdate([])


@pytest.mark.parametrize("name,value", [("mode", "parallel"), ("memory", "cheap")])
def test_an_unknown_mode_or_memory_strategy_is_an_error_naming_it(name: str, value: str) -> None:
    layer = GradualUpdate(linear_units([8, 8], 16), dim=-1)
    with pytest.raises(ValueError, match=f"{name} must be one of .*'{value}'"):
        setattr(layer, name, value)


class InPlaceUnit(nn.Module):
    def forward(self, state: torch.Tensor) -> torch.Tensor:
        state.mul_(2)
        return state[..., :8]


def test_a_unit_that_modifies_its_input_in_place_is_named_in_the_error() -> None:
    layer = GradualUpdate([InPlaceUnit(), InPlaceUnit()], dim=-1)
    with pytest.raises(RuntimeError, match="update unit 0 \\(InPlaceUnit\\) modified its input"):
        layer(torch.randn(2, 16, requires_grad=True))


@pytest.mark.parametrize("memory", ["efficient", "recompute"])
def test_modifying_the_output_in_place_before_backward_is_a_clear_error(memory: str) -> None:
    layer = GunnLayer(8, 4, memory=memory).to(DEVICE)
    out = layer(torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=True))
    out.relu_()
    with pytest.raises(RuntimeError, match="modified in place after its forward"):
        out.sum().backward()


@pytest.mark.parametrize("memory", ["efficient", "recompute"])
def test_backward_twice_with_retain_graph_gives_the_same_gradients(memory: str) -> None:
    layer = GunnLayer(12, 3, memory=memory).to(DEVICE, torch.float64)
    x = torch.randn(2, 12, 5, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    out = layer(x)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, [x, *layer.parameters()], grad, retain_graph=True)
    second = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("memory", ["efficient", "recompute"])
def test_second_order_gradients_match_the_plain_loop(memory: str) -> None:
    layer = GunnLayer(8, 4, memory=memory).to(DEVICE, torch.float64)
    twin = GunnLayer(8, 4, memory=memory).to(DEVICE, torch.float64)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64, device=DEVICE)

    def gradient_penalty_grads(module: nn.Module, fn) -> list[torch.Tensor]:
        inp = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(inp).pow(2).sum(), inp, create_graph=True)
        return torch.autograd.grad(gx.pow(2).sum(), list(module.parameters()))

    got = gradient_penalty_grads(layer, layer)
    want = gradient_penalty_grads(twin, lambda t: gradual_reference(twin.units, t))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_without_autograd_the_layer_keeps_nothing_but_its_output() -> None:
    layer = GunnLayer(48, 6)
    x = torch.randn(4, 48, 8, 8)
    with torch.no_grad():
        nbytes, out = retained_bytes(lambda: layer(x))
    assert out.grad_fn is None
    assert nbytes == out.untyped_storage().nbytes()


def test_inference_without_autograd_matches_the_autograd_forward() -> None:
    layer = GunnLayer(24, 4).to(DEVICE, torch.float64).eval()
    x = torch.randn(2, 24, 6, 6, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        plain = layer(x)
    torch.testing.assert_close(plain, gradual_reference(layer.units, x).detach(), atol=1e-12, rtol=0)


def test_evaluation_mode_stays_differentiable() -> None:
    layer = GunnLayer(12, 3).to(DEVICE, torch.float64).eval()
    assert_same_training_step(layer, gradual_reference, torch.randn(2, 12, 4, 4, dtype=torch.float64, device=DEVICE))


@pytest.mark.parametrize("memory", MEMORY)
def test_units_wider_than_the_input_are_an_error(memory: str) -> None:
    layer = GradualUpdate(linear_units([8, 12], 16), memory=memory, dim=-1)
    with pytest.raises(ValueError, match="add up to more than the input's 16 channels|add up to 20 channels"):
        layer(torch.randn(2, 16, requires_grad=True))
