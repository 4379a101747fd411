"""CIFAR through torchvision's reader, on files written in its on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gunn import config as cfgmod
from gunn.data import DataError
from gunn.data.cifar import Cifar, check_cifar
from gunn.train.engine import train


def write_cifar(root: Path, classes: int, train: int = 100, test: int = 20, seed: int = 0) -> np.ndarray:
    """A small CIFAR-10/100 in torchvision's layout; returns the training images (N, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    label_key = "labels" if classes == 10 else "fine_labels"
    images = {"train": rng.integers(0, 256, (train, 3072), dtype=np.uint8),
              "test": rng.integers(0, 256, (test, 3072), dtype=np.uint8)}
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": images["train"][i - 1 :: 5] for i in range(1, 6)} | {"test_batch": images["test"]}
        meta = ("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    else:
        folder = root / "cifar-100-python"
        files = {"train": images["train"], "test": images["test"]}
        meta = ("meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(pickle.dumps({"data": data, label_key: list(rng.integers(0, classes, len(data)))}))
    (folder / meta[0]).write_bytes(pickle.dumps(meta[1]))
    order = [images["train"][i - 1 :: 5] for i in range(1, 6)] if classes == 10 else [images["train"]]
    return np.concatenate(order).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


@pytest.fixture
def no_checksums(monkeypatch):
    # The real files' MD5 sums cannot match generated ones; everything else is torchvision's reader.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)


def test_missing_cifar_says_where_it_belongs_and_how_to_download_it(tmp_path):
    with pytest.raises(DataError, match=r"(?s)expected .*cifar-100-python/.*python -m gunn.data download cifar100 --root"):
        check_cifar(tmp_path, 100)
    with pytest.raises(DataError, match="data.root is required for cifar10"):
        check_cifar(None, 10)


@pytest.mark.parametrize("classes", [10, 100])
def test_images_are_normalised_with_the_training_sets_channel_statistics(tmp_path, no_checksums, classes):
    pixels = write_cifar(tmp_path, classes).reshape(-1, 3) / 255.0
    train, test = Cifar(tmp_path, classes, train=True), Cifar(tmp_path, classes, train=False)
    assert (len(train), len(test), train.num_classes) == (100, 20, classes)
    torch.testing.assert_close(train.mean.flatten(), torch.tensor(pixels.mean(0), dtype=torch.float32))
    torch.testing.assert_close(train.std.flatten(), torch.tensor(pixels.std(0), dtype=torch.float32))
    torch.testing.assert_close(test.mean, train.mean)
    image, label = test.load(3, augment=False)
    expected = (torch.from_numpy(test.images[3].numpy()).float() / 255 - train.mean) / train.std
    torch.testing.assert_close(image, expected)
    assert label == test.labels[3]


def test_training_crops_the_zero_padded_image_and_flips_it(tmp_path, no_checksums):
    write_cifar(tmp_path, 10)
    data = Cifar(tmp_path, 10, train=True)
    raw = data.images[0].float() / 255
    padded = torch.nn.functional.pad(raw, (4, 4, 4, 4))
    crops = [padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
    candidates = [(c - data.mean) / data.std for c in crops]
    candidates += [c.flip(-1) for c in candidates]
    seen_flip = seen_shift = False
    for seed in range(20):
        torch.manual_seed(seed)
        image, _ = data.load(0, augment=True)
        match = [i for i, c in enumerate(candidates) if torch.allclose(image, c)]
        assert match, "an augmented image is not a crop (or flipped crop) of the 4-pixel zero-padded image"
        seen_flip |= match[0] >= len(crops)
        seen_shift |= match[0] % len(crops) != 40  # 40: the centred crop
    assert seen_flip and seen_shift


@pytest.mark.slow
def test_the_engine_trains_on_cifar_files(tmp_path, no_checksums):
    write_cifar(tmp_path / "data", 10, train=128, test=32)
    config = cfgmod.load("gunn15-cifar10", [
        f"data.root={tmp_path / 'data'}", "data.workers=0", "model.name=gunn_tiny", "optim.epochs=1",
        "optim.batch_size=32", "logging.mlflow=false", "logging.progress=false", f"checkpoint.dir={tmp_path / 'run'}",
    ])
    result = train(config)
    assert result.status == "finished" and result.history[0]["epoch"] == 1
