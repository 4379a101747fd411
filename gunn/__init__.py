"""Gradually Updated Neural Networks (Qiao et al., ICML 2018): layers, models, training.

The public names below are imported when first used, so that ``import gunn`` (every command's first
step) does not import torch: a command can take Ctrl-C quietly while torch loads (gunn.cluster.commands).
For the same reason the paper's models join timm's registry (gunn.models.timm_models) only when timm
itself is imported: at once if it already is, else right after its module has run (``_TimmHook``).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

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


def _register_with_timm() -> None:
    """Adds the models to timm's registry; a failure is a warning, never a failed ``import timm``."""
    try:
        importlib.import_module("gunn.models.timm_models").register()
    except Exception as error:  # whatever it is: timm itself must stay importable
        warnings.warn(f"gunn: the GUNN models could not be added to timm's registry: {error!r}", stacklevel=2)


class _TimmHook:
    """A meta path finder that finds nothing: when ``timm`` is imported, it has timm's own loader register the
    models after timm's module has run. (Not an ``importlib.abc.MetaPathFinder``: importing that costs 20 ms.)"""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None, target: Any = None) -> ModuleSpec | None:
        if fullname != "timm":
            return None
        for finder in sys.meta_path:  # the spec any other finder gives
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is not None and hasattr(loader, "exec_module"):
            run = loader.exec_module

            def exec_module(module: Any) -> None:
                run(module)
                if self in sys.meta_path:
                    sys.meta_path.remove(self)
                _register_with_timm()

            loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    _register_with_timm()
elif not any(type(finder).__qualname__ == "_TimmHook" for finder in sys.meta_path):  # gunn imported anew
    sys.meta_path.insert(0, _TimmHook())
