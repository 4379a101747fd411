"""Whole training steps measured by the benchmark and the GPU check (gunn.bench.steps)."""

from __future__ import annotations

import pytest
import torch

from gunn.bench import steps
from gunn.layers import cpu_kernels


def test_the_peak_memory_is_reset_after_the_warm_up_not_before():
    # Warm-up steps hold cuDNN's algorithm search and first allocations: not the step's memory.
    calls = []
    seconds, _ = steps.time_steps(lambda: calls.append("step"), torch.device("cpu"), warmup=2, steps=3,
                                  reset=lambda device: calls.append("reset"))
    assert calls == ["step", "step", "reset", "step", "step", "step"] and seconds >= 0


def test_graph_pools_count_the_private_pools_and_what_of_them_no_tensor_holds(monkeypatch):
    segments = [
        {"device": 0, "segment_pool_id": (0, 0), "total_size": 1000, "allocated_size": 1000},  # the default pool
        {"device": 0, "segment_pool_id": (0, 1), "total_size": 400, "allocated_size": 100},  # a graph's pool
        {"device": 0, "segment_pool_id": (0, 1), "total_size": 200, "allocated_size": 0},
        {"device": 1, "segment_pool_id": (0, 2), "total_size": 800, "allocated_size": 0},  # another GPU's
    ]
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda *args, **kwargs: segments)
    assert steps.graph_pools(torch.device("cuda", 0)) == (600, 500)


@pytest.mark.slow
def test_a_measured_eager_row_counts_kernels_and_dispatched_operations_and_labels_tf32():
    row = steps.measure("sunn_tiny", 2, 16, torch.device("cpu"), "fp32", warmup=1, steps=1, tf32=True)
    assert (row.model, row.batch, row.precision, row.mode) == ("sunn_tiny", 2, "fp32 (TF32)", "eager")
    assert row.kernels > 0 and row.ops > 0 and row.pool_mb is None and row.memory_mb == row.peak_mb


@pytest.mark.slow
def test_dispatched_operations_are_counted_on_the_cpu_as_a_gpu_runs_them_without_the_cpu_kernels():
    from gunn.bench.measure import dispatched_ops

    step = steps.TrainingStep(steps.build("gunn_tiny", num_classes=10), 2, 16, torch.device("cpu"), "fp32",
                              num_classes=10)
    before = cpu_kernels.ENABLED
    counted = steps.count_ops(step, torch.device("cpu"))
    assert cpu_kernels.ENABLED == before  # put back
    cpu_kernels.ENABLED = False
    try:
        assert counted == sum(dispatched_ops(step).values())
    finally:
        cpu_kernels.ENABLED = before


def test_a_step_cannot_be_both_graphed_and_compiled():
    with pytest.raises(ValueError, match="exclude each other"):
        steps.TrainingStep(steps.build("gunn_tiny"), 2, 16, torch.device("cpu"), "fp32", graphs=True,
                           compile_options={"mode": "default"})
    with pytest.raises(ValueError, match="mode must be one of eager, graphs, graphs-stages, compile"):
        steps.measure("gunn_tiny", 2, 16, torch.device("cpu"), "fp32", mode="jit")
