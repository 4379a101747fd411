"""The paper's networks (docs/layer.md, "The models"): structure, parameter counts, initialisation, modes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gunn.bench.measure import activation_bytes, flops
from gunn.layers import GunnLayer, set_mode
from gunn.models import create_model, list_models
from tests.reference import DEVICE

PARAMETERS = [
    ("gunn15", 10, 1_585_746),
    ("gunn15", 100, 1_618_236),
    ("gunn24", 10, 29_534_106),
    ("gunn24", 100, 29_631_396),
    ("gunn18", 1000, 28_909_736),
    ("wide_gunn18", 1000, 45_624_936),
]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name,classes,expected", PARAMETERS)
def test_parameter_counts_are_exactly_the_papers(name, classes, expected):
    assert count(create_model(name, num_classes=classes)) == expected


@pytest.mark.slow
@pytest.mark.parametrize("name,classes,expected", PARAMETERS)
def test_sunn_twins_have_the_same_parameters(name, classes, expected):
    assert count(create_model(name.replace("gunn", "sunn"), num_classes=classes)) == expected


def gunn_layers(model: nn.Module) -> list[GunnLayer]:
    return [m for m in model.modules() if isinstance(m, GunnLayer)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,size,layers",
    [
        ("gunn15", 32, [(240, 20, 32), (300, 25, 16), (360, 30, 8)]),
        ("gunn18", 224, [(400, 10, 56), (800, 20, 28), (1600, 40, 14), (2000, 50, 7)]),
    ],
)
def test_gunn_layers_have_the_specified_widths_segments_and_resolutions(name, size, layers):
    model = create_model(name).to(DEVICE).eval()
    seen = []
    for layer in gunn_layers(model):
        layer.register_forward_pre_hook(lambda m, inp: seen.append((m.channels, m.segments, inp[0].shape[-1])))
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size, device=DEVICE))
    assert seen == layers
    assert out.shape == (1, model.num_classes)


def test_wide_gunn18_and_gunn24_layers_follow_the_spec():
    assert [(l.channels, l.segments) for l in gunn_layers(create_model("wide_gunn18"))] == [
        (1200, 30), (1600, 40), (2000, 50), (2000, 50)]
    gunn24 = gunn_layers(create_model("gunn24"))
    assert [(l.channels, l.segments, l.expansion, l.depth, l.projection) for l in gunn24] == [
        (720, 20, 3, 2, True), (900, 25, 3, 2, True), (1080, 30, 3, 2, True)]


def test_sunn_models_are_the_gunn_network_in_simultaneous_mode():
    assert {l.mode for l in gunn_layers(create_model("sunn15"))} == {"sunn"}
    assert {l.mode for l in gunn_layers(create_model("gunn15"))} == {"gunn"}


def test_list_models_names_every_model_and_filters_by_pattern():
    paper = ["gunn15", "gunn24", "gunn18", "wide_gunn18", "sunn15", "sunn24", "sunn18", "wide_sunn18"]
    assert set(paper + ["gunn_tiny", "sunn_tiny"]) <= set(list_models())
    assert list_models("sunn1*") == ["sunn15", "sunn18"]


def test_an_unknown_model_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model 'gunn16' \(did you mean gunn18, gunn15, sunn18\?\); "
                                         "available models: densenet264, densenet_bc190, gunn15, gunn18"):
        create_model("gunn16")


def test_an_unknown_override_lists_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['width'\] for model 'gunn15'; options: num_classes"):
        create_model("gunn15", width=2)


def test_none_overrides_are_ignored():
    assert create_model("gunn15", num_classes=None, mode=None).num_classes == 10


def test_segment_override_sets_each_gunn_layer():
    model = create_model("gunn15", segments=(10, 10, 10))
    assert [l.segments for l in gunn_layers(model)] == [10, 10, 10]
    assert [l.segments for l in gunn_layers(create_model("gunn15", segments=60))] == [60, 60, 60]


@pytest.mark.parametrize(
    "segments,message",
    [((10, 10), "one segment count per GUNN layer \\(3 on this model\\)"),
     ((10, 7, 10), "segments\\[1\\] must be a positive divisor of that GUNN layer's width 300"),
     ("10", "segments must be an int or a sequence of ints")],
)
def test_bad_segment_overrides_are_errors_naming_segments(segments, message):
    with pytest.raises(ValueError, match=message):
        create_model("gunn15", segments=segments)


def test_mode_residual_expansion_and_memory_overrides_reach_every_layer():
    model = create_model("gunn15", mode="sunn", residual=False, expansion=3, memory="recompute")
    assert {(l.mode, l.residual, l.expansion, l.memory) for l in gunn_layers(model)} == {("sunn", False, 3, "recompute")}


def test_bad_class_count_is_an_error():
    with pytest.raises(ValueError, match="num_classes must be a positive integer, got 0"):
        create_model("gunn15", num_classes=0)


def test_initialisation_is_resnets():
    torch.manual_seed(0)
    model = create_model("gunn15")
    transition = model.stages[1].transition[0]  # conv1x1 240 -> 300: 72,000 weights
    assert transition.weight.std().item() == pytest.approx(math.sqrt(2 / 300), rel=0.02)
    conv3x3 = model.stages[0].gunn.units[0].blocks[0].conv2
    expected = math.sqrt(2 / (9 * conv3x3.out_channels))
    assert torch.cat([u.blocks[0].conv2.weight.flatten() for u in model.stages[0].gunn.units]).std().item() == \
        pytest.approx(expected, rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.slow
def test_a_state_dict_saved_in_one_mode_loads_in_the_other():
    torch.manual_seed(0)
    gunn = create_model("gunn15").to(DEVICE).eval()
    sunn = create_model("sunn15").to(DEVICE).eval()
    sunn.load_state_dict(gunn.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(sunn(x), set_mode(gunn, "sunn")(x), atol=0, rtol=0)
        gunn_out = set_mode(gunn, "gunn")(x)
    assert not torch.allclose(gunn_out, sunn(x))


@pytest.mark.slow
def test_gunn_and_sunn_have_the_same_flops():
    x = torch.randn(1, 3, 32, 32)
    model = create_model("gunn15")
    assert flops(model, x) == flops(set_mode(model, "sunn"), x) > 0


@pytest.mark.slow
def test_gunn15_exports_with_torch_export():
    model = create_model("gunn15").to(DEVICE).eval()
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_whole_gunn15_keeps_about_the_activation_memory_of_sunn15():
    torch.manual_seed(0)
    model = create_model("gunn15").to(DEVICE)
    x = torch.randn(32, 3, 32, 32, device=DEVICE)
    gunn = activation_bytes(model, x)
    sunn = activation_bytes(set_mode(model, "sunn"), x)
    assert gunn <= 1.15 * sunn


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_gunn_layer_of_a_model_trains_on_the_fast_path_under_bf16_autocast(channels_last):
    # As the ImageNet recipes train (runtime.amp=bf16): the layers then get bf16 inputs.
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = create_model("gunn_tiny").to(DEVICE, memory_format=layout)
    backward_kinds = []
    for layer in gunn_layers(model):
        layer.register_forward_hook(lambda m, inp, out: backward_kinds.append(type(out.grad_fn).__name__))
    x = torch.randn(4, 3, 16, 16, device=DEVICE).to(memory_format=layout)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x).float(), torch.arange(4, device=DEVICE))
    loss.backward()
    assert backward_kinds == ["_GradualBottlenecksBackward"] * 3
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name,precision", [("gunn_tiny", "fp32"), ("gunn_tiny", "bf16"), ("sunn_tiny", "bf16")])
def test_a_training_step_traces_into_one_graph_for_torch_compile(name, precision):
    import torch._dynamo
    import torch.nn.functional as F

    model = create_model(name).train().to(DEVICE, memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32, device=DEVICE).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device=DEVICE)

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # the engine's step up to the backward pass
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    explained = torch._dynamo.explain(loss)(x, y)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
