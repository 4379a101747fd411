"""What a model costs: its parameters and its multiply-adds per image.

The one count of both, read by the engine (the run's ``parameters`` and ``gmac`` tags), the sweep
report and the benchmark. Multiply-adds are those of one evaluation forward as PyTorch's
``FlopCounterMode`` counts them (convolutions and matrix products; 2 FLOPs per multiply-add), so
BatchNorm, ReLU and pooling are left out, as papers leave them out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gunn.models.registry import create_model


def parameter_count(model: nn.Module) -> int:
    """The number of the model's parameters (trainable or not; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def multiply_adds(model: nn.Module, x: Tensor) -> int:
    """Multiply-adds of one evaluation forward of ``model`` on the batch ``x`` (all of its images)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def model_cost(name: str, input_shape: tuple[int, int, int], **arguments: Any) -> tuple[int, int, nn.Module]:
    """Parameters and multiply-adds per image of model ``name`` (``create_model(name, **arguments)``)
    fed images of ``input_shape`` (channels, height, width), and the model, built on the meta device:
    no memory, no values, whatever its size."""
    with torch.device("meta"):
        model = create_model(name, **arguments)
        x = torch.empty(1, *input_shape)
    return parameter_count(model), multiply_adds(model, x), model
