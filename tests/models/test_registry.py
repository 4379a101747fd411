"""The model registry: the one way models are found by name."""

from __future__ import annotations

import pytest
from torch import nn

from gunn.models import create_model, list_models, register_model


def test_a_registered_builder_is_found_by_name_and_receives_keyword_arguments():
    @register_model
    def tiny_test_model(width: int = 2) -> nn.Module:
        return nn.Linear(width, width)

    assert "tiny_test_model" in list_models("tiny_*")
    assert create_model("tiny_test_model", width=3, unused=None).in_features == 3


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'gunn15' is already registered"):
        register_model(type("gunn15", (), {"__name__": "gunn15"}))
