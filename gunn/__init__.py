"""Gradually Updated Neural Networks (Qiao et al., ICML 2018): layers, models, training."""

from gunn.layers import GradualUpdate, GunnLayer, UpdateUnit, set_memory, set_mode
from gunn.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["GradualUpdate", "GunnLayer", "UpdateUnit", "create_model", "list_models", "set_memory", "set_mode"]
