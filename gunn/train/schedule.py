"""Learning-rate schedules as pure functions of the position in training (nothing to checkpoint)."""

from __future__ import annotations

import math

from gunn.config import OptimConfig


def milestones(cfg: OptimConfig) -> list[int]:
    """Epochs at which the step schedule multiplies the LR by gamma (fractions of the epochs, rounded)."""
    return [round(f * cfg.epochs) for f in cfg.lr_steps]


def cycle_epochs(cfg: OptimConfig) -> int:
    """Length of one cosine cycle of the snapshot schedule, in epochs (they must divide evenly)."""
    return cfg.epochs // cfg.snapshots


def learning_rate(cfg: OptimConfig, epoch: int, batch: int, batches_per_epoch: int) -> float:
    """The LR for batch ``batch`` of ``epoch``.

    ``step``: the paper's schedule, LR / 10 at each milestone (docs/lifecycle.md, "The paper's recipes").
    ``snapshot``: Snapshot Ensembles (Huang et al., 2017, Eq. 2): in each of M cycles the LR
    falls from its initial value to 0 along a half cosine, per iteration.
    """
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch >= m for m in milestones(cfg))
    per_cycle = cycle_epochs(cfg) * batches_per_epoch
    t = epoch * batches_per_epoch + batch
    return cfg.lr / 2 * (math.cos(math.pi * (t % per_cycle) / per_cycle) + 1)


def snapshot_epochs(cfg: OptimConfig) -> list[int]:
    """Epochs (0-based) after which the snapshot schedule saves a snapshot: the end of each cycle."""
    if cfg.schedule != "snapshot":
        return []
    return [(k + 1) * cycle_epochs(cfg) - 1 for k in range(cfg.snapshots)]
