"""The paper's GUNN and SUNN networks, found by name through the registry."""

from gunn.models import gunn as _gunn  # noqa: F401  (registers the builders)
from gunn.models.gunn import OVERRIDES, GunnNet
from gunn.models.registry import create_model, list_models, register_model

__all__ = ["GunnNet", "OVERRIDES", "create_model", "list_models", "register_model"]
