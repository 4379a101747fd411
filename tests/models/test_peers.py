"""The networks GUNN is compared with (paper, Tables 3 and 4): parameter counts, shapes, channels, settings."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gunn.models import create_model, list_models, takes
from gunn.models.registry import InputChannels
from tests.reference import DEVICE

CIFAR = ["resnet110", "wrn28_10", "wrn40_10", "resnext29_16x64d", "densenet_bc190"]
IMAGENET = ["densenet264", "resnext101_32x4d"]

# name, classes of the data the paper used, exact count, the published count in millions.
PARAMETERS = [
    # GUNN Table 3 (He et al., 2016a, Table 6): 1.7M; option A shortcuts have no parameters.
    ("resnet110", 10, 1_727_962, 1.7),
    # GUNN Table 3 (Zagoruyko & Komodakis, 2016, Table 5): 36.5M; the official PyTorch code's 36,479,194.
    ("wrn28_10", 10, 36_479_194, 36.5),
    # GUNN Table 3 (Zagoruyko & Komodakis, 2016, official repository's CIFAR table): 55.8M.
    ("wrn40_10", 10, 55_841_754, 55.8),
    # GUNN Table 3 (Xie et al., 2017, Table 7): 68.1M, truncated from 68.16M.
    ("resnext29_16x64d", 10, 68_155_210, 68.1),
    # GUNN Table 3 (Huang et al., 2017b, Table 2): 25.6M.
    ("densenet_bc190", 10, 25_624_430, 25.6),
    # GUNN Table 4 (Huang et al., 2017b): 33.3M.
    ("densenet264", 1000, 33_337_704, 33.3),
    # GUNN Table 4 (Xie et al., 2017): 44.1M, truncated from 44.18M (torchvision's resnext101_32x4d layout).
    ("resnext101_32x4d", 1000, 44_177_704, 44.1),
]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,classes,expected,published", PARAMETERS)
def test_parameter_counts_are_pinned_and_are_the_published_ones(name, classes, expected, published):
    with torch.device("meta"):  # no values drawn: counting is instant
        model = create_model(name, num_classes=classes)
    assert count(model) == expected
    # The papers give millions to one decimal, rounded or (ResNeXt's) truncated.
    assert published in (round(expected / 1e6, 1), math.floor(expected / 1e5) / 10)


@pytest.mark.slow
@pytest.mark.parametrize("name", CIFAR)
def test_cifar_models_classify_a_32x32_batch_and_backpropagate(name):
    model = create_model(name).to(DEVICE)
    out = model(torch.randn(2, 3, 32, 32, device=DEVICE))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_models_classify_a_224x224_batch_and_backpropagate(name):
    with torch.device("meta"):  # shapes only: a CPU pass at 224x224 would take seconds
        model = create_model(name)
        out = model(torch.empty(2, 3, 224, 224))
        out.sum().backward()
    assert out.shape == (2, 1000)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.slow
def test_a_cifar_model_takes_the_input_channels_in_its_first_convolution():
    model = create_model("resnet110", num_classes=10, in_chans=1)
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_an_imagenet_model_maps_other_input_channels_to_three():
    with torch.device("meta"):
        model = create_model("resnext101_32x4d", num_classes=5, in_chans=1)
        out = model(torch.empty(2, 1, 224, 224))
    assert isinstance(model, InputChannels) and model[0].in_channels == 1
    assert out.shape == (2, 5)


@pytest.mark.parametrize("name", ["resnet110", "densenet264"])
def test_models_are_initialised_as_their_official_code(name):
    model = create_model(name)
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)][-1]
    # fb.resnet.torch: N(0, 2 / (9 * out_channels)); torchvision's DenseNet would draw by fan-in
    assert last.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * last.out_channels)), rel=0.05)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(bool((m.weight == 1).all() and (m.bias == 0).all()) for m in norms)
    fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert bool((fc.bias == 0).all())


def test_create_model_sets_the_classes_and_refuses_gunn_settings():
    model = create_model("wrn28_10", num_classes=100)
    assert model.fc.out_features == 100 and count(model) == 36_536_884
    with pytest.raises(ValueError, match=r"wrn28_10 has no setting 'mode' \(model.mode=sunn\)"):
        create_model("wrn28_10", mode="sunn")


def test_the_peers_are_registered_and_take_only_the_datas_arguments():
    assert set(CIFAR + IMAGENET) <= set(list_models())
    for name in CIFAR + IMAGENET:
        assert takes(name, "num_classes") and takes(name, "in_chans")
        assert not takes(name, "memory") and not takes(name, "segments")
