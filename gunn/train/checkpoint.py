"""Checkpoints written atomically, loaded without running code, with fallback past a bad one."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from gunn.config import ConfigError

PATTERN = re.compile(r"checkpoint-e(\d+)-b(\d+)\.pt$")


def checkpoint_name(epoch: int, batch: int) -> str:
    """File name of the checkpoint taken before batch ``batch`` of epoch ``epoch``."""
    return f"checkpoint-e{epoch:04d}-b{batch:06d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoints in ``directory``, oldest first."""
    found = [(tuple(map(int, m.groups())), p) for p in directory.glob("checkpoint-*.pt") if (m := PATTERN.search(p.name))]
    return [p for _, p in sorted(found)]


# What the engine's checkpoint holds (gunn.train.engine.save_checkpoint), checked before a run resumes from it;
# besides these, either "ranks" (every rank's "meter" and "rng") or, written before 2026-12, "meter" and "rng".
RUN_STATE_KEYS = ("model", "optimizer", "scaler", "epoch", "batch", "step", "history", "config", "train_seconds")
RANK_STATE_KEYS = ("meter", "rng")  # each entry of "ranks" (and "buffers", BatchNorm statistics, since 2026-12)
# Torch's own message when a write fails in its C++ writer (the OSError is lost there).
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed writing")
# Sentences of torch's load errors that advise loading the file in a way that runs its code.
_TORCH_ADVICE = re.compile(r"weights.only|torch\.load|safe_globals|trust|can still be loaded|arbitrary code",
                           re.IGNORECASE)
# A full disk or quota: said as "no space left on device while writing X" (os.strerror's words).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(OSError):
    """A file could not be written (disk full, quota, permissions); the message names it, ``errno`` is kept."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" before it
        return str(self.strerror)


def save(state: dict[str, Any], directory: Path, name: str, keep: int) -> Path:
    """Writes ``state`` to directory/name atomically (see ``atomic_write``), keeps the newest ``keep``.

    A failed write leaves the previous checkpoints as they were and raises ``CheckpointWriteError``,
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


def atomic_write(path: Path, write: Callable[[IO[bytes]], None], *, what: str = "file", note: str = "") -> None:
    """Writes ``path`` through ``write(file)`` all or nothing: a temporary file, fsync, rename, fsync of the folder.

    On any failure (KeyboardInterrupt included) the temporary file is removed and ``path`` keeps its
    old contents. An OSError anywhere in the failure's chain, or torch's own message for a failed
    write, becomes a ``CheckpointWriteError`` that names ``what`` and ``path`` (with ``note`` after it)
    and says in plain words when the disk is full: torch otherwise reports a full disk as
    "unexpected pos 64 vs 0".
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        failure = _write_error(err, tmp, f"{what} {path}", note) if isinstance(err, Exception) else None
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from err
        raise
    _fsync_dir(path.parent)


def _write_error(err: Exception, tmp: Path, what: str, note: str) -> CheckpointWriteError | None:
    """The error to raise for ``err`` raised while writing ``what`` through ``tmp``; None to raise ``err`` as it is."""
    cause: BaseException | None = err
    for _ in range(10):  # bounded: exception chains can loop
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    code = cause.errno if isinstance(cause, OSError) else None
    if code is None and _TORCH_WRITE_FAILED.search(str(err)):
        # torch's C++ writer drops the errno; a full file system is the usual reason (checked before
        # the temporary file is removed, which frees its space).
        code = errno.ENOSPC if _free_bytes(tmp.parent) < 2**20 else errno.EIO
    elif code is None:
        return None  # not a write failure (e.g. an object that cannot be pickled)
    tail = f"; {note}" if note else ""
    if code in NO_SPACE:
        return CheckpointWriteError(code, f"{os.strerror(code).lower()} while writing {what}{tail}")
    reason = (cause.strerror or str(cause)) if isinstance(cause, OSError) else str(err).splitlines()[0]
    return CheckpointWriteError(code, f"could not write {what}: {reason}{tail}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(directory: Path) -> int:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return 2**63
    return stat.f_bavail * stat.f_frsize


def run_state(*, ranks: list[dict[str, Any]], **values: Any) -> dict[str, Any]:
    """The checkpoint the engine writes: every one of ``RUN_STATE_KEYS``, and ``ranks`` (each rank's
    ``RANK_STATE_KEYS``); ValueError on a key missing or unknown, so writer and reader agree."""
    if set(values) != set(RUN_STATE_KEYS):
        missing, unknown = set(RUN_STATE_KEYS) - set(values), set(values) - set(RUN_STATE_KEYS)
        raise ValueError(f"a run state holds {', '.join(RUN_STATE_KEYS)}: missing {sorted(missing)}, "
                         f"unknown {sorted(unknown)}")
    if not all(set(RANK_STATE_KEYS) <= set(r) for r in ranks):
        raise ValueError(f"each rank's state must hold {', '.join(RANK_STATE_KEYS)}")
    return {**{key: values[key] for key in RUN_STATE_KEYS}, "ranks": ranks}


def check_state(state: Any) -> str | None:
    """What keeps ``state`` from being a run's state as the engine writes it, or None if nothing does."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    missing = [key for key in RUN_STATE_KEYS if key not in state]
    if "ranks" not in state and not all(key in state for key in RANK_STATE_KEYS):
        missing.append("ranks")
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
    ranks = state["ranks"] if "ranks" in state else [{key: state[key] for key in RANK_STATE_KEYS}]
    if not (isinstance(ranks, list) and ranks and all(
            isinstance(r, dict) and all(isinstance(r.get(key), dict) for key in RANK_STATE_KEYS) for r in ranks)):
        problems.append("'ranks' is not a list of dicts with 'meter' and 'rng'" if "ranks" in state
                        else "'meter' and 'rng' are not dicts")
    return "; ".join(problems) or None


class NoLoadableCheckpoint(ConfigError):
    """No checkpoint of a run directory loads: the run stops rather than start over them."""


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
    if isinstance(cuda, list):  # written before 2026-12: every visible GPU's state; rank 0 trained on the first
        cuda = cuda[0] if cuda else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda.cpu(), device)
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
