"""Overlap-singularity diagnostics: they find collapsed channels made on purpose, and only those."""

from __future__ import annotations

import copy

import pytest
import torch

from gunn.diagnostics import channel_stats, singularity_report
from gunn.layers import GunnLayer
from gunn.models import create_model


def duplicated_units(mode: str) -> GunnLayer:
    """Segments 0 and 1 computed by units with the same weights, each replacing its segment."""
    torch.manual_seed(0)
    layer = GunnLayer(16, 4, residual=False, mode=mode).eval()
    layer.units[1].load_state_dict(copy.deepcopy(layer.units[0].state_dict()))
    return layer


def test_simultaneous_units_with_equal_weights_give_collapsed_channels():
    out = duplicated_units("sunn")(torch.randn(8, 16, 6, 6))
    stats = channel_stats(out)
    # Channel k of segment 0 equals channel k of segment 1: 4 pairs, 8 channels.
    assert stats.collapsed_pairs >= 4 and stats.collapsed_channels >= 8


def test_the_gradual_order_breaks_the_collapse_of_the_same_weights():
    # Section 4 of the paper: unit 1 sees unit 0's output, so equal weights no longer give
    # equal channels.
    out = duplicated_units("gunn")(torch.randn(8, 16, 6, 6))
    assert channel_stats(out).collapsed_pairs == 0


def test_a_random_layer_has_no_collapsed_channels_and_a_high_effective_dimension():
    torch.manual_seed(1)
    out = GunnLayer(16, 4).eval()(torch.randn(8, 16, 6, 6))
    stats = channel_stats(out)
    assert (stats.collapsed_pairs, stats.collapsed_channels, stats.dead_channels) == (0, 0, 0)
    assert 4 < stats.participation_ratio <= 16


def test_participation_ratio_counts_the_dimensions_spanned():
    basis = torch.randn(4096, 3, dtype=torch.float64)
    mixed = basis @ torch.randn(3, 10, dtype=torch.float64)  # 10 channels spanning 3 dimensions
    assert channel_stats(torch.randn(4096, 10)).participation_ratio == pytest.approx(10, rel=0.1)
    assert channel_stats(mixed).participation_ratio <= 3 + 1e-9


def test_constant_channels_are_dead_not_collapsed():
    x = torch.randn(64, 4)
    x[:, 2] = 3.0
    x[:, 3] = -1.0
    stats = channel_stats(x)
    assert stats.dead_channels == 2 and stats.collapsed_pairs == 0


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="threshold must be in"):
        channel_stats(torch.randn(4, 4), threshold=1.5)
    with pytest.raises(ValueError, match="batch and a channel dimension"):
        channel_stats(torch.randn(4))


def test_a_report_covers_every_gunn_layer_of_a_model_and_leaves_it_in_training_mode():
    model = create_model("gunn_tiny").train()
    report = singularity_report(model, torch.randn(4, 3, 32, 32))
    assert list(report) == ["stages.0.gunn", "stages.1.gunn", "stages.2.gunn"]
    assert [r.channels for r in report.values()] == [32, 48, 64]
    assert model.training
