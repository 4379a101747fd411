"""Model registry: the only way models are found by name."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers ``builder`` under its function name."""
    name = builder.__name__
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _BUILDERS if fnmatch.fnmatchcase(name, pattern))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name``; keyword arguments that are None are dropped.

    Dropping None lets a command line pass every option it has without overriding a
    model's defaults with unset values.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _BUILDERS[name](**{key: value for key, value in kwargs.items() if value is not None})
