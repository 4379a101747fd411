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
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gunn import config as cfgmod
from gunn.config import ConfigError, OptimConfig, RunConfig
from gunn.data import DataBundle, build_data, check_data, train_size
from gunn.layers import GunnLayer
from gunn.models import create_model
from gunn.models.cost import model_cost
from gunn.train import checkpoint as ckpt
from gunn.train import distributed, graphs
from gunn.train.device import resolve as resolve_device
from gunn.train.device import set_tf32
from gunn.train.metrics import Meter
from gunn.train import rundir
from gunn.train.rundir import RunDirError, RunDirLock, slurm_job
from gunn.train.schedule import learning_rate, snapshot_epochs
from gunn.train.tracking.journal import JournalWriteError


class _StopFlag:
    """A stop request. Set from signal handlers, so a plain attribute: a handler runs between any two
    bytecodes of the main thread, and a ``threading.Event``'s lock, held by the code it interrupted
    (a first handler, say), would deadlock it."""

    requested = False


_STOP = _StopFlag()
# Settings that may change between the pieces of a resumed run without changing its result.
# The run directory is where the run lives, not a setting: a moved one continues its MLflow run, a copied one
# starts a new one (``_tracker``).
_NO_EFFECT_ON_RESULTS = ("data.workers", "logging.", "checkpoint.dir", "checkpoint.every", "checkpoint.keep",
                         "runtime.cuda_graphs", "dist.timeout_s")
# torch.compile's modes that replay the compiled step as CUDA graphs (on CUDA).
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")
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
RUN_ERRORS = (NonFiniteLossError, ckpt.CheckpointWriteError, ckpt.NoLoadableCheckpoint, JournalWriteError, RunDirError)


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
    unsent: int = 0  # MLflow records still in the run's journal at the end (the store was down)


def validate(config: RunConfig, world_size: int = 1, check_device: bool = True, check_tracking: bool = True) -> None:
    """Checks what the schema cannot: values that depend on each other, the model, the data path,
    (``check_device``, where the run will train) that the device it asks for is usable, and
    (``check_tracking``) that the MLflow store is one runs can log to."""
    o = config.optim
    if o.schedule == "step" and any(not 0 < f <= 1 for f in o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be fractions of the epochs in (0, 1], got {o.lr_steps}")
    if o.schedule == "step" and o.lr_steps != sorted(o.lr_steps):
        raise ConfigError(f"optim.lr_steps must be increasing, got {o.lr_steps}")
    if o.schedule == "snapshot" and o.epochs % o.snapshots:
        raise ConfigError(f"optim.snapshots={o.snapshots} must divide optim.epochs={o.epochs} (whole-epoch cycles)")
    if o.batch_size % world_size:
        raise ConfigError(f"optim.batch_size={o.batch_size} must be a multiple of the {world_size} ranks")
    resolved = cfgmod.resolve(config)  # builds the model on the meta device: ConfigError for values it rejects
    r = config.runtime
    if r.cuda_graphs and r.compile:
        raise ConfigError("runtime.cuda_graphs and runtime.compile exclude each other: choose one")
    if r.cuda_graphs and config.model.memory == "recompute" and resolved.model.mode != "sunn":
        raise ConfigError("runtime.cuda_graphs=true cannot capture model.memory='recompute': its backward reads and "
                          "forks the CUDA random state, which a capture forbids. Use model.memory='efficient', or "
                          "runtime.cuda_graphs=false")
    kind = resolve_device(r.device) if check_device else r.device
    if r.amp == "fp16" and kind == "cpu":
        raise ConfigError("runtime.amp='fp16' needs a GPU; use 'bf16' on the CPU")
    if r.cuda_graphs and config.dist.sync_bn and world_size > 1:
        raise ConfigError("runtime.cuda_graphs=true cannot capture dist.sync_bn's collectives; turn one of them off")
    if r.cuda_graphs and kind == "cpu":
        raise ConfigError("runtime.cuda_graphs=true needs a GPU (CUDA graphs); set it to false on the CPU")
    if config.logging.mlflow and check_tracking:
        _check_tracking(config)
    check_data(config.data)
    size = train_size(config.data)
    if size is not None and o.batch_size > size:
        raise ConfigError(_too_large(o.batch_size, size, config.data.name))


def _too_large(batch_size: int, images: int, data: str) -> str:
    return (f"optim.batch_size={batch_size} is larger than the {images} training images of {data}: an epoch would "
            "hold no batch (the last partial batch is dropped)")


def _check_tracking(config: RunConfig) -> None:
    """ConfigError naming where the tracking URI came from if runs cannot log there (`check_tracking_uri`)."""
    from gunn.train.tracking.store import check_tracking_uri, resolve_tracking_uri

    given = config.logging.tracking_uri
    uri = resolve_tracking_uri(given)
    why = check_tracking_uri(uri)
    if why is None:
        return
    source = (f"logging.tracking_uri={given}" if given else f"MLFLOW_TRACKING_URI={os.environ['MLFLOW_TRACKING_URI']}"
              if os.environ.get("MLFLOW_TRACKING_URI") else f"the default MLflow store {uri}")
    raise ConfigError(f"{source}: {why}; set logging.tracking_uri to a store runs can log to, or logging.mlflow=false")


def _model_overrides(config: RunConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    return dict(num_classes=num_classes, in_chans=in_chans, **cfgmod.model_arguments(config.model))


def default_run_dir(config: RunConfig) -> Path:
    """runs/<name>-<date>-<time>: a new directory for each run that does not name one."""
    return Path("runs") / f"{config.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


EpochCallback = Callable[[dict[str, float], Path | None], bool | None]


def train(config: RunConfig, *, stop_after: int | None = None, on_epoch: EpochCallback | None = None) -> RunResult:
    """Trains (or continues) the run that ``config`` describes; returns how far it got.

    ``stop_after``: checkpoint and return after this many batches of this call (a time-boxed
    session); ``request_stop()`` does the same from a signal handler. ``on_epoch(metrics,
    checkpoint)`` is called on rank 0 after every epoch with its metrics and the newest
    checkpoint file (how sweeps report to Ray Tune); when it returns True, the run stops there
    as on a stop request (checkpointed, "interrupted", MLflow KILLED until someone ends it
    otherwise: a sweep records a scheduler's early stop as FINISHED).
    """
    info = distributed.setup(config.runtime.device, config.dist.backend, config.runtime.threads,
                             config.dist.timeout_s)
    together = False  # after an error the other ranks may never get to leaving in order
    try:
        validate(config, info.world_size)
        config = cfgmod.resolve(config)  # the model's own values where model fields are null: saved and logged
        run_dir = _agreed_run_dir(config)
        config.checkpoint.dir = str(run_dir)
        with locked(run_dir, info):
            result = _loop(config, info, run_dir, stop_after, on_epoch)
        together = True
        return result
    finally:
        _STOP.requested = False
        distributed.teardown(together)


def _loop(config: RunConfig, info: distributed.DistInfo, run_dir: Path, stop_after: int | None,
          on_epoch: EpochCallback | None) -> RunResult:
    """The run, in order: build, resume, then train and end epoch after epoch until the last one (finish)
    or a stop (checkpoint); rank 0 logs it all to MLflow."""
    parts = build(config, info)
    position = resume(run_dir, parts, config, info)
    tracker = _tracker(config, info, run_dir, parts, position.history)
    result = RunResult(run_dir, "finished", position.epoch, history=position.history,
                       mlflow_run_id=getattr(tracker, "run_id", None),
                       tracking_uri=getattr(tracker, "tracking_uri", None))
    status = "FAILED"
    try:
        _announce(info, run_dir, position, tracker)
        first_step = position.step  # of this call: CUDA graphs are captured there, stop_after counts from there
        stop = StopPoll(info.device, info.grouped, lambda batch: _raise_bad_loss(run_dir, info, position, batch,
                                                                               stop.bad_rank),
                         stop_at=None if stop_after is None else first_step + stop_after, rank=info.rank)
        already_finished = position.epoch >= config.optim.epochs and (run_dir / "model-final.pt").exists()
        while position.epoch < config.optim.epochs:
            capture = config.runtime.cuda_graphs and position.step == first_step
            stopped = train_one_epoch(parts, position, config, info, stop, capture_graphs=capture)
            stop.check_loss()  # before anything is saved: nothing non-finite is
            if not stopped:
                metrics = end_epoch(parts, position, config, info, run_dir, tracker)
                last = position.epoch == config.optim.epochs  # then no rank waits for rank 0 any more
                told = _on_epoch_says_stop(on_epoch, metrics, run_dir, info, agree=not last)
                stopped = not last and (told or stop.requested(position.step, now=True))
            if stopped:
                save_checkpoint(parts, position, config, info, run_dir)
                _log(info, f"checkpointed at epoch {position.epoch + 1}, batch {position.batch}")  # the caller says what next
                result.status, status = "interrupted", "KILLED"
                break
        if result.status == "finished":
            if already_finished:
                _log(info, f"{run_dir} has finished already: nothing to do")
                if tracker is not None:  # a run killed while it finished lacks some of them
                    _log_final_artifacts(tracker, parts, position, config, run_dir)
            else:
                finish(parts, position, config, info, run_dir, tracker)
            status = "FINISHED"
        result.epochs_done = position.epoch
        result.metrics = dict(position.history[-1]) if position.history else {}
        result.model = parts.model
        return result
    finally:
        if tracker is not None:
            tracker.finish(status)
            result.mlflow_run_id = tracker.run_id  # also a run created after the start's wait
            result.unsent = tracker.unsent


def _log(info: distributed.DistInfo, message: str) -> None:
    """Prints ``message`` on rank 0 (only the main process prints)."""
    if info.is_main:
        print(message)


def _announce(info: distributed.DistInfo, run_dir: Path, position: Position, tracker: Any) -> None:
    """Says how many ranks train and, when the run starts, where it lives and logs."""
    if info.grouped:
        ranks = f"{info.world_size} rank{'s' if info.world_size > 1 else ''}"
        _log(info, f"{ranks} in a {info.backend} process group, {torch.get_num_threads()} CPU thread(s) each "
                   "(runtime.threads)")
    if position.epoch == 0 and position.batch == 0:
        _log(info, f"run directory: {run_dir}")
        if tracker is not None:
            _log(info, _mlflow_line(tracker))


# -- build and resume ----------------------------------------------------------------------


@dataclass
class Parts:
    """What a run builds once: its data, network, optimiser and gradient scaler, on its device; its CUDA graphs."""

    data: DataBundle
    model: nn.Module  # the network itself: what checkpoints hold, evaluation runs and ``train`` returns
    forward: nn.Module  # what trains: ``model`` in DDP with several ranks, compiled with runtime.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None  # autocast's, or None for float32
    memory_format: torch.memory_format
    device: torch.device
    graphs: graphs.CapturedStep | None = None  # captured by this call's first step (runtime.cuda_graphs)

    def on_device(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batches`` moved to the device, images in the network's memory format."""
        for x, y in batches:
            yield x.to(self.device, non_blocking=True, memory_format=self.memory_format), y.to(self.device, non_blocking=True)


@dataclass
class Position:
    """Where a run stands: what a checkpoint holds besides the weights and optimiser, advanced batch by batch."""

    meter: Meter  # this rank's running training metrics of the current epoch
    epoch: int = 0  # epochs done; the current one, counted from 0
    batch: int = 0  # batches done in the current epoch
    step: int = 0  # batches done in the whole run
    history: list[dict[str, float]] = field(default_factory=list)  # every finished epoch's metrics
    train_seconds: float = 0.0  # spent training the current epoch
    # This process's own share of the current epoch, which its images_per_s measures; not saved, so a
    # resumed epoch does not mix in the seconds of the process that started it.
    images_here: float = 0.0  # images this rank trained
    seconds_here: float = 0.0


def build(config: RunConfig, info: distributed.DistInfo) -> Parts:
    """Seeds torch and builds this rank's data shard, the network (DDP, SyncBatchNorm, compiled where asked),
    the SGD optimiser and the gradient scaler."""
    c, device = config, info.device
    torch.manual_seed(c.runtime.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        set_tf32(c.runtime.tf32)
    data = build_data(c.data, batch_size=c.optim.batch_size // info.world_size, rank=info.rank,
                      world_size=info.world_size, seed=c.runtime.seed, device=device)
    if len(data.train) == 0:
        raise ConfigError(_too_large(c.optim.batch_size, data.train_images, c.data.name))
    model = create_model(c.model.name, **_model_overrides(c, data.num_classes, data.in_chans))
    memory_format = torch.channels_last if c.runtime.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    if c.dist.sync_bn and info.grouped:
        if device.type == "cuda":
            model, synced, kept = distributed.sync_batch_norm(model)
            _log(info, f"dist.sync_bn: {synced} BatchNorm layers synchronised across ranks (stem, transitions, "
                       f"head); the {kept} inside GUNN layers stay per rank")
        else:
            warnings.warn("dist.sync_bn is ignored on the CPU: SyncBatchNorm needs CUDA", stacklevel=2)
    ddp = DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None,
        gradient_as_bucket_view=True, **_NO_BUFFER_BROADCAST,
    ) if info.grouped else model
    optimizer = sgd(model.parameters(), c.optim, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(c.runtime.amp)
    forward = torch.compile(ddp, mode=c.runtime.compile_mode) if c.runtime.compile else ddp
    return Parts(data=data, model=model, forward=forward,
                 optimizer=optimizer, scaler=torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                 amp_dtype=amp_dtype, memory_format=memory_format, device=device)


def sgd(params: Iterable[nn.Parameter], optim: OptimConfig, device: torch.device,
        fused: bool | None = None) -> torch.optim.SGD:
    """The paper's SGD (``optim``) for parameters on ``device``. On CUDA its fused kernel: one launch for every
    parameter, and GradScaler hands it the scale and the inf/NaN flag as tensors instead of reading them on the
    host (the other kernels' ``.item()`` makes fp16 wait for the device at every step). On the CPU the plain
    loop, whose results the fused kernel does not repeat bit for bit. ``fused``: the fused kernel or not,
    whatever the device (the benchmark counts the CPU's operations of a GPU's step)."""
    if fused is None:
        fused = device.type == "cuda"
    optimizer = torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, dampening=0.0,
                                weight_decay=optim.weight_decay, nesterov=optim.nesterov, fused=True if fused else None)
    momentum_from_zero(optimizer)
    return optimizer


def momentum_from_zero(optimizer: torch.optim.Optimizer) -> None:
    """Gives every parameter of a fused SGD that has none a momentum buffer of zeros.

    Without buffers the fused kernel allocates them empty and lets its first step fill them;
    a first step that GradScaler skips (an inf gradient: usual in fp16's first steps, at the
    initial scale 65536) returns before filling them, and the next steps take whatever that
    memory held as momentum. From zeros, the first step gives the same buffer (0.9 * 0 + g = g,
    as dampening is 0) and a skipped one keeps them zero. (Called again after a checkpoint is
    loaded: a state saved before any step has no buffers.)
    """
    for group in optimizer.param_groups:
        if not (group.get("fused") and group["momentum"]):
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def resume(run_dir: Path, parts: Parts, config: RunConfig, info: distributed.DistInfo) -> Position:
    """Where the run continues: the newest checkpoint in ``run_dir`` loaded into ``parts`` (and every rank's own
    random state, running metrics and BatchNorm statistics restored), or the start, ``config.yaml`` written."""
    found = ckpt.load_latest(run_dir)
    if found is None:
        if info.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(cfgmod.dump(config))
        return Position(meter=Meter(parts.device))
    state, path = found
    mismatch = _shape_mismatch(parts.model.state_dict(), state["model"])
    if mismatch:
        raise RunDirError(f"{path} holds a run of another model than these settings build ({config.model.name}: "
                          f"{mismatch}); continue {run_dir} with the settings it was saved with (its config.yaml), "
                          "or choose another checkpoint.dir")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    momentum_from_zero(parts.optimizer)
    parts.scaler.load_state_dict(state["scaler"])
    own = _rank_state(state, info, run_dir)
    position = Position(meter=Meter(parts.device, **own["meter"]), epoch=state["epoch"], batch=state["batch"],
                        step=state["step"], history=state["history"], train_seconds=state["train_seconds"])
    ckpt.set_rng_state(own["rng"], parts.device)
    if own.get("buffers"):  # this rank's BatchNorm statistics (they differ between ranks mid-epoch)
        with torch.no_grad():
            for name, buffer in parts.model.named_buffers():
                buffer.copy_(own["buffers"][name])
    _log(info, f"resuming {run_dir} from {path.name}: epoch {position.epoch + 1}, batch {position.batch}")
    _record_config_changes(config, state["config"], info, run_dir, position)
    return position


def _shape_mismatch(now: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str:
    """How the tensors of ``saved`` differ from the model's ``now`` in names and shapes ('' if they fit)."""
    missing, extra = [k for k in now if k not in saved], [k for k in saved if k not in now]
    shapes = [k for k in now if k in saved and tuple(now[k].shape) != tuple(saved[k].shape)]
    said = []
    if shapes:
        k = shapes[0]
        said.append(f"{len(shapes)} tensor(s) of other shapes, e.g. {k}: saved {tuple(saved[k].shape)}, "
                    f"built {tuple(now[k].shape)}")
    if missing:
        said.append(f"{len(missing)} the checkpoint lacks, e.g. {missing[0]}")
    if extra:
        said.append(f"{len(extra)} the model lacks, e.g. {extra[0]}")
    return "; ".join(said)


def _rank_state(state: dict[str, Any], info: distributed.DistInfo, run_dir: Path) -> dict[str, Any]:
    """This rank's running metrics, random state and buffers from a checkpoint."""
    ranks = state.get("ranks")
    if ranks is None:  # written before 2026-12: rank 0's metrics and random state only
        return {key: state[key] for key in ckpt.RANK_STATE_KEYS}
    if len(ranks) == info.world_size:
        return ranks[info.rank]
    if info.is_main and state["batch"]:
        warnings.warn(f"{run_dir} was checkpointed mid-epoch by {len(ranks)} rank(s) and continues with "
                      f"{info.world_size}: the rest of epoch {state['epoch'] + 1} is sharded differently",
                      stacklevel=3)
    # The epoch's running sums so far go to rank 0 (they are summed over ranks at its end).
    totals = {k: sum(r["meter"][k] for r in ranks) if info.is_main else 0.0 for k in ranks[0]["meter"]}
    return {"meter": totals, "rng": ranks[0]["rng"]}


def _record_config_changes(config: RunConfig, saved: dict[str, Any], info: distributed.DistInfo, run_dir: Path,
                           position: Position) -> None:
    """Records (rank 0) and names the settings that differ from the checkpoint's ``saved`` configuration:
    the run goes on with them, so ``config.yaml`` takes them and ``config-changes.yaml`` says from where."""
    old = cfgmod.flatten(cfgmod.resolve(cfgmod.from_dict(saved)))  # runs saved before resolving held nulls
    changes = rundir.config_changes(cfgmod.flatten(config), old, _NO_EFFECT_ON_RESULTS)
    if not changes or not info.is_main:
        return
    rundir.record_config_changes(run_dir, changes, position.epoch + 1, position.batch, cfgmod.dump(config))
    _log(info, f"continuing with changed settings from epoch {position.epoch + 1}"
               + (f", batch {position.batch}" if position.batch else "") + ": "
               + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
               + f" (recorded in {rundir.CONFIG_NAME}, {rundir.CHANGES_NAME} and the MLflow run's changed/ tags)")


# -- an epoch ------------------------------------------------------------------------------


def train_one_epoch(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo,
                    stop: StopPoll, capture_graphs: bool = False) -> bool:
    """Trains the rest of the epoch at ``position``, advancing it batch by batch; True if ``stop`` asked to
    stop before the epoch's end. ``capture_graphs``: first capture the training step as CUDA graphs."""
    meter = position.meter
    parts.model.train()
    per_epoch = len(parts.data.train)
    if capture_graphs:  # before the loader's threads start (pin memory, DALI): see _capture_graphs
        _capture_graphs(parts, config, info)
    bar = _progress(config, info, position, per_epoch)
    start_time, start_count = time.perf_counter(), meter.count
    new_graph_step = (config.runtime.compile and config.runtime.compile_mode in GRAPHED_COMPILE_MODES
                      and parts.device.type == "cuda")
    try:
        stopped = _train_batches(parts, position, config, stop, bar, new_graph_step, start_time, start_count,
                                 info.world_size)
    finally:
        if bar is not None:
            bar.close()  # also when the step fails: an error line then starts a line of its own
    seconds = time.perf_counter() - start_time
    position.train_seconds += seconds
    position.seconds_here += seconds
    position.images_here += meter.count - start_count
    return stopped


def _train_batches(parts: Parts, position: Position, config: RunConfig, stop: StopPoll, bar: Any,
                   new_graph_step: bool, start_time: float, start_count: float, world_size: int) -> bool:
    """The batches of `train_one_epoch`; True if ``stop`` asked to stop before the epoch's end."""
    loader, optimizer, scaler, meter = parts.data.train, parts.optimizer, parts.scaler, position.meter
    per_epoch = len(loader)
    for x, y in parts.on_device(loader.iterate(position.epoch, position.batch)):
        lr = learning_rate(config.optim, position.epoch, position.batch, per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if new_graph_step:  # the compiled step's CUDA graphs: a new step, whose replay may reuse the last one's outputs
            torch.compiler.cudagraph_mark_step_begin()
        # CUDA graphs replay the casts they captured: autocast must not cache casts across steps.
        with torch.autocast(parts.device.type, dtype=parts.amp_dtype or torch.float32,
                            enabled=parts.amp_dtype is not None, cache_enabled=not config.runtime.cuda_graphs):
            logits = parts.forward(x)
        loss = F.cross_entropy(logits.float(), y, reduction="sum")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / y.shape[0]).backward()
        scaler.step(optimizer)
        scaler.update()
        meter.add(loss.detach(), logits.detach(), y)
        stop.watch_loss(loss.detach(), position.batch + 1)
        position.batch, position.step = position.batch + 1, position.step + 1
        if bar is not None:
            _update_bar(bar, position, world_size, start_time, start_count)
        if position.batch < per_epoch and stop.requested(position.step):
            return True
    return False


def _raise_bad_loss(run_dir: Path, info: distributed.DistInfo, position: Position, batch: int,
                    rank: int | None = None) -> None:
    """Stops the run: the loss was not finite in ``batch`` (with several ranks, on ``rank`` by then)."""
    saved = ckpt.list_checkpoints(run_dir)
    where = f"by batch {batch}" if info.grouped else f"in batch {batch}"
    if info.world_size > 1 and rank is not None:
        where += f" on rank {rank} of {info.world_size}"
    last = (f"its last good checkpoint is {saved[-1].name}" if saved else f"{run_dir} holds no checkpoint yet")
    raise NonFiniteLossError(
        f"the training loss became nan or infinite in epoch {position.epoch + 1}, {where}; the run stopped without "
        f"saving it ({last}). The same command would diverge the same way: continue with a lower optim.lr (the "
        "change is recorded), or from an earlier checkpoint (move the later ones out of the run directory), "
        "after looking at the data")


def _capture_graphs(parts: Parts, config: RunConfig, info: distributed.DistInfo) -> None:
    """Captures the training step as CUDA graphs (``parts.graphs``) on a static batch of the training loader's
    shape, then starts the device's memory peak afresh: the warm-up's is not the step's.

    A CUDA call from another thread invalidates a capture (global mode), and the loader's threads
    (pin memory, DALI) make such calls: the capture runs before this process first starts the
    training loader's iterator. With several ranks a GunnNet is captured stage by stage, so that
    DDP's all-reduce of the later stages' gradients overlaps the earlier stages' backward.
    """
    data = parts.data
    example = torch.empty(config.optim.batch_size // info.world_size, data.in_chans, data.image_size,
                          data.image_size, device=parts.device, memory_format=parts.memory_format).zero_()
    _log(info, f"capturing the training step of {config.model.name} as CUDA graphs (runtime.cuda_graphs)")
    parts.graphs = graphs.capture_training_step(parts.model, example, parts.amp_dtype, stages=info.world_size > 1)
    pieces = ", ".join(parts.graphs.pieces) if parts.graphs.pieces != ("",) else "the whole model"
    _log(info, f"captured {pieces}; the graphs' memory pool holds {parts.graphs.pool_bytes / 2**20:.0f} MB")
    if parts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(parts.device)


def _progress(config: RunConfig, info: distributed.DistInfo, position: Position, total: int) -> Any:
    if not (info.is_main and config.logging.progress):
        return None
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(total=total, initial=position.batch, desc=f"epoch {position.epoch + 1}/{config.optim.epochs}",
                unit="batch", leave=False, dynamic_ncols=terminal, file=sys.stderr if terminal else _Lines(sys.stderr),
                mininterval=0.5 if terminal else 30.0, delay=0 if terminal else 30.0)  # a log file: no "0%" lines


class _Lines:
    """tqdm's file in a log file (not a terminal): each redraw a line of its own. tqdm redraws in place
    with carriage returns, which in a file glue every redraw, and the next message, into one line."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()  # a closing bar writes only blanks
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _update_bar(bar: Any, position: Position, world_size: int, start_time: float, start_count: float) -> None:
    if time.time() - bar.last_print_t >= bar.mininterval:  # the bar redraws now: read the meter once
        loss, top1, _, count = position.meter.values()
        n = max(count, 1)
        images = position.images_here + count - start_count  # this process's, as images_per_s counts them
        rate = images * world_size / max(position.seconds_here + time.perf_counter() - start_time, 1e-9)
        bar.set_postfix(loss=f"{loss / n:.3f}", acc=f"{100 * top1 / n:.1f}%", img_s=f"{rate:.0f}", refresh=False)
    bar.update(1)


def end_epoch(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo, run_dir: Path,
              tracker: Any) -> dict[str, float]:
    """Evaluates the epoch just trained and records its metrics (history, MLflow, a summary line), moves
    ``position`` to the next epoch and checkpoints if one is due there; returns the metrics.

    After the last epoch it first checks that every rank holds the same weights: the run's last
    collectives (that check, the checkpoint's gather) come before rank 0's own work at its end
    (writing the checkpoint, ``finish``), which no rank waits for."""
    metrics = _epoch_metrics(parts, position, config, info, run_dir)
    position.history.append(metrics)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=position.epoch + 1)
    _log(info, _summary_line(metrics, config.optim.epochs))
    position.epoch, position.batch, position.meter, position.train_seconds = (
        position.epoch + 1, 0, Meter(parts.device), 0.0)
    position.images_here = position.seconds_here = 0.0
    if parts.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(parts.device)
    last = position.epoch == config.optim.epochs
    if last:
        fingerprint = distributed.check_identical(parts.model, parts.device)
        if info.world_size > 1:
            _log(info, f"weights identical on all {info.world_size} ranks (fingerprint {fingerprint})")
    if position.epoch % config.checkpoint.every == 0 or last:
        save_checkpoint(parts, position, config, info, run_dir)
    return metrics


def _epoch_metrics(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo,
                   run_dir: Path) -> dict[str, float]:
    """The epoch's training and evaluation metrics, with its snapshot ensemble's and diagnostics where asked."""
    # Each rank's BatchNorm statistics saw only its own batches: average them, so that
    # every rank evaluates (and saves) the same model.
    distributed.average_buffers(parts.model)
    train = position.meter.reduced().summary("train")
    evaluation = evaluate(parts, [parts.model.state_dict()]).summary("eval")
    per_epoch, seconds = len(parts.data.train), position.train_seconds
    metrics = {"epoch": position.epoch + 1, **train, **evaluation,
               "lr": learning_rate(config.optim, position.epoch, per_epoch - 1, per_epoch),
               "epoch_time": seconds,  # the whole epoch's, also the part trained before a resume
               "images_per_s": position.images_here * info.world_size / max(position.seconds_here, 1e-9),
               "peak_memory_mb": _peak_memory_mb(parts.device, parts.graphs)}
    if position.epoch in snapshot_epochs(config.optim):
        metrics.update(_snapshot(parts, position.epoch, config, info, run_dir))
    if config.logging.diagnostics and info.is_main:
        metrics.update(_diagnostics(parts))
    return metrics


def _on_epoch_says_stop(on_epoch: EpochCallback | None, metrics: dict[str, float], run_dir: Path,
                        info: distributed.DistInfo, agree: bool) -> bool:
    """Calls ``on_epoch`` on rank 0 with the epoch's metrics and newest checkpoint; whether it asked to stop,
    the same on every rank if ``agree`` (after the last epoch a stop changes nothing: no rank waits for it)."""
    told = False  # asked on rank 0; with agree, every rank takes part in the broadcast below
    if info.is_main and on_epoch is not None:
        saved = ckpt.list_checkpoints(run_dir)
        told = bool(on_epoch(metrics, saved[-1] if saved else None))
    return bool(distributed.broadcast_object(told)) if agree and info.grouped else told


@torch.no_grad()
def evaluate(parts: Parts, weights: list[dict[str, torch.Tensor]]) -> Meter:
    """Loss and top-k hits on the evaluation set of the averaged softmax of ``weights``, all ranks."""
    model, loader, amp_dtype = parts.model, parts.data.eval, parts.amp_dtype
    current = {k: v.clone() for k, v in model.state_dict().items()} if len(weights) > 1 else None
    model.eval()
    probs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    for k, state in enumerate(weights):
        if current is not None:
            model.load_state_dict(state)
        for i, (x, y) in enumerate(parts.on_device(loader.iterate(0))):
            with torch.autocast(parts.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                p = model(x).float().softmax(1)
            if k == 0:
                probs.append(p)
                targets.append(y)
            else:
                probs[i] += p
    if current is not None:
        model.load_state_dict(current)
    meter = Meter(parts.device)
    for p, y in zip(probs, targets):
        p = p / len(weights)
        meter.add(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum"), p, y)
    model.train()
    return meter.reduced()


def _diagnostics(parts: Parts) -> dict[str, float]:
    """Overlap-singularity diagnostics of every GUNN layer on the first evaluation batch."""
    from gunn.diagnostics import singularity_report

    x, _ = next(parts.on_device(parts.data.eval.iterate(0)))
    report = singularity_report(parts.model, x)
    return {f"diag/{layer}/{key}": value for layer, stats in report.items()
            for key, value in stats.as_dict().items() if key != "channels"}


def _snapshot(parts: Parts, epoch: int, config: RunConfig, info: distributed.DistInfo, run_dir: Path) -> dict[str, float]:
    """Saves the weights of the cycle that ends with ``epoch`` and evaluates the ensemble of all snapshots so far."""
    folder = run_dir / "snapshots"
    index = snapshot_epochs(config.optim).index(epoch) + 1
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        weights = parts.model.state_dict()
        ckpt.atomic_write(folder / f"snapshot-{index:02d}.pt", lambda f: torch.save(weights, f), what="snapshot")
    distributed.broadcast_object(None)  # a barrier: the file exists before any rank reads it
    paths = [folder / f"snapshot-{k:02d}.pt" for k in range(1, index + 1)]
    snapshots = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    ensemble = evaluate(parts, snapshots).summary("ensemble")
    return {"snapshots": float(len(snapshots)), **ensemble}


def save_checkpoint(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo,
                    run_dir: Path) -> None:
    """Writes a checkpoint at ``position`` into ``run_dir`` (rank 0, with every rank's own state); keeps the
    newest ``checkpoint.keep``."""
    # Every rank's own running metrics, random state and BatchNorm statistics (which differ
    # between ranks mid-epoch), so that every rank continues exactly where it stopped.
    own = {"meter": position.meter.state(), "rng": ckpt.rng_state(parts.device),
           "buffers": {name: b.detach().cpu() for name, b in parts.model.named_buffers()}}
    ranks = distributed.gather_to_main(own)
    if not info.is_main:
        return
    state = ckpt.run_state(
        model=parts.model.state_dict(), optimizer=parts.optimizer.state_dict(),
        scaler=parts.scaler.state_dict(), epoch=position.epoch, batch=position.batch, step=position.step,
        train_seconds=position.train_seconds, history=position.history, ranks=ranks,
        config=cfgmod.to_dict(config),
    )
    ckpt.save(state, run_dir, ckpt.checkpoint_name(position.epoch, position.batch), config.checkpoint.keep)


# -- the end -------------------------------------------------------------------------------


def finish(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo, run_dir: Path,
           tracker: Any) -> None:
    """Rank 0 writes ``model-final.pt`` and the curves and logs the final artifacts and MLflow model; the other
    ranks have nothing left to do (``end_epoch`` checked that all hold the same weights) and leave."""
    if not info.is_main:
        return
    final = run_dir / "model-final.pt"
    weights = parts.model.state_dict()
    ckpt.atomic_write(final, lambda f: torch.save(weights, f), what="final weights")  # whole, or not there
    last = position.history[-1] if position.history else {}
    _log(info, f"finished: eval top-1 error {last.get('eval_top1_error', math.nan):.2f}%, "
               f"top-5 {last.get('eval_top5_error', math.nan):.2f}%; weights {final}")
    if tracker is None:
        return
    from gunn.train import plots

    with contextlib.suppress(Exception):  # a plot is not worth failing a finished run for
        plots.plot_curves(position.history, run_dir / "curves.png")
    _log_final_artifacts(tracker, parts, position, config, run_dir, save_model=True)


def _log_final_artifacts(tracker: Any, parts: Parts, position: Position, config: RunConfig, run_dir: Path,
                         save_model: bool = False) -> None:
    """Logs the finished run's files (curves, configuration, final weights) and MLflow model that it
    has not logged yet; ``save_model``: save the MLflow model even if the run directory has one."""
    from gunn.train import plots

    if not (run_dir / "curves.png").exists():  # killed before it drew them
        with contextlib.suppress(Exception):
            plots.plot_curves(position.history, run_dir / "curves.png")
    final = run_dir / "model-final.pt"
    if final.stat().st_size > 100 * 2**20:
        final = run_dir / "model-final.txt"  # a pointer to the weights, not a copy
        final.write_text(f"{run_dir / 'model-final.pt'}\n")
    # A run continued with changed settings has rewritten its configuration since it was logged: logged again.
    changed = (run_dir / rundir.CHANGES_NAME).exists()
    for path in (run_dir / "curves.png", run_dir / rundir.CONFIG_NAME, run_dir / rundir.CHANGES_NAME, final):
        if path.exists():
            tracker.log_artifact(path, once=not (changed and path.name in (rundir.CONFIG_NAME, rundir.CHANGES_NAME)))
    if not config.logging.model:
        return
    from gunn.train.tracking.journal import MODEL_DIR_NAME
    from gunn.train.tracking.sync import model_step

    model_dir = run_dir / MODEL_DIR_NAME
    if save_model or not (model_dir / "MLmodel").is_file():
        try:
            _save_mlflow_model(model_dir, parts.data, position, config, run_dir)
        except Exception as err:  # noqa: BLE001 - the run has finished: its weights are in model-final.pt
            warnings.warn(f"the MLflow model of {run_dir} was not saved ({type(err).__name__}: {err}); "
                          f"its weights are in model-final.pt", stacklevel=2)
            return
    tracker.log_model(model_dir, step=model_step(model_dir), once=True)


def _save_mlflow_model(model_dir: Path, data: DataBundle, position: Position, config: RunConfig, run_dir: Path) -> None:
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

    c = config
    model = create_model(c.model.name, **_model_overrides(c, data.num_classes, data.in_chans))
    model.load_state_dict(torch.load(run_dir / "model-final.pt", map_location="cpu", weights_only=True))
    model.eval()
    x, _ = next(iter(data.eval.iterate(0)))
    x = x[:2].detach().to("cpu", torch.float32).contiguous()
    if len(x) < 2:  # torch.export fixes a batch dimension of 1: the model would take one image only
        x = torch.cat([x, x])
    with torch.no_grad():
        logits = model(x)
    example = x.numpy()
    last = position.history[-1] if position.history else {}
    metrics = {k: float(v) for k, v in last.items()
               if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
    options = dict(signature=infer_signature(example, logits.numpy()), input_example=example,
                   pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                   metadata={"gunn": {"step": position.epoch, "metrics": metrics, "model": c.model.name}})
    tmp = run_dir / f".{model_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        try:
            with warnings.catch_warnings():
                # The BatchNorm statistics of a GUNN layer are views of one tensor (fused.TiedStatistics): the
                # archive stores them whole, and warns that it does, which only matters for weights off the CPU.
                warnings.filterwarnings("ignore", message="No complete tensor found in the group")
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


# -- the run directory and MLflow ----------------------------------------------------------


def _agreed_run_dir(config: RunConfig) -> Path:
    """The run directory (``checkpoint.dir``, or a new one), rank 0's on every rank."""
    run_dir = Path(config.checkpoint.dir) if config.checkpoint.dir else default_run_dir(config)
    return Path(distributed.broadcast_object(str(run_dir.resolve()))).resolve()


@contextlib.contextmanager
def locked(run_dir: Path, info: distributed.DistInfo) -> Iterator[None]:
    """Holds the run directory's lock (rank 0, for every rank) while the run trains; RunDirError
    on every rank if another process holds it or the directory cannot be written."""
    lock, error = None, None
    if info.is_main:
        try:
            lock = RunDirLock(run_dir)
            lock.acquire()
            _remove_partial_writes(run_dir, info)
            _record_start(run_dir, lock.me)
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


def _remove_partial_writes(run_dir: Path, info: distributed.DistInfo) -> None:
    """Deletes the temporary files of writes that a killed process left (``.NAME.tmp-PID``): with the
    lock held, no other process writes here."""
    for tmp in [*run_dir.glob(".*.tmp-*"), *run_dir.glob("snapshots/.*.tmp-*")]:
        _log(info, f"removing {tmp}, left by a write that did not finish")
        if tmp.is_dir() and not tmp.is_symlink():  # an MLflow model being saved
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _record_start(run_dir: Path, me: dict[str, Any]) -> None:
    """Appends this start (the lock holder ``me``) to the run directory's ``starts.log``: when, where,
    and in which Slurm job."""
    where = f"host {me['host']} pid {me['pid']}" + (
        f" Slurm job {me['slurm_job']} restart {me['restart']}" if me["slurm_job"] else "")
    with open(run_dir / "starts.log", "a") as f:
        f.write(f"{datetime.now().isoformat(timespec='seconds')} {where}\n")


def _slurm_jobs(run_dir: Path) -> list[str]:
    """Every Slurm job this run has lived in, oldest first (from ``starts.log``)."""
    try:
        lines = (run_dir / "starts.log").read_text().splitlines()
    except OSError:
        return []
    jobs = [line.split(" Slurm job ", 1)[1].split()[0] for line in lines if " Slurm job " in line]
    return list(dict.fromkeys(jobs))


def _tracker(config: RunConfig, info: distributed.DistInfo, run_dir: Path, parts: Parts,
             history: list[dict[str, float]]) -> Any:
    """The MLflow tracker of the run (rank 0, with logging.mlflow), or None.

    A copy of a run directory continues as a new MLflow run, tagged with the run it was copied from,
    which gets the epochs that came with the copy (``history``); the copy's journal is set aside. The
    settings changed since the start are left out of the params (they were logged before the change):
    ``changed/`` tags give each change."""
    if not (info.is_main and config.logging.mlflow):
        return None
    from gunn.train.tracking.journal import copied_from, set_aside
    from gunn.train.tracking.tracker import Tracker

    c = config
    layers = [m for m in parts.model.modules() if isinstance(m, GunnLayer)]
    data = parts.data
    count, macs, _ = model_cost(c.model.name, (data.in_chans, data.image_size, data.image_size),
                                **_model_overrides(c, data.num_classes, data.in_chans))
    tags = {
        "model": c.model.name,
        "mode": ",".join(sorted({layer.mode for layer in layers})),
        "segments": ",".join(str(layer.segments) for layer in layers),
        "data": c.data.name,
        "parameters": str(count),
        "gmac": f"{macs / 1e9:.4g}",  # multiply-adds per image of the training size, in billions
        "world_size": str(info.world_size),
        "device": info.device.type,
        "host": socket.gethostname(),  # rank 0's node
        "git_commit": _git_commit(),
    }
    if tags["git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["git_commit"]  # shown by the MLflow UI
    job = slurm_job()
    if job is not None:
        tags["slurm_job_id"] = job  # 8_1 for task 1 of array job 8
        tags["slurm_job_ids"] = ",".join(_slurm_jobs(run_dir))  # every job the run has lived in
        tags["mlflow.source.type"] = "JOB"  # else LOCAL (the tracker's default, with source name and user)
    if c.logging.parent_run_id:
        tags["mlflow.parentRunId"] = c.logging.parent_run_id  # shown nested under the sweep
    if c.logging.study:
        tags["study"] = c.logging.study
    changed = rundir.change_tags(run_dir)
    tags.update(changed)
    params = {k: v for k, v in cfgmod.flatten(c).items() if f"changed/{k}" not in changed}
    copied = copied_from(run_dir)
    if copied is not None:
        origin, origin_run = copied
        aside = set_aside(run_dir, origin_run)
        tags.update({"gunn.forked_from": origin_run, "gunn.forked_from_dir": str(origin)})
    tracker = Tracker(run_dir=run_dir, tracking_uri=c.logging.tracking_uri, experiment=c.logging.experiment,
                      run_name=c.logging.run_name or run_dir.name, params=params, tags=tags,
                      system_metrics=c.logging.system_metrics)
    if copied is not None:
        _log(info, f"{run_dir} is a copy of {origin}, whose MLflow run {origin_run} it leaves alone: it continues as "
                   f"a new MLflow run, tagged gunn.forked_from (the copied journal is kept as {aside.name})")
        for metrics in history:  # the epochs it inherited, so that its curves start where the run did
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
        _log(info, _mlflow_line(tracker))
    return tracker


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


def _peak_memory_mb(device: torch.device, captured: graphs.CapturedStep | None) -> float:
    """The device's peak since it was last reset, with the memory that CUDA graphs' replays use beyond what the
    allocator counts; on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) + (captured.unseen_bytes if captured else 0)) / 2**20
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
    from gunn.train.tracking.journal import sync_command

    return (f"MLflow: {tracker.tracking_uri} has not created the run yet; its records are kept in "
            f"{tracker.journal_path} and sent when the store answers (or later with: {sync_command(tracker.run_dir)})")
