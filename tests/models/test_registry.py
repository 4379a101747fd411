"""The model registry: the one way models are found by name."""

from __future__ import annotations

import importlib.util

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


@pytest.mark.slow
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


def test_another_librarys_model_is_built_by_name_and_takes_the_datas_channels_and_classes():
    import torch

    from gunn.models import is_model, takes
    from gunn.models.registry import InputChannels

    model = create_model("torchvision.resnet18", num_classes=7, in_chans=3)
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 7
    grey = create_model("torchvision.resnet18", num_classes=7, in_chans=1)  # digits: one channel, mapped to 3
    assert isinstance(grey, InputChannels) and grey(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert is_model("torchvision.resnext50_32x4d") and not is_model("torchvision.resnt18")
    assert not takes("torchvision.resnet18", "memory") and takes("gunn15", "memory")


@pytest.mark.parametrize("name,message", [
    ("torchvision.resnt18", r"unknown model 'torchvision.resnt18': torchvision has no classification model 'resnt18' "
                            r"\(did you mean torchvision.resnet18"),
    ("torchvision.", r"unknown model 'torchvision.'"),
    ("tourchvision.resnet18", r"unknown model 'tourchvision.resnet18'.*torchvision.NAME"),
])
def test_an_unknown_model_of_another_library_is_a_clear_error(name, message):
    with pytest.raises(ValueError, match=message):
        create_model(name)


def test_a_gunn_setting_given_to_a_model_without_it_names_the_model_and_the_setting():
    @register_model
    def plain_mlp(num_classes: int = 10, in_chans: int = 3) -> nn.Module:  # no GUNN knob, no memory
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert isinstance(create_model("plain_mlp", num_classes=4, in_chans=1, mode=None, memory=None), nn.Sequential)
    for name in ("plain_mlp", "torchvision.resnet18"):
        with pytest.raises(ValueError, match=rf"{name} has no setting 'segments' \(model.segments=\[2, 2\]\): only "
                                             "GUNN models take mode, residual, segments, expansion, depth, memory"):
            create_model(name, segments=[2, 2])


def test_timm_models_need_timm():
    if importlib.util.find_spec("timm") is not None:
        assert create_model("timm.resnet18", num_classes=3, in_chans=1).num_classes == 3
    else:
        with pytest.raises(ValueError, match=r"model 'timm.resnet18' needs timm: pip install timm"):
            create_model("timm.resnet18")
