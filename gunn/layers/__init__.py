"""GUNN and SUNN layers: the generic container and the paper's bottleneck layer."""

from gunn.layers.bottleneck import Bottleneck, GunnLayer, UpdateUnit
from gunn.layers.gradual import MEMORY_MODES, MODES, GradualUpdate, set_memory, set_mode

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
