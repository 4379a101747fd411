"""Model registry: the only way models are found by name, and each model's default configuration."""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
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


# Models of other libraries are found by ``LIBRARY.NAME`` (`_builder`): torchvision's classification models,
# and timm's when timm is installed (``torchvision.resnext50_32x4d``, ``timm.wide_resnet50_2``). They take
# num_classes and in_chans, and none of the GUNN knobs.
# What every builder may be given besides its own architecture: the data decides these.
DATA_ARGUMENTS = ("num_classes", "in_chans")
# The GUNN knobs that only models which declare them take (MODEL_KNOBS and the backward strategy).
GUNN_ARGUMENTS = (*MODEL_KNOBS, "memory")


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a shell-style ``pattern``, sorted. Other libraries' models
    (``torchvision.NAME``, ``timm.NAME``) are found by name, not listed."""
    return sorted(name for name in _BUILDERS if fnmatch.fnmatchcase(name, pattern))


def _builder(name: str) -> Callable[..., nn.Module]:
    """The builder of model ``name``: registered, or another library's; ValueError naming what there is."""
    if name in _BUILDERS:
        return _BUILDERS[name]
    library, _, model = name.partition(".")
    if library == "torchvision" and model:
        from torchvision import models

        known = models.list_models(module=models)  # the classification models
        if model not in known:
            raise ValueError(f"unknown model {name!r}: torchvision has no classification model {model!r}"
                             f"{_close(model, known, 'torchvision.')}")
        return functools.partial(_torchvision, model)
    if library == "timm" and model:
        try:
            import timm
        except ImportError:
            raise ValueError(f"model {name!r} needs timm: pip install timm (or the gunn[timm] extra)") from None
        if not timm.is_model(model):
            raise ValueError(f"unknown model {name!r}: timm has no model {model!r}"
                             f"{_close(model, timm.list_models(), 'timm.')}")
        return functools.partial(_timm, model)
    raise ValueError(f"unknown model {name!r}{_close(name, list_models(), '')}; available models: "
                     f"{', '.join(list_models())}, and torchvision.NAME (or timm.NAME with timm installed) for "
                     "another library's classification model")


def _close(name: str, known: list[str], prefix: str) -> str:
    matches = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(prefix + m for m in matches)}?)" if matches else ""


def check_model(name: str) -> None:
    """Raises ValueError, naming the models there are (and close matches), unless ``name`` builds a model."""
    _builder(name)


def is_model(name: str) -> bool:
    """Whether ``name`` builds a model: registered, or another library's."""
    try:
        check_model(name)
    except ValueError:
        return False
    return True


def takes(name: str, argument: str) -> bool:
    """Whether model ``name``'s builder takes ``argument`` (a GUNN knob, ``memory``, ``num_classes``...)."""
    builder = _builder(name)
    if isinstance(builder, functools.partial):  # another library's: the data's arguments only
        return argument in DATA_ARGUMENTS
    parameters = inspect.signature(builder).parameters
    return argument in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def default_cfg(name: str) -> ModelDefaults | None:
    """The default configuration registered with model ``name`` (None if it has none)."""
    _builder(name)
    return _DEFAULTS.get(name)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds model ``name``; keyword arguments that are None are dropped.

    Dropping None lets a command line pass every option it has without overriding a
    model's defaults with unset values. A GUNN knob (``mode``, ``segments``, ..., ``memory``) given to a
    model that does not take it is a ValueError naming both: it would otherwise be ignored, or fail
    inside the builder.
    """
    builder = _builder(name)
    kwargs = {key: value for key, value in kwargs.items() if value is not None}
    for key in kwargs:
        if key in GUNN_ARGUMENTS and not takes(name, key):
            raise ValueError(f"{name} has no setting {key!r} (model.{key}={kwargs[key]}): only GUNN models take "
                             f"{', '.join(GUNN_ARGUMENTS)}; leave model.{key} unset")
    kwargs = {key: value for key, value in kwargs.items() if key not in DATA_ARGUMENTS or takes(name, key)}
    model = builder(**kwargs)
    if name in _DEFAULTS and isinstance(model, nn.Module):
        model.default_cfg = _DEFAULTS[name]
    return model


class InputChannels(nn.Sequential):
    """A network for 3-channel images fed ``in_chans`` channels: a learned 1x1 convolution maps them to 3."""

    def __init__(self, in_chans: int, network: nn.Module) -> None:
        super().__init__(nn.Conv2d(in_chans, 3, kernel_size=1), network)


def _torchvision(model: str, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    from torchvision import models

    network = models.get_model(model, weights=None, num_classes=num_classes)
    return network if in_chans == 3 else InputChannels(in_chans, network)


def _timm(model: str, num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    import timm

    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_chans)
