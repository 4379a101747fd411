"""GUNN and SUNN layers: the generic container and the paper's bottleneck layer."""

from gunn.layers.bottleneck import Bottleneck, UpdateUnit
from gunn.layers.gradual import MEMORY_MODES, MODES, GradualUpdate, set_memory, set_mode
from gunn.layers.gunn_layer import GunnLayer

__all__ = [
    "Bottleneck",
    "GradualUpdate",
    "GunnLayer",
    "MEMORY_MODES",
    "MODES",
    "UpdateUnit",
    "set_memory",
    "set_mode",
]
