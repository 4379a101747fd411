"""Measurements used by the benchmark and the memory tests."""

from __future__ import annotations

import torch
from torch import nn

from gunn.bench.measure import activation_bytes, flops, interleaved_medians, retained_bytes


def test_retained_bytes_counts_what_a_function_leaves_allocated():
    nbytes, kept = retained_bytes(lambda: (torch.empty(1024), torch.empty(256, dtype=torch.float64)))
    assert nbytes == 1024 * 4 + 256 * 8
    freed, _ = retained_bytes(lambda: torch.empty(4096).sum())
    assert freed == 4  # the temporary is freed, the scalar sum stays


def test_activation_bytes_of_conv_bn_relu_are_what_autograd_keeps():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    x = torch.randn(2, 4, 10, 10)
    # conv output (kept by BN) + ReLU output (kept by ReLU, returned) + BN's saved mean and invstd
    assert activation_bytes(model, x) == 2 * (2 * 8 * 10 * 10 * 4) + 2 * 8 * 4


def test_flops_count_two_per_multiply_add():
    conv = nn.Conv2d(3, 8, 3, bias=False)
    assert flops(conv, torch.randn(1, 3, 10, 10)) == 2 * 8 * 3 * 9 * 8 * 8


def test_interleaved_medians_time_every_candidate():
    calls = {"a": 0, "b": 0}
    result = interleaved_medians({k: (lambda k=k: calls.__setitem__(k, calls[k] + 1)) for k in calls}, repeats=3)
    assert calls == {"a": 4, "b": 4} and set(result) == {"a", "b"}
    assert all(v >= 0 for v in result.values())
