"""The run configuration: presets, overrides, and errors that name the field and the value."""

from __future__ import annotations

import re

import pytest

from gunn import config
from gunn.config import ConfigError


def test_every_preset_loads_and_the_paper_presets_exist():
    presets = config.list_presets()
    for name in ["digits", "gunn15-cifar10", "gunn15-cifar100", "sunn15-cifar10", "gunn24-cifar10",
                 "gunn18-imagenet", "wide-gunn18-imagenet"]:
        assert name in presets
    for name in presets:
        assert config.load(name).name == name


def test_a_misspelt_preset_gets_the_closest_name():
    with pytest.raises(ConfigError, match="no preset or configuration file 'digit'; did you mean 'digits'\\? presets: "):
        config.load("digit")


def test_the_cifar_presets_follow_the_papers_recipe():
    c = config.load("gunn15-cifar10")
    assert (c.model.name, c.data.name, c.optim.epochs, c.optim.batch_size, c.optim.lr) == ("gunn15", "cifar10", 300, 64, 0.1)
    assert (c.optim.momentum, c.optim.nesterov, c.optim.weight_decay, c.optim.lr_steps) == (0.9, True, 1e-4, [0.5, 0.75])
    i = config.load("gunn18-imagenet")
    assert (i.optim.batch_size, i.optim.epochs) == (256, 90)
    assert [round(f * 90) for f in i.optim.lr_steps] == [30, 60]


def test_the_default_is_the_digits_demo():
    assert config.load().name == "digits" and config.load().data.name == "digits"


def test_overrides_are_read_as_yaml_values():
    c = config.load("digits", ["optim.lr=0.05", "model.segments=[2, 2, 2]", "runtime.amp=bf16", "model.mode=sunn",
                               "logging.tracking_uri=http://127.0.0.1:5000"])
    assert (c.optim.lr, c.model.segments, c.runtime.amp, c.model.mode) == (0.05, [2, 2, 2], "bf16", "sunn")
    assert c.logging.tracking_uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", r"unknown field optim.lrr \(did you mean optim.lr\?\)"),
        ("optimizer.lr=1", r"unknown field optimizer"),
        ("optim.lr=-0.1", r"optim.lr must be >= 0.0, got -0.1"),
        ("optim.epochs=2.5", r"optim.epochs must be an integer, got 2.5"),
        ("optim.epochs=0", r"optim.epochs must be >= 1, got 0"),
        ("optim.momentum=2", r"optim.momentum must be <= 1.0, got 2.0"),
        ("model.mode=parallel", r"model.mode must be one of 'gunn', 'sunn', got 'parallel'"),
        ("data.name=mnist", r"data.name must be one of .*got 'mnist'"),
        ("runtime.channels_last=maybe", r"runtime.channels_last must be true or false, got 'maybe'"),
        ("model.segments=[2, x]", r"model.segments\[1\] must be an integer, got 'x'"),
        ("optim=3", r"optim must be a mapping, got 3"),
        ("lr", r"must look like section.field=value"),
        ("dist.timeout_s=0", r"dist.timeout_s must be >= 1.0, got 0.0"),
    ],
)
def test_bad_values_are_errors_naming_the_field_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load("digits", [override])


def test_an_unknown_preset_or_missing_file_lists_the_presets():
    with pytest.raises(ConfigError, match="no preset or configuration file 'gunn99'; presets: digits"):
        config.load("gunn99")


def test_a_yaml_file_is_a_configuration(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\nmodel: {name: gunn15}\noptim: {epochs: 5}\n")
    c = config.load(path, ["optim.batch_size=32"])
    assert (c.name, c.model.name, c.optim.epochs, c.optim.batch_size) == ("mine", "gunn15", 5, 32)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: {name: [\n")
    with pytest.raises(ConfigError, match="broken.yaml is not valid YAML"):
        config.load(path)


def test_dump_and_load_give_the_same_configuration(tmp_path):
    c = config.load("gunn15-cifar100", ["model.segments=[10, 10, 10]", "optim.epochs=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config.dump(c))
    assert config.load(path) == c


def test_flatten_gives_one_key_per_field():
    flat = config.flatten(config.load("digits"))
    assert flat["optim.lr"] == 0.1 and flat["model.name"] == "gunn_tiny" and "logging.experiment" in flat
    assert not any(isinstance(v, dict) for v in flat.values())


def test_help_lists_every_field_with_its_meaning():
    text = config.help_text()
    assert "optim.lr_steps" in text and "fractions of the epochs" in text and "data.root" in text


def test_the_field_list_has_aligned_columns_and_says_its_defaults_are_the_schemas():
    text = config.help_text()
    head, rows = text.split("\n  FIELD", 1)
    assert "schema" in head and "preset" in head and "--print-config" in head
    header, *rows = ("  FIELD" + rows).splitlines()
    default, meaning = header.index("DEFAULT"), header.index("MEANING")
    assert len(rows) == len(config.flatten(config.RunConfig()))
    for row in rows:
        assert row[default - 2 : default] == "  " and row[default] != " ", row  # every default starts in its column
        assert row[meaning - 2 : meaning] == "  " and row[meaning] != " ", row  # every meaning too
        assert row[2:default].strip() in config.flatten(config.RunConfig())
    assert re.search(r"^  optim\.lr_steps +\[0\.5, 0\.75\] +step: fractions", text, re.M)
    assert re.search(r"^  model\.mode +null +update order.*null: the model's", text, re.M)


@pytest.mark.parametrize("preset, mode, segments, expansion", [
    ("digits", "gunn", [4, 4, 4], 2), ("gunn24-cifar10", "gunn", [20, 25, 30], 3),
    ("sunn15-cifar10", "sunn", [20, 25, 30], 2), ("gunn18-imagenet", "gunn", [10, 20, 40, 50], 2),
])
def test_resolve_records_the_values_the_model_uses(preset, mode, segments, expansion):
    loaded = config.load(preset)
    assert (loaded.model.mode, loaded.model.segments, loaded.model.residual, loaded.model.expansion) == (None,) * 4
    resolved = config.resolve(loaded)
    m = resolved.model
    assert (m.mode, m.segments, m.residual, m.expansion) == (mode, segments, True, expansion)
    assert loaded.model.mode is None  # a copy: the configuration given is left as it was
    assert config.resolve(resolved) == resolved
    flat = config.flatten(resolved)
    assert (flat["model.mode"], flat["model.segments"]) == (mode, segments)


def test_resolve_keeps_the_values_a_run_sets_and_refuses_a_model_that_cannot_be_built():
    c = config.resolve(config.load("digits", ["model.mode=sunn", "model.segments=[2, 4, 8]", "model.residual=false"]))
    assert (c.model.mode, c.model.segments, c.model.residual, c.model.expansion) == ("sunn", [2, 4, 8], False, 2)
    with pytest.raises(ConfigError, match="model: segments"):
        config.resolve(config.load("digits", ["model.segments=[5, 5, 5]"]))


@pytest.mark.parametrize("written, value", [("1e-3", 1e-3), ("1E-3", 1e-3), ("5e2", 500.0), ("-2e-1", -0.2),
                                            ("1_000.5", 1000.5), (".5", 0.5), ("3", 3.0)])
def test_every_number_a_user_writes_is_read_as_a_number(written, value, tmp_path):
    # YAML 1.1 reads 1e-3 (an exponent without a dot) as a string; users write it all the time.
    assert config.load("digits", [f"optim.weight_decay={written.lstrip('-')}"]).optim.weight_decay == abs(value)
    assert config.load("digits", [f"optim.lr_steps=[{written.lstrip('-')}]"]).optim.lr_steps == [abs(value)]
    path = tmp_path / "run.yaml"
    path.write_text(f"optim:\n  lr: {written.lstrip('-')}\n")
    assert config.load(str(path)).optim.lr == abs(value)


@pytest.mark.parametrize("written", [".inf", ".nan", "-.inf", ".NaN", "1e999"])
def test_non_finite_numbers_are_refused(written):
    with pytest.raises(ConfigError, match=r"optim\.lr must be a finite number"):
        config.load("digits", [f"optim.lr={written}"])
    with pytest.raises(ConfigError, match=r"optim\.lr_steps\[0\] must be a finite number"):
        config.load("digits", [f"optim.lr_steps=[{written}]"])


def test_the_model_section_has_every_model_knob_and_resolve_fills_depth():
    from gunn.models import MODEL_KNOBS, default_cfg

    assert {f"model.{knob}" for knob in MODEL_KNOBS} <= set(config.flatten(config.RunConfig()))
    for preset in ("digits", "gunn24-cifar10"):
        loaded = config.load(preset)
        assert loaded.model.depth is None
        resolved = config.resolve(loaded)
        assert config.model_knobs(resolved.model) == default_cfg(loaded.model.name).knobs()


def test_model_depth_2_builds_a_deeper_model():
    import torch

    from gunn.models import create_model

    def size(overrides):
        c = config.resolve(config.load("digits", overrides))
        with torch.device("meta"):
            model = create_model(c.model.name, **config.model_knobs(c.model))
        return c.model.depth, sum(p.numel() for p in model.parameters())

    (one, small), (two, large) = size([]), size(["model.depth=2"])
    assert (one, two) == (1, 2) and large > small
    with pytest.raises(ConfigError, match="model.depth must be >= 1"):
        config.load("digits", ["model.depth=0"])


def test_flatten_flattens_plain_mappings_too():
    assert config.flatten({"a": {"b": 1, "c": {"d": [2]}}, "e": None}) == {"a.b": 1, "a.c.d": [2], "e": None}
