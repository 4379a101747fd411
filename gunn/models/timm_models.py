"""The paper's eight networks in timm's registry: ``timm.create_model("gunn18")``, ``timm.list_models("*gunn*")``.

``register()`` adds them, each with a ``pretrained_cfg`` made from its ``ModelDefaults``; ``import gunn``
calls it once timm is imported (gunn/__init__.py). GUNN has no published weights: ``pretrained=True``
is an error unless the configuration names a checkpoint of one's own (timm's
``pretrained_cfg_overlay=dict(file=PATH)``).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import torch
from timm.models import (build_model_with_cfg, generate_default_cfgs, is_model, model_entrypoint, register_model,
                         resolve_pretrained_cfg)

# The submodules, not the package: timm may be imported while gunn.models itself is being imported.
from gunn.models import gunn as gunn_builders
from gunn.models.gunn import OVERRIDES, GunnNet
from gunn.models.registry import ModelDefaults, create_model, default_cfg

NAMES = ("gunn15", "sunn15", "gunn24", "sunn24", "gunn18", "sunn18", "wide_gunn18", "wide_sunn18")
# timm's register_model lists each entrypoint in its module's __all__.
__all__ = ["NAMES", "register", *NAMES]

# What timm hands every entrypoint besides the architecture; they go to build_model_with_cfg.
_TIMM_ARGUMENTS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")
# timm options GUNN has in one setting only, accepted at that value: timm's train.py always passes drop_rate.
_FIXED = {"drop_rate": 0.0, "global_pool": "avg"}
_OPTIONS = (*OVERRIDES, *_FIXED, "device", "dtype")


def _cfg(cfg: ModelDefaults) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a model with defaults ``cfg``: its input, normalisation and evaluation crop."""
    _, height, width = cfg.input_size
    imagenet = height > 32  # the ImageNet stem (conv7x7/2, maxpool/2: gunn.py) quarters the size
    halvings = (2 if imagenet else 0) + len(cfg.widths) - 1  # and an average pooling between GUNN layers
    return dict(
        input_size=cfg.input_size, mean=cfg.mean, std=cfg.std, num_classes=cfg.num_classes,
        pool_size=(height >> halvings, width >> halvings),
        # gunn.data: ImageNet's shorter side resized (bilinear) to 256, centre crop 224; CIFAR's images as they are.
        crop_pct=0.875 if imagenet else 1.0, interpolation="bilinear",
        first_conv="stem.0.0" if imagenet else "stem.0", classifier="fc", license="mit",
        paper_name="Gradually Updated Neural Networks for Large-Scale Image Recognition (ICML 2018)",
    )


# Read by timm's register_model from the entrypoints' module; untrained: no weights (timm's convention).
default_cfgs = generate_default_cfgs({f"{name}.untrained": _cfg(default_cfg(name)) for name in NAMES})


def register() -> None:
    """Registers the eight models in timm's registry; those already there are left as they are."""
    for name in NAMES:
        if not (is_model(name) and model_entrypoint(name).__module__ == __name__):
            register_model(globals()[name])


def _network(variant: str, num_classes: int, device: Any = None, dtype: torch.dtype | None = None,
             **overrides: Any) -> GunnNet:
    """The network; ``num_classes=0``: without classifier (timm's convention; gunn's create_model refuses 0)."""
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = create_model(variant, num_classes=num_classes or None, **overrides)
    if num_classes == 0:
        model.reset_classifier(0)
    return model if dtype is None else model.to(dtype)


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> GunnNet:
    """Model ``variant`` built as timm builds its own (``build_model_with_cfg``)."""
    unknown = sorted(set(kwargs) - {*_OPTIONS, *_TIMM_ARGUMENTS})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for timm model {variant!r}; options: {', '.join(_OPTIONS)}")
    for key, value in _FIXED.items():
        given = kwargs.pop(key, value)
        if given != value:
            raise ValueError(f"{variant} takes only {key}={value!r} (GUNN has no other), got {key}={given!r}")
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
        if not (cfg.has_weights or cfg.state_dict):
            raise RuntimeError(f"no pretrained weights exist for {variant} (none are published for GUNN): use "
                               "pretrained=False, or pretrained_cfg_overlay=dict(file=PATH) for a checkpoint of your own")
    return build_model_with_cfg(functools.partial(_network, variant), variant, pretrained, **kwargs)


def _entrypoint(name: str) -> Callable[..., GunnNet]:
    """timm's entrypoint of model ``name``: a function named as the model, pretrained first, the rest for the
    network, documented as gunn's builder."""
    def entrypoint(pretrained: bool = False, **kwargs: Any) -> GunnNet:
        return _create(name, pretrained, kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__  # timm groups models by it, and reads default_cfgs from it
    entrypoint.__doc__ = getattr(gunn_builders, name).__doc__
    return entrypoint


globals().update({name: _entrypoint(name) for name in NAMES})
