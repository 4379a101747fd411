"""GunnLayer (gunn.layers.gunn_layer): the paper's bottleneck units in gradual and simultaneous order (docs/layer.md)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from gunn.bench.measure import activation_bytes, dispatched_ops
from gunn.layers import GunnLayer, UpdateUnit, gunn_layer
from tests.layers.changed_units import GeluBottleneck, NormalizedBottleneck
from tests.reference import DEVICE, assert_same_training_step, forward_backward, gradual_reference, simultaneous_reference

# (channels, segments, expansion, depth, projection, residual)
SHAPES = [
    (16, 4, 2, 1, True, True),
    (16, 4, 2, 2, True, True),
    (16, 4, 2, 1, False, True),
    (18, 3, 3, 2, False, True),
    (12, 12, 2, 1, True, True),
    (16, 4, 2, 1, True, False),
]


def double_input(channels: int) -> torch.Tensor:
    return torch.randn(3, channels, 5, 6, dtype=torch.float64, device=DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["efficient", "recompute", "autograd"])
@pytest.mark.parametrize("channels,segments,expansion,depth,projection,residual", SHAPES)
def test_gunn_mode_matches_a_plain_loop_over_the_units(channels, segments, expansion, depth, projection, residual, memory):
    layer = GunnLayer(channels, segments, expansion, depth, projection, residual, "gunn", memory)
    assert_same_training_step(layer.to(DEVICE, torch.float64), gradual_reference, double_input(channels))


@pytest.mark.slow
@pytest.mark.parametrize("channels,segments,expansion,depth,projection,residual", SHAPES)
def test_sunn_mode_matches_every_unit_applied_to_the_input(channels, segments, expansion, depth, projection, residual):
    layer = GunnLayer(channels, segments, expansion, depth, projection, residual, "sunn")
    assert_same_training_step(layer.to(DEVICE, torch.float64), simultaneous_reference, double_input(channels))


@pytest.mark.slow
@pytest.mark.parametrize("mode,reference", [("gunn", gradual_reference), ("sunn", simultaneous_reference)])
def test_sync_batch_norm_units_run_unfused_with_the_same_result(mode, reference):
    layer = nn.SyncBatchNorm.convert_sync_batchnorm(GunnLayer(16, 4, depth=2, mode=mode))
    assert any(isinstance(m, nn.SyncBatchNorm) for m in layer.modules())
    assert_same_training_step(layer.to(DEVICE, torch.float64), reference, double_input(16))


def test_one_segment_makes_gunn_and_sunn_identical():
    gunn = GunnLayer(16, 1, mode="gunn").to(DEVICE, torch.float64)
    sunn = copy.deepcopy(gunn)
    sunn.mode = "sunn"
    x = double_input(16)
    got, want = forward_backward(gunn, gunn, x), forward_backward(sunn, sunn, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=0, msg=lambda m, key=key: f"{key}: {m}")


def test_changing_the_mode_of_a_built_layer_reuses_its_weights():
    layer = GunnLayer(16, 4).to(DEVICE, torch.float64).eval()
    x = double_input(16)
    with torch.no_grad():
        for mode, reference in [("sunn", simultaneous_reference), ("gunn", gradual_reference), ("sunn", simultaneous_reference)]:
            layer.mode = mode
            torch.testing.assert_close(layer(x), reference(layer.units, x), atol=1e-12, rtol=0)


def test_units_map_the_whole_state_to_their_own_segment():
    layer = GunnLayer(24, 4, projection=True)
    assert isinstance(layer.units, nn.ModuleList) and len(layer.units) == 4
    assert all(isinstance(u, UpdateUnit) for u in layer.units)
    assert layer.units[2](torch.randn(2, 24, 5, 5)).shape == (2, 6, 5, 5)


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["efficient", "recompute", "autograd"])
def test_batch_norm_statistics_are_updated_once_per_forward(memory):
    layer = GunnLayer(16, 4, memory=memory).to(DEVICE)
    layer(torch.randn(4, 16, 6, 6, device=DEVICE, requires_grad=True)).sum().backward()
    counts = {m.num_batches_tracked.item() for m in layer.modules() if isinstance(m, nn.BatchNorm2d)}
    assert counts == {1}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(channels=16, segments=5), "segments must divide channels=16, got segments=5"),
        (dict(channels=0, segments=1), "channels must be a positive integer, got 0"),
        (dict(channels=16, segments=-4), "segments must be a positive integer, got -4"),
        (dict(channels=16, segments=4, expansion=0), "expansion must be a positive integer, got 0"),
        (dict(channels=16, segments=4, depth=1.5), "depth must be a positive integer, got 1.5"),
        (dict(channels=16, segments=4, mode="simultaneous"), "mode must be one of .*'simultaneous'"),
        (dict(channels=16, segments=4, memory="low"), "memory must be one of .*'low'"),
        (dict(channels=16, segments=4, residual="yes"), "residual must be a bool, got 'yes'"),
        (dict(channels=16, segments=4, projection=1), "projection must be a bool, got 1"),
        (dict(channels=16, segments=4, block=nn.Identity), "block must be Bottleneck or a subclass of it, got <class"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_argument_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GunnLayer(**kwargs)


def convolutions(layer: nn.Module, x: torch.Tensor) -> int:
    return dispatched_ops(lambda: layer(x))["convolution.default"]


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2])
def test_sunn_runs_a_unit_with_another_elementwise_activation_as_grouped_convolutions(depth, monkeypatch):
    monkeypatch.setattr(gunn_layer, "_warned", set())
    layer = GunnLayer(16, 4, depth=depth, mode="sunn", block=GeluBottleneck).to(DEVICE, torch.float64)
    x = double_input(16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convolutions(layer, x) == convolutions(GunnLayer(16, 4, depth=depth, mode="sunn").to(DEVICE, torch.float64), x)
        assert_same_training_step(layer, simultaneous_reference, x)


def test_sunn_runs_a_unit_with_a_step_across_channels_unit_by_unit_after_one_warning(monkeypatch):
    monkeypatch.setattr(gunn_layer, "_warned", set())
    layer = GunnLayer(16, 4, mode="sunn", block=NormalizedBottleneck).to(DEVICE, torch.float64)
    x = double_input(16)
    with pytest.warns(UserWarning, match="GunnLayer runs its units one by one in SUNN order") as caught:
        assert convolutions(layer, x) == convolutions(layer, x) == 3 * 4  # per unit: first conv with projection, 3x3, 1x1
    said = [str(w.message) for w in caught if "GunnLayer" in str(w.message)]
    assert len(said) == 1 and "NormalizedBottleneck.STEPS has 'normalize' at step 5" in said[0], said
    assert_same_training_step(layer, simultaneous_reference, x)


@pytest.mark.parametrize("mode", ["gunn", "sunn"])
def test_channels_last_gives_the_float32_results_of_contiguous_tensors(mode):
    layer = GunnLayer(32, 4, mode=mode).to(DEVICE)
    twin = copy.deepcopy(layer).to(memory_format=torch.channels_last)
    x = torch.randn(4, 32, 8, 8, device=DEVICE)
    want = forward_backward(layer, layer, x)
    got = forward_backward(twin, twin, x.to(memory_format=torch.channels_last))
    assert twin(x.to(memory_format=torch.channels_last)).is_contiguous(memory_format=torch.channels_last)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def autocast(fn):
    def run(t):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return fn(t)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("mode,memory", [("gunn", "efficient"), ("gunn", "recompute"), ("sunn", "efficient")])
def test_bfloat16_autocast_stays_close_to_float32(mode, memory):
    layer = GunnLayer(32, 4, mode=mode, memory=memory).to(DEVICE)
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 32, 8, 8, device=DEVICE)
    want = forward_backward(layer, layer, x)
    got = forward_backward(autocast(twin), twin, x)
    grads = [key for key in want if key.startswith("grad ")]
    assert all(got[key].dtype == torch.float32 for key in grads)
    # bfloat16 keeps 8 significant bits: outputs agree to about 1%, gradients to a few %.
    assert relative_error(got["out"], want["out"]) < 0.02
    assert relative_error(got["x.grad"], want["x.grad"]) < 0.1
    flat = lambda d: torch.cat([d[key].flatten() for key in grads])  # noqa: E731
    assert relative_error(flat(got), flat(want)) < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["efficient", "recompute"])
def test_bfloat16_autocast_backward_matches_the_plain_loop_under_autocast(memory):
    # The generic container computes what the plain loop computes, cast for cast. (The fast path
    # rounds in other places; test_fastpath holds it to the same accuracy instead.)
    layer = GunnLayer(32, 4, memory=memory).to(DEVICE)
    layer.fast_path = False
    twin = copy.deepcopy(layer)
    x = torch.randn(4, 32, 8, 8, device=DEVICE)
    got = forward_backward(autocast(layer), layer, x)
    want = forward_backward(autocast(lambda t: gradual_reference(twin.units, t)), twin, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-3, rtol=1e-2, msg=lambda m, key=key: f"{key}: {m}")


@pytest.fixture(scope="module")
def first_layer_memory() -> dict[str, int]:
    """Activation bytes of GUNN-15's first layer (batch 32, 32x32) for every variant."""
    torch.manual_seed(0)
    layer = GunnLayer(240, 20)
    x = torch.randn(32, 240, 32, 32, requires_grad=True)
    result = {}
    for name, mode, memory in [("gunn", "gunn", "efficient"), ("recompute", "gunn", "recompute"),
                               ("autograd", "gunn", "autograd"), ("sunn", "sunn", "efficient")]:
        layer.mode, layer.memory = mode, memory
        result[name] = activation_bytes(layer, x)
    return result


@pytest.mark.slow
def test_memory_saving_backward_keeps_about_what_sunn_keeps(first_layer_memory):
    assert first_layer_memory["gunn"] <= 1.15 * first_layer_memory["sunn"]


@pytest.mark.slow
def test_a_plain_autograd_loop_keeps_every_intermediate_state(first_layer_memory):
    # P = 20 copies of the 240-channel state (docs/layer.md, "The memory-saving backward").
    assert first_layer_memory["autograd"] >= 2.5 * first_layer_memory["sunn"]


def test_recompute_mode_keeps_less_than_sunn(first_layer_memory):
    assert first_layer_memory["recompute"] < 0.5 * first_layer_memory["sunn"]
