"""Gradually Updated Neural Networks (Qiao et al., ICML 2018): layers, models, training.

The public names below are imported when first used, so that ``import gunn`` (every command's first
step) does not import torch: a command can take Ctrl-C quietly while torch loads (gunn.cluster.commands).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gunn.layers import GradualUpdate, GunnLayer, UpdateUnit, set_memory, set_mode
    from gunn.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["GradualUpdate", "GunnLayer", "UpdateUnit", "create_model", "list_models", "set_memory", "set_mode"]
_HOME = {"GradualUpdate": "gunn.layers", "GunnLayer": "gunn.layers", "UpdateUnit": "gunn.layers",
         "set_memory": "gunn.layers", "set_mode": "gunn.layers", "create_model": "gunn.models",
         "list_models": "gunn.models"}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'gunn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
