"""Classification metrics accumulated over an epoch on the device and summed across ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from gunn.train.distributed import all_reduce_sum_


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the k highest logits, for each k (on the device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


class Meter:
    """Sums over the samples seen so far: loss, top-1 and top-5 hits (on the device), and the count.

    Adding a batch never waits for the device: the sums stay there, in float64, until they are
    read (``values``, ``summary``, ``state``), once per epoch or progress refresh.
    """

    def __init__(self, device: torch.device | str = "cpu", loss: float = 0.0, top1: float = 0.0,
                 top5: float = 0.0, count: float = 0.0) -> None:
        self.sums = torch.tensor([loss, top1, top5], dtype=torch.float64).to(device)
        self.count = float(count)  # batch sizes are known on the host

    def add(self, loss_sum: Tensor, logits: Tensor, target: Tensor) -> None:
        """Adds one batch (``loss_sum`` is the batch's summed loss) without a host sync."""
        top1, top5 = topk_correct(logits, target)
        self.sums += torch.stack([loss_sum.detach().double(), top1.double(), top5.double()])
        self.count += target.shape[0]

    def values(self) -> tuple[float, float, float, float]:
        """(loss, top1, top5, count) as numbers: one read from the device."""
        loss, top1, top5 = self.sums.tolist()
        return loss, top1, top5, self.count

    def reduced(self) -> Meter:
        """The sums over all ranks."""
        totals = torch.cat([self.sums, self.sums.new_full((1,), self.count)])
        all_reduce_sum_(totals)
        loss, top1, top5, count = totals.tolist()
        return Meter(self.sums.device, loss, top1, top5, count)

    def summary(self, prefix: str) -> dict[str, float]:
        """Mean loss and top-1/top-5 error in percent, keyed ``<prefix>_loss`` and so on."""
        loss, top1, top5, count = self.values()
        n = max(count, 1.0)
        return {
            f"{prefix}_loss": loss / n,
            f"{prefix}_top1_error": 100.0 * (1 - top1 / n),
            f"{prefix}_top5_error": 100.0 * (1 - top5 / n),
        }

    def state(self) -> dict[str, float]:
        """Plain values for a checkpoint."""
        loss, top1, top5, count = self.values()
        return {"loss": loss, "top1": top1, "top5": top5, "count": count}
