"""The paper's bottleneck unit (gunn.layers.bottleneck): its arithmetic is the steps it declares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gunn.layers import Bottleneck, UpdateUnit, fastpath
from gunn.layers.bottleneck import unit_difference
from tests.layers.changed_units import GeluBottleneck, RenamedBottleneck, UndeclaredBottleneck
from tests.reference import DEVICE


def _double(module: torch.nn.Module) -> torch.nn.Module:
    return module.to(DEVICE, torch.float64)


def test_the_bottleneck_computes_figure_4_step_by_step():
    block = _double(Bottleneck(12, 4, 2)).eval()  # eval: both computations see the same statistics
    x = torch.randn(3, 12, 5, 6, dtype=torch.float64, device=DEVICE)
    want = block.bn3(block.conv3(F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))))
    assert torch.equal(block(x), want)


def test_a_subclass_computes_the_steps_it_declares():
    block = _double(GeluBottleneck(12, 4, 2)).eval()
    x = torch.randn(3, 12, 5, 6, dtype=torch.float64, device=DEVICE)
    want = block.bn3(block.conv3(F.gelu(block.bn2(block.conv2(F.gelu(block.bn1(block.conv1(x))))))))
    assert torch.equal(block(x), want)


def test_the_update_unit_computes_the_steps_of_its_bottlenecks_fused_or_not():
    # The fused first conv + projection runs the rest of the declared steps after it.
    unit = _double(UpdateUnit(12, 4, projection=True, block=GeluBottleneck)).eval()
    x = torch.randn(3, 12, 5, 6, dtype=torch.float64, device=DEVICE)
    want = unit.blocks[0].run(x, GeluBottleneck.STEPS) + unit.proj(x)
    torch.testing.assert_close(unit(x), want, atol=1e-12, rtol=0)


def test_a_step_that_names_nothing_is_an_error_naming_it():
    class Misspelt(Bottleneck):
        STEPS = ("conv1", "bn1", "relu", "conv2", "bn2", "rleu", "conv3", "bn3")

    with pytest.raises(ValueError, match="Misspelt.STEPS: 'rleu' names neither a module of the block nor a function"):
        Misspelt(12, 4, 2)(torch.randn(2, 12, 3, 3))


def test_the_papers_unit_declares_what_the_fast_path_computes():
    assert Bottleneck.STEPS == fastpath.STEPS
    assert unit_difference(Bottleneck, fastpath.STEPS) is None
    assert unit_difference(RenamedBottleneck, fastpath.STEPS) is None
    assert unit_difference(UpdateUnit, fastpath.STEPS) is None


@pytest.mark.parametrize(
    "kind,difference",
    [
        (GeluBottleneck, "GeluBottleneck.STEPS has 'gelu' at step 2, not 'relu'"),
        (UndeclaredBottleneck, "UndeclaredBottleneck overrides Bottleneck.forward instead of declaring its STEPS"),
        (type("Wrapped", (UpdateUnit,), {"forward": lambda self, x: x}), "Wrapped overrides UpdateUnit.forward"),
        (torch.nn.Identity, "the unit Identity is not an UpdateUnit"),
    ],
)
def test_a_changed_unit_is_told_apart_naming_its_class_and_what_differs(kind, difference):
    assert unit_difference(kind, fastpath.STEPS) == difference
