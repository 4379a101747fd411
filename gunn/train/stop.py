"""Stopping a run early: the stop request that signal handlers set (preemption, the time limit), and
``StopPoll``, which the training loop asks at every batch whether to stop and whether the loss stayed finite
(``NonFiniteLossError`` when it did not).

With several ranks a stop is agreed on by a collective, so that every rank stops at the same batch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from gunn.train import checkpoint as ckpt
from gunn.train import distributed

if TYPE_CHECKING:
    from gunn.train.distributed import DistInfo


class _StopFlag:
    """A stop request. Set from signal handlers, so a plain attribute: a handler runs between any two
    bytecodes of the main thread, and a ``threading.Event``'s lock, held by the code it interrupted
    (a first handler, say), would deadlock it."""

    requested = False


_STOP = _StopFlag()

# With several ranks a stop request (a signal on any rank) is agreed on by a collective about
# this often, not at every step: each check costs a host sync. Far below Slurm's warning time
# (--signal-delay-s, default 120 s), so a checkpoint is written in time.
STOP_POLL_S = 5.0


def request_stop() -> None:
    """Asks the training loop to checkpoint at the next batch and return (preemption).

    A request made before ``train`` starts (a signal during start-up) holds for its first batch;
    ``train`` forgets it when it returns.
    """
    _STOP.requested = True


def clear_request() -> None:
    """Forgets a stop request (``train`` does when it returns)."""
    _STOP.requested = False


class NonFiniteLossError(RuntimeError):
    """The training loss became nan or infinite: the run stopped without checkpointing it."""


def raise_bad_loss(run_dir: Path, info: DistInfo, epoch: int, batch: int, rank: int | None = None) -> None:
    """Stops the run: the loss was not finite in ``batch`` of ``epoch`` (from 0; with several ranks, on ``rank``
    by then)."""
    saved = ckpt.list_checkpoints(run_dir)
    where = f"by batch {batch}" if info.grouped else f"in batch {batch}"
    if info.world_size > 1 and rank is not None:
        where += f" on rank {rank} of {info.world_size}"
    last = (f"its last good checkpoint is {saved[-1].name}" if saved else f"{run_dir} holds no checkpoint yet")
    raise NonFiniteLossError(
        f"the training loss became nan or infinite in epoch {epoch + 1}, {where}; the run stopped without "
        f"saving it ({last}). The same command would diverge the same way: continue with a lower optim.lr (the "
        "change is recorded), or from an earlier checkpoint (move the later ones out of the run directory), "
        "after looking at the data")


class StopPoll:
    """Whether to stop early: at step ``stop_at`` (``train``'s ``stop_after``), or on a stop requested by a
    signal on any rank, agreed on by all ranks every few seconds; and whether the training loss of any
    rank stopped being finite, checked at the same moments.

    One process reads its own flag at every step. Ranks in a process group (``grouped``, also a
    group of one rank) agree with a collective that reads the answer on the host, so they do it
    every ``every`` steps, where ``every`` is recomputed at each check from the slowest rank's
    time since the last one to keep checks about ``STOP_POLL_S`` apart. Every rank gets the same
    reduced time, hence the same ``every``, and so checks at the same steps. The first batch with
    a non-finite loss is noted on the device at every step (no host sync) and read at those checks.
    """

    def __init__(self, device: torch.device, grouped: bool, bad_loss: Callable[[int], None],
                 stop_at: int | None = None, rank: int = 0) -> None:
        self.device, self.grouped, self.bad_loss, self.stop_at = device, grouped, bad_loss, stop_at
        self.every, self.since, self.last = 1, 0, time.monotonic()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_rank: int | None = None  # the highest rank whose loss was not finite, once one was
        self.rank = rank

    def watch_loss(self, loss: torch.Tensor, batch: int) -> None:
        """Notes ``batch`` (1-based, in the epoch) if it is the first whose ``loss`` is not finite."""
        first = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), batch, self.first_bad)
        self.first_bad = first.to(torch.long)

    def check_loss(self) -> None:
        """``bad_loss(batch)`` on every rank if any rank's loss was not finite (a collective in a process group)."""
        mine = self.first_bad.item()
        worst, rank = distributed.all_reduce_max([float(mine), float(self.rank if mine >= 0 else -1)], self.device)
        if worst >= 0:
            self.bad_rank = int(rank)
            self.bad_loss(int(worst))

    def requested(self, step: int, now: bool = False) -> bool:
        """Whether ``step`` (batches done in the run) is ``stop_at``, the same on every rank; else, at a check
        (every ``every`` calls, or ``now``), whether any rank was asked to stop."""
        if self.stop_at is not None and step >= self.stop_at:
            return True
        if not self.grouped:
            if now or time.monotonic() - self.last >= STOP_POLL_S:
                self.last = time.monotonic()
                self.check_loss()
            return _STOP.requested
        self.since += 1
        if self.since < self.every and not now:
            return False
        mine = self.first_bad.item()
        flag, slowest, bad, rank = distributed.all_reduce_max(
            [float(_STOP.requested), time.monotonic() - self.last, float(mine), float(self.rank if mine >= 0 else -1)],
            self.device)
        self.every = max(1, min(1000, int(self.since * STOP_POLL_S / max(slowest, 1e-6))))
        self.since, self.last = 0, time.monotonic()
        if bad >= 0:
            self.bad_rank = int(rank)
            self.bad_loss(int(bad))  # every rank sees it at this same check, so all stop together
        return flag > 0
