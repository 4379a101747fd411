#!/usr/bin/env python
"""The comparison report of a sweep, rebuilt from MLflow alone.

    python pipelines/report.py PARENT_RUN_ID | SWEEP_NAME [--tracking-uri URI] [--out DIR]

One row per configuration (the parameters that vary between the sweep's child runs, seeds
aside): update mode, segment width, parameters, FLOPs, final top-1 error (mean and spread
over seeds), time per epoch, peak memory, and the overlap-singularity diagnostics when the
trials logged them. Writes report.md, report.csv, error_vs_width.png and curves.png, and logs
them as artifacts of the sweep's parent run.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sqlite3
import statistics
import sys
from collections import defaultdict
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

from gunn.config import RunConfig
from gunn.layers import GunnLayer
from gunn.models import create_model


class ReportError(Exception):
    """A sweep or store that cannot be reported on, said in one line."""


# Child-run parameters that differ between trials without defining a configuration.
PER_TRIAL = ("runtime.seed", "checkpoint.dir", "logging.")
INPUT = {"digits": (1, 32, 10), "cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "imagenet": (3, 224, 1000)}


def layer_widths(config: RunConfig) -> list[int]:
    """Channel counts of the GUNN layers of the configuration's model."""
    with torch.device("meta"):
        model = create_model(config.model.name)
    return [m.channels for m in model.modules() if isinstance(m, GunnLayer)]


def _value(text: str | None) -> Any:
    import yaml

    return None if text in (None, "None") else yaml.safe_load(text)


def model_cost(params: dict[str, str]) -> tuple[int, int, list[int], str]:
    """Parameters, multiply-adds per image, GUNN layer segment widths and update mode of a child
    run's model (the mode its layers have: the model's own when the run did not set one)."""
    from torch.utils.flop_counter import FlopCounterMode

    data = params.get("data.name", "digits")
    chans, size, classes = INPUT.get(data, (3, int(params.get("data.image_size", 32)),
                                           int(params.get("data.classes", 10))))
    overrides = {k: _value(params.get(f"model.{k}")) for k in ("mode", "residual", "segments", "expansion")}
    with torch.device("meta"):
        model = create_model(params["model.name"], num_classes=classes, in_chans=chans, **overrides).eval()
        x = torch.randn(1, chans, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    layers = [m for m in model.modules() if isinstance(m, GunnLayer)]
    widths = [m.channels // m.segments for m in layers]
    mode = ",".join(sorted({m.mode for m in layers}))  # as the engine's ``mode`` tag
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2, widths, mode


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


def summarize(client: Any, children: list[Any]) -> tuple[list[dict[str, Any]], dict[str, dict[str, list[float]]]]:
    """Report rows, and the mean training curves of every configuration."""
    varying = sorted({k for c in children for k in c.data.params
                      if not k.startswith(PER_TRIAL) and len({d.data.params.get(k) for d in children}) > 1})
    groups: dict[str, list[Any]] = defaultdict(list)
    for child in children:
        label = ", ".join(f"{k.split('.')[-1]}={child.data.params.get(k)}" for k in varying) or "all"
        groups[label].append(child)
    rows, curves = [], {}
    for label, runs in sorted(groups.items()):
        params, flops, widths, mode = model_cost(runs[0].data.params)
        final = [r.data.metrics["eval_top1_error"] for r in runs if "eval_top1_error" in r.data.metrics]
        histories = {name: [client.get_metric_history(r.info.run_id, name) for r in runs]
                     for name in ("eval_top1_error", "train_top1_error", "epoch_time", "peak_memory_mb")}
        epoch_times = [m.value for h in histories["epoch_time"] for m in h]
        memory = [m.value for h in histories["peak_memory_mb"] for m in h]
        pairs = [sum(v for k, v in r.data.metrics.items() if k.endswith("/collapsed_pairs")) for r in runs
                 if any(k.endswith("/collapsed_pairs") for k in r.data.metrics)]
        ratios = [statistics.mean(v for k, v in r.data.metrics.items() if k.endswith("/participation_ratio"))
                  for r in runs if any(k.endswith("/participation_ratio") for k in r.data.metrics)]
        rows.append({
            "configuration": label,
            "mode": runs[0].data.tags.get("mode") or mode,
            "segment_width": "/".join(map(str, widths)),
            "seeds": len(runs),
            "finished": sum(r.info.status == "FINISHED" for r in runs),
            "parameters": params,
            "mmac_per_image": round(flops / 1e6, 2),
            "top1_error_mean": statistics.mean(final) if final else math.nan,
            "top1_error_std": statistics.stdev(final) if len(final) > 1 else 0.0,
            "epoch_time_s": statistics.mean(epoch_times) if epoch_times else math.nan,
            "peak_memory_mb": max(memory) if memory else math.nan,
            "collapsed_pairs": statistics.mean(pairs) if pairs else math.nan,
            "participation_ratio": statistics.mean(ratios) if ratios else math.nan,
        })
        curves[label] = {name: _mean_curve(histories[name]) for name in ("eval_top1_error", "train_top1_error")}
    return rows, curves


def _mean_curve(histories: list[list[Any]]) -> list[float]:
    by_step: dict[int, list[float]] = defaultdict(list)
    for history in histories:
        for m in history:
            by_step[m.step].append(m.value)
    return [statistics.mean(by_step[s]) for s in sorted(by_step)]


COLUMNS = [("configuration", "configuration"), ("mode", "mode"), ("segment_width", "segment width"),
           ("seeds", "seeds"), ("finished", "finished"), ("parameters", "parameters"), ("mmac_per_image", "MMAC/image"),
           ("top1_error_mean", "top-1 error %"), ("top1_error_std", "+-"), ("epoch_time_s", "s/epoch"),
           ("peak_memory_mb", "peak MB"), ("collapsed_pairs", "collapsed pairs"),
           ("participation_ratio", "eff. dim")]


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "-" if math.isnan(value) else f"{value:.2f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], curves: dict[str, dict[str, list[float]]], out: Path) -> list[Path]:
    """error_vs_width.png (when segment widths vary) and curves.png (Figure 3 of the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    gunn = [r for r in rows if r["mode"] != "sunn" and r["segment_width"]]
    if len({r["segment_width"] for r in gunn}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        width = [int(r["segment_width"].split("/")[0]) for r in gunn]
        ax.errorbar(width, [r["top1_error_mean"] for r in gunn], yerr=[r["top1_error_std"] for r in gunn],
                    marker="o", capsize=3, label="GUNN")
        for r in rows:
            if r["mode"] == "sunn":
                ax.axhline(r["top1_error_mean"], color="gray", linestyle="--", label="SUNN")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="segment width (channels, first GUNN layer)", ylabel="final top-1 error (%)")
        ax.legend()
        fig.tight_layout()
        paths.append(out / "error_vs_width.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        line, = ax.plot(range(1, len(curve["eval_top1_error"]) + 1), curve["eval_top1_error"], label=f"{label} (eval)")
        ax.plot(range(1, len(curve["train_top1_error"]) + 1), curve["train_top1_error"], linestyle=":",
                color=line.get_color(), label=f"{label} (train)")
    ax.set(xlabel="epoch", ylabel="top-1 error (%)", title="training curves, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def build(tracking_uri: str, parent: str, out: Path) -> str:
    """Writes the report of the sweep ``parent`` into ``out``, logs it to the parent run; the table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run, children = collect(tracking_uri, parent)
    if not children:
        return f"sweep {run.info.run_name}: no trial has logged a run yet"
    rows, curves = summarize(client, children)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows)
    study = run.data.tags.get("study", "?")
    (out / "report.md").write_text(
        f"# Sweep {run.info.run_name} ({study})\n\n{table}\n\n"
        "Top-1 error: final epoch, mean and standard deviation over seeds. Collapsed pairs: output "
        "channel pairs with |correlation| > 0.99 summed over GUNN layers; eff. dim: participation "
        "ratio of the channel covariance, mean over layers (when the trials logged diagnostics).\n\n"
        + "".join(f"![{p.stem}]({p.name})\n" for p in plot(rows, curves, out))
    )
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[key for key, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)
    for path in sorted(out.iterdir()):
        client.log_artifact(run.info.run_id, str(path), artifact_path="report")
    return f"sweep {run.info.run_name} ({study}), {len(children)} trials:\n{table}"


def check_store(tracking_uri: str) -> None:
    """Refuses a local store that does not exist or holds no MLflow data, without creating one
    (MLflow would create an empty store at any local URI it is given)."""
    from urllib.parse import unquote, urlparse

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
    parser = argparse.ArgumentParser(prog="python pipelines/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="the sweep's parent run id, or the sweep's name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the local store)")
    parser.add_argument("--out", type=Path, default=None, help="directory of the report files (default: report-<sweep>)")
    args = parser.parse_args(argv)
    from gunn.train.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri)
    try:
        check_store(uri)
        print(build(uri, args.sweep, args.out or Path(f"report-{args.sweep}")))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
