"""The paper's models inside timm (gunn.models.timm_models): found, built and trained as timm's own."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gunn
from gunn.layers import GunnLayer
from gunn.models import create_model, default_cfg

timm = pytest.importorskip("timm")
from timm.data import resolve_data_config  # noqa: E402

from gunn.models import timm_models  # noqa: E402

CIFAR = ["gunn15", "sunn15", "gunn24", "sunn24"]
IMAGENET = ["gunn18", "sunn18", "wide_gunn18", "wide_sunn18"]
# What timm's data pipeline, weight loading and optimiser grouping read from a model's pretrained_cfg.
TIMM_KEYS = {"input_size", "mean", "std", "num_classes", "crop_pct", "interpolation", "first_conv", "classifier"}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_timm_lists_the_eight_models_and_none_as_pretrained():
    assert timm.list_models("*gunn*") == ["gunn15", "gunn18", "gunn24", "wide_gunn18"]
    assert timm.list_models("*sunn*") == ["sunn15", "sunn18", "sunn24", "wide_sunn18"]
    assert timm.list_models("*gunn*", include_tags=True) == [
        "gunn15.untrained", "gunn18.untrained", "gunn24.untrained", "wide_gunn18.untrained"]
    assert timm.list_pretrained("*unn*") == []


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR + IMAGENET)
def test_pretrained_cfg_has_the_keys_timm_reads_from_the_models_defaults(name):
    model = timm.create_model(name, device="meta")
    cfg, defaults = model.pretrained_cfg, default_cfg(name)
    assert TIMM_KEYS <= cfg.keys() and model.default_cfg is cfg
    assert (cfg["input_size"], cfg["mean"], cfg["std"], cfg["num_classes"]) == (
        defaults.input_size, defaults.mean, defaults.std, defaults.num_classes)
    assert (cfg["crop_pct"], cfg["interpolation"]) == ((1.0 if name in CIFAR else 0.875), "bilinear")
    assert (cfg["architecture"], cfg["tag"]) == (name, "untrained")
    first_conv = model.get_submodule(cfg["first_conv"])
    assert isinstance(first_conv, nn.Conv2d) and first_conv.in_channels == defaults.input_size[0]
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    assert model.num_classes == model.get_classifier().out_features == defaults.num_classes


@pytest.mark.parametrize("name", ["gunn15", "gunn18"])
def test_timms_data_config_is_the_models_input_and_normalisation(name):
    config = resolve_data_config({}, model=timm.create_model(name, device="meta"))
    defaults = default_cfg(name)
    assert (config["input_size"], config["mean"], config["std"]) == (defaults.input_size, defaults.mean, defaults.std)


def test_gunn15_for_cifar100_has_the_papers_parameter_count_and_gunns_state_dict_keys():
    model = timm.create_model("gunn15", num_classes=100)
    assert count(model) == 1_618_236
    assert list(model.state_dict()) == list(create_model("gunn15", num_classes=100).state_dict())


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_train_at_their_default_input_size(name):
    model = timm.create_model(name)
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    features = model.forward_features(x)
    assert features.shape == (2, model.num_features, *model.pretrained_cfg["pool_size"])
    out = model.forward_head(features)
    assert out.shape == (2, model.num_classes)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_run_forward_and_backward_at_their_default_input_size(name):
    with torch.device("meta"):  # shapes only: a CPU step at 224x224 would take seconds per model
        model = timm.create_model(name)
        features = model.forward_features(torch.empty(2, *model.pretrained_cfg["input_size"]))
    assert features.shape == (2, model.num_features, *model.pretrained_cfg["pool_size"])
    out = model.forward_head(features)
    assert out.shape == (2, 1000)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_forward_head_of_forward_features_is_forward_and_pre_logits_are_the_pooled_features():
    model = timm.create_model("gunn15").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.equal(model.forward_head(features), model(x))
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)


@pytest.mark.slow
def test_reset_classifier_gives_a_new_initialised_classifier_or_none():
    model = timm.create_model("gunn15")
    model.reset_classifier(5)
    assert model.num_classes == 5 and model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.get_classifier().in_features == model.num_features and torch.all(model.fc.bias == 0)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(5, global_pool="max")


@pytest.mark.slow
def test_num_classes_0_builds_the_network_without_classifier():
    model = timm.create_model("gunn15", num_classes=0)
    assert model.num_classes == 0 and model(torch.randn(2, 3, 32, 32)).shape == (2, 360)


def test_gunn_knobs_and_input_channels_reach_the_network():
    model = timm.create_model("gunn15", mode="sunn", segments=10, in_chans=1, drop_rate=0.0, global_pool="avg")
    assert {(m.mode, m.segments) for m in model.modules() if isinstance(m, GunnLayer)} == {("sunn", 10)}
    assert model.in_chans == 1 and model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 1


@pytest.mark.parametrize("option,message", [
    (dict(drop_path_rate=0.1), r"unknown option\(s\) \['drop_path_rate'\] for timm model 'gunn15'; options: "),
    (dict(features_only=True), r"unknown option\(s\) \['features_only'\]"),
    (dict(drop_rate=0.2), r"gunn15 takes only drop_rate=0.0 \(GUNN has no other\), got drop_rate=0.2"),
    (dict(global_pool="max"), r"gunn15 takes only global_pool='avg'"),
])
def test_options_gunn_does_not_have_are_errors(option, message):
    with pytest.raises(ValueError, match=message):
        timm.create_model("gunn15", **option)


def test_pretrained_is_an_error_as_there_are_no_weights():
    with pytest.raises(RuntimeError, match=r"no pretrained weights exist for wide_gunn18 .* use pretrained=False"):
        timm.create_model("wide_gunn18", pretrained=True)


def test_pretrained_loads_ones_own_checkpoint_named_by_the_cfg_overlay(tmp_path):
    trained = timm.create_model("gunn15")
    torch.save(trained.state_dict(), tmp_path / "gunn15.pth")
    model = timm.create_model("gunn15", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "gunn15.pth")))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))


def test_registering_again_changes_nothing():
    entrypoint = timm.models.model_entrypoint("gunn15")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # timm warns when a name is registered over
        timm_models.register()
    assert timm.models.model_entrypoint("gunn15") is entrypoint


def test_a_failing_registration_is_a_warning_and_timm_still_imports(monkeypatch):
    # The hook as `import timm` meets it: it runs timm's module (again, into a new module object) then registers.
    hook = gunn._TimmHook()
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    monkeypatch.setattr(timm_models, "register", lambda: 1 / 0)
    spec = hook.find_spec("timm")
    module = importlib.util.module_from_spec(spec)
    with pytest.warns(UserWarning, match=r"could not be added to timm's registry: ZeroDivisionError"):
        spec.loader.exec_module(module)
    assert module.create_model is timm.create_model and hook not in sys.meta_path


# -- import order (new interpreters: this one has imported both) -------------------------------------------------

REGISTERED = "print(*timm.list_models('*unn*'), type(timm.create_model('gunn15')).__name__)"


@pytest.fixture(scope="module")
def import_orders() -> dict[str, subprocess.Popen]:
    """Both orders at once, in new interpreters (each takes seconds to import torch and timm)."""
    orders = {"timm first": "import timm, gunn; " + REGISTERED, "gunn first": "import gunn, timm; " + REGISTERED}
    return {order: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for order, code in orders.items()}


@pytest.mark.slow
@pytest.mark.parametrize("order", ["timm first", "gunn first"])
def test_importing_gunn_and_timm_in_either_order_registers_the_models(import_orders, order):
    stdout, stderr = import_orders[order].communicate(timeout=120)
    assert import_orders[order].returncode == 0, stderr
    assert stdout.split() == sorted(CIFAR + IMAGENET) + ["GunnNet"]
    assert "registry" not in stderr  # no warning


def test_importing_gunn_imports_neither_torch_nor_timm():
    code = "import gunn, sys; print('torch' in sys.modules, 'timm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == [
        "False", "False"]
