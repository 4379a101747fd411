"""The figures of runs and sweeps (gunn.train.plots): a run's curves.png and a sweep report's plots."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gunn.train.plots import curves_figure, plot_curves


def test_plot_curves_writes_a_png(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 2.0, "train_top1_error": 0.8, "lr": 0.1},
        {"epoch": 2, "train_loss": 1.5, "train_top1_error": 0.6, "eval_top1_error": 0.65, "lr": 0.01},
    ]
    path = plot_curves(history, tmp_path / "plots" / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the curves plot

_PLAIN_KEYS = ("train_loss", "eval_loss", "train_top1_error", "eval_top1_error", "lr", "epoch_time",
               "images_per_s", "peak_memory_mb")
_LAYERS = ("stages.0.gunn", "stages.1.gunn", "stages.2.gunn")
_MEASURES = ("channels", "collapsed_pairs", "collapsed_channels", "dead_channels", "participation_ratio")


def _history(epochs: int, *, diagnostics: bool = False) -> list[dict[str, float]]:
    rows = []
    for epoch in range(1, epochs + 1):
        row = {"epoch": epoch, **{key: 1.0 / epoch + i for i, key in enumerate(_PLAIN_KEYS)}}
        if diagnostics:
            row.update({f"diag/{layer}/{measure}": float(epoch * (j + 1) + i)
                        for i, layer in enumerate(_LAYERS) for j, measure in enumerate(_MEASURES)})
        rows.append(row)
    return rows


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of the PNG at `path`, as written."""
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def test_plot_curves_of_a_plain_run_is_not_a_wide_strip(tmp_path: Path) -> None:
    width, height = _png_size(plot_curves(_history(3), tmp_path / "curves.png"))
    assert width <= 1700
    assert height >= 2 * 300  # 6 panels: two rows of readable panels


@pytest.mark.slow
def test_plot_curves_with_diagnostics_is_a_grid_with_one_panel_per_measure(tmp_path: Path) -> None:
    history = _history(3, diagnostics=True)
    width, height = _png_size(plot_curves(history, tmp_path / "curves.png"))
    assert width <= 1700 and height >= 3 * 300  # 6 plain + 5 diagnostic panels: 3 rows of 4
    figure = curves_figure(history)
    figure.canvas.draw()  # lays the panels out
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert len(panels) == 6 + len(_MEASURES)
    for measure in _MEASURES:
        (panel,) = [axes for axes in panels if axes.get_title().endswith(f": {measure}")]
        assert [line.get_label() for line in panel.get_lines()] == list(_LAYERS)
        assert [text.get_text() for text in panel.get_legend().get_texts()] == list(_LAYERS)
    for axes in panels:  # each panel stays readable: about 400 x 300 px or more, legend included
        box = axes.get_position()
        assert box.width * width >= 300 and box.height * height >= 200


def test_plot_curves_of_one_epoch_shows_points_on_integer_epoch_ticks(tmp_path: Path) -> None:
    history = _history(1, diagnostics=True)
    assert plot_curves(history, tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = curves_figure(history)
    figure.canvas.draw()
    panels = [axes for axes in figure.axes if axes.get_visible()]
    assert panels
    for axes in panels:
        assert all(line.get_marker() not in (None, "None", "", " ") for line in axes.get_lines())
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)
        for legend_text in axes.get_legend().get_texts():
            assert legend_text.get_fontsize() <= 10  # "small" or less: legends do not cover the curves


def test_plot_curves_keeps_integer_epoch_ticks_over_many_epochs() -> None:
    figure = curves_figure(_history(7))
    figure.canvas.draw()
    for axes in (a for a in figure.axes if a.get_visible()):
        low, high = axes.get_xlim()
        ticks = [t for t in axes.get_xticks() if low <= t <= high]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks)


# --------------------------------------------------------------------------- shared by the runs and the sweep report


def test_a_png_is_written_whole_or_not_at_all(tmp_path: Path) -> None:
    from gunn.train.plots import save_png

    class DiesWhileSaving:  # as a kill or a full disk halfway through savefig would
        def savefig(self, path: Path, **_: object) -> None:
            with open(path, "wb") as f:
                f.write(b"\x89PNG half")
            raise OSError(28, os.strerror(28))

    path = tmp_path / "curves.png"
    path.write_bytes(b"the previous plot")
    try:
        save_png(DiesWhileSaving(), path, dpi=100)
    except OSError:
        pass
    assert path.read_bytes() == b"the previous plot" and sorted(p.name for p in tmp_path.iterdir()) == ["curves.png"]


def test_the_sweep_report_draws_its_plots_with_the_shared_module(tmp_path: Path) -> None:
    from gunn.sweeps import report

    rows = [{"mode": "sunn", "segment_width": "16", "top1_error_mean": 30.0, "top1_error_std": 1.0},
            {"mode": "gunn", "segment_width": "4", "top1_error_mean": 25.0, "top1_error_std": 0.5},
            {"mode": "gunn", "segment_width": "8", "top1_error_mean": 27.0, "top1_error_std": 0.7}]
    curves = {row["segment_width"]: {"eval_top1_error": ([1, 2], [40.0, row["top1_error_mean"]]),
                                     "train_top1_error": ([1, 2], [45.0, 35.0])} for row in rows}
    paths = report.plot(rows, curves, tmp_path)
    assert [p.name for p in paths] == ["error_vs_width.png", "curves.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "error_vs_width.png"]  # no temporary left


def test_the_sweep_curves_mark_their_points_on_integer_epochs(tmp_path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    from gunn.train.plots import save_png, sweep_curves_figure

    fig = sweep_curves_figure({"one epoch": {"eval_top1_error": ([7], [30.0]), "train_top1_error": ([7], [35.0])},
                               "long": {"eval_top1_error": (list(range(3, 43)), [20.0] * 40),
                                        "train_top1_error": ([], [])}})
    ax = fig.axes[0]
    eval_one, train_one, eval_long, _ = ax.lines
    assert eval_one.get_marker() == train_one.get_marker() == "o" and eval_long.get_marker() == "None"
    assert list(eval_one.get_xdata()) == [7] and list(eval_long.get_xdata()) == list(range(3, 43))
    assert isinstance(ax.xaxis.get_major_locator(), MaxNLocator)
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    save_png(fig, tmp_path / "curves.png", dpi=120)
