"""Running classification metrics: kept on the device, read once."""

from __future__ import annotations

import pytest
import torch

from gunn.train.metrics import Meter


def test_adding_a_batch_reads_nothing_back_from_the_device():
    # Meta tensors hold no data: any read on the host (.item(), .tolist(), float()) raises.
    meter = Meter("meta")
    logits = torch.randn(8, 10, device="meta")
    target = torch.zeros(8, dtype=torch.int64, device="meta")
    for _ in range(3):
        meter.add(torch.ones((), device="meta"), logits, target)
    assert meter.count == 24 and meter.sums.device.type == "meta"
    with pytest.raises(NotImplementedError):  # the meta device indeed refuses reads
        meter.values()


def test_sums_match_the_batches_and_survive_a_checkpoint():
    meter = Meter()
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    target = torch.tensor([1, 1, 0])
    meter.add(torch.tensor(1.5), logits, target)
    assert meter.values() == (1.5, 1.0, 3.0, 3.0)  # one top-1 hit; with 2 classes top-5 hits all
    restored = Meter("cpu", **meter.state())
    restored.add(torch.tensor(0.5), logits, target)
    assert restored.summary("train") == pytest.approx(
        {"train_loss": 2.0 / 6, "train_top1_error": 100 * (1 - 2 / 6), "train_top5_error": 0.0})
