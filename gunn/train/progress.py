"""What rank 0 shows while a run trains: the progress bar of an epoch (a line every 30 s in a log file) and
each epoch's summary line."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunn.config import RunConfig
    from gunn.train.metrics import Meter


def progress_bar(config: RunConfig, is_main: bool, epoch: int, batch: int, total: int) -> Any:
    """The bar of epoch ``epoch`` (from 0) of ``total`` batches, ``batch`` done; None off rank 0 or without
    logging.progress."""
    if not (is_main and config.logging.progress):
        return None
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(total=total, initial=batch, desc=f"epoch {epoch + 1}/{config.optim.epochs}",
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


def update_bar(bar: Any, meter: Meter, world_size: int, start_count: float, start_time: float,
               images_before: float, seconds_before: float) -> None:
    """One batch more on ``bar``; when it redraws, the running loss and accuracy of ``meter`` (which counted
    ``start_count`` images when this process started training the epoch, at ``start_time``) and the images/s
    of this process's share of the epoch (``images_before`` in ``seconds_before`` before that) times the ranks."""
    if time.time() - bar.last_print_t >= bar.mininterval:  # the bar redraws now: read the meter once
        loss, top1, _, count = meter.values()
        n = max(count, 1)
        images = images_before + count - start_count  # this process's, as images_per_s counts them
        rate = images * world_size / max(seconds_before + time.perf_counter() - start_time, 1e-9)
        bar.set_postfix(loss=f"{loss / n:.3f}", acc=f"{100 * top1 / n:.1f}%", img_s=f"{rate:.0f}", refresh=False)
    bar.update(1)


def summary_line(m: dict[str, float], epochs: int) -> str:
    """An epoch's metrics ``m`` in one line."""
    line = (f"epoch {int(m['epoch'])}/{epochs}  train loss {m['train_loss']:.4f} err {m['train_top1_error']:.2f}%  "
            f"eval top-1 {m['eval_top1_error']:.2f}% top-5 {m['eval_top5_error']:.2f}%  lr {m['lr']:.4g}  "
            f"{m['epoch_time']:.1f} s  {m['images_per_s']:.0f} img/s")
    if "ensemble_top1_error" in m:
        line += f"  ensemble of {int(m['snapshots'])}: top-1 {m['ensemble_top1_error']:.2f}%"
    return line
