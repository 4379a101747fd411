"""The comparison report of a sweep, rebuilt from MLflow alone.

    python pipelines/report.py PARENT_RUN_ID | SWEEP_NAME [--tracking-uri URI] [--out DIR] [--attach]

One row per configuration (the parameters that vary between the sweep's child runs, seeds
aside): update mode, segment width, parameters, FLOPs, top-1 error at the last epoch every
seed of the configuration reached (mean and spread over seeds; trials stopped early by ASHA
end sooner), time per epoch, throughput, peak memory, and the overlap-singularity diagnostics
when the trials logged them; below the table, the best configuration among those that ran the
full budget. Writes report.md, report.csv, error_vs_width.png and curves.png, and logs them as
artifacts of the sweep's parent run once that is FINISHED (--attach: whatever its status). The
report of a sweep that is running or was interrupted says it is partial: how many trials ended,
which have no run yet, and it measures the full budget by the epochs the trials were given.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import shutil
import sqlite3
import statistics
import sys
import time
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gunn.cluster.commands import plain_warnings, program
from gunn.config import RunConfig
from gunn.data.registry import find_dataset
from gunn.layers import GunnLayer
from gunn.models import MODEL_KNOBS, cost, create_model, default_cfg, is_model, paper
from gunn.train import plots


class ReportError(Exception):
    """A sweep or store that cannot be reported on, said in one line."""


# Child-run parameters that differ between trials without defining a configuration.
PER_TRIAL = ("runtime.seed", "checkpoint.dir", "logging.")
METRICS = ("eval_top1_error", "eval_top5_error", "train_top1_error", "epoch_time", "images_per_s", "peak_memory_mb")


def layer_widths(config: RunConfig) -> list[int]:
    """Channel counts of the GUNN layers of the configuration's model (its default configuration's)."""
    defaults = default_cfg(config.model.name)
    if defaults is not None:
        return list(defaults.widths)
    with torch.device("meta"):
        model = create_model(config.model.name)
    return [m.channels for m in model.modules() if isinstance(m, GunnLayer)]


def input_shape(params: dict[str, str]) -> tuple[int, int, int]:
    """Image channels, image side and classes that a child run's model saw (from its parameters): the data,
    not the model, decides them. As its registered data set has them (gunn.data.registry), or, for a data set
    that takes them from the configuration or is not registered here, data.image_size and data.classes."""
    data = find_dataset(params.get("data.name", "digits"))
    chans = data.in_chans if data is not None else 3
    size = data.image_size if data is not None and data.image_size else int(params.get("data.image_size", 32))
    classes = data.num_classes if data is not None and data.num_classes else int(params.get("data.classes", 10))
    return chans, size, classes


def _value(text: str | None) -> Any:
    import yaml

    return None if text in (None, "None") else yaml.safe_load(text)


def model_cost(params: dict[str, str]) -> tuple[int, int, list[int], str]:
    """Parameters, multiply-adds per image, GUNN layer segment widths and update mode of a child
    run's model (the mode its layers have: the model's own when the run did not set one)."""
    chans, size, classes = input_shape(params)
    overrides = {k: _value(params.get(f"model.{k}")) for k in MODEL_KNOBS}
    count, macs, model = cost.model_cost(params["model.name"], (chans, size, size), num_classes=classes,
                                         in_chans=chans, **overrides)
    layers = [m for m in model.modules() if isinstance(m, GunnLayer)]
    widths = [m.channels // m.segments for m in layers]
    mode = ",".join(sorted({m.mode for m in layers}))  # as the engine's ``mode`` tag
    return count, macs, widths, mode


def paper_columns(params: dict[str, str]) -> dict[str, float]:
    """The paper's published top-1 and top-5 errors of a child run's model and data (gunn.models.paper), when
    the run used the paper's recipe and the model's own architecture; NaN otherwise."""
    why = paper_differs(params)
    row = paper.published(params.get("model.name", ""), params.get("data.name", ""))
    if why or row is None:
        return {"paper_top1_error": math.nan, "paper_top5_error": math.nan}
    return {"paper_top1_error": row.top1, "paper_top5_error": math.nan if row.top5 is None else row.top5}


def paper_differs(params: dict[str, str]) -> list[str]:
    """How a child run differs from the paper's recipe for its data, and from its model's architecture."""
    data = params.get("data.name", "")
    fields = paper.PAPER_RECIPE["imagenet" if data == "imagenet" else "cifar"]
    differ = paper.differs_from_recipe(data, {k: _value(params.get(k)) for k in fields})
    defaults = default_cfg(params["model.name"]) if is_model(params.get("model.name", "")) else None
    if defaults is not None:
        differ += [f"model.{k}={_value(params.get(f'model.{k}'))} (paper: {v})" for k, v in defaults.knobs().items()
                   if params.get(f"model.{k}") not in (None, "None") and _value(params.get(f"model.{k}")) != v]
    return differ


def collect(tracking_uri: str, parent: str) -> tuple[Any, list[Any]]:
    """The parent run (by id, or by its sweep name) and its child runs."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if not re.fullmatch(r"[0-9a-f]{32}", parent):
        experiments = [e.experiment_id for e in client.search_experiments()]
        try:
            found = client.search_runs(experiments, filter_string=f"tags.sweep = '{parent}'")
        except MlflowException as err:
            raise ReportError(f"no sweep named {parent!r} at {tracking_uri}: {err.message}") from None
        if not found:
            raise ReportError(f"no sweep named {parent!r} at {tracking_uri}")
        parent = found[0].info.run_id
    try:
        run = client.get_run(parent)
    except MlflowException:
        raise ReportError(f"no run {parent} at {tracking_uri}") from None
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'",
                                  max_results=10000)
    return run, children


class Summary(NamedTuple):
    """Report rows; each configuration's mean training curves (epochs, values); the full budget (the
    largest epoch any trial reached) and the configurations whose every trial reached it."""

    rows: list[dict[str, Any]]
    curves: dict[str, dict[str, tuple[list[int], list[float]]]]
    budget: int | None
    full: set[str]
    at_budget: dict[str, list[float]]  # each configuration's errors of the trials that reached the budget


def _by_epoch(history: list[Any]) -> dict[int, float]:
    """A metric history by step (= epoch), the last value logged at each (a resumed trial logs again)."""
    return {m.step: m.value for m in sorted(history, key=lambda m: (m.step, m.timestamp))}


def _at(client: Any, run: Any, key: str, epoch: int, last: int) -> float | None:
    """The run's metric ``key`` at ``epoch``: its latest value when that is the run's last epoch."""
    if epoch == last:
        return run.data.metrics.get(key)
    return _by_epoch(client.get_metric_history(run.info.run_id, key)).get(epoch)


def summarize(client: Any, children: list[Any], study: str | None = None) -> Summary:
    """Report rows, the mean training curves of every configuration and the full budget, with every
    configuration's trials compared at one epoch: the last that all of them reached."""
    varying = sorted({k for c in children for k in c.data.params
                      if not k.startswith(PER_TRIAL) and len({d.data.params.get(k) for d in children}) > 1})
    groups: dict[str, list[Any]] = defaultdict(list)
    for child in children:
        groups[_label(child, varying, study)].append(child)
    histories = {c.info.run_id: {name: _by_epoch(client.get_metric_history(c.info.run_id, name)) for name in METRICS}
                 for c in children}
    last = {run_id: max(h["eval_top1_error"], default=None) for run_id, h in histories.items()}
    # The full budget is the epochs the trials were given (a partial sweep has not reached it); runs
    # that do not say so (made by other tools) are taken to have been given what the longest reached.
    reached = max((e for e in last.values() if e is not None), default=None)
    given = {c.info.run_id: configured_epochs(c) for c in children}
    budget = max((e for e in given.values() if e is not None), default=reached)
    due = {run_id: budget if e is None else e for run_id, e in given.items()}  # each run's own budget
    rows, curves, full, at_budget = [], {}, set(), {}
    for label, runs in sorted(groups.items()):
        params, flops, widths, mode = model_cost(runs[0].data.params)
        runs_h = [histories[r.info.run_id] for r in runs]
        evaluated = [r for r in runs if last[r.info.run_id] is not None]
        steps = [set(histories[r.info.run_id]["eval_top1_error"]) for r in evaluated]
        epoch = max(set.intersection(*steps), default=None) if steps else None
        final = [histories[r.info.run_id]["eval_top1_error"][epoch] for r in evaluated] if epoch is not None else []
        top5 = [histories[r.info.run_id]["eval_top5_error"].get(epoch, math.nan) for r in evaluated] if final else []
        rates = [statistics.mean(h["images_per_s"].values()) for h in runs_h if h["images_per_s"]]
        epoch_times = [v for h in runs_h for v in h["epoch_time"].values()]
        memory = [v for h in runs_h for v in h["peak_memory_mb"].values()]
        pairs, ratios = [], []
        for r in evaluated if epoch is not None else []:
            keys = [k for k in r.data.metrics if k.endswith("/collapsed_pairs")]
            found = [_at(client, r, k, epoch, last[r.info.run_id]) for k in keys]
            if keys and None not in found:
                pairs.append(sum(found))
            keys = [k for k in r.data.metrics if k.endswith("/participation_ratio")]
            found = [_at(client, r, k, epoch, last[r.info.run_id]) for k in keys]
            if keys and None not in found:
                ratios.append(statistics.mean(found))
        rows.append({
            "configuration": label,
            "mode": runs[0].data.tags.get("mode") or mode,
            "segment_width": "/".join(map(str, widths)),
            "seeds": len(runs),
            "finished": sum(r.info.status == "FINISHED" and r.data.tags.get("stopped_early") != "true" for r in runs),
            "stopped": sum(r.data.tags.get("stopped_early") == "true" for r in runs),
            "failed": sum(r.info.status == "FAILED" for r in runs),
            "parameters": params,
            "gmac_per_image": flops / 1e9,
            "epoch": math.nan if epoch is None else epoch,
            "top1_error_mean": statistics.mean(final) if final else math.nan,
            "top1_error_std": statistics.stdev(final) if len(final) > 1 else math.nan,  # no spread from one seed
            "top5_error_mean": statistics.mean(top5) if top5 else math.nan,
            **paper_columns(runs[0].data.params),
            "epoch_time_s": statistics.mean(epoch_times) if epoch_times else math.nan,
            "images_per_s": statistics.mean(rates) if rates else math.nan,
            "images_per_s_std": statistics.stdev(rates) if len(rates) > 1 else math.nan,
            "peak_memory_mb": max(memory) if memory else math.nan,
            "collapsed_pairs": statistics.mean(pairs) if pairs else math.nan,
            "participation_ratio": statistics.mean(ratios) if ratios else math.nan,
        })
        curves[label] = {name: _mean_curve([h[name] for h in runs_h])
                         for name in ("eval_top1_error", "train_top1_error")}
        if budget is not None and all(last[r.info.run_id] is not None and last[r.info.run_id] >= due[r.info.run_id]
                                      for r in runs):
            full.add(label)
        at_budget[label] = [histories[r.info.run_id]["eval_top1_error"][budget] for r in evaluated
                            if last[r.info.run_id] == budget]
    return Summary(rows, curves, budget, full, at_budget)


def _label(child: Any, varying: list[str], study: str | None) -> str:
    """A child run's configuration: the parameters that vary between the trials; for the partitions study,
    what it varied (``width=4``, ``mode=sunn``: the trial's name without its seed), not the segment counts
    that follow from it; for the studies of models, the model (``model=wrn28_10``), not the settings that differ
    with it."""
    head, _, seed = (child.info.run_name or "").rpartition("_seed=")
    if (study == "partitions" or head.startswith("model=")) and head and seed == child.data.params.get("runtime.seed"):
        return head
    return ", ".join(f"{k.split('.')[-1]}={child.data.params.get(k)}" for k in varying) or "all"


def configured_epochs(run: Any) -> int | None:
    """The epochs a child run was given (its ``optim.epochs``, the last value it was changed to), if it says."""
    changed = run.data.tags.get("changed/optim.epochs")
    if changed:
        return int(re.findall(r"-> (\d+)", changed)[-1])
    value = run.data.params.get("optim.epochs")
    return int(value) if value and value.isdigit() else None


def progress_line(run: Any, children: list[Any], ended: bool = False) -> str | None:
    """What a report of a sweep that has not ended, or has runs missing or unfinished, leaves out, in one
    line; None for a complete sweep. The sweep driver tags its parent run with its trials (gunn.trials,
    gunn.trial_names). ``ended``: the sweep has ended, whatever its parent run's status says yet (the driver
    builds the report before it ends the parent run)."""
    names = json.loads(run.data.tags.get("gunn.trial_names", "[]"))
    total = int(run.data.tags.get("gunn.trials", len(names) or len(children)))
    have = {c.data.tags.get("mlflow.runName") or c.info.run_name for c in children}
    missing = [n for n in names if n not in have]
    open_runs = sorted(f"{c.info.run_name} ({c.info.status})" for c in children
                       if c.info.status not in ("FINISHED", "FAILED"))
    done = sum(c.info.status in ("FINISHED", "FAILED") for c in children)
    if (ended or run.info.status in ("FINISHED", "FAILED")) and not open_runs and done >= total:
        return None
    parts = [f"Partial: the sweep's parent run is {run.info.status}; {done} of {total} trials have ended"]
    if open_runs:
        parts.append(f"not ended: {', '.join(open_runs)}")
    if missing:
        parts.append(f"no run yet: {', '.join(missing)}")
    elif len(children) < total:
        parts.append(f"{total - len(children)} without a run yet")
    return "; ".join(parts) + ". The figures cover what has been logged so far."


def _mean_curve(histories: list[dict[int, float]]) -> tuple[list[int], list[float]]:
    """The epochs that every seed (with this metric) reached, and the mean over seeds at each."""
    logged = [h for h in histories if h]
    epochs = sorted(set.intersection(*(set(h) for h in logged))) if logged else []
    return epochs, [statistics.mean(h[e] for h in logged) for e in epochs]


def budget_line(summary: Summary) -> str:
    """The best configuration among those whose every trial ran the full budget, in one line."""
    if summary.budget is None:
        return "Full budget: no trial has logged an evaluation yet."
    head = f"Full budget ({summary.budget} epoch{'s' * (summary.budget != 1)})"
    done = [r for r in summary.rows if r["configuration"] in summary.full and not math.isnan(r["top1_error_mean"])]
    if done:
        best = min(done, key=lambda r: r["top1_error_mean"])
        spread = f" ± {best['top1_error_std']:.2f}" if best["seeds"] > 1 else ""  # no spread from one seed
        return (f"{head}: best {best['configuration']}: top-1 error {best['top1_error_mean']:.2f}{spread} % "
                f"({best['seeds']} seed{'s' * (best['seeds'] != 1)})")
    some = {label: errors for label, errors in summary.at_budget.items() if errors}
    if not some:
        return f"{head}: no configuration ran the full budget in all its trials, and no trial reached it."
    label = min(some, key=lambda k: statistics.mean(some[k]))
    errors, seeds = some[label], next(r["seeds"] for r in summary.rows if r["configuration"] == label)
    spread = f" ± {statistics.stdev(errors):.2f}" if len(errors) > 1 else ""
    return (f"{head}: no configuration ran the full budget in all its trials; of the trials that did, best "
            f"{label}: top-1 error {statistics.mean(errors):.2f}{spread} % ({len(errors)} of {seeds} seeds)")


# The engine's peak_memory_mb: torch.cuda.max_memory_allocated on CUDA, else the process's ru_maxrss.
MEMORY = {"cuda": "peak MB (CUDA allocated)", "cpu": "peak MB (process RSS)"}


def memory_title(children: list[Any]) -> str:
    """The peak-memory header for the devices the trials ran on (their ``device`` tags)."""
    kinds = {d if d in (None, "cuda") else "cpu" for d in (c.data.tags.get("device") for c in children)}
    return MEMORY.get(kinds.pop(), "peak MB") if len(kinds) == 1 else "peak MB"


COLUMNS = [("configuration", "configuration"), ("mode", "mode"), ("segment_width", "segment width"),
           ("seeds", "seeds"), ("finished", "finished"), ("stopped", "stopped"), ("failed", "failed"), ("parameters", "parameters"),
           ("gmac_per_image", "GMAC/image"), ("epoch", "at epoch"), ("top1_error_mean", "top-1 error %"),
           ("top1_error_std", "+-"), ("top5_error_mean", "top-5 error %"), ("paper_top1_error", "paper top-1 %"),
           ("paper_top5_error", "paper top-5 %"), ("epoch_time_s", "s/epoch"), ("images_per_s", "images/s"),
           ("images_per_s_std", "+-"), ("peak_memory_mb", "peak MB"), ("collapsed_pairs", "collapsed pairs"),
           ("participation_ratio", "eff. dim")]


def markdown(rows: list[dict[str, Any]], titles: dict[str, str] | None = None) -> str:
    """The rows as a Markdown table (``titles``: headers other than COLUMNS', by key)."""
    def cell(value: Any, key: str) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.3g}" if key == "gmac_per_image" else f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    titles = {**dict(COLUMNS), **(titles or {})}
    lines = ["| " + " | ".join(titles[key] for key, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key], key) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], curves: dict[str, dict[str, tuple[list[int], list[float]]]],
         out: Path) -> list[Path]:
    """error_vs_width.png (when segment widths vary) and curves.png (Figure 3 of the paper)."""
    paths = []
    gunn = [r for r in rows if r["mode"] != "sunn" and r["segment_width"]]
    if len({r["segment_width"] for r in gunn}) > 1:
        figure = plots.error_vs_width_figure([int(r["segment_width"].split("/")[0]) for r in gunn],
                                             [r["top1_error_mean"] for r in gunn],
                                             [0.0 if math.isnan(r["top1_error_std"]) else r["top1_error_std"] for r in gunn],
                                             [r["top1_error_mean"] for r in rows if r["mode"] == "sunn"])
        paths.append(plots.save_png(figure, out / "error_vs_width.png", dpi=120))
    paths.append(plots.save_png(plots.sweep_curves_figure(curves), out / "curves.png", dpi=120))
    return paths


def build(tracking_uri: str, parent: str, out: Path, *, log: bool | None = None, ended: bool = False) -> str:
    """Writes the report of the sweep ``parent`` into ``out`` and logs it to the parent run (``log``: True
    always, False never (the caller does), None only when the parent run is FINISHED: a report of a
    sweep that is running, interrupted or failed is not the sweep's); ``ended``: the caller knows the sweep
    has ended (see `progress_line`); the text to print."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run, children = collect(tracking_uri, parent)
    if not children:
        return f"sweep {run.info.run_name}: no trial has logged a run yet"
    summary = summarize(client, children, run.data.tags.get("study"))
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(summary.rows, {"peak_memory_mb": memory_title(children)})
    partial = progress_line(run, children, ended)
    budget = budget_line(summary) if partial is None else f"So far: {budget_line(summary)}"
    head = f"{partial}\n\n" if partial else ""
    study = run.data.tags.get("study", "?")
    devices = sorted({c.data.tags["device"] for c in children if "device" in c.data.tags})
    ran_on = f"these trials ran on {', '.join(devices)}" if devices else "these trials did not say on which device"
    papers = paper_line(children)
    notes = (
        "- Top-1 error: evaluation error at the last epoch that every seed of the configuration reached "
        "(column at epoch), mean and standard deviation over seeds; top-5 error: its mean at that epoch. Trials "
        "stopped early by ASHA (column stopped; column finished counts the trials that ran the full budget) end "
        "before the full budget, so rows at different epochs are no equal comparison; the line above compares only "
        "configurations whose every trial ran the full budget.\n"
        "- Paper top-1/top-5: the errors the paper published for the model on the data (gunn.models.paper; "
        "Tables 3-5), shown where the trials ran the paper's recipe on its data with the model's own architecture"
        f"{papers}.\n"
        "- GMAC/image: multiply-adds of one image's evaluation forward at the training image size, in billions "
        "(convolutions and matrix products).\n"
        "- s/epoch: training time per epoch, mean over trials and epochs; images/s: training throughput, each "
        "trial's mean over its epochs, then mean and standard deviation (+-) over trials.\n"
        "- Peak MB: the largest over the configuration's trials and epochs of the engine's peak memory: on "
        "CUDA torch.cuda.max_memory_allocated (tensors PyTorch allocated on the GPU), on the CPU the process's "
        "peak resident set size (ru_maxrss: Python, torch, the data and the Ray worker, not the model's "
        f"activations alone); {ran_on}.\n"
        "- Collapsed pairs: output channel pairs with |correlation| > 0.99 summed over GUNN layers; eff. dim: "
        "participation ratio of the channel covariance, mean over layers (at the row's epoch, when the trials "
        "logged diagnostics).\n"
        "- Training curves: mean over seeds, on the epochs that every seed reached.\n\n"
    )
    figures = plot(summary.rows, summary.curves, out)
    page = f"# Sweep {run.info.run_name} ({study})\n\n{head}{table}\n\n{budget}\n\n{notes}"
    (out / "report.md").write_text(page + "".join(f"![{p.stem}]({p.name})\n" for p in figures))
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(summary.rows)
    attach = run.info.status == "FINISHED" if log is None else log
    if attach:
        _attach(client, run.info.run_id, out)
    text = f"sweep {run.info.run_name} ({study}), {len(children)} trials:\n{head}{table}\n{budget}"
    if log is None and not attach:
        text += (f"\nNot logged to the parent run {run.info.run_id}: it is {run.info.status}, so this report may "
                 "not be the sweep's last (--attach logs it there all the same).")
    return text


def _attach(client: Any, run_id: str, out: Path) -> None:
    """Logs the report in ``out`` to the parent run ``run_id`` (under ``report/``; see `mlflow_copy`) with its
    summary metrics (`summary_metrics`)."""
    import tempfile

    from mlflow.entities import Metric

    with tempfile.TemporaryDirectory() as folder:
        copy = mlflow_copy(out, run_id, Path(folder) / "report", client.tracking_uri)
        client.log_artifacts(run_id, str(copy), artifact_path="report")
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, 0) for key, value in summary_metrics(read_rows(out)).items()]
    for start in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


# Where MLflow's UI serves a store that is not a server: `mlflow ui`'s default address.
MLFLOW_UI = "http://127.0.0.1:5000"


def mlflow_copy(out: Path, run_id: str, dest: Path, tracking_uri: str) -> Path:
    """``dest``, made a copy of the report in ``out`` as the parent run ``run_id`` keeps it: the same files, but a
    report.md whose figures link to the MLflow server's get-artifact route by its full address, so that the UI's
    preview of the file shows them: MLflow 3's preview shows only images of http(s) addresses, and shows a
    relative link as text. The address is the tracking server's, or `mlflow ui`'s default (``MLFLOW_UI``) for a
    store that is not a server."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for path in sorted(out.iterdir()):
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    server = tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else MLFLOW_UI
    page = re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)",
                  lambda m: f"![{m[1]}]({server}/get-artifact?path=report%2F{m[2]}&run_uuid={run_id})",
                  (out / "report.md").read_text())
    (dest / "report.md").write_text(page)
    return dest


def read_rows(out: Path) -> list[dict[str, Any]]:
    """The rows of the report in ``out`` (its report.csv), numbers as numbers."""
    def number(text: str) -> Any:
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    with open(out / "report.csv", newline="") as f:
        return [{k: number(v) for k, v in row.items()} for row in csv.DictReader(f)]


# The report's columns that the parent run gets as metrics, one per configuration (summary_metrics).
SUMMARY = {"top1_error_mean": "eval_top1_error_mean", "top1_error_std": "eval_top1_error_std",
           "top5_error_mean": "eval_top5_error_mean", "images_per_s": "images_per_s",
           "peak_memory_mb": "peak_memory_mb", "gmac_per_image": "gmac_per_image", "parameters": "parameters"}


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The rows as MLflow metrics ``METRIC/CONFIGURATION`` (``eval_top1_error_mean/gunn``): MLflow's chart view
    puts each metric's configurations side by side in one section. Missing values (NaN) are left out."""
    metrics = {}
    for row in rows:
        label = row["configuration"]
        pairs = [part.partition("=") for part in label.split(", ")]
        named = len(pairs) == 1 and pairs[0][0] in ("model", "mode")  # gunn, torchvision.resnet18; else width:8
        name = pairs[0][2] if named else " ".join(f"{k}:{v}" if eq else k for k, eq, v in pairs)
        name = re.sub(r"[^\w.\- :]", "_", name).strip() or "all"
        for column, metric in SUMMARY.items():
            value = row[column]
            if isinstance(value, (int, float)) and not math.isnan(value):
                metrics[f"{metric}/{name}"] = float(value)
    return metrics


def paper_line(children: list[Any]) -> str:
    """Where the paper has a figure for a trial's model and data that is not shown: how the trials differ."""
    seen, parts = set(), []
    for child in children:
        params = child.data.params
        row = paper.published(params.get("model.name", ""), params.get("data.name", ""))
        if row is None or (row.model, row.data) in seen:
            continue
        seen.add((row.model, row.data))
        differ = paper_differs(params)
        if differ:
            parts.append(f"{row.model} on {row.data} ({row.table}: {row.top1}%) is not shown: its trials differ in "
                         f"{', '.join(differ)}")
    return "; " + "; ".join(parts) if parts else ""


def check_store(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Refuses a local store that does not exist or holds no MLflow data, without creating one
    (MLflow would create an empty store at any local URI it is given), and a server that does not
    answer within ``timeout_s`` (MLflow's own client retries for minutes)."""
    from urllib.parse import unquote, urlparse

    if urlparse(tracking_uri).scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # it answers (a proxy's or an older server's page): MLflow's own calls say the rest
        except (OSError, ValueError) as err:
            reason = getattr(err, "reason", None) or err
            raise ReportError(f"MLflow at {tracking_uri} does not answer ({reason}); start it, or pass the "
                              "sweep's store with --tracking-uri") from None
    if tracking_uri.startswith("sqlite:///"):
        path = Path(unquote(tracking_uri[len("sqlite:///"):].split("?", 1)[0]))
        try:
            with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
                tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.Error:
            tables = set()
        if "runs" not in tables:
            raise ReportError(f"no MLflow store at {tracking_uri} ({path} is missing or holds no runs); "
                              "pass the sweep's store with --tracking-uri")
    elif urlparse(tracking_uri).scheme == "file":
        path = Path(unquote(urlparse(tracking_uri).path))
        if not path.is_dir() or not any(p.name.isdigit() and (p / "meta.yaml").is_file() for p in path.iterdir()):
            raise ReportError(f"no MLflow store at {tracking_uri} ({path} is missing or holds no experiments); "
                              "pass the sweep's store with --tracking-uri")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=program("report"), description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep's parent run id, or the sweep's name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store)")
    parser.add_argument("--out", type=Path, default=None, help="directory of the report files (default: report-<sweep>)")
    parser.add_argument("--attach", action="store_true",
                        help="log the report to the parent run even when the sweep has not finished (it is running, "
                             "was interrupted, or a trial failed)")
    args = parser.parse_args(argv)
    plain_warnings()
    from gunn.train.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        check_store(uri)
        print(build(uri, args.sweep, args.out or Path(f"report-{args.sweep}"), log=True if args.attach else None))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
