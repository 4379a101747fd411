"""The MLflow side of a training run: its tracker with the run's params and tags, the line that says
where it logs, and the finished run's artifacts and MLflow model.

The engine calls these on rank 0; ``start`` returns None when the run does not log to MLflow.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from gunn import config as cfgmod
from gunn.config import RunConfig
from gunn.layers import GunnLayer
from gunn.models import create_model
from gunn.models.cost import model_cost
from gunn.train import plots, rundir
from gunn.train.tracking.journal import MODEL_DIR_NAME, copied_from, set_aside, sync_command
from gunn.train.tracking.sync import model_step
from gunn.train.tracking.tracker import Tracker

if TYPE_CHECKING:
    from gunn.data import DataBundle
    from gunn.train.distributed import DistInfo


def config_tags(config: RunConfig) -> dict[str, str]:
    """The tags that name what a run trains (model, data) and where it belongs (its sweep and study)."""
    c = config
    tags = {"model": c.model.name, "data": c.data.name}
    if c.logging.parent_run_id:
        tags["mlflow.parentRunId"] = c.logging.parent_run_id  # shown nested under the sweep
    if c.logging.study:
        tags["study"] = c.logging.study
    return tags


def run_tracker(config: RunConfig, run_dir: Path, *, name: str | None = None, params: dict[str, object] | None = None,
                tags: dict[str, str] | None = None, **options: object) -> Tracker:
    """The Tracker of the training run that ``config`` describes, journaled in ``run_dir``: named
    logging.run_name, else ``name``, else the run directory's name; its params the flat configuration unless
    ``params`` are given; its tags ``config_tags`` and ``tags``; ``options`` go to the Tracker."""
    c = config
    return Tracker(run_dir=run_dir, tracking_uri=c.logging.tracking_uri, experiment=c.logging.experiment,
                   run_name=c.logging.run_name or name or run_dir.name,
                   params=cfgmod.flatten(c) if params is None else params,
                   tags={**config_tags(c), **(tags or {})}, **options)


def start(config: RunConfig, info: DistInfo, run_dir: Path, model: nn.Module, data: DataBundle,
          history: list[dict[str, float]]) -> Tracker | None:
    """The MLflow tracker of the run (rank 0, with logging.mlflow), or None.

    A copy of a run directory continues as a new MLflow run, tagged with the run it was copied from,
    which gets the epochs that came with the copy (``history``); the copy's journal is set aside. The
    settings changed since the start are left out of the params (they were logged before the change):
    ``changed/`` tags give each change."""
    if not (info.is_main and config.logging.mlflow):
        return None
    c = config
    layers = [m for m in model.modules() if isinstance(m, GunnLayer)]
    count, macs, _ = model_cost(c.model.name, (data.in_chans, data.image_size, data.image_size),
                                **cfgmod.model_arguments_for(c, data.num_classes, data.in_chans))
    tags = {
        "mode": ",".join(sorted({layer.mode for layer in layers})),
        "segments": ",".join(str(layer.segments) for layer in layers),
        "parameters": str(count),
        "gmac": f"{macs / 1e9:.4g}",  # multiply-adds per image of the training size, in billions
        "world_size": str(info.world_size),
        "device": info.device.type,
        "host": socket.gethostname(),  # rank 0's node
        "git_commit": git_commit(),
    }
    if tags["git_commit"] != "unknown":
        tags["mlflow.source.git.commit"] = tags["git_commit"]  # shown by the MLflow UI
    job = rundir.slurm_job()
    if job is not None:
        tags["slurm_job_id"] = job  # 8_1 for task 1 of array job 8
        tags["slurm_job_ids"] = ",".join(rundir.slurm_jobs(run_dir))  # every job the run has lived in
        tags["mlflow.source.type"] = "JOB"  # else LOCAL (the tracker's default, with source name and user)
    changed = rundir.change_tags(run_dir)
    tags.update(changed)
    params = {k: v for k, v in cfgmod.flatten(c).items() if f"changed/{k}" not in changed}
    copied = copied_from(run_dir)
    if copied is not None:
        origin, origin_run = copied
        aside = set_aside(run_dir, origin_run)
        tags.update({"gunn.forked_from": origin_run, "gunn.forked_from_dir": str(origin)})
    tracker = run_tracker(c, run_dir, params=params, tags=tags, system_metrics=c.logging.system_metrics)
    if copied is not None:
        print(f"{run_dir} is a copy of {origin}, whose MLflow run {origin_run} it leaves alone: it continues as "
              f"a new MLflow run, tagged gunn.forked_from (the copied journal is kept as {aside.name})")
        for metrics in history:  # the epochs it inherited, so that its curves start where the run did
            tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=int(metrics["epoch"]))
        print(mlflow_line(tracker))
    return tracker


def log_final_artifacts(tracker: Tracker, data: DataBundle, history: list[dict[str, float]], epoch: int,
                        config: RunConfig, run_dir: Path, finished_now: bool = False) -> None:
    """Logs the finished run's files (curves, configuration, final weights) and MLflow model that it
    has not logged yet. ``finished_now``: the run finished in this call, so its curves are drawn and its
    MLflow model saved even if the run directory has them (else only if a killed process left them out)."""
    if finished_now or not (run_dir / "curves.png").exists():
        with contextlib.suppress(Exception):  # a plot is not worth failing a finished run for
            plots.plot_curves(history, run_dir / "curves.png")
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
    model_dir = run_dir / MODEL_DIR_NAME
    if finished_now or not (model_dir / "MLmodel").is_file():
        try:
            _save_mlflow_model(model_dir, data, history, epoch, config, run_dir)
        except Exception as err:  # noqa: BLE001 - the run has finished: its weights are in model-final.pt
            warnings.warn(f"the MLflow model of {run_dir} was not saved ({type(err).__name__}: {err}); "
                          f"its weights are in model-final.pt", stacklevel=2)
            return
    tracker.log_model(model_dir, step=model_step(model_dir), once=True)


def _save_mlflow_model(model_dir: Path, data: DataBundle, history: list[dict[str, float]], epoch: int, config: RunConfig,
                       run_dir: Path) -> None:
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
    model = create_model(c.model.name, **cfgmod.model_arguments_for(c, data.num_classes, data.in_chans))
    model.load_state_dict(torch.load(run_dir / "model-final.pt", map_location="cpu", weights_only=True))
    model.eval()
    x, _ = next(iter(data.eval.iterate(0)))
    x = x[:2].detach().to("cpu", torch.float32).contiguous()
    if len(x) < 2:  # torch.export fixes a batch dimension of 1: the model would take one image only
        x = torch.cat([x, x])
    with torch.no_grad():
        logits = model(x)
    example = x.numpy()
    last = history[-1] if history else {}
    metrics = {k: float(v) for k, v in last.items()
               if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v)}
    options = dict(signature=infer_signature(example, logits.numpy()), input_example=example,
                   pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                   metadata={"gunn": {"step": epoch, "metrics": metrics, "model": c.model.name}})
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
            with warnings.catch_warnings(), quiet("mlflow.pytorch"):  # its warning about pickles: said above
                warnings.simplefilter("ignore")
                mlflow.pytorch.save_model(model, str(tmp), serialization_format="pickle",
                                          code_paths=[str(Path(__file__).resolve().parents[2])], **options)
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Silences the warnings of ``logger`` for a while."""
    import logging

    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def mlflow_line(tracker: Tracker) -> str:
    """Where the run logs to; when the store has not created the run yet, where its records wait."""
    if tracker.run_id is not None:
        return f"MLflow: run {tracker.run_id} at {tracker.tracking_uri}"
    return (f"MLflow: {tracker.tracking_uri} has not created the run yet; its records are kept in "
            f"{tracker.journal_path} and sent when the store answers (or later with: {sync_command(tracker.run_dir)})")
