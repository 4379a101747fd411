"""The paper's GUNN and SUNN networks and the networks it compares them with, found by name through the registry."""

from gunn.models import gunn as _gunn  # noqa: F401  (registers the builders)
from gunn.models import peers as _peers  # noqa: F401  (registers the comparison networks)
from gunn.models.gunn import OVERRIDES, GunnNet
from gunn.models.registry import (MODEL_KNOBS, ModelDefaults, create_model, default_cfg, is_model, list_models,
                                  register_model, takes)

__all__ = ["GunnNet", "MODEL_KNOBS", "ModelDefaults", "OVERRIDES", "create_model", "default_cfg", "is_model",
           "list_models", "register_model", "takes"]
