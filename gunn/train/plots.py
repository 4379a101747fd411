"""The figures of training runs and sweeps: a run's curves (``curves.png`` in its run directory) and
a sweep report's curves and error-versus-width plot, drawn and saved the same way.

Matplotlib is used without pyplot (no global state, no display: the Agg canvas), and a PNG is
written whole or not at all: a kill may come any time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["curves_figure", "error_vs_width_figure", "new_figure", "plot_curves", "save_png",
           "sweep_curves_figure"]

_PANEL_INCHES = (4.0, 3.2)  # 400 x 320 px per panel at the PNG's dpi of 100
_MAX_COLUMNS = 4  # at most 1600 px wide, however many panels
_MARKER_EPOCHS = 30  # fewer points than this: markers, so that a single epoch still shows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curve_panels(history: list[dict[str, float]]) -> dict[str, list[tuple[str, str]]]:
    """Panel title -> (key, legend label) of each line, in the order keys first appear in `history`.

    Keys `group/<name>/<measure>` (the singularity diagnostics `diag/<layer>/<measure>`)
    share one panel per measure, with one line per name; losses, errors and learning rates
    each share a panel; any other key gets its own.
    """
    keys = list(dict.fromkeys(k for row in history for k, v in row.items() if _is_number(v) and k != "epoch"))
    panels: dict[str, list[tuple[str, str]]] = {"loss": [], "error": [], "learning rate": []}
    for key in keys:
        parts = key.split("/")
        if len(parts) >= 3 and all(parts):
            panels.setdefault(f"{parts[0]}: {parts[-1]}", []).append((key, "/".join(parts[1:-1])))
        elif "loss" in key:
            panels["loss"].append((key, key))
        elif "error" in key or "acc" in key:
            panels["error"].append((key, key))
        elif key == "lr" or key.startswith("lr"):
            panels["learning rate"].append((key, key))
        else:
            panels.setdefault(key, []).append((key, key))
    return {title: lines for title, lines in panels.items() if lines}


def new_figure(width: float, height: float, *, layout: str | None = None) -> Any:
    """A matplotlib Figure of `width` x `height` inches on the Agg canvas (files only, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Any, path: Path, *, dpi: int) -> Path:
    """Write `figure` as a PNG to `path`, whole or not at all (a temporary file, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # whole or not there: a kill may come any time
    try:
        figure.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def curves_figure(history: list[dict[str, float]]) -> Any:
    """The matplotlib Figure that `plot_curves` saves: a grid of at most 4 panels a row."""
    if not history:
        raise ValueError("history must hold at least one epoch, got an empty list")
    from matplotlib.ticker import MaxNLocator

    panels = curve_panels(history)
    if not panels:
        raise ValueError(f"history has no numeric values to plot; keys: {sorted(history[0])}")

    columns = min(_MAX_COLUMNS, len(panels))
    rows = -(-len(panels) // columns)
    width, height = _PANEL_INCHES
    figure = new_figure(width * columns, height * rows, layout="constrained")
    grid = list(figure.subplots(rows, columns, squeeze=False).flat)
    for axes, (title, lines) in zip(grid, panels.items()):
        for key, label in lines:
            # Keys may be missing in some epochs (e.g. evaluation every few epochs).
            points = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(history) if _is_number(row.get(key))]
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o" if len(points) < _MARKER_EPOCHS else None, markersize=4, label=label)
        if title == "learning rate" and all(v > 0 for line in axes.get_lines() for v in line.get_ydata()):
            axes.set_yscale("log")
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("epoch", fontsize="small")
        axes.tick_params(labelsize="small")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axes.grid(alpha=0.3)
        many = len(lines) > 4
        axes.legend(fontsize="x-small" if many else "small", ncols=2 if many else 1, framealpha=0.6)
    for axes in grid[len(panels):]:  # the unused cells of the last row
        axes.set_visible(False)
    return figure


def plot_curves(history: list[dict[str, float]], path: Path) -> Path:
    """Write a PNG of the training curves in `history` (one dict per epoch) to `path`.

    A grid of 400 x 320 px panels, at most 4 a row (1600 px), as many rows as needed.
    """
    return save_png(curves_figure(history), path, dpi=100)


def sweep_curves_figure(curves: dict[str, dict[str, tuple[list[int], list[float]]]]) -> Any:
    """Figure 3 of the paper: each configuration's eval and train error by epoch, mean over seeds.

    `curves`: configuration -> ``{"eval_top1_error": (epochs, values), "train_top1_error": (epochs, values)}``."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(6, 4)
    ax = fig.subplots()
    for label, curve in curves.items():
        epochs, values = curve["eval_top1_error"]
        line, = ax.plot(epochs, values, marker="o" if len(epochs) < _MARKER_EPOCHS else None, label=f"{label} (eval)")
        epochs, values = curve["train_top1_error"]
        ax.plot(epochs, values, linestyle=":", marker="o" if len(epochs) < _MARKER_EPOCHS else None,
                markerfacecolor="none", color=line.get_color(), label=f"{label} (train)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="top-1 error (%)",
           title="training curves, mean over seeds (epochs every seed reached)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def error_vs_width_figure(widths: list[int], errors: list[float], spreads: list[float],
                          references: list[float]) -> Any:
    """GUNN's top-1 error (mean, error bars: spread over seeds) by segment width, on a log2 axis, with
    each of `references` (SUNN's errors) as a dashed line."""
    fig = new_figure(5, 3.5)
    ax = fig.subplots()
    ax.errorbar(widths, errors, yerr=spreads, marker="o", capsize=3, label="GUNN")
    for error in references:
        ax.axhline(error, color="gray", linestyle="--", label="SUNN")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="segment width (channels, first GUNN layer)", ylabel="top-1 error (%), at epoch of the table")
    ax.legend()
    fig.tight_layout()
    return fig
