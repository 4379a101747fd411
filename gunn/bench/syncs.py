"""Host synchronisations per training step, counted in the training engine's own loop.

A training step that reads a value back to the host (``.item()``, ``bool(tensor)``, a shape that
depends on the data) makes the host wait until the GPU has run everything queued before it, so
the host can no longer run ahead and launch the next kernels: a launch-bound step then takes
the sum of both times. The target is none.

On CUDA each wait is counted with CUDA's sync-debug mode set to "warn": torch then issues one
warning per synchronising call. On the CPU nothing waits; there the dispatcher shows the same
reads: ``HOST_READS`` (a value read back) and ``DATA_DEPENDENT`` operations (whose output shape
depends on the data, so that their CUDA kernels read a count back). A copy to the CPU
(``.cpu()``, ``.tolist()``) dispatches nothing on the CPU and is only seen on CUDA.

The measured window is ``steps`` batches of ``gunn.train.engine.train_one_epoch`` with the parts
that ``gunn.train.engine.build`` makes, after ``warmup`` batches (cuDNN's algorithm search and
a CUDA graph capture synchronise, once). Two reads are periodic by design and left out of the
count: the stop poll, which reads the loss check every ``STOP_POLL_S`` seconds (counted and
reported apart), and the progress bar's redraw (turned off: ``logging.progress=false``). The
loader's batches are read before the window, as its workers would have prefetched them: what
the window holds is the engine's step, not the generation of synthetic images.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from gunn.bench.measure import dispatched_ops

# ATen operations (overload names without the overload) that read a value back to the host.
HOST_READS = frozenset({"_local_scalar_dense", "equal"})
# Operations whose output shape depends on the values: on CUDA they read a count back to the host.
DATA_DEPENDENT = frozenset({"nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
                            "unique_dim", "unique_dim_consecutive", "bincount", "repeat_interleave"})
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch's text in sync-debug mode "warn"


def host_reads(counts: collections.Counter[str]) -> collections.Counter[str]:
    """The operations of ``counts`` (from ``dispatched_ops``) that make a GPU's host wait."""
    return collections.Counter({name: n for name, n in counts.items()
                                if name.split(".")[0] in HOST_READS | DATA_DEPENDENT})


class SyncCounter:
    """Counts host synchronisations (``run``), each by where it came from: on CUDA, CUDA's sync-debug
    warnings by file and line; on the CPU, the host reads among the dispatched operations, by operation.
    ``left_out(fn)``, called inside ``run``, runs ``fn`` without counting what it does (the stop poll)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.found: collections.Counter[str] = collections.Counter()
        self.excluded: collections.Counter[str] = collections.Counter()
        self._caught: list[warnings.WarningMessage] = []

    def run(self, fn: Callable[[], Any]) -> None:
        """Runs ``fn``, counting its host synchronisations into ``found``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # what was queued before is not fn's
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")  # every one, not once per line
                self._caught = caught
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    fn()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            seen = _where(caught)
            torch.cuda.synchronize(self.device)
        else:
            seen = host_reads(dispatched_ops(fn))
        seen.subtract(self.excluded)
        self.found.update(+seen)  # + drops what was left out

    def left_out(self, fn: Callable[[], Any]) -> int:
        """Runs ``fn`` inside ``run`` without counting its synchronisations; returns how many it made."""
        if self.device.type == "cuda":
            before = len(self._caught)
            fn()
            seen = _where(self._caught[before:])
        else:  # a count inside the one of ``run``, which sees these operations too
            seen = host_reads(dispatched_ops(fn))
        self.excluded.update(seen)
        return sum(seen.values())


def _where(caught: list[warnings.WarningMessage]) -> collections.Counter[str]:
    return collections.Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))


@dataclasses.dataclass
class SyncCount:
    """Host synchronisations of ``steps`` training steps of the engine, and the stop polls left out."""

    label: str
    steps: int
    syncs: int  # in the window, the stop polls' left out
    where: dict[str, int]  # file:line (CUDA) or ATen operation (CPU) of each, with its count
    polls: int  # stop polls in the window (documented periodic reads, left out)
    poll_syncs: int  # their synchronisations

    @property
    def per_step(self) -> float:
        return self.syncs / self.steps


class _Prefetched:
    """The batches of one epoch of a training loader, read in advance; the loader's interface (``EpochLoader``)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches[start:])


def engine_syncs(label: str, overrides: list[str], *, warmup: int = 3, steps: int = 10,
                 fast_path: bool = True) -> SyncCount:
    """Counts the host synchronisations of ``steps`` batches of the engine's training loop (after ``warmup``)
    for the run that the ``digits`` preset with ``overrides`` describes (its data must hold exactly
    ``warmup + steps`` batches). ``fast_path=False`` sends the GUNN layers down their generic path."""
    from gunn import config as cfgmod
    from gunn.layers import GunnLayer, cpu_kernels
    from gunn.train import distributed, engine
    from gunn.train.checks import validate
    from gunn.train.stop import NonFiniteLossError, StopPoll
    from gunn.train.metrics import Meter

    config = cfgmod.load("digits", [*overrides, "logging.progress=false", "logging.mlflow=false"])
    validate(config, 1)
    config = cfgmod.resolve(config)
    device = torch.device(config.runtime.device if config.runtime.device != "auto" else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    info = distributed.DistInfo(0, 1, 0, device)
    # On the CPU the fast path's C++ kernels would hide the operations they run: count what a GPU runs.
    kernels, cpu_kernels.ENABLED = cpu_kernels.ENABLED, cpu_kernels.ENABLED and device.type == "cuda"
    try:
        parts = engine.build(config, info)
        if len(parts.data.train) != warmup + steps:
            raise ValueError(f"the training data hold {len(parts.data.train)} batches, not warmup + steps = "
                             f"{warmup + steps}")
        batches = _Prefetched(list(parts.data.train.iterate(0)))
        parts = dataclasses.replace(parts, data=dataclasses.replace(parts.data, train=batches))
        for module in parts.model.modules():
            if isinstance(module, GunnLayer):
                module.fast_path = fast_path
        position = engine.Position(meter=Meter(device))

        def bad_loss(batch: int) -> None:
            raise NonFiniteLossError(f"{label}: the loss became nan or infinite in batch {batch}")

        warm = StopPoll(device, False, bad_loss, stop_at=warmup)
        engine.train_one_epoch(parts, position, config, info, warm, capture_graphs=config.runtime.cuda_graphs)
        if position.batch != warmup:
            raise RuntimeError(f"{label}: the warm-up ended after {position.batch} batches, not {warmup}")
        counter = SyncCounter(device)
        stop = StopPoll(device, False, bad_loss)
        check_loss, polls, poll_syncs = stop.check_loss, 0, 0

        def poll() -> None:  # the stop poll's periodic read: counted apart
            nonlocal polls, poll_syncs
            polls += 1
            poll_syncs += counter.left_out(check_loss)

        stop.check_loss = poll  # type: ignore[method-assign]
        counter.run(lambda: engine.train_one_epoch(parts, position, config, info, stop))
        if position.batch != warmup + steps:
            raise RuntimeError(f"{label}: the measured window ended after {position.batch - warmup} batches")
    finally:
        cpu_kernels.ENABLED = kernels
    return SyncCount(label, steps, sum(counter.found.values()), dict(counter.found.most_common()), polls,
                     poll_syncs)
