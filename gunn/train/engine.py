"""The training loop: one run of the paper's recipe, the same whichever entry point starts it.

``train(config)`` is called by ``jobs/launch.py`` (in-process, local processes or Slurm
tasks) and by the sweeps' trials. Each process is one data-parallel rank; only rank 0
prints, writes checkpoints and logs to MLflow. A run always continues from the newest
checkpoint in its directory, so a requeued job needs no special path.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gunn import config as cfgmod
from gunn.config import ConfigError, RunConfig
from gunn.data import DataBundle, build_data
from gunn.diagnostics import diagnostic_metrics
from gunn.models import create_model
from gunn.train import checkpoint as ckpt
from gunn.train import distributed, graphs, rundir
from gunn.train import progress as show
from gunn.train.checks import too_large, validate
from gunn.train.device import peak_memory_mb, set_tf32
from gunn.train.metrics import Meter
from gunn.train.optimizer import momentum_from_zero, sgd
from gunn.train.rundir import RunDirError
from gunn.train.schedule import learning_rate, snapshot_epochs
from gunn.train.stop import NonFiniteLossError, StopPoll, clear_request, raise_bad_loss
from gunn.train.tracking import run as tracking
from gunn.train.tracking.tracker import Tracker
from gunn.train.writes import WriteError, atomic_write


# Settings that may change between the pieces of a resumed run without changing its result.
# The run directory is where the run lives, not a setting: a moved one continues its MLflow run, a copied one
# starts a new one (``tracking.start``).
_NO_EFFECT_ON_RESULTS = ("data.workers", "logging.", "checkpoint.dir", "checkpoint.every", "checkpoint.keep",
                         "runtime.cuda_graphs", "dist.timeout_s")
# torch.compile's modes that replay the compiled step as CUDA graphs (on CUDA).
GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")
# BatchNorm statistics are averaged over the ranks after every epoch (average_buffers), so DDP
# need not send rank 0's buffers before every forward pass. (torch 2.14 renamed the switch; both
# still copy them once when DDP is built, before a resumed run restores each rank's own.)
_NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


# How a run fails for a reason its message says in full (no traceback needed); each leaves the
# last checkpoint intact.
RUN_ERRORS = (NonFiniteLossError, WriteError, ckpt.NoLoadableCheckpoint, ckpt.NewerFormat, RunDirError)


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


EpochCallback = Callable[[dict[str, float], Path | None], bool | None]


def train(config: RunConfig, *, stop_after: int | None = None, on_epoch: EpochCallback | None = None) -> RunResult:
    """Trains (or continues) the run that ``config`` describes; returns how far it got.

    ``stop_after``: checkpoint and return after this many batches of this call (a time-boxed
    session); ``gunn.train.stop.request_stop()`` does the same from a signal handler. ``on_epoch(metrics,
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
        run_dir = rundir.agreed_run_dir(config)
        config.checkpoint.dir = str(run_dir)
        with rundir.locked(run_dir, info):
            result = _loop(config, info, run_dir, stop_after, on_epoch)
        together = True
        return result
    finally:
        clear_request()
        distributed.teardown(together)


def _loop(config: RunConfig, info: distributed.DistInfo, run_dir: Path, stop_after: int | None,
          on_epoch: EpochCallback | None) -> RunResult:
    """The run, in order: build, resume, then train and end epoch after epoch until the last one (finish)
    or a stop (checkpoint); rank 0 logs it all to MLflow."""
    parts = build(config, info)
    position = resume(run_dir, parts, config, info)
    tracker = tracking.start(config, info, run_dir, parts.model, parts.data, position.history)
    result = RunResult(run_dir, "finished", position.epoch, history=position.history,
                       mlflow_run_id=getattr(tracker, "run_id", None),
                       tracking_uri=getattr(tracker, "tracking_uri", None))
    status = "FAILED"
    try:
        _announce(info, run_dir, position, tracker)
        first_step = position.step  # of this call: CUDA graphs are captured there, stop_after counts from there
        stop = StopPoll(info.device, info.grouped, lambda batch: raise_bad_loss(run_dir, info, position.epoch, batch,
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
                    tracking.log_final_artifacts(tracker, parts.data, position.history, position.epoch, config, run_dir)
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


def _announce(info: distributed.DistInfo, run_dir: Path, position: Position, tracker: Tracker | None) -> None:
    """Says how many ranks train and, when the run starts, where it lives and logs."""
    if info.grouped:
        ranks = f"{info.world_size} rank{'s' if info.world_size > 1 else ''}"
        _log(info, f"{ranks} in a {info.backend} process group, {torch.get_num_threads()} CPU thread(s) each "
                   "(runtime.threads)")
    if position.epoch == 0 and position.batch == 0:
        _log(info, f"run directory: {run_dir}")
        if tracker is not None:
            _log(info, tracking.mlflow_line(tracker))


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
        raise ConfigError(too_large(c.optim.batch_size, data.train_images, c.data.name))
    model = create_model(c.model.name, **cfgmod.model_arguments_for(c, data.num_classes, data.in_chans))
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
    mismatch = ckpt.shape_mismatch(parts.model.state_dict(), state["model"])
    if mismatch:
        raise RunDirError(f"{path} holds a run of another model than these settings build ({config.model.name}: "
                          f"{mismatch}); continue {run_dir} with the settings it was saved with (its config.yaml), "
                          "or choose another checkpoint.dir")
    parts.model.load_state_dict(state["model"])
    parts.optimizer.load_state_dict(state["optimizer"])
    momentum_from_zero(parts.optimizer)
    parts.scaler.load_state_dict(state["scaler"])
    own = ckpt.rank_state(state, info.rank, info.world_size, run_dir)
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
    bar = show.progress_bar(config, info.is_main, position.epoch, position.batch, per_epoch)
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
            show.update_bar(bar, meter, world_size, start_count, start_time, position.images_here,
                            position.seconds_here)
        if position.batch < per_epoch and stop.requested(position.step):
            return True
    return False


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


def end_epoch(parts: Parts, position: Position, config: RunConfig, info: distributed.DistInfo, run_dir: Path,
              tracker: Tracker | None) -> dict[str, float]:
    """Evaluates the epoch just trained and records its metrics (history, MLflow, a summary line), moves
    ``position`` to the next epoch and checkpoints if one is due there; returns the metrics.

    After the last epoch it first checks that every rank holds the same weights: the run's last
    collectives (that check, the checkpoint's gather) come before rank 0's own work at its end
    (writing the checkpoint, ``finish``), which no rank waits for."""
    metrics = _epoch_metrics(parts, position, config, info, run_dir)
    position.history.append(metrics)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=position.epoch + 1)
    _log(info, show.summary_line(metrics, config.optim.epochs))
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
               "peak_memory_mb": peak_memory_mb(parts.device, parts.graphs.unseen_bytes if parts.graphs else 0)}
    if position.epoch in snapshot_epochs(config.optim):
        metrics.update(_snapshot(parts, position.epoch, config, info, run_dir))
    if config.logging.diagnostics and info.is_main:
        x, _ = next(parts.on_device(parts.data.eval.iterate(0)))  # the first evaluation batch
        metrics.update(diagnostic_metrics(parts.model, x))
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


def _snapshot(parts: Parts, epoch: int, config: RunConfig, info: distributed.DistInfo, run_dir: Path) -> dict[str, float]:
    """Saves the weights of the cycle that ends with ``epoch`` and evaluates the ensemble of all snapshots so far."""
    folder = run_dir / "snapshots"
    index = snapshot_epochs(config.optim).index(epoch) + 1
    if info.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        weights = parts.model.state_dict()
        atomic_write(folder / f"snapshot-{index:02d}.pt", lambda f: torch.save(weights, f), what="snapshot")
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
           tracker: Tracker | None) -> None:
    """Rank 0 writes ``model-final.pt`` and the curves and logs the final artifacts and MLflow model; the other
    ranks have nothing left to do (``end_epoch`` checked that all hold the same weights) and leave."""
    if not info.is_main:
        return
    final = run_dir / "model-final.pt"
    weights = parts.model.state_dict()
    atomic_write(final, lambda f: torch.save(weights, f), what="final weights")  # whole, or not there
    last = position.history[-1] if position.history else {}
    _log(info, f"finished: eval top-1 error {last.get('eval_top1_error', math.nan):.2f}%, "
               f"top-5 {last.get('eval_top5_error', math.nan):.2f}%; weights {final}")
    if tracker is not None:
        tracking.log_final_artifacts(tracker, parts.data, position.history, position.epoch, config, run_dir,
                                     finished_now=True)
