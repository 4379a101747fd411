"""Checkpoints written atomically, loaded without running code, with fallback past a bad one."""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

PATTERN = re.compile(r"checkpoint-e(\d+)-b(\d+)\.pt$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """File name of the checkpoint taken before batch ``batch`` of epoch ``epoch``."""
    return f"checkpoint-e{epoch:04d}-b{batch:06d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    found = [(tuple(map(int, m.groups())), p) for p in directory.glob("checkpoint-*.pt") if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict[str, Any], directory: Path, name: str, keep: int) -> Path:
    """Writes ``state`` to directory/name atomically (temporary file, fsync, rename), keeps the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = directory / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads, or None if there is none; a bad newer one is skipped with a warning.

    Loads with ``weights_only=True`` (a checkpoint from a stranger cannot run code) and onto
    the CPU, whichever device wrote it: ``load_state_dict`` moves weights to the model's
    device, and random-generator states must be CPU tensors.
    """
    candidates = list_checkpoints(directory) if directory.is_dir() else []
    failures = []
    for path in reversed(candidates):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # truncated, corrupt, or holding objects that are not plain data
            failures.append(path)
            warnings.warn(f"checkpoint {path} cannot be loaded ({type(err).__name__}: {err}); trying the previous one",
                          stacklevel=2)
            continue
        return state, path
    if failures:
        raise RuntimeError(
            f"no checkpoint in {directory} can be loaded ({', '.join(p.name for p in failures)}); refusing to "
            "start from scratch over them: move them away to start a new run there"
        )
    return None


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of every random generator a run uses: torch's CPU one, the CUDA one of ``device`` (this
    rank's own GPU only, so that a run resumes whatever GPUs are visible then), NumPy's and Python's."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        # NumPy's key array as a tensor: weights_only loading accepts tensors, not arrays.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restores what ``rng_state`` captured; the CUDA state goes to ``device`` (if it is a GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if isinstance(cuda, list):  # written before 2026-12: every visible GPU's state; rank 0 trained on the first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
