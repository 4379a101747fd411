"""The hand-written GUNN backward of GunnLayer (gunn.layers.fastpath) against the plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import gunn.layers.fastpath as fastpath
from gunn.layers import cpu_kernels
from gunn.bench.measure import activation_bytes
from gunn.layers import GunnLayer
from tests.reference import DEVICE, assert_same_training_step, forward_backward, gradual_reference

FAST = "_GradualBottlenecksBackward"


def grad_fn_name(layer: nn.Module, x: torch.Tensor) -> str:
    return type(layer(x.clone().requires_grad_()).grad_fn).__name__


def double_input(channels: int, channels_last: bool, size: tuple[int, int] = (5, 6)) -> torch.Tensor:
    x = torch.randn(3, channels, *size, dtype=torch.float64, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# (channels, segments, projection, residual); block_rows 1 = one unit per block, 40 = two
# units per block plus a remainder (rows per unit 3 * width), 10**6 = the whole layer.
SHAPES = [(30, 5, True, True), (30, 5, False, True), (30, 5, True, False), (12, 1, True, True), (12, 12, True, True)]


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "aten-norm"])
@pytest.mark.parametrize("block_rows", [1, 40, 10**6])
@pytest.mark.parametrize("channels_last,cpu_channels_last", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("channels,segments,projection,residual", SHAPES)
def test_fast_path_matches_the_plain_loop(
    channels, segments, projection, residual, channels_last, cpu_channels_last, block_rows, kernels, monkeypatch
):
    monkeypatch.setattr(fastpath, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(fastpath, "CPU_CHANNELS_LAST", cpu_channels_last)
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels)
    layer = GunnLayer(channels, segments, projection=projection, residual=residual).to(DEVICE, torch.float64)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    x = double_input(channels, channels_last)
    assert grad_fn_name(layer, x) == FAST
    assert layer(x).is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_same_training_step(layer, gradual_reference, x)


@pytest.mark.parametrize("size", [(1, 1), (1, 3)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_path_on_feature_maps_whose_layout_is_ambiguous(size, channels_last):
    # With one pixel per row or column NCHW and channels_last strides can both be contiguous.
    layer = GunnLayer(12, 3).to(DEVICE, torch.float64)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
    x = double_input(12, channels_last, size)
    assert grad_fn_name(layer, x) == FAST
    assert_same_training_step(layer, gradual_reference, x)


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "aten-norm"])
@pytest.mark.parametrize("momentum,track", [(None, True), (0.1, False)])
def test_fast_path_keeps_batch_norm_statistics_as_the_modules_would(momentum, track, kernels, monkeypatch):
    monkeypatch.setattr(cpu_kernels, "ENABLED", kernels)
    layer = GunnLayer(16, 4)
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
            if not track:
                m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    layer = layer.to(DEVICE, torch.float64).to(memory_format=torch.channels_last)
    x = double_input(16, True)
    assert grad_fn_name(copy.deepcopy(layer), x) == FAST
    assert_same_training_step(layer, gradual_reference, x)


def test_fast_path_and_generic_path_agree_in_float32_channels_last():
    layer = GunnLayer(48, 6).to(DEVICE).to(memory_format=torch.channels_last)
    generic = copy.deepcopy(layer)
    generic.fast_path = False
    x = torch.randn(4, 48, 8, 8, device=DEVICE).to(memory_format=torch.channels_last)
    assert grad_fn_name(copy.deepcopy(generic), x) != FAST
    got, want = forward_backward(layer, layer, x), forward_backward(generic, generic, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def test_frozen_parameters_and_an_input_without_grad_are_left_alone():
    layer = GunnLayer(16, 4).to(DEVICE, torch.float64)
    frozen = [layer.units[1].blocks[0].conv2.weight, layer.units[3].proj[1].bias]
    for p in frozen:
        p.requires_grad_(False)
    twin = copy.deepcopy(layer)
    x = double_input(16, False)
    layer(x).pow(2).sum().backward()
    gradual_reference(twin.units, x).pow(2).sum().backward()
    for (name, p), q in zip(layer.named_parameters(), twin.parameters()):
        if q.grad is None:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-12, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    assert all(p.grad is None for p in frozen)


def _with_forward_hook(layer):
    calls = []
    layer.units[2].register_forward_hook(lambda *args: calls.append(1))
    return layer, calls


@pytest.mark.parametrize(
    "change",
    ["fast_path off", "forward hook", "batch norm in eval mode", "depth 2", "autocast", "recompute"],
)
def test_what_the_fast_path_does_not_cover_runs_on_the_generic_path(change):
    layer = GunnLayer(16, 4, depth=2 if change == "depth 2" else 1).to(DEVICE)
    calls = None
    if change == "fast_path off":
        layer.fast_path = False
    elif change == "forward hook":
        layer, calls = _with_forward_hook(layer)
    elif change == "batch norm in eval mode":
        layer.units[0].blocks[0].bn2.eval()
    elif change == "recompute":
        layer.memory = "recompute"
    x = torch.randn(2, 16, 4, 4, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=change == "autocast"):
        out = layer(x)
    assert type(out.grad_fn).__name__ != FAST
    out.float().sum().backward()
    assert x.grad is not None
    if calls is not None:
        assert calls == [1]


def test_fast_path_keeps_no_more_activations_than_the_generic_path():
    layer = GunnLayer(48, 6).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(8, 48, 16, 16, device=DEVICE).to(memory_format=torch.channels_last)
    fast = activation_bytes(layer, x)
    layer.fast_path = False
    generic = activation_bytes(layer, x)
    assert fast <= generic
