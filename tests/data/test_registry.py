"""The data sets by name (gunn.data.registry): the one list that the configuration, the loaders, the engine's
checks, the sweeps and their report read."""

from __future__ import annotations

import pytest
import torch

from gunn import config as cfgmod
from gunn.data import DataBundle, DataError, build_data, check_data, list_datasets, map_style, register_dataset, train_size
from gunn.data import registry


class Stripes:
    """Two-channel 8x8 images of horizontal stripes, the label their period (three classes)."""

    num_classes, in_chans = 3, 2

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size

    def load(self, index: int, augment: bool) -> tuple[torch.Tensor, int]:
        label = index % 3
        rows = (torch.arange(8) // (label + 1) % 2).float()
        return rows.view(1, 8, 1).expand(2, 8, 8).clone(), label


@pytest.fixture
def stripes(monkeypatch: pytest.MonkeyPatch) -> str:
    """A data set registered for one test, in one place: its decorated function."""
    monkeypatch.setattr(registry, "_DATASETS", dict(registry._DATASETS))

    @register_dataset("stripes", in_chans=2, image_size=8, num_classes=3, train_images=24)
    def stripes(cfg: cfgmod.DataConfig, loading) -> DataBundle:
        """Striped 8x8 images in three classes, made on the fly."""
        return map_style(Stripes(24), Stripes(9), cfg.workers, loading)

    return "stripes"


def test_gunns_data_sets_are_registered_in_the_order_the_configuration_lists_them():
    assert list_datasets()[:5] == ["digits", "cifar10", "cifar100", "imagenet", "synthetic"]
    with pytest.raises(cfgmod.ConfigError, match="data.name must be one of 'digits', 'cifar10', 'cifar100', "
                                                 "'imagenet', 'synthetic', got 'mnist'"):
        cfgmod.load("digits", ["data.name=mnist"])


def test_a_registered_data_set_is_known_to_the_configuration_and_the_loaders(stripes):
    config = cfgmod.load("digits", [f"data.name={stripes}", "data.workers=0"])
    assert config.data.name == "stripes"
    check_data(config.data)
    assert train_size(config.data) == 24
    bundle = build_data(config.data, batch_size=4, rank=0, world_size=2, seed=0, device=torch.device("cpu"))
    assert (bundle.num_classes, bundle.in_chans, bundle.image_size) == (3, 2, 8)
    assert (bundle.train_images, bundle.eval_images, len(bundle.train)) == (24, 9, 3)
    images, labels = next(bundle.train.iterate(0))
    assert images.shape == (4, 2, 8, 8) and labels.tolist() and set(labels.tolist()) <= {0, 1, 2}


def test_a_registered_data_set_is_known_to_the_sweeps_and_their_report(stripes, tmp_path):
    from gunn.sweeps import driver, report, studies

    # What the report builds a child run's model for: the data set's channels, side and classes.
    assert report.input_shape({"model.name": "gunn_tiny", "data.name": stripes}) == (2, 8, 3)
    args = driver.parse_args(["--study", "sunn-vs-gunn", f"data.name={stripes}", "data.workers=0",
                              "optim.batch_size=8", "logging.model=false"])
    trials = studies.trial_configs(args, tmp_path, "parent", "sqlite:///unused.db", check_device=False)
    assert [t["config"]["data"]["name"] for t in trials] == ["stripes", "stripes"]
    # The engine's checks read its size: a batch larger than its training set is refused before anything runs.
    args = driver.parse_args(["--study", "sunn-vs-gunn", f"data.name={stripes}", "optim.batch_size=32"])
    with pytest.raises(cfgmod.ConfigError, match="larger than the 24 training images of stripes"):
        studies.trial_configs(args, tmp_path, "parent", "sqlite:///unused.db", check_device=False)


def test_a_data_set_name_is_registered_once():
    with pytest.raises(ValueError, match="data set 'digits' is already registered"):
        register_dataset("digits", in_chans=1, image_size=32, num_classes=10)(lambda cfg, loading: None)
    with pytest.raises(DataError, match="unknown data set 'mnist'; data sets: digits, cifar10"):
        from gunn.data import get_dataset

        get_dataset("mnist")
