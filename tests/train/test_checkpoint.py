"""Checkpoint files: loaded onto the CPU, random states restored whatever devices are visible."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.serialization

from gunn.train import checkpoint as ckpt


def gpu_written(state: dict, path) -> None:
    """Saves ``state`` as a GPU run writes it: every storage tagged with the device cuda:0."""
    tag = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(state, path)
    finally:
        torch.serialization.location_tag = tag


def test_a_checkpoint_written_on_a_gpu_loads_onto_the_cpu(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "rng": ckpt.rng_state(torch.device("cpu"))}
    gpu_written(state, tmp_path / ckpt.checkpoint_name(1, 0))
    loaded, path = ckpt.load_latest(tmp_path)
    assert path.name == ckpt.checkpoint_name(1, 0)
    assert loaded["model"]["w"].device.type == "cpu" and loaded["rng"]["torch"].device.type == "cpu"
    ckpt.set_rng_state(loaded["rng"], torch.device("cpu"))  # torch.set_rng_state takes CPU tensors only


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = ckpt.rng_state(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.save({"rng": state}, tmp_path, ckpt.checkpoint_name(0, 5), keep=1)
    loaded, _ = ckpt.load_latest(tmp_path)
    ckpt.set_rng_state(loaded["rng"], torch.device("cpu"))
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


def test_an_older_checkpoint_with_every_gpus_state_restores_on_fewer_gpus(monkeypatch):
    old = FakeGpus(8)
    state = ckpt.rng_state(torch.device("cpu")) | {"cuda": [old.states[i] for i in range(8)]}
    one = FakeGpus(1)
    one.install(monkeypatch)
    ckpt.set_rng_state(state, torch.device("cuda", 0))
    assert torch.equal(one.states[0], old.states[0])
