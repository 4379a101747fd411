"""CUDA graphs of the training step: what is refused before any capture (the capture itself needs a GPU:
.ci/gpu-check runs it)."""

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
