"""CUDA graphs of the training step: what is refused before any capture, what is captured as one graph, and the
warm-up before it (the capture itself needs a GPU: .ci/gpu-check runs it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gunn.models import create_model
from gunn.train.graphs import capture_training_step


def test_a_cpu_batch_is_refused():
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device, got an input on cpu"):
        capture_training_step(create_model("gunn_tiny"), torch.randn(2, 3, 16, 16), None)


def test_a_model_in_eval_mode_is_refused():
    with pytest.raises(ValueError, match="train mode"):
        capture_training_step(create_model("gunn_tiny").eval(), torch.randn(2, 3, 16, 16, ), None)


def test_cumulative_batch_norm_is_refused():
    model = create_model("gunn_tiny")
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).momentum = None
    x = torch.randn(2, 3, 16, 16, )
    with pytest.raises(ValueError, match="cannot replay BatchNorm with momentum=None"):
        capture_training_step(model, x, None)


def test_a_gunn_layer_that_recomputes_in_backward_is_refused_naming_it():
    # Its backward reads and forks the CUDA random state: a capture fails there ("Cannot call
    # CUDAGeneratorImpl::current_seed during CUDA graph capture").
    model = create_model("gunn_tiny", memory="recompute")
    with pytest.raises(ValueError, match=r"GUNN layer stages\.0\.gunn with memory='recompute'.*memory='efficient'"):
        capture_training_step(model, torch.randn(2, 3, 16, 16), None)
    sunn = create_model("gunn_tiny", mode="sunn", memory="recompute")  # SUNN recomputes nothing
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        capture_training_step(sunn, torch.randn(2, 3, 16, 16), None)


def test_one_rank_captures_the_whole_model_and_several_capture_a_gunn_net_stage_by_stage():
    from gunn.train.graphs import graph_pieces

    model = create_model("gunn_tiny")
    assert graph_pieces(model, stages=False) == [("", model)]
    pieces = graph_pieces(model, stages=True)
    assert [name for name, _ in pieces] == ["stem", "stages.0", "stages.1", "stages.2", "head"]
    assert [module for _, module in pieces] == [model.stem, *model.stages, model.head]
    with torch.device("meta"):
        imagenet = create_model("gunn18")  # no transition after the last stage: its head is an Identity
    assert [name for name, _ in graph_pieces(imagenet, stages=True)] == ["stem", *(f"stages.{i}" for i in range(4))]
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())  # not a GunnNet: one graph whatever the ranks
    assert graph_pieces(other, stages=True) == [("", other)]


@pytest.mark.slow
def test_each_stage_is_warmed_up_on_what_the_stage_before_it_gives_as_the_live_step_will():
    from gunn.train.graphs import _warm_up, graph_pieces

    model = create_model("gunn_tiny").to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    modules = [module for _, module in graph_pieces(model, stages=True)]
    outputs = _warm_up(modules, x, iterations=1)
    expected, features = [], x
    with torch.no_grad():
        for module in modules:
            features = module(features)
            expected.append(features)
    assert [o.shape for o in outputs] == [e.shape for e in expected]
    assert all(o.is_contiguous(memory_format=torch.channels_last) for o in outputs)  # the capture's inputs keep it
    assert all(p.grad is None for p in model.parameters())  # the warm-up's gradients go nowhere
