"""The hand-written GUNN backward of GunnLayer (gunn.layers.fastpath) against the plain loop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import gunn.layers.fastpath as fastpath
from gunn.layers import cpu_kernels
from gunn.bench.measure import activation_bytes
from gunn.layers import GunnLayer, gunn_layer
from tests.layers.changed_units import GeluBottleneck, RenamedBottleneck, UndeclaredBottleneck
from tests.reference import DEVICE, assert_same_training_step, forward_backward, gradual_reference

FAST = "_GradualBottlenecksBackward"
GENERIC = "_SegmentUpdateBackward"


def grad_fn_name(layer: nn.Module, x: torch.Tensor) -> str:
    return type(layer(x.clone().requires_grad_()).grad_fn).__name__


def double_input(channels: int, channels_last: bool, size: tuple[int, int] = (5, 6)) -> torch.Tensor:
    x = torch.randn(3, channels, *size, dtype=torch.float64, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if channels_last else x


# (channels, segments, projection, residual); block_rows 1 = one unit per block, 40 = two
# units per block plus a remainder (rows per unit 3 * width), 10**6 = the whole layer.
SHAPES = [(30, 5, True, True), (30, 5, False, True), (30, 5, True, False), (12, 1, True, True), (12, 12, True, True)]


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "change",
    ["fast_path off", "forward hook", "batch norm in eval mode", "depth 2", "recompute"],
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
    out = layer(x)
    assert type(out.grad_fn).__name__ != FAST
    out.sum().backward()
    assert x.grad is not None
    if calls is not None:
        assert calls == [1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "block,difference",
    [
        (GeluBottleneck, "GeluBottleneck.STEPS has 'gelu' at step 2, not 'relu'"),
        (UndeclaredBottleneck, "UndeclaredBottleneck overrides Bottleneck.forward"),
    ],
)
def test_a_changed_unit_trains_on_the_generic_path_after_one_warning(block, difference, monkeypatch):
    monkeypatch.setattr(gunn_layer, "_warned", set())  # warnings said before this test
    layer = GunnLayer(16, 4, block=block).to(DEVICE, torch.float64)
    x = double_input(16, False)
    with pytest.warns(UserWarning, match="GunnLayer trains on the generic path") as caught:
        assert [grad_fn_name(layer, x) for _ in range(3)] == [GENERIC] * 3
    said = [str(w.message) for w in caught if "GunnLayer" in str(w.message)]
    assert len(said) == 1 and difference in said[0], said  # once, naming the class and what differs
    # The numbers of plain autograd over the changed unit, not of the paper's.
    assert_same_training_step(layer, gradual_reference, x)


@pytest.mark.slow
@pytest.mark.parametrize("block", [None, RenamedBottleneck], ids=["paper", "subclass"])
def test_a_unit_that_declares_the_papers_steps_takes_the_fast_path_without_a_warning(block, monkeypatch):
    monkeypatch.setattr(gunn_layer, "_warned", set())
    layer = GunnLayer(16, 4, **({} if block is None else {"block": block})).to(DEVICE, torch.float64)
    x = double_input(16, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert grad_fn_name(layer, x) == FAST
    assert_same_training_step(layer, gradual_reference, x)


def test_fast_path_keeps_no_more_activations_than_the_generic_path():
    layer = GunnLayer(48, 6).to(DEVICE).to(memory_format=torch.channels_last)
    x = torch.randn(8, 48, 16, 16, device=DEVICE).to(memory_format=torch.channels_last)
    fast = activation_bytes(layer, x)
    layer.fast_path = False
    generic = activation_bytes(layer, x)
    assert fast <= generic


# -- autocast ---------------------------------------------------------------------------------

def _step(fn, module, x, grad):
    """Output, input gradient, parameter gradients and buffers of one training step of ``fn``."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    out.backward(grad.to(out.dtype))
    return {"out": out.detach(), "x.grad": x.grad, **{n: p.grad for n, p in module.named_parameters()},
            **{f"buffer {n}": b.clone() for n, b in module.named_buffers()}}


def _relative_error(got: dict, want: dict, keys: list[str]) -> float:
    """Root of the summed squared errors over the summed squares of ``want`` (float64)."""
    error = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in keys)
    return float((error / sum((want[k].double() ** 2).sum() for k in keys)).sqrt())


@pytest.mark.slow
@pytest.mark.parametrize("block_rows", [1, 10**6])
@pytest.mark.parametrize("input_dtype", ["float32", "autocast's"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels,segments,projection", [(30, 5, True), (30, 5, False), (12, 12, True)])
def test_fast_path_under_autocast_is_as_accurate_as_the_plain_loop_in_that_precision(
    channels, segments, projection, dtype, channels_last, input_dtype, block_rows, monkeypatch
):
    # Both paths are held to the exact answer (the plain loop in float64): the fast path's
    # error must be that of autocast itself, which the generic path (same numbers as the
    # plain loop) shows. Summed over all parameters, since small bias gradients are sums
    # with cancellation whose relative error says little.
    monkeypatch.setattr(fastpath, "BLOCK_ROWS", block_rows)
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    layer = GunnLayer(channels, segments, projection=projection).to(DEVICE, memory_format=layout)
    exact, generic = copy.deepcopy(layer).double(), copy.deepcopy(layer)
    generic.fast_path = False
    x = torch.randn(4, channels, 6, 7, device=DEVICE).to(memory_format=layout)
    grad = torch.randn(4, channels, 6, 7, device=DEVICE)

    def under_autocast(module):
        def run(t):
            with torch.autocast(DEVICE.type, dtype=dtype):
                return module(t if input_dtype == "float32" else t.to(dtype))
        return run

    with torch.autocast(DEVICE.type, dtype=dtype):
        assert grad_fn_name(layer, x) == FAST
    layer.load_state_dict(generic.state_dict())  # undo that step's statistics
    got, ref = _step(under_autocast(layer), layer, x, grad), _step(under_autocast(generic), generic, x, grad)
    want = _step(lambda t: gradual_reference(exact.units, t.double()), exact, x.double(), grad.double())
    assert got["out"].dtype == ref["out"].dtype == (torch.float32 if input_dtype == "float32" else dtype)
    params = [k for k, _ in layer.named_parameters()]
    assert all(got[k].dtype == torch.float32 for k in params)
    statistics = [f"buffer {k}" for k, b in layer.named_buffers() if b.is_floating_point()]
    for keys in (["out"], ["x.grad"], params, statistics):
        assert _relative_error(got, want, keys) <= 1.5 * _relative_error(ref, want, keys) + 1e-6, keys
    counts = [f"buffer {k}" for k, b in layer.named_buffers() if not b.is_floating_point()]
    assert all(torch.equal(got[k], ref[k]) and int(got[k]) == 1 for k in counts)  # each BatchNorm counted once


@pytest.fixture
def new_memory_is_nan():
    """Every tensor ATen allocates uninitialised (torch.empty and the like) is filled with NaN meanwhile."""
    import torch.utils.deterministic as deterministic

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        deterministic.fill_uninitialized_memory = before[2]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, None], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_fast_path_reads_no_memory_before_writing_it(dtype, channels_last, new_memory_is_nan):
    # An element read before it is written, by the fast path or by a kernel that reads around a view, is NaN
    # here. (ATen's bfloat16 matrix product on CPUs with AMX reads before a column slice: the backward's
    # uninitialised buffer made a GUNN's bf16 training NaN on such CPUs, and only on some of their runs.)
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    layer = GunnLayer(30, 5).to(DEVICE, memory_format=layout)
    generic = copy.deepcopy(layer)
    generic.fast_path = False
    x = torch.randn(4, 30, 6, 7, device=DEVICE).to(memory_format=layout)
    grad = torch.randn(4, 30, 6, 7, device=DEVICE)

    def step(module):
        with torch.autocast(DEVICE.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            return _step(module, module, x, grad)

    with torch.autocast(DEVICE.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        assert grad_fn_name(copy.deepcopy(layer), x) == FAST
    got, ref = step(layer), step(generic)
    for key, value in got.items():
        assert torch.isfinite(value).all(), key
    params = ["x.grad", *(k for k, _ in layer.named_parameters())]
    assert _relative_error(got, ref, params) < (1e-2 if dtype else 1e-5)


def test_fast_path_under_fp16_autocast_with_a_gradient_scaler_matches_the_plain_loop():
    torch.manual_seed(0)
    layer = GunnLayer(30, 5).to(DEVICE, memory_format=torch.channels_last)
    generic = copy.deepcopy(layer)
    generic.fast_path = False
    x = torch.randn(8, 30, 6, 6, device=DEVICE).to(memory_format=torch.channels_last)
    target = torch.randn(8, 30, 6, 6, device=DEVICE)
    results = []
    for module in (layer, generic):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
        scaler = torch.amp.GradScaler(DEVICE.type, init_scale=2.0**16)
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            out = module(x)
        assert (type(out.grad_fn).__name__ == FAST) == (module is layer)
        scaler.scale((out.float() - target).pow(2).mean()).backward()
        scaler.unscale_(optimizer)  # the gradients divided by the scale, as the optimiser sees them
        found_inf = sum(v.item() for v in scaler._found_inf_per_device(optimizer).values())
        results.append((found_inf, {n: p.grad for n, p in module.named_parameters()}))
    (inf_fast, fast), (inf_generic, slow) = results
    assert inf_fast == inf_generic == 0
    for name, value in slow.items():
        torch.testing.assert_close(fast[name], value, atol=2e-3, rtol=5e-2, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_step_of_the_fast_path_reads_nothing_back_from_the_device(channels_last):
    # Meta tensors hold no data: a host read (.item(), float(), .tolist()) raises. On a GPU
    # such a read would stop the host until the device caught up, and break CUDA graphs.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    layer = GunnLayer(16, 4).to("meta", memory_format=layout)
    x = torch.empty(2, 16, 4, 4, device="meta").to(memory_format=layout).requires_grad_()
    out = layer(x)
    assert type(out.grad_fn).__name__ == FAST
    out.sum().backward()
    assert x.grad.shape == x.shape and all(p.grad is not None for p in layer.parameters())


@pytest.mark.slow
def test_cumulative_batch_norm_counts_are_read_from_the_device_only_when_changed_elsewhere(monkeypatch):
    from gunn.layers import fused

    reads = []
    monkeypatch.setattr(fused, "_read", lambda counter: reads.append(1) or int(counter))
    layer = GunnLayer(16, 4).double()
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: the factor is 1 / batches counted so far
    start, generic = copy.deepcopy(layer.state_dict()), copy.deepcopy(layer)
    generic.fast_path = False
    x = double_input(16, True)
    for module in (generic, layer):
        reads.clear()
        for _ in range(3):
            module(x).sum().backward()
    assert len(reads) == 3 * 4  # three counting groups per unit, read on the fast path's first step only
    for module in (generic, layer):
        module.load_state_dict(start)  # counters changed outside the fast path: read once more
        reads.clear()
        for _ in range(2):
            module(x).sum().backward()
    assert len(reads) == 3 * 4
    for (name, got), want in zip(layer.named_buffers(), generic.buffers()):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_fast_path_gradients_have_their_parameters_strides(channels_last):
    # As autograd's do: DDP's gradient buckets are views with the parameters' strides.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    layer = GunnLayer(16, 4).to(DEVICE, memory_format=layout)
    x = torch.randn(2, 16, 5, 5, device=DEVICE).to(memory_format=layout)
    out = layer(x)
    assert type(out.grad_fn).__name__ == FAST
    out.sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad.stride() == p.stride(), name


@pytest.mark.slow
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_every_parameter_gradient_has_its_parameters_strides(layout):
    # The gradient layout contract that DistributedDataParallel's bucket views rely on: a
    # 1x1 conv weight (O, I, 1, 1) in channels_last has strides (I, 1, I, I), and a gradient
    # made by a matrix product must keep them, or every multi-rank run warns "Grad strides
    # do not match bucket view strides" (and DDP copies every such gradient).
    from gunn.models import create_model

    torch.manual_seed(0)
    model = create_model("gunn_tiny", num_classes=10, in_chans=3).to(memory_format=layout)
    model(torch.randn(4, 3, 16, 16).to(memory_format=layout)).sum().backward()
    wrong = {n: (p.stride(), p.grad.stride()) for n, p in model.named_parameters() if p.grad.stride() != p.stride()}
    assert not wrong


@pytest.mark.slow
@pytest.mark.parametrize("projection", [False, True])
def test_under_bf16_autocast_a_layer_dispatches_a_few_operations_more_whatever_its_number_of_units(
    projection, monkeypatch
):
    # Autocast would cast every unit's weights forward and again backward, and every weight gradient back (about
    # eight operations a unit); the fast path casts all weights with one call and all gradients with another.
    from gunn.bench.measure import dispatched_ops

    monkeypatch.setattr(cpu_kernels, "ENABLED", False)  # the operations a GPU runs
    monkeypatch.setattr(fastpath, "BLOCK_ROWS", 1)  # one unit per block: the block operations scale with units

    def extra_operations(segments: int) -> int:
        counts = {}
        for precision in ("fp32", "bf16"):
            layer = GunnLayer(8 * segments, segments, projection=projection).to(memory_format=torch.channels_last)
            x = torch.randn(2, 8 * segments, 4, 4).to(memory_format=torch.channels_last).requires_grad_()

            def step(layer: GunnLayer = layer, x: torch.Tensor = x) -> None:
                layer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    out = layer(x.to(torch.bfloat16) if precision == "bf16" else x)  # bf16 input, as in a model
                out.float().sum().backward()

            step()
            counts[precision] = sum(dispatched_ops(step).values())
        return counts["bf16"] - counts["fp32"]

    few, many = extra_operations(2), extra_operations(8)
    assert few == many and few <= 8, (few, many)
