"""Model registry: the only way models are found by name, and each model's default configuration."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# The architecture knobs a run configuration may change on a registered model (``model.<knob>``; None
# keeps the model's). The one list read by gunn.config, the engine and the sweep report.
MODEL_KNOBS = ("mode", "residual", "segments", "expansion", "depth")

# ImageNet's per-channel normalisation (gunn.data.imagenet reads it from here).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-10's, for reference: the CIFAR reader computes its own from the training set's pixels.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ModelDefaults:
    """A registered model's default configuration (as timm's ``pretrained_cfg``): the input it was
    designed for, its normalisation, and the architecture its builder makes when nothing is overridden.

    ``recipe`` names the preset (gunn/presets) that trains it as the paper does, or None.
    """

    input_size: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    widths: tuple[int, ...]
    segments: tuple[int, ...]
    expansion: int = 2
    depth: int = 1
    mode: str = "gunn"
    residual: bool = True
    recipe: str | None = None

    def knobs(self) -> dict[str, Any]:
        """The values of ``MODEL_KNOBS`` (segments as a list, as a configuration holds them)."""
        return {k: list(v) if isinstance(v := getattr(self, k), tuple) else v for k in MODEL_KNOBS}


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, ModelDefaults] = {}


def register_model(
    builder: Callable[..., nn.Module] | None = None, *, default_cfg: ModelDefaults | None = None
) -> Any:
    """Decorator: registers ``builder`` under its function name, with its default configuration.

    ``@register_model`` or ``@register_model(default_cfg=ModelDefaults(...))``; a model built
    through ``create_model`` carries it as ``model.default_cfg``.
    """

    def register(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = builder.__name__
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        if default_cfg is not None:
            _DEFAULTS[name] = default_cfg
        return builder

    return register if builder is None else register(builder)


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in _BUILDERS if fnmatch.fnmatchcase(name, pattern))


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")


def default_cfg(name: str) -> ModelDefaults | None:
    """The default configuration registered with model ``name`` (None if it has none)."""
    _check_name(name)
    return _DEFAULTS.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name``; keyword arguments that are None are dropped.

    Dropping None lets a command line pass every option it has without overriding a
    model's defaults with unset values.
    """
    _check_name(name)
    model = _BUILDERS[name](**{key: value for key, value in kwargs.items() if value is not None})
    if name in _DEFAULTS and isinstance(model, nn.Module):
        model.default_cfg = _DEFAULTS[name]
    return model
