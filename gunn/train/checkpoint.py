"""Checkpoints written atomically, loaded without running code, with fallback past a bad one."""

from __future__ import annotations

import pickle
import random
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gunn.config import ConfigError
from gunn.train.writes import atomic_write

PATTERN = re.compile(r"checkpoint-e(\d+)-b(\d+)\.pt$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """File name of the checkpoint taken before batch ``batch`` of epoch ``epoch``."""
    return f"checkpoint-e{epoch:04d}-b{batch:06d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    found = [(tuple(map(int, m.groups())), p) for p in directory.glob("checkpoint-*.pt") if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


# What the engine's checkpoint holds (gunn.train.engine.save_checkpoint), checked before a run resumes from it;
# besides these, "ranks" (every rank's RANK_STATE_KEYS and "buffers", its BatchNorm statistics) and "format".
RUN_STATE_KEYS = ("model", "optimizer", "scaler", "epoch", "batch", "step", "history", "config", "train_seconds")
RANK_STATE_KEYS = ("meter", "rng")
# The layout of a checkpoint, saved in it as "format"; raised when the layout changes. A checkpoint without
# one was written before formats were numbered, in format 1's layout.
FORMAT = 1
# Sentences of torch's load errors that advise loading the file in a way that runs its code.
_TORCH_ADVICE = re.compile(r"weights.only|torch\.load|safe_globals|trust|can still be loaded|arbitrary code",
                           re.IGNORECASE)


def save(state: dict[str, Any], directory: Path, name: str, keep: int) -> Path:
    """Writes ``state`` to directory/name atomically (see ``atomic_write``), keeps the newest ``keep``.

    A failed write leaves the previous checkpoints as they were and raises ``WriteError``,
    which says whether the disk is full and which checkpoint a rerun would continue from.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    previous = list_checkpoints(directory)
    intact = f"the previous checkpoint {previous[-1]} is intact" if previous else "there is no previous checkpoint"
    atomic_write(path, lambda f: torch.save(state, f), what="checkpoint", note=intact)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def run_state(*, ranks: list[dict[str, Any]], **values: Any) -> dict[str, Any]:
    """The checkpoint the engine writes: every one of ``RUN_STATE_KEYS``, and ``ranks`` (each rank's
    ``RANK_STATE_KEYS``); ValueError on a key missing or unknown, so writer and reader agree."""
    if set(values) != set(RUN_STATE_KEYS):
        missing, unknown = set(RUN_STATE_KEYS) - set(values), set(values) - set(RUN_STATE_KEYS)
        raise ValueError(f"a run state holds {', '.join(RUN_STATE_KEYS)}: missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    if not all(set(RANK_STATE_KEYS) <= set(r) for r in ranks):
        raise ValueError(f"each rank's state must hold {', '.join(RANK_STATE_KEYS)}")
    return {"format": FORMAT, **{key: values[key] for key in RUN_STATE_KEYS}, "ranks": ranks}


def check_state(state: Any) -> str | None:
    """What keeps ``state`` from being a run's state as the engine writes it, or None if nothing does."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    missing = [key for key in (*RUN_STATE_KEYS, "ranks") if key not in state]
    if missing:
        return "missing " + ", ".join(repr(key) for key in missing)
    problems = []
    model = state["model"]
    if not (isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values())):
        problems.append("'model' is not a mapping of tensors")
    problems += [f"{key!r} is not a dict" for key in ("optimizer", "scaler", "config")
                 if not isinstance(state[key], dict)]
    problems += [f"{key!r} is not a non-negative int" for key in ("epoch", "batch", "step")
                 if not (type(state[key]) is int and state[key] >= 0)]
    if not isinstance(state["history"], list):
        problems.append("'history' is not a list")
    if type(state["train_seconds"]) not in (int, float):
        problems.append("'train_seconds' is not a number")
    ranks = state["ranks"]
    if not (isinstance(ranks, list) and ranks and all(
            isinstance(r, dict) and all(isinstance(r.get(key), dict) for key in RANK_STATE_KEYS) for r in ranks)):
        problems.append("'ranks' is not a list of dicts with 'meter' and 'rng'")
    return "; ".join(problems) or None


def shape_mismatch(now: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str:
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


def rank_state(state: dict[str, Any], rank: int, world_size: int, run_dir: Path) -> dict[str, Any]:
    """Rank ``rank``'s running metrics, random state and buffers from a checkpoint, continued by ``world_size``
    ranks (if it was written by another number of ranks: the epoch's running sums go to rank 0, and every
    rank takes rank 0's random state)."""
    ranks = state["ranks"]
    if len(ranks) == world_size:
        return ranks[rank]
    if rank == 0 and state["batch"]:
        warnings.warn(f"{run_dir} was checkpointed mid-epoch by {len(ranks)} rank(s) and continues with "
                      f"{world_size}: the rest of epoch {state['epoch'] + 1} is sharded differently",
                      stacklevel=3)
    # The epoch's running sums so far go to rank 0 (they are summed over ranks at its end).
    totals = {k: sum(r["meter"][k] for r in ranks) if rank == 0 else 0.0 for k in ranks[0]["meter"]}
    return {"meter": totals, "rng": ranks[0]["rng"]}


class NoLoadableCheckpoint(ConfigError):
    """No checkpoint of a run directory loads: the run stops rather than start over them."""


class NewerFormat(ConfigError):
    """A checkpoint in a format newer than this gunn reads (``FORMAT``): written by a newer gunn."""


def check_format(state: dict[str, Any], path: Path) -> None:
    """NewerFormat, naming both versions, if ``state`` (loaded from ``path``) is in a format this gunn cannot read."""
    found = state.get("format", 1)
    if not (type(found) is int and found <= FORMAT):
        raise NewerFormat(f"{path} is a checkpoint in format {found!r}, written by a newer gunn; this gunn reads "
                          f"checkpoint formats up to {FORMAT}: continue the run with the gunn that wrote it, or "
                          "upgrade gunn")


def load_latest(directory: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that loads and holds a run's state (``check_state``), or None if there is
    none; a bad newer one is skipped with a warning.

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
            warnings.warn(f"checkpoint {path} cannot be loaded ({_load_error(err)}); trying the previous one",
                          stacklevel=2)
            continue
        if isinstance(state, dict):
            check_format(state, path)  # not a bad file to skip: the run would lose what it holds
        problem = check_state(state)
        if problem is not None:
            failures.append(path)
            warnings.warn(f"checkpoint {path} holds no run state ({problem}); trying the previous one", stacklevel=2)
            continue
        return state, path
    if failures:
        raise NoLoadableCheckpoint(
            f"no checkpoint in {directory} can be loaded ({', '.join(p.name for p in failures)}); refusing to "
            "start from scratch over them: move them away to start a new run there"
        )
    return None


def _load_error(err: Exception) -> str:
    """``err`` in one sentence, never torch's advice to load the file with ``weights_only=False`` or to allow
    its classes: either would run whatever code the file holds."""
    sentences = (part.strip() for line in str(err).splitlines() for part in re.split(r"(?<=\.)\s+", line))
    kept = [s.removeprefix("WeightsUnpickler error: ") for s in sentences if s and not _TORCH_ADVICE.search(s)]
    if isinstance(err, pickle.UnpicklingError):
        return f"{type(err).__name__}: {kept[0] if kept else 'objects that are not plain data'} (refused: loading " \
               "it could run code)"
    return f"{type(err).__name__}: {kept[0] if kept else ''}"[:300]


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
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
