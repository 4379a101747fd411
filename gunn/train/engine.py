"""The training loop: one run of the paper's recipe, the same whichever entry point starts it.

``train(config)`` is called by ``jobs/launch.py`` (in-process, local processes or Slurm
tasks) and by the sweeps' trials. Each process is one data-parallel rank; only rank 0
prints, writes checkpoints and logs to MLflow. A run always continues from the newest
checkpoint in its directory, so a requeued job needs no special path.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import DataBundle, build_data, check_data
from gunn.layers import GunnLayer
from gunn.models import create_model
from gunn.train import checkpoint as ckpt
from gunn.train import distributed
from gunn.train.device import resolve as resolve_device
from gunn.train.device import set_tf32
from gunn.train.metrics import Meter
from gunn.train.rundir import RunDirError, RunDirLock, slurm_job
from gunn.train.schedule import learning_rate, snapshot_epochs
from gunn.train.tracking import JournalWriteError


class _StopFlag:
    """A stop request. Set from signal handlers, so a plain attribute: a handler runs between any two
    bytecodes of the main thread, and a ``threading.Event``'s lock, held by the code it interrupted
    (a first handler, say), would deadlock it."""

    requested = False


_STOP = _StopFlag()
# Settings that may change between the pieces of a resumed run without changing its result.
# The run directory is where the run lives, not a setting: a moved or copied one continues as is.
_NO_EFFECT_ON_RESULTS = ("data.workers", "logging.", "checkpoint.dir", "checkpoint.every", "checkpoint.keep",
                         "runtime.cuda_graphs")
# With several ranks a stop request (a signal on any rank) is agreed on by a collective about
# this often, not at every step: each check costs a host sync. Far below Slurm's warning time
# (--signal-delay-s, default 120 s), so a checkpoint is written in time.
STOP_POLL_S = 5.0
# BatchNorm statistics are averaged over the ranks after every epoch (average_buffers), so DDP
# need not send rank 0's buffers before every forward pass. (torch 2.14 renamed the switch; both
# still copy them once when DDP is built, before a resumed run restores each rank's own.)
_NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def request_stop() -> None:
    """Asks the training loop to checkpoint at the next batch and return (preemption).

    A request made before ``train`` starts (a signal during start-up) holds for its first batch;
    ``train`` forgets it when it returns.
    """
    _STOP.requested = True


class NonFiniteLossError(RuntimeError):
    """The training loss became nan or infinite: the run stopped without checkpointing it."""


# How a run fails for a reason its message says in full (no traceback needed); each leaves the
# last checkpoint intact.
RUN_ERRORS = (NonFiniteLossError, ckpt.CheckpointWriteError, JournalWriteError, RunDirError)


@dataclass
class RunResult:
    """How a call of ``train`` ended."""

    run_dir: Path
    status: str  # "finished" or "interrupted" (checkpointed on request; run again to continue)
    epochs_done: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    model: nn.Module | None = None  # the trained network (unwrapped from DDP and compile)


def validate(config: RunConfig, world_size: int = 1, check_device: bool = True) -> None:
    """Checks what the schema cannot: values that depend on each other, the model, the data path, and
    (``check_device``, where the run will train) that the device it asks for is usable."""
    o = config.optim
    if o.schedule == "step" and any(not 0 < f <= 1 for f in o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be fractions of the epochs in (0, 1], got {o.lr_steps}")
    if o.schedule == "step" and o.lr_steps != sorted(o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be increasing, got {o.lr_steps}")
    if o.schedule == "snapshot" and o.epochs % o.snapshots:
        raise ConfigError(f"optim.snapshots={o.snapshots} must divide optim.epochs={o.epochs} (whole-epoch cycles)")
    if o.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} must be a multiple of the {world_size} ranks")
    cfgmod.resolve(config)  # builds the model on the meta device: ConfigError for a name or values it rejects
    r = config.runtime
    if r.cuda_graphs and r.compile:
        raise ConfigError("runtime.cuda_graphs and runtime.compile exclude each other: choose one")
    kind = resolve_device(r.device) if check_device else r.device
    if r.amp == "fp16" and kind == "cpu":
        raise ConfigError("runtime.amp='fp16' needs a GPU; use 'bf16' on the CPU")
    if r.cuda_graphs and config.dist.sync_bn and world_size > 1:
        raise ConfigError("runtime.cuda_graphs=true cannot capture dist.sync_bn's collectives; turn one of them off")
    if r.cuda_graphs and kind == "cpu":
        raise ConfigError("runtime.cuda_graphs=true needs a GPU (CUDA graphs); set it to false on the CPU")
    check_data(config.data)


def _model_overrides(config: RunConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    return dict(num_classes=num_classes, in_chans=in_chans, **cfgmod.model_knobs(config.model),
                memory=config.model.memory)


def default_run_dir(config: RunConfig) -> Path:
    """runs/<name>-<date>-<time>: a new directory for each run that does not name one."""
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


EpochCallback = Callable[[dict[str, float], Path | None], None]


def train(config: RunConfig, *, stop_after: int | None = None, on_epoch: EpochCallback | None = None) -> RunResult:
    """Trains (or continues) the run that ``config`` describes; returns how far it got.

    ``stop_after``: checkpoint and return after this many batches of this call (a time-boxed
    session); ``request_stop()`` does the same from a signal handler. ``on_epoch(metrics,
    checkpoint)`` is called on rank 0 after every epoch with its metrics and the newest
    checkpoint file (how sweeps report to Ray Tune); when it returns True, the run stops there
    as on a stop request (checkpointed, "interrupted", MLflow KILLED until someone ends it
    otherwise: a sweep records a scheduler's early stop as FINISHED).
    """
    info = distributed.setup(config.runtime.device, config.dist.backend, config.runtime.threads)
    together = False  # after an error the other ranks may never reach the final barrier
    try:
        validate(config, info.world_size)
        config = cfgmod.resolve(config)  # the model's own values where model fields are null: saved and logged
        run = _Run(config, info, on_epoch)
        with run.locked():
            result = run.run(stop_after)
        together = True
        return result
    finally:
        _STOP.requested = False
        distributed.teardown(together)


class _Run:
    def __init__(self, config: RunConfig, info: distributed.DistInfo, on_epoch: EpochCallback | None = None) -> None:
        self.config, self.info, self.device, self.on_epoch = config, info, info.device, on_epoch
        run_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else default_run_dir(config)
        self.run_dir = Path(distributed.broadcast_object(str(run_dir.resolve()))).resolve()
        self.config.checkpoint.dir = str(self.run_dir)
        self.log = print if info.is_main else (lambda *a, **k: None)

    # -- setup ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the run directory's lock (rank 0, for every rank) while the run trains; RunDirError
        on every rank if another process holds it or the directory cannot be written."""
        lock, error = None, None
        if self.info.is_main:
            try:
                lock = RunDirLock(self.run_dir)
                lock.acquire()
                self._remove_partial_writes()
                self._record_start(lock.me)
            except RunDirError as err:
                lock, error = None, str(err)
        error = distributed.broadcast_object(error)
        if error is not None:
            raise RunDirError(error)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _remove_partial_writes(self) -> None:
        """Deletes the temporary files of writes that a killed process left (``.NAME.tmp-PID``): with the
        lock held, no other process writes here."""
        for tmp in [*self.run_dir.glob(".*.tmp-*"), *self.run_dir.glob("snapshots/.*.tmp-*")]:
            self.log(f"removing {tmp}, left by a write that did not finish")
            if tmp.is_dir() and not tmp.is_symlink():  # an MLflow model being saved
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)

    def _record_start(self, me: dict[str, Any]) -> None:
        """Appends this start (the lock holder ``me``) to the run directory's ``starts.log``: when, where,
        and in which Slurm job."""
        where = f"host {me['host']} pid {me['pid']}" + (
            f" Slurm job {me['slurm_job']} restart {me['restart']}" if me["slurm_job"] else "")
        with open(self.run_dir / "starts.log", "a") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {where}\n")

    def _slurm_jobs(self) -> list[str]:
        """Every Slurm job this run has lived in, oldest first (from ``starts.log``)."""
        try:
            lines = (self.run_dir / "starts.log").read_text().splitlines()
        except OSError:
            return []
        jobs = [line.split(" Slurm job ", 1)[1].split()[0] for line in lines if " Slurm job " in line]
        return list(dict.fromkeys(jobs))

    def _build(self) -> None:
        c, info = self.config, self.info
        torch.manual_seed(c.runtime.seed)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            set_tf32(c.runtime.tf32)
        self.data: DataBundle = build_data(
            c.data, batch_size=c.optim.batch_size // info.world_size, rank=info.rank,
            world_size=info.world_size, seed=c.runtime.seed, device=self.device,
        )
        if len(self.data.train) == 0:
            raise ConfigError(
                f"optim.batch_size={c.optim.batch_size} is larger than the {self.data.train_images} training images"
            )
        model = create_model(c.model.name, **_model_overrides(c, self.data.num_classes, self.data.in_chans))
        self.memory_format = torch.channels_last if c.runtime.channels_last else torch.contiguous_format
        model = model.to(self.device, memory_format=self.memory_format)
        if c.dist.sync_bn and info.world_size > 1:
            if self.device.type == "cuda":
                model, synced, kept = distributed.sync_batch_norm(model)
                self.log(f"dist.sync_bn: {synced} BatchNorm layers synchronised across ranks (stem, transitions, "
                         f"head); the {kept} inside GUNN layers stay per rank")
            else:
                warnings.warn("dist.sync_bn is ignored on the CPU: SyncBatchNorm needs CUDA", stacklevel=2)
        self.model = model
        ddp = DistributedDataParallel(
            model, device_ids=[self.device] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True, **_NO_BUFFER_BROADCAST,
        ) if info.world_size > 1 else model
        self.forward = torch.compile(ddp) if c.runtime.compile else ddp
        self.graphs_pending = c.runtime.cuda_graphs  # captured on the first training batch
        self.optimizer = torch.optim.SGD(
            model.parameters(), lr=c.optim.lr, momentum=c.optim.momentum, dampening=0.0,
            weight_decay=c.optim.weight_decay, nesterov=c.optim.nesterov,
        )
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.runtime.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

    def _resume(self) -> None:
        self.epoch, self.batch, self.step = 0, 0, 0
        self.history: list[dict[str, float]] = []
        self.meter = Meter(self.device)
        self.train_seconds = 0.0
        found = ckpt.load_latest(self.run_dir)
        if found is None:
            if self.info.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                (self.run_dir / "config.yaml").write_text(cfgmod.dump(self.config))
            return
        state, path = found
        self._warn_config_changes(state["config"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.history = state["history"]
        self.train_seconds = state["train_seconds"]
        own = self._rank_state(state)
        self.meter = Meter(self.device, **own["meter"])
        ckpt.set_rng_state(own["rng"], self.device)
        if own.get("buffers"):  # this rank's BatchNorm statistics (they differ between ranks mid-epoch)
            with torch.no_grad():
                for name, buffer in self.model.named_buffers():
                    buffer.copy_(own["buffers"][name])
        self.log(f"resuming {self.run_dir} from {path.name}: epoch {self.epoch + 1}, batch {self.batch}")

    def _rank_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """This rank's running metrics, random state and buffers from a checkpoint."""
        ranks = state.get("ranks")
        if ranks is None:  # written before 2026-12: rank 0's metrics and random state only
            return {key: state[key] for key in ckpt.RANK_STATE_KEYS}
        if len(ranks) == self.info.world_size:
            return ranks[self.info.rank]
        if self.info.is_main and self.batch:
            warnings.warn(f"{self.run_dir} was checkpointed mid-epoch by {len(ranks)} rank(s) and continues with "
                          f"{self.info.world_size}: the rest of epoch {self.epoch + 1} is sharded differently",
                          stacklevel=3)
        # The epoch's running sums so far go to rank 0 (they are summed over ranks at its end).
        totals = {k: sum(r["meter"][k] for r in ranks) if self.info.is_main else 0.0 for k in ranks[0]["meter"]}
        return {"meter": totals, "rng": ranks[0]["rng"]}

    def _warn_config_changes(self, saved: dict[str, Any]) -> None:
        now = cfgmod.flatten(self.config)
        old = cfgmod.flatten(cfgmod.resolve(cfgmod.from_dict(saved)))  # runs saved before resolving held nulls
        changed = [k for k in now if now[k] != old.get(k) and not k.startswith(_NO_EFFECT_ON_RESULTS)]
        if changed and self.info.is_main:
            warnings.warn(f"continuing {self.run_dir} with changed settings: "
                          + ", ".join(f"{k}: {old.get(k)!r} -> {now[k]!r}" for k in changed), stacklevel=3)

    def _tracker(self) -> Any:
        if not (self.info.is_main and self.config.logging.mlflow):
            return None
        from gunn.train.tracking import Tracker

        c = self.config
        layers = [m for m in self.model.modules() if isinstance(m, GunnLayer)]
        tags = {
            "model": c.model.name,
            "mode": ",".join(sorted({layer.mode for layer in layers})),
            "segments": ",".join(str(layer.segments) for layer in layers),
            "data": c.data.name,
            "world_size": str(self.info.world_size),
            "device": self.device.type,
            "host": socket.gethostname(),  # rank 0's node
            "git_commit": _git_commit(),
        }
        if tags["git_commit"] != "unknown":
            tags["mlflow.source.git.commit"] = tags["git_commit"]  # shown by the MLflow UI
        job = slurm_job()
        if job is not None:
            tags["slurm_job_id"] = job  # 8_1 for task 1 of array job 8
            tags["slurm_job_ids"] = ",".join(self._slurm_jobs())  # every job the run has lived in
            tags["mlflow.source.type"] = "JOB"  # else LOCAL (the tracker's default, with source name and user)
        if c.logging.parent_run_id:
            tags["mlflow.parentRunId"] = c.logging.parent_run_id  # shown nested under the sweep
        if c.logging.study:
            tags["study"] = c.logging.study
        return Tracker(run_dir=self.run_dir, tracking_uri=c.logging.tracking_uri, experiment=c.logging.experiment,
                       run_name=c.logging.run_name or self.run_dir.name, params=cfgmod.flatten(c), tags=tags,
                       system_metrics=c.logging.system_metrics)

    # -- the loop ------------------------------------------------------------------------
    def run(self, stop_after: int | None) -> RunResult:
        self._build()
        self._resume()
        tracker = self._tracker()
        result = RunResult(self.run_dir, "finished", self.epoch, history=self.history,
                           mlflow_run_id=getattr(tracker, "run_id", None),
                           tracking_uri=getattr(tracker, "tracking_uri", None))
        status = "FAILED"
        try:
            if self.info.world_size > 1:
                self.log(f"{self.info.world_size} ranks, {torch.get_num_threads()} CPU thread(s) each "
                         f"(runtime.threads)")
            if self.epoch == 0 and self.batch == 0:
                self.log(f"run directory: {self.run_dir}")
                if tracker is not None:
                    self.log(_mlflow_line(tracker))
            self.done, self.stop_after = 0, stop_after
            self.stop_poll = _StopPoll(self.device, self.info.world_size, self._bad_loss)
            already_finished = self.epoch >= self.config.optim.epochs and (self.run_dir / "model-final.pt").exists()
            while self.epoch < self.config.optim.epochs:
                stopped = self._train_epoch()
                self.stop_poll.check_loss()  # before anything is saved: nothing non-finite is
                if not stopped:
                    told_to_stop = self._end_epoch(tracker)
                    stopped = (told_to_stop or self._stop_requested(now=True)) and self.epoch < self.config.optim.epochs
                if stopped:
                    self._save()
                    self.log(f"checkpointed at epoch {self.epoch + 1}, batch {self.batch}: run again to continue")
                    result.status, status = "interrupted", "KILLED"
                    break
            if result.status == "finished":
                if already_finished:
                    self.log(f"{self.run_dir} has finished already: nothing to do")
                    if tracker is not None:  # a run killed while it finished lacks some of them
                        self._log_final_artifacts(tracker)
                else:
                    self._finish(tracker)
                status = "FINISHED"
            result.epochs_done = self.epoch
            result.metrics = dict(self.history[-1]) if self.history else {}
            result.model = self.model
            return result
        finally:
            if tracker is not None:
                tracker.finish(status)
                result.mlflow_run_id = tracker.run_id  # also a run created after the start's wait

    def _stop_requested(self, now: bool = False) -> bool:
        """A stop request: ``stop_after`` reached (the same on every rank), or a signal on any rank (agreed
        on every few seconds, or ``now``); every rank gets the same answer."""
        if self.stop_after is not None and self.done >= self.stop_after:
            return True
        return self.stop_poll.requested(now)

    def _train_epoch(self) -> bool:
        """Trains the rest of the current epoch; True if it stopped early on request."""
        c, loader = self.config, self.data.train
        self.model.train()
        per_epoch = len(loader)
        start_time = time.perf_counter()
        bar = self._progress(per_epoch)
        stopped = False
        for x, y in self._batches(loader.iterate(self.epoch, self.batch)):
            lr = learning_rate(c.optim, self.epoch, self.batch, per_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.graphs_pending:
                self._capture_graphs(x)
            # CUDA graphs replay the casts they captured: autocast must not cache casts across steps.
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None, cache_enabled=not c.runtime.cuda_graphs):
                logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y, reduction="sum")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss / y.shape[0]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.meter.add(loss.detach(), logits.detach(), y)
            self.stop_poll.watch_loss(loss.detach(), self.batch + 1)
            self.batch, self.step, self.done = self.batch + 1, self.step + 1, self.done + 1
            if bar is not None:
                self._update_bar(bar, start_time)
            if self.batch < per_epoch and self._stop_requested():
                stopped = True
                break
        if bar is not None:
            bar.close()
        self.train_seconds += time.perf_counter() - start_time
        return stopped

    def _bad_loss(self, batch: int) -> None:
        """Stops the run: the loss was not finite in ``batch`` (with several ranks, on some rank by then)."""
        saved = ckpt.list_checkpoints(self.run_dir)
        last = (f"its last good checkpoint is {saved[-1]}, which running again continues from" if saved else
                f"{self.run_dir} holds no checkpoint yet: running again starts from the beginning")
        where = f"by batch {batch}" if self.info.world_size > 1 else f"in batch {batch}"
        raise NonFiniteLossError(f"the training loss became nan or infinite in epoch {self.epoch + 1}, {where}; the "
                                 f"run stopped without saving it, and {last}. Lower optim.lr, or look at the data, first")

    def _capture_graphs(self, x: torch.Tensor) -> None:
        from gunn.train.graphs import capture_training_step

        self.log(f"capturing the training step of {self.config.model.name} as CUDA graphs (runtime.cuda_graphs)")
        capture_training_step(self.model, x, self.amp_dtype)
        self.graphs_pending = False

    def _batches(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in batches:
            yield x.to(self.device, non_blocking=True, memory_format=self.memory_format), y.to(self.device, non_blocking=True)

    def _progress(self, total: int) -> Any:
        if not (self.info.is_main and self.config.logging.progress):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.batch, desc=f"epoch {self.epoch + 1}/{self.config.optim.epochs}",
                    unit="batch", leave=False, dynamic_ncols=True, file=sys.stderr,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)

    def _update_bar(self, bar: Any, start_time: float) -> None:
        if time.time() - bar.last_print_t >= bar.mininterval:  # the bar redraws now: read the meter once
            loss, top1, _, count = self.meter.values()
            n = max(count, 1)
            rate = count * self.info.world_size / max(self.train_seconds + time.perf_counter() - start_time, 1e-9)
            bar.set_postfix(loss=f"{loss / n:.3f}", acc=f"{100 * top1 / n:.1f}%", img_s=f"{rate:.0f}", refresh=False)
        bar.update(1)

    def _end_epoch(self, tracker: Any) -> bool:
        """Evaluates, logs and checkpoints the epoch just trained; True if ``on_epoch`` asked to stop here."""
        c = self.config
        # Each rank's BatchNorm statistics saw only its own batches: average them, so that
        # every rank evaluates (and saves) the same model.
        distributed.average_buffers(self.model)
        train = self.meter.reduced().summary("train")
        evaluation = self.evaluate([self.model.state_dict()]).summary("eval")
        metrics = {"epoch": self.epoch + 1, **train, **evaluation,
                   "lr": learning_rate(c.optim, self.epoch, len(self.data.train) - 1, len(self.data.train)),
                   "epoch_time": self.train_seconds,
                   "images_per_s": self.meter.count * self.info.world_size / max(self.train_seconds, 1e-9),
                   "peak_memory_mb": _peak_memory_mb(self.device)}
        if self.epoch in snapshot_epochs(c.optim):
            metrics.update(self._snapshot())
        if c.logging.diagnostics and self.info.is_main:
            metrics.update(self._diagnostics())
        self.history.append(metrics)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=self.epoch + 1)
        self.log(_summary_line(metrics, c.optim.epochs))
        self.epoch, self.batch, self.meter, self.train_seconds = self.epoch + 1, 0, Meter(self.device), 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.epoch % c.checkpoint.every == 0 or self.epoch == c.optim.epochs:
            self._save()
        if self.on_epoch is None and self.info.world_size == 1:
            return False
        told = False  # asked on rank 0; every rank takes part in the broadcast below
        if self.info.is_main and self.on_epoch is not None:
            saved = ckpt.list_checkpoints(self.run_dir)
            told = bool(self.on_epoch(metrics, saved[-1] if saved else None))
        return bool(distributed.broadcast_object(told))

    @torch.no_grad()
    def evaluate(self, weights: list[dict[str, torch.Tensor]]) -> Meter:
        """Loss and top-k hits on the evaluation set of the averaged softmax of ``weights``, all ranks."""
        model, loader = self.model, self.data.eval
        current = {k: v.clone() for k, v in model.state_dict().items()} if len(weights) > 1 else None
        model.eval()
        probs: list[torch.Tensor] = []
        targets: list[torch.Tensor] = []
        for k, state in enumerate(weights):
            if current is not None:
                model.load_state_dict(state)
            for i, (x, y) in enumerate(self._batches(loader.iterate(0))):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    p = model(x).float().softmax(1)
                if k == 0:
                    probs.append(p)
                    targets.append(y)
                else:
                    probs[i] += p
        if current is not None:
            model.load_state_dict(current)
        meter = Meter(self.device)
        for p, y in zip(probs, targets):
            p = p / len(weights)
            meter.add(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum"), p, y)
        model.train()
        return meter.reduced()

    def _diagnostics(self) -> dict[str, float]:
        """Overlap-singularity diagnostics of every GUNN layer on the first evaluation batch."""
        from gunn.diagnostics import singularity_report

        x, _ = next(self._batches(self.data.eval.iterate(0)))
        report = singularity_report(self.model, x)
        return {f"singularity/{layer}/{key}": value for layer, stats in report.items()
                for key, value in stats.as_dict().items() if key != "channels"}

    def _snapshot(self) -> dict[str, float]:
        """Saves this cycle's weights and evaluates the ensemble of all snapshots so far."""
        folder = self.run_dir / "snapshots"
        index = snapshot_epochs(self.config.optim).index(self.epoch) + 1
        if self.info.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            weights = self.model.state_dict()
            ckpt.atomic_write(folder / f"snapshot-{index:02d}.pt", lambda f: torch.save(weights, f), what="snapshot")
        distributed.broadcast_object(None)  # a barrier: the file exists before any rank reads it
        paths = [folder / f"snapshot-{k:02d}.pt" for k in range(1, index + 1)]
        snapshots = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
        ensemble = self.evaluate(snapshots).summary("ensemble")
        return {"snapshots": float(len(snapshots)), **ensemble}

    def _save(self) -> None:
        # Every rank's own running metrics, random state and BatchNorm statistics (which differ
        # between ranks mid-epoch), so that every rank continues exactly where it stopped.
        own = {"meter": self.meter.state(), "rng": ckpt.rng_state(self.device),
               "buffers": {name: b.detach().cpu() for name, b in self.model.named_buffers()}}
        ranks = distributed.gather_to_main(own)
        if not self.info.is_main:
            return
        state = ckpt.run_state(
            model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
            scaler=self.scaler.state_dict(), epoch=self.epoch, batch=self.batch, step=self.step,
            train_seconds=self.train_seconds, history=self.history, ranks=ranks,
            config=cfgmod.to_dict(self.config),
        )
        ckpt.save(state, self.run_dir, ckpt.checkpoint_name(self.epoch, self.batch), self.config.checkpoint.keep)

    def _finish(self, tracker: Any) -> None:
        fingerprint = distributed.check_identical(self.model, self.device)
        if self.info.world_size > 1:
            self.log(f"weights identical on all {self.info.world_size} ranks (fingerprint {fingerprint})")
        if not self.info.is_main:
            return
        final = self.run_dir / "model-final.pt"
        weights = self.model.state_dict()
        ckpt.atomic_write(final, lambda f: torch.save(weights, f), what="final weights")  # whole, or not there
        last = self.history[-1] if self.history else {}
        self.log(f"finished: eval top-1 error {last.get('eval_top1_error', math.nan):.2f}%, "
                 f"top-5 {last.get('eval_top5_error', math.nan):.2f}%; weights {final}")
        if tracker is None:
            return
        from gunn.train.tracking import plot_curves

        with contextlib.suppress(Exception):  # a plot is not worth failing a finished run for
            plot_curves(self.history, self.run_dir / "curves.png")
        self._log_final_artifacts(tracker, save_model=True)

    def _log_final_artifacts(self, tracker: Any, save_model: bool = False) -> None:
        """Logs the finished run's files (curves, configuration, final weights) and MLflow model that it
        has not logged yet; ``save_model``: save the MLflow model even if the run directory has one."""
        from gunn.train.tracking import plot_curves

        if not (self.run_dir / "curves.png").exists():  # killed before it drew them
            with contextlib.suppress(Exception):
                plot_curves(self.history, self.run_dir / "curves.png")
        final = self.run_dir / "model-final.pt"
        if final.stat().st_size > 100 * 2**20:
            final = self.run_dir / "model-final.txt"  # a pointer to the weights, not a copy
            final.write_text(f"{self.run_dir / 'model-final.pt'}\n")
        for path in (self.run_dir / "curves.png", self.run_dir / "config.yaml", final):
            if path.exists():
                tracker.log_artifact(path, once=True)
        if not self.config.logging.model:
            return
        from gunn.train.tracking import MODEL_DIR_NAME, model_step

        model_dir = self.run_dir / MODEL_DIR_NAME
        if save_model or not (model_dir / "MLmodel").is_file():
            try:
                self._save_mlflow_model(model_dir)
            except Exception as err:  # noqa: BLE001 - the run has finished: its weights are in model-final.pt
                warnings.warn(f"the MLflow model of {self.run_dir} was not saved ({type(err).__name__}: {err}); "
                              f"its weights are in model-final.pt", stacklevel=2)
                return
        tracker.log_model(model_dir, step=model_step(model_dir), once=True)

    def _save_mlflow_model(self, model_dir: Path) -> None:
        """Saves the final weights as an MLflow model (``mlflow.pytorch.save_model``) in ``model_dir``.

        A float32 CPU copy of the network in eval mode, rebuilt from ``model-final.pt``; its input
        example is two images of the evaluation set as the data pipeline gives them (normalized,
        N x C x H x W), and its signature that input and the logits it gives. MLflow 3's default
        format, pt2 (``torch.export``: loads without gunn's code and without unpickling code, any
        batch size); pickled with gunn's code (``code_paths``) if the network cannot be exported.
        Its MLmodel metadata ``gunn`` holds the epoch (the step it is logged at) and that
        epoch's metrics (for whoever reads the MLmodel). Written whole or not at all."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        c = self.config
        model = create_model(c.model.name, **_model_overrides(c, self.data.num_classes, self.data.in_chans))
        model.load_state_dict(torch.load(self.run_dir / "model-final.pt", map_location="cpu", weights_only=True))
        model.eval()
        x, _ = next(iter(self.data.eval.iterate(0)))
        x = x[:2].detach().to("cpu", torch.float32).contiguous()
        if len(x) < 2:  # torch.export fixes a batch dimension of 1: the model would take one image only
            x = torch.cat([x, x])
        with torch.no_grad():
            logits = model(x)
        example = x.numpy()
        last = self.history[-1] if self.history else {}
        metrics = {k: float(v) for k, v in last.items()
                   if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
        options = dict(signature=infer_signature(example, logits.numpy()), input_example=example,
                       pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                       metadata={"gunn": {"step": self.epoch, "metrics": metrics, "model": c.model.name}})
        tmp = self.run_dir / f".{model_dir.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            try:
                mlflow.pytorch.save_model(model, str(tmp), serialization_format="pt2", **options)
            except Exception as err:  # noqa: BLE001 - torch.export could not trace the network
                warnings.warn(f"torch.export could not export {c.model.name} ({type(err).__name__}: {err}); its "
                              f"MLflow model is pickled with gunn's code instead", stacklevel=3)
                shutil.rmtree(tmp, ignore_errors=True)
                with warnings.catch_warnings(), _quiet("mlflow.pytorch"):  # its warning about pickles: said above
                    warnings.simplefilter("ignore")
                    mlflow.pytorch.save_model(model, str(tmp), serialization_format="pickle",
                                              code_paths=[str(Path(__file__).resolve().parents[1])], **options)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(tmp, model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class _StopPoll:
    """Whether a stop was requested by a signal on any rank, agreed on by all ranks every few seconds;
    and whether the training loss of any rank stopped being finite, checked at the same moments.

    One process reads its own flag at every step. Several ranks agree with a collective that
    reads the answer on the host, so they do it every ``every`` steps, where ``every`` is
    recomputed at each check from the slowest rank's time since the last one to keep checks
    about ``STOP_POLL_S`` apart. Every rank gets the same reduced time, hence the same
    ``every``, and so checks at the same steps. The first batch with a non-finite loss is
    noted on the device at every step (no host sync) and read at those checks.
    """

    def __init__(self, device: torch.device, world_size: int, bad_loss: Callable[[int], None]) -> None:
        self.device, self.world_size, self.bad_loss = device, world_size, bad_loss
        self.every, self.since, self.last = 1, 0, time.monotonic()
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def watch_loss(self, loss: torch.Tensor, batch: int) -> None:
        """Notes ``batch`` (1-based, in the epoch) if it is the first whose ``loss`` is not finite."""
        first = torch.where(~torch.isfinite(loss) & (self.first_bad < 0), batch, self.first_bad)
        self.first_bad = first.to(torch.long)

    def check_loss(self) -> None:
        """``bad_loss(batch)`` on every rank if any rank's loss was not finite (a collective with several ranks)."""
        (worst,) = distributed.all_reduce_max([float(self.first_bad.item())], self.device)
        if worst >= 0:
            self.bad_loss(int(worst))

    def requested(self, now: bool = False) -> bool:
        """At a check (every ``every`` calls, or ``now``): whether any rank was asked to stop."""
        if self.world_size == 1:
            if now or time.monotonic() - self.last >= STOP_POLL_S:
                self.last = time.monotonic()
                self.check_loss()
            return _STOP.requested
        self.since += 1
        if self.since < self.every and not now:
            return False
        flag, slowest, bad = distributed.all_reduce_max(
            [float(_STOP.requested), time.monotonic() - self.last, float(self.first_bad.item())], self.device)
        self.every = max(1, min(1000, int(self.since * STOP_POLL_S / max(slowest, 1e-6))))
        self.since, self.last = 0, time.monotonic()
        if bad >= 0:
            self.bad_loss(int(bad))  # every rank sees it at this same check, so all stop together
        return flag > 0


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silences the warnings of ``logger`` for a while."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _summary_line(m: dict[str, float], epochs: int) -> str:
    line = (f"epoch {int(m['epoch'])}/{epochs}  train loss {m['train_loss']:.4f} err {m['train_top1_error']:.2f}%  "
            f"eval top-1 {m['eval_top1_error']:.2f}% top-5 {m['eval_top5_error']:.2f}%  lr {m['lr']:.4g}  "
            f"{m['epoch_time']:.1f} s  {m['images_per_s']:.0f} img/s")
    if "ensemble_top1_error" in m:
        line += f"  ensemble of {int(m['snapshots'])}: top-1 {m['ensemble_top1_error']:.2f}%"
    return line


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _mlflow_line(tracker: Any) -> str:
    """Where the run logs to; when the store has not created the run yet, where its records wait."""
    if tracker.run_id is not None:
        return f"MLflow: run {tracker.run_id} at {tracker.tracking_uri}"
    from gunn.train.tracking import sync_command

    return (f"MLflow: {tracker.tracking_uri} has not created the run yet; its records are kept in "
            f"{tracker.journal_path} and sent when the store answers (or later with: {sync_command(tracker.run_dir)})")
