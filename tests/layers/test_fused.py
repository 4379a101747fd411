"""Many BatchNorms as one call, with their running statistics tied into one tensor per kind."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call

from gunn.bench.measure import dispatched_ops
from gunn.layers import GunnLayer
from gunn.layers.fused import TiedStatistics, batch_norm_many
from tests.reference import DEVICE, forward_backward, simultaneous_reference


def _norms(count: int = 3, width: int = 4) -> list[nn.BatchNorm2d]:
    norms = [nn.BatchNorm2d(width).to(DEVICE, torch.float64) for _ in range(count)]
    for k, norm in enumerate(norms):
        norm.running_mean.fill_(k)
        norm.running_var.fill_(k + 1)
    return norms


def test_tied_statistics_are_views_that_one_batch_norm_call_updates_in_place():
    norms = _norms()
    twins = copy.deepcopy(norms)
    tied = TiedStatistics(norms)
    assert tied.intact() and torch.equal(tied.mean, torch.tensor([0.0] * 4 + [1.0] * 4 + [2.0] * 4, device=DEVICE,
                                                                  dtype=torch.float64))
    x = torch.randn(5, 12, 3, 3, device=DEVICE, dtype=torch.float64)
    got = batch_norm_many(x, norms, tied)
    want = torch.cat([norm(part) for norm, part in zip(twins, x.split(4, 1))], 1)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for norm, twin in zip(norms, twins):
        assert norm.running_mean.data_ptr() != twin.running_mean.data_ptr()
        torch.testing.assert_close(norm.running_mean, twin.running_mean, atol=1e-12, rtol=0)
        torch.testing.assert_close(norm.running_var, twin.running_var, atol=1e-12, rtol=0)
        assert norm.num_batches_tracked.item() == twin.num_batches_tracked.item() == 1
    ops = dispatched_ops(lambda: batch_norm_many(x, norms, tied))
    assert ops["copy_.default"] == 0  # nothing written back


def test_a_replaced_buffer_breaks_the_tie_and_is_then_written_back_as_before():
    norms = _norms()
    tied = TiedStatistics(norms)
    norms[1].running_mean = torch.zeros(4, device=DEVICE, dtype=torch.float64)  # an assignment, not a write
    assert not tied.intact()
    twins = copy.deepcopy(norms)
    x = torch.randn(5, 12, 3, 3, device=DEVICE, dtype=torch.float64)
    batch_norm_many(x, norms, tied)
    for twin, part in zip(twins, x.split(4, 1)):
        twin(part)
    for norm, twin in zip(norms, twins):
        torch.testing.assert_close(norm.running_mean, twin.running_mean, atol=1e-12, rtol=0)


def _all_tied(layer: GunnLayer) -> bool:
    return all(t.intact() for t in layer.tied_statistics().values())


def _sunn(depth: int = 1, projection: bool = True) -> GunnLayer:
    return GunnLayer(16, 4, depth=depth, projection=projection, mode="sunn").to(DEVICE, torch.float64)


@pytest.mark.parametrize("depth,projection", [(1, True), (2, False)])
def test_the_state_dict_keeps_one_entry_per_unit_and_norm(depth, projection):
    layer = _sunn(depth, projection)
    keys = set(layer.state_dict())
    assert "units.3.blocks.0.bn2.running_mean" in keys and ("units.1.proj.1.running_var" in keys) == projection
    norms = [name for name, m in layer.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert {k for k in keys if k.endswith(("running_mean", "running_var"))} == {
        f"{n}.{s}" for n in norms for s in ("running_mean", "running_var")}
    # A state dict of independent tensors (as layers wrote before the tie) loads into the tied layer.
    saved = {k: v.clone() + 1 if v.is_floating_point() else v.clone() for k, v in layer.state_dict().items()}
    fresh = _sunn(depth, projection)
    fresh.load_state_dict(saved)
    assert _all_tied(fresh)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())


def _round_trips(layer: GunnLayer) -> dict[str, GunnLayer]:
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    assigned = _sunn()
    assigned.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    return {
        "deepcopy": copy.deepcopy(layer),
        "pickle": torch.load(buffer, weights_only=False),
        "to float32 and back": copy.deepcopy(layer).float().double(),
        "load_state_dict(assign=True)": assigned,
    }


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "to float32 and back", "load_state_dict(assign=True)"])
def test_the_tie_survives_copies_conversions_and_loads(how):
    layer = _sunn()
    copied = _round_trips(layer)[how]
    assert _all_tied(copied)
    twin = copy.deepcopy(copied)
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64, device=DEVICE)
    got = forward_backward(copied, copied, x)
    want = forward_backward(lambda t: simultaneous_reference(twin.units, t), twin, x)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


def test_functional_call_with_other_buffers_uses_them_and_leaves_the_layers_own():
    layer = _sunn()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    others = {k: v.clone() + 0.5 if k.endswith("running_var") else v.clone() for k, v in layer.named_buffers()}
    twin = copy.deepcopy(layer)
    twin.load_state_dict({**dict(twin.named_parameters()), **others}, strict=False)
    x = torch.randn(3, 16, 5, 6, dtype=torch.float64, device=DEVICE)
    layer.eval(), twin.eval()
    with torch.no_grad():
        got = functional_call(layer, others, (x,))
        want = simultaneous_reference(twin.units, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert all(torch.equal(layer.state_dict()[k], v) for k, v in before.items()) and _all_tied(layer)


def test_a_sunn_training_step_dispatches_as_many_operations_whatever_the_number_of_units():
    counts = []
    for segments in (2, 8):
        layer = GunnLayer(32, segments, projection=True, mode="sunn").to(DEVICE)
        x = torch.randn(2, 32, 4, 4, device=DEVICE, requires_grad=True)

        def step(layer: GunnLayer = layer, x: torch.Tensor = x) -> None:
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()

        step()  # warm-up
        counts.append(sum(dispatched_ops(step).values()))
    assert counts[0] == counts[1]


def test_an_exported_sunn_layer_reads_its_statistics_as_buffers_not_as_constants():
    layer = _sunn().eval()
    exported = torch.export.export(layer, (torch.randn(2, 16, 5, 6, dtype=torch.float64, device=DEVICE),))
    # torch.export swaps the modules' buffers for its own: the tie no longer holds, the layer reads those.
    assert not exported.constants
    assert {k for k in exported.state_dict if "running" in k} == {k for k in layer.state_dict() if "running" in k}
