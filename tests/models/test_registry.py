"""The model registry: the one way models are found by name."""

from __future__ import annotations

import pytest
from torch import nn

from gunn.models import MODEL_KNOBS, create_model, default_cfg, list_models, register_model


def test_a_registered_builder_is_found_by_name_and_receives_keyword_arguments():
    @register_model
    def tiny_test_model(width: int = 2) -> nn.Module:
        return nn.Linear(width, width)

    assert "tiny_test_model" in list_models("tiny_*")
    assert create_model("tiny_test_model", width=3, unused=None).in_features == 3


def test_registering_a_name_twice_is_an_error():
    with pytest.raises(ValueError, match="'gunn15' is already registered"):
        register_model(type("gunn15", (), {"__name__": "gunn15"}))


@pytest.mark.parametrize("name", [n for n in list_models() if default_cfg(n) is not None])
def test_each_models_default_configuration_is_what_its_builder_builds(name):
    import torch

    from gunn.layers import GunnLayer

    cfg = default_cfg(name)
    with torch.device("meta"):
        model = create_model(name)
        out = model(torch.empty(2, *cfg.input_size))
    assert model.default_cfg is cfg
    layers = [m for m in model.modules() if isinstance(m, GunnLayer)]
    assert tuple(m.channels for m in layers) == cfg.widths
    assert tuple(m.segments for m in layers) == cfg.segments
    assert {(m.expansion, m.depth, m.mode, m.residual) for m in layers} == {
        (cfg.expansion, cfg.depth, cfg.mode, cfg.residual)}
    assert next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels == cfg.input_size[0]
    assert out.shape == (2, cfg.num_classes) and model.num_classes == cfg.num_classes
    assert len(cfg.mean) == len(cfg.std) == cfg.input_size[0]
    assert tuple(cfg.knobs()) == MODEL_KNOBS and cfg.knobs()["segments"] == list(cfg.segments)


def test_every_registered_paper_model_has_a_default_configuration_and_its_recipe_is_a_preset():
    from gunn.config import list_presets

    for name in list_models():
        if name.startswith(("gunn", "sunn", "wide_")):
            cfg = default_cfg(name)
            assert cfg is not None, name
            assert cfg.recipe is None or cfg.recipe in list_presets(), (name, cfg.recipe)
    assert default_cfg("gunn18").input_size == (3, 224, 224) and default_cfg("gunn15").input_size == (3, 32, 32)
    assert default_cfg("gunn15").recipe == "gunn15-cifar10" and default_cfg("sunn15").mode == "sunn"


def test_a_model_registered_without_defaults_has_none_and_an_unknown_name_is_an_error():
    @register_model
    def tiny_test_model_without_defaults() -> nn.Module:
        return nn.Identity()

    assert default_cfg("tiny_test_model_without_defaults") is None
    assert not hasattr(create_model("tiny_test_model_without_defaults"), "default_cfg")
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        default_cfg("no_such_model")
