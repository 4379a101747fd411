"""Classification metrics accumulated over an epoch and summed across ranks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from gunn.train.distributed import all_reduce_sum


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the k highest logits, for each k (on the device)."""
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


@dataclass
class Meter:
    """Sums over the samples seen so far: loss, top-1 and top-5 hits, count."""

    loss: float = 0.0
    top1: float = 0.0
    top5: float = 0.0
    count: float = 0.0

    def add(self, loss_sum: Tensor, logits: Tensor, target: Tensor) -> None:
        """Adds one batch (``loss_sum`` is the batch's summed loss); syncs with the device once."""
        top1, top5 = topk_correct(logits, target)
        values = torch.stack([loss_sum.float(), top1.float(), top5.float()]).tolist()
        self.loss += values[0]
        self.top1 += values[1]
        self.top5 += values[2]
        self.count += target.shape[0]

    def reduced(self, device: torch.device) -> Meter:
        """The sums over all ranks."""
        return Meter(*all_reduce_sum([self.loss, self.top1, self.top5, self.count], device))

    def summary(self, prefix: str) -> dict[str, float]:
        """Mean loss and top-1/top-5 error in percent, keyed ``<prefix>_loss`` and so on."""
        n = max(self.count, 1.0)
        return {
            f"{prefix}_loss": self.loss / n,
            f"{prefix}_top1_error": 100.0 * (1 - self.top1 / n),
            f"{prefix}_top5_error": 100.0 * (1 - self.top5 / n),
        }

    def state(self) -> dict[str, float]:
        """Plain values for a checkpoint."""
        return asdict(self)
