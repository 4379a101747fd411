"""Host synchronisations per training step, counted in the engine's own loop (gunn.bench.syncs)."""

from __future__ import annotations

import warnings

import pytest
import torch

from gunn.bench import syncs
from gunn.bench.measure import dispatched_ops
from gunn.train import stop
from gunn.train.metrics import Meter

# The dry run's engine: GUNN-tiny on 16 px synthetic images, batch 2, on the CPU.
TINY = ["model.name=gunn_tiny", "data.name=synthetic", "data.image_size=16", "data.classes=10", "data.samples=6",
        "optim.batch_size=2", "data.workers=0", "runtime.device=cpu"]


def test_host_reads_are_the_operations_that_read_a_value_or_a_data_dependent_shape_back():
    t = torch.arange(6.0)
    counts = dispatched_ops(lambda: (t.sum().item(), t.nonzero(), bool(t.any()), t.mul(2)))
    assert syncs.host_reads(counts) == {"_local_scalar_dense.default": 2, "nonzero.default": 1}


@pytest.mark.slow
def test_the_engines_step_reads_nothing_back_on_the_host():
    found = syncs.engine_syncs("gunn_tiny eager fp32", TINY, warmup=1, steps=2)
    assert (found.syncs, found.per_step, found.where) == (0, 0.0, {})


@pytest.mark.slow
def test_a_host_read_in_the_engines_step_is_counted_once_per_step(monkeypatch):
    add = Meter.add

    def add_and_read(self, loss_sum, logits, target):
        add(self, loss_sum, logits, target)
        float(loss_sum)  # what a per-step .item() on the loss would do

    monkeypatch.setattr(Meter, "add", add_and_read)
    found = syncs.engine_syncs("gunn_tiny eager fp32", TINY, warmup=1, steps=2)
    assert found.per_step == 1.0 and found.where == {"_local_scalar_dense.default": 2}


@pytest.mark.slow
def test_the_stop_poll_is_left_out_of_the_count_and_counted_apart(monkeypatch):
    monkeypatch.setattr(stop, "STOP_POLL_S", 0.0)  # a poll after every step
    found = syncs.engine_syncs("gunn_tiny eager fp32", TINY, warmup=1, steps=2)
    # The poll follows every step but the epoch's last; each reads the loss check back once.
    assert (found.syncs, found.polls, found.poll_syncs) == (0, 1, 1)


def test_on_cuda_the_sync_debug_warnings_are_counted_by_where_they_come_from(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    counter = syncs.SyncCounter(torch.device("cuda", 0))

    def step():
        warnings.warn(syncs.SYNC_WARNING, UserWarning, stacklevel=1)
        warnings.warn(syncs.SYNC_WARNING, UserWarning, stacklevel=1)  # every one, not once per line
        warnings.warn("something else", UserWarning, stacklevel=1)
        assert counter.left_out(lambda: warnings.warn(syncs.SYNC_WARNING, UserWarning, stacklevel=1)) == 1

    counter.run(step)
    assert modes == ["warn", "default"]
    assert sum(counter.found.values()) == 2 and all(where.startswith("test_syncs.py:") for where in counter.found)


def test_the_measured_window_must_hold_the_batches_asked_for():
    with pytest.raises(ValueError, match="hold 3 batches, not warmup \\+ steps = 4"):
        syncs.engine_syncs("gunn_tiny eager fp32", TINY, warmup=2, steps=2)
