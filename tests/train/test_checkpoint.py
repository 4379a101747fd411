"""Checkpoint files: loaded onto the CPU, random states restored whatever devices are visible."""

from __future__ import annotations

import errno
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.serialization

from gunn.train import checkpoint as ckpt
from gunn.train.writes import WriteError, atomic_write
from tests.train.full_disk import fill, small_tmpfs


def run_state(**changes) -> dict:
    """A checkpoint as the engine writes it (a tiny model), with ``changes``."""
    cpu = torch.device("cpu")
    state = {
        "format": ckpt.FORMAT, "model": {"w": torch.arange(4.0)}, "optimizer": {"state": {}, "param_groups": []}, "scaler": {},
        "epoch": 1, "batch": 0, "step": 10, "train_seconds": 1.5, "history": [{"epoch": 1, "train_loss": 2.0}],
        "ranks": [{"meter": {"loss": 0.0, "top1": 0.0, "top5": 0.0, "count": 0.0}, "rng": ckpt.rng_state(cpu)}],
        "config": {"name": "test"},
    }
    return state | changes


def gpu_written(state: dict, path) -> None:
    """Saves ``state`` as a GPU run writes it: every storage tagged with the device cuda:0."""
    tag = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = tag


def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path):
    gpu_written(run_state(), tmp_path / ckpt.checkpoint_name(1, 0))
    loaded, path = ckpt.load_latest(tmp_path)
    assert path.name == ckpt.checkpoint_name(1, 0)
    rng = loaded["ranks"][0]["rng"]
    assert loaded["model"]["w"].device.type == "cpu" and rng["torch"].device.type == "cpu"
    ckpt.set_rng_state(rng, torch.device("cpu"))  # torch.set_rng_state takes CPU tensors only


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = ckpt.rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.save(run_state(ranks=[{"meter": {}, "rng": state}]), tmp_path, ckpt.checkpoint_name(0, 5), keep=1)
    loaded, _ = ckpt.load_latest(tmp_path)
    ckpt.set_rng_state(loaded["ranks"][0]["rng"], torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


class FakeGpus:
    """torch.cuda's generator API over ``count`` simulated GPUs (this machine has none)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(count)}

    def _index(self, device) -> int:
        index = torch.device(device).index
        if index is None or not 0 <= index < self.count:
            raise RuntimeError(f"invalid device {device} with {self.count} visible")
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        assert state.device.type == "cpu"
        self.states[self._index(device)] = state.clone()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get_rng_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set_rng_state)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.count)])
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.count)


def test_a_rank_saves_only_its_own_gpus_random_state(monkeypatch):
    FakeGpus(8).install(monkeypatch)
    state = ckpt.rng_state(torch.device("cuda", 5))
    assert torch.equal(state["cuda"], torch.full((16,), 5, dtype=torch.uint8))


def test_the_random_state_of_8_visible_gpus_restores_on_a_task_that_sees_1(monkeypatch):
    saved_with_8 = FakeGpus(8)
    saved_with_8.install(monkeypatch)
    state = ckpt.rng_state(torch.device("cuda", 3))  # rank 3 of a node where all 8 GPUs were visible
    one = FakeGpus(1)  # the requeued task sees only its own GPU, as cuda:0
    one.install(monkeypatch)
    ckpt.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(one.states[0], torch.full((16,), 3, dtype=torch.uint8))


# -- a checkpoint that cannot be written ---------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 256 KiB file system: room for a tiny checkpoint, not for a larger one."""
    with small_tmpfs(tmp_path / "tmpfs") as folder:
        yield folder


def temporaries(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp-" in p.name]


def test_a_full_disk_names_itself_and_leaves_the_previous_checkpoint(full_disk: Path) -> None:
    first = ckpt.save(run_state(), full_disk, ckpt.checkpoint_name(1, 0), keep=2)
    second = full_disk / ckpt.checkpoint_name(2, 0)
    with pytest.raises(WriteError) as failure:
        ckpt.save(run_state(model={"w": torch.zeros(100_000)}), full_disk, second.name, keep=2)
    assert isinstance(failure.value, OSError) and failure.value.errno == errno.ENOSPC
    assert str(failure.value) == (f"no space left on device while writing checkpoint {second}; "
                                  f"the previous checkpoint {first} is intact")
    assert temporaries(full_disk) == [] and not second.exists()
    assert ckpt.load_latest(full_disk)[1] == first


def test_a_full_disk_before_the_first_checkpoint_says_there_is_none(full_disk: Path) -> None:
    with pytest.raises(WriteError, match="no space left on device while writing checkpoint .*; "
                                                        "there is no previous checkpoint$"):
        ckpt.save(run_state(model={"w": torch.zeros(100_000)}), full_disk, ckpt.checkpoint_name(1, 0), keep=2)
    assert os.listdir(full_disk) == []


def test_torchs_write_failure_without_its_oserror_on_a_full_disk_is_named(full_disk: Path) -> None:
    fill(full_disk)

    def torch_failing(f) -> None:  # torch's C++ writer, given a path, loses the errno
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    with pytest.raises(WriteError, match="^.*no space left on device while writing snapshot") as failure:
        atomic_write(full_disk / "snapshot-01.pt", torch_failing, what="snapshot")
    assert failure.value.errno == errno.ENOSPC
    assert temporaries(full_disk) == []


def test_another_write_error_names_the_file(tmp_path: Path) -> None:
    def failing(f) -> None:
        f.write(b"partial")
        raise OSError(errno.EIO, "Input/output error")

    path = tmp_path / ckpt.checkpoint_name(1, 0)
    with pytest.raises(WriteError, match=f"could not write checkpoint {path}: Input/output error") as e:
        atomic_write(path, failing, what="checkpoint")
    assert e.value.errno == errno.EIO and os.listdir(tmp_path) == []


def test_an_interrupted_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    def interrupted(f) -> None:
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "a.pt", interrupted)
    assert os.listdir(tmp_path) == []


# -- a checkpoint that loads but is not a run's state --------------------------------------


def test_a_checkpoint_without_run_state_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    good = ckpt.save(run_state(), tmp_path, ckpt.checkpoint_name(1, 0), keep=3)
    bad = tmp_path / ckpt.checkpoint_name(2, 0)
    torch.save({}, bad)
    with pytest.warns(UserWarning, match=f"checkpoint {bad} holds no run state \\(missing 'model', .*'config', "
                                         ".*'ranks'\\); trying the previous one"):
        state, path = ckpt.load_latest(tmp_path)
    assert path == good and state["config"] == {"name": "test"}


@pytest.mark.parametrize("changes, problem", [
    ({"epoch": -1}, "'epoch' is not a non-negative int"),
    ({"step": "10"}, "'step' is not a non-negative int"),
    ({"model": {"w": [1.0]}}, "'model' is not a mapping of tensors"),
    ({"config": []}, "'config' is not a dict"),
    ({"history": {}}, "'history' is not a list"),
    ({"ranks": [{"meter": {}}]}, "'ranks' is not a list of dicts with 'meter' and 'rng'"),
])
def test_check_state_names_what_is_wrong(changes: dict, problem: str) -> None:
    assert ckpt.check_state(run_state()) is None
    assert ckpt.check_state(run_state(**changes)) == problem
    assert ckpt.check_state([]) == "a list, not a dict"


def test_a_checkpoint_without_every_ranks_state_is_no_run_state() -> None:
    older = run_state()
    rank = older.pop("ranks")[0]
    assert ckpt.check_state(older | rank) == "missing 'ranks'"


def test_a_checkpoint_of_a_newer_format_is_an_error_that_names_both_formats(tmp_path: Path) -> None:
    ckpt.save(run_state(), tmp_path, ckpt.checkpoint_name(1, 0), keep=3)
    newer = tmp_path / ckpt.checkpoint_name(2, 0)
    torch.save(run_state(format=ckpt.FORMAT + 1), newer)
    with pytest.raises(ckpt.NewerFormat, match=f"{newer} is a checkpoint in format {ckpt.FORMAT + 1}, written by a "
                                               f"newer gunn; this gunn reads checkpoint formats up to {ckpt.FORMAT}"):
        ckpt.load_latest(tmp_path)  # not the older checkpoint: the run would lose what the newer one holds
    newer.unlink()
    unnumbered = run_state()
    del unnumbered["format"]  # written before formats were numbered: format 1
    torch.save(unnumbered, newer)
    assert ckpt.load_latest(tmp_path)[1] == newer


def test_only_checkpoints_without_run_state_are_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / ckpt.checkpoint_name(1, 0))
    with warnings.catch_warnings(record=True), pytest.raises(ckpt.NoLoadableCheckpoint, match="refusing to start from scratch"):
        ckpt.load_latest(tmp_path)


class Malicious:
    """Runs a command when unpickled (what a checkpoint from a stranger may do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_checkpoint_is_skipped_without_advice_to_run_it(tmp_path: Path) -> None:
    good = ckpt.save(run_state(), tmp_path, ckpt.checkpoint_name(1, 0), keep=3)
    bad, marker = tmp_path / ckpt.checkpoint_name(2, 0), tmp_path / "ran"
    torch.save(run_state(config={"evil": Malicious(marker)}), bad)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ckpt.load_latest(tmp_path)[1] == good
    (message,) = [str(w.message) for w in caught if str(bad) in str(w.message)]
    assert "cannot be loaded (UnpicklingError: " in message and "system" in message
    assert "weights_only=False" not in message and "re-running" not in message.lower()
    assert "add_safe_globals" not in message
    assert not marker.exists()


@pytest.mark.parametrize("message", [
    # torch 2.6-2.8
    ("Weights only load failed. This file can still be loaded, to do so you have two options, do those steps only if "
    "you trust the source of the checkpoint. \n\t(1) Re-running `torch.load` with `weights_only` set to `False` will "
    "likely succeed, but it can result in arbitrary code execution.\n\t(2) Alternatively, to load with "
    "`weights_only=True` please check the recommended steps in the following error message.\n\tWeightsUnpickler "
    "error: Unsupported global: GLOBAL posix.system was not an allowed global by default. Please use "
    "`torch.serialization.add_safe_globals([system])` to allowlist this global if you trust this class/function."),
    # torch 2.14
    ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source."
    "\n\n\nTrying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation "
    "of torch.load to learn more about types accepted by default with weights_only https://pytorch.org/docs/."),
])
def test_the_load_error_keeps_the_cause_and_drops_the_advice_to_run_the_file(message: str) -> None:
    import pickle

    summary = ckpt._load_error(pickle.UnpicklingError(message))
    assert "GLOBAL posix.system" in summary
    assert not any(word in summary for word in ("weights_only", "torch.load", "safe_globals", "trust", "Re-running"))


def test_the_run_state_the_engine_writes_is_the_one_the_reader_checks():
    values = dict(model={"w": torch.zeros(1)}, optimizer={}, scaler={}, epoch=1, batch=0, step=3, history=[],
                  config={}, train_seconds=1.5)
    ranks = [{"meter": {}, "rng": {}, "buffers": {}}]
    state = ckpt.run_state(ranks=ranks, **values)
    assert set(state) == {"format", *ckpt.RUN_STATE_KEYS, "ranks"} and ckpt.check_state(state) is None
    assert state["format"] == ckpt.FORMAT
    with pytest.raises(ValueError, match=r"missing \['train_seconds'\]"):
        ckpt.run_state(ranks=ranks, **{k: v for k, v in values.items() if k != "train_seconds"})
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        ckpt.run_state(ranks=ranks, extra=1, **values)
    with pytest.raises(ValueError, match="meter, rng"):
        ckpt.run_state(ranks=[{"meter": {}}], **values)
