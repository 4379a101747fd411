"""ImageNet loaders: DALI (on the CPU, no mocks) and torchvision read the same shards alike."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from gunn.data.base import DataError, eval_batches, shard, train_batches
from gunn.data.imagenet import (
    DaliLoader,
    ImageFolderSamples,
    build_imagenet,
    find_images,
    make_jpeg_tree,
    verify,
)
from gunn.data.loader import ShardedLoader

import nvidia.dali  # noqa: E402,F401  (the test extra installs DALI: a missing one is a failure, not a skip)

CLASSES, TRAIN, VAL = 3, 8, 5  # 24 training and 15 validation images
BATCH, WORLD, SEED = 4, 2, 7
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]
# Mean absolute difference of normalised pixels allowed per image between DALI and PIL +
# torchvision. Observed: 0.003-0.019 (one grey level is 0.017). The largest values come from
# a one-pixel shift of the centre crop (torchvision rounds half offsets to even, DALI up) and
# from rounding the resized longer side; a horizontal flip or another image differs by 0.8-1.5.
EVAL_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    make_jpeg_tree(root, classes=CLASSES, train_per_class=TRAIN, val_per_class=VAL, seed=0)
    return root


@pytest.fixture
def corrupt_tree(tree: Path, tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "imagenet"
    shutil.copytree(tree, root)
    bad = root / "val" / "n00000001" / "x.JPEG"
    bad.write_bytes(os.urandom(3000))
    return root, bad


def _dali(
    root: Path, split: str, *, rank: int = 0, world_size: int = WORLD, indices: bool = False, device: torch.device = CPU
) -> DaliLoader:
    """A DALI loader; with ``indices`` its labels are the file indices, which shows the order read."""
    files, labels, _ = find_images(root, split)
    labels = list(range(len(files))) if indices else labels
    return DaliLoader(
        files, labels, batch_size=BATCH, rank=rank, world_size=world_size, seed=SEED,
        train=split == "train", device=device, workers=2,
    )


def _torchvision(
    root: Path, split: str, *, rank: int = 0, world_size: int = WORLD, indices: bool = False
) -> ShardedLoader:
    samples = ImageFolderSamples(root, split, train=split == "train")
    if indices:
        samples.labels = list(range(len(samples)))
    return ShardedLoader(
        samples, batch_size=BATCH, rank=rank, world_size=world_size, seed=SEED, train=split == "train",
    )


LOADERS = {"dali": _dali, "torchvision": _torchvision}


def _labels(batches) -> list[int]:
    return [label for _, labels in batches for label in labels.tolist()]


def test_find_images_reads_imagefolder_samples_in_its_order(tree: Path, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = tmp_path / "mixed"
    shutil.copytree(tree, root)
    some = root / "train" / "n00000000" / "n00000000_0.JPEG"
    (root / "train" / "n00000000" / "deeper").mkdir()
    shutil.copy(some, root / "train" / "n00000000" / "deeper" / "a.jpg")
    Image.open(some).save(root / "train" / "n00000002" / "B.Png")
    (root / "train" / "n00000001" / "notes.txt").write_text("not an image")
    for split in ("train", "val"):
        files, labels, classes = find_images(root, split)
        reference = ImageFolder(root / split, is_valid_file=lambda p: p.lower().endswith((".jpeg", ".jpg", ".png")))
        assert classes == reference.classes
        assert [(str(f), label) for f, label in zip(files, labels)] == reference.samples
    assert len(find_images(root, "train")[0]) == CLASSES * TRAIN + 2


def test_dali_evaluation_matches_imagefolder_samples(tree: Path) -> None:
    dali = list(_dali(tree, "val", world_size=1).iterate(0))
    reference = list(_torchvision(tree, "val", world_size=1).iterate(0))
    assert _labels(dali) == _labels(reference) == find_images(tree, "val")[1]
    for (images, _), (expected, _) in zip(dali, reference):
        assert images.shape == expected.shape and images.dtype == torch.float32
        per_image = (images - expected).abs().mean(dim=(1, 2, 3))
        assert per_image.max() < EVAL_TOLERANCE, per_image


@pytest.mark.parametrize("name", LOADERS)
def test_training_batches_have_the_same_count_on_every_rank(tree: Path, name: str) -> None:
    expected = train_batches(CLASSES * TRAIN, WORLD, BATCH)
    for rank in range(WORLD):
        loader = LOADERS[name](tree, "train", rank=rank)
        batches = list(loader.iterate(0))
        assert len(loader) == len(batches) == expected
        for images, labels in batches:
            assert images.shape == (BATCH, 3, 224, 224) and images.dtype == torch.float32
            assert labels.shape == (BATCH,) and labels.dtype == torch.int64
            assert 0 <= labels.min() and labels.max() < CLASSES


@pytest.mark.slow
@pytest.mark.parametrize("name", LOADERS)
def test_training_order_is_shardedloaders_seeded_by_epoch(tree: Path, name: str) -> None:
    size = CLASSES * TRAIN
    for rank in range(WORLD):
        loader = LOADERS[name](tree, "train", rank=rank, indices=True)
        first = list(loader.iterate(3))
        expected = shard(size, seed=SEED, epoch=3, rank=rank, world_size=WORLD, batch_size=BATCH, train=True)
        assert _labels(first) == expected
        again = list(loader.iterate(3))
        assert _labels(again) == expected
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))  # same augmentation too
        assert _labels(loader.iterate(4)) != expected


@pytest.mark.parametrize("name", LOADERS)
def test_resuming_mid_epoch_reads_the_remaining_batches(tree: Path, name: str) -> None:
    loader = LOADERS[name](tree, "train", indices=True)
    full = list(loader.iterate(2))
    resumed = list(loader.iterate(2, start=1))
    assert _labels(resumed) == _labels(full[1:])
    if name == "torchvision":  # seeded per sample: the augmentation is also that of the full epoch
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(full[1:], resumed))


@pytest.mark.parametrize("name", LOADERS)
def test_evaluation_shards_cover_every_image_once(tree: Path, name: str) -> None:
    size = CLASSES * VAL
    seen = []
    for rank in range(WORLD):
        loader = LOADERS[name](tree, "val", rank=rank, indices=True)
        batches = list(loader.iterate(0))
        assert len(loader) == len(batches) == eval_batches(size, rank, WORLD, BATCH)
        assert _labels(batches) == list(range(rank, size, WORLD))
        seen += _labels(batches)
    assert sorted(seen) == list(range(size))


def test_build_imagenet_gives_both_loaders_and_the_class_count(tree: Path) -> None:
    for loader in ("dali", "torchvision"):
        bundle = build_imagenet(
            tree, loader=loader, batch_size=BATCH, rank=1, world_size=WORLD, seed=SEED, device=CPU, workers=0,
        )
        assert (bundle.num_classes, bundle.in_chans) == (CLASSES, 3)
        assert (bundle.train_images, bundle.eval_images) == (CLASSES * TRAIN, CLASSES * VAL)
        assert isinstance(bundle.train, DaliLoader if loader == "dali" else ShardedLoader)
        assert len(bundle.train) == train_batches(CLASSES * TRAIN, WORLD, BATCH)


@pytest.mark.parametrize("name", LOADERS)
def test_a_corrupt_image_stops_the_loader_with_its_path(corrupt_tree: tuple[Path, Path], name: str) -> None:
    root, bad = corrupt_tree
    loader = LOADERS[name](root, "val", world_size=1)
    with pytest.raises(DataError, match=re.escape(str(bad))):
        list(loader.iterate(0))


def _quotes_dali(message: str, dali: BaseException | None) -> bool:
    """Whether ``message`` quotes a line of DALI's own error message."""
    return dali is not None and any(line.strip() and line.strip() in message for line in str(dali).splitlines())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine whose CUDA driver DALI cannot use")
def test_dali_that_cannot_start_on_the_gpu_blames_dali_and_the_device_not_the_data(tree: Path) -> None:
    loader = _dali(tree, "val", world_size=1, device=torch.device("cuda", 0))
    with pytest.raises(RuntimeError) as failure:
        list(loader.iterate(0))
    assert not isinstance(failure.value, DataError)
    message = str(failure.value)
    assert "DALI could not start its pipeline on cuda:0" in message
    assert _quotes_dali(message, failure.value.__cause__)
    assert "nvidia-dali-cuda120" in message and "nvidia-dali-cuda130" in message  # the wheel/driver hint


def test_a_dali_failure_on_images_pil_decodes_is_not_a_data_error(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    shutil.copytree(tree, root)
    odd = root / "val" / "n00000001" / "n00000001_0.JPEG"  # file 5 of the validation order: batch 1
    Image.open(odd).convert("RGB").save(odd, format="GIF")  # PIL decodes GIFs, DALI does not
    with pytest.raises(RuntimeError) as failure:
        list(_dali(root, "val", world_size=1).iterate(0))
    assert not isinstance(failure.value, DataError)
    message = str(failure.value)
    assert "DALI failed while reading batch 1 of epoch 0 on cpu" in message and "not a bad image" in message
    assert _quotes_dali(message, failure.value.__cause__)


@pytest.mark.parametrize("split", ["train", "val"])
def test_dali_labels_are_int64_vectors_on_the_cpu(tree: Path, split: str) -> None:
    # The CUDA path (labels moved to the GPU inside the pipeline) needs a GPU and is not tested here.
    batches = list(_dali(tree, split, world_size=1).iterate(0))
    if split == "val":
        assert len(batches[-1][1]) == CLASSES * VAL % BATCH  # a partial last batch
    for images, labels in batches:
        assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
        assert labels.device == images.device == CPU


def test_verify_lists_the_corrupt_image(corrupt_tree: tuple[Path, Path]) -> None:
    root, bad = corrupt_tree
    assert [path for path, _ in verify(root)] == [bad]


@pytest.mark.slow
def test_verify_command_lists_the_corrupt_image_and_fails(corrupt_tree: tuple[Path, Path]) -> None:
    root, bad = corrupt_tree
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run(
        [sys.executable, "-m", "gunn.data", "verify", str(root)], capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert run.returncode == 1, run.stderr
    assert str(bad) in run.stdout
    assert "1 unreadable image" in run.stderr


def test_verify_passes_a_clean_tree(tree: Path) -> None:
    assert verify(tree) == []


@pytest.mark.parametrize("missing", ["", "train", "val"])
def test_a_missing_directory_is_named_with_the_expected_layout(tmp_path: Path, missing: str) -> None:
    root = tmp_path / "imagenet"
    make_jpeg_tree(root, classes=1, train_per_class=1, val_per_class=1)
    shutil.rmtree(root / missing)
    with pytest.raises(DataError, match=re.escape(str(root / missing)) + r" .*\n.*ROOT/train/<class>/"):
        build_imagenet(root, batch_size=2, rank=0, world_size=1, seed=0, device=CPU, workers=0)
    if missing:
        with pytest.raises(DataError, match=re.escape(str(root / missing))):
            find_images(root, missing)


def test_train_and_val_with_different_classes_are_refused(tree: Path, tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    shutil.copytree(tree, root)
    shutil.rmtree(root / "val" / "n00000002")
    with pytest.raises(DataError, match="n00000002"):
        build_imagenet(root, loader="torchvision", batch_size=2, rank=0, world_size=1, seed=0, device=CPU, workers=0)


def _check(root: Path) -> None:
    from gunn.config import DataConfig
    from gunn.data import check_data

    check_data(DataConfig(name="imagenet", root=str(root)))


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """Two classes of one image each in train and val, where a folder is cheap to empty or add."""
    root = tmp_path / "imagenet"
    make_jpeg_tree(root, classes=2, train_per_class=1, val_per_class=1)
    return root


def test_check_data_passes_a_complete_tree_with_images_in_subfolders(tiny: Path) -> None:
    image = tiny / "train" / "n00000001" / "n00000001_0.JPEG"
    (image.parent / "deeper").mkdir()
    image.rename(image.parent / "deeper" / "a.jpg")
    _check(tiny)


@pytest.mark.parametrize("split", ["train", "val"])
def test_check_data_finds_an_empty_class_folder(tiny: Path, split: str) -> None:
    folder = tiny / split / "n00000001"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    (folder / "empty").mkdir()
    with pytest.raises(DataError, match=f"^imagenet {split}/n00000001 holds no images "):
        _check(tiny)


def test_check_data_finds_val_classes_missing_from_train(tiny: Path) -> None:
    for name in ("n00000007", "n00000009"):
        shutil.copytree(tiny / "val" / "n00000000", tiny / "val" / name)
    with pytest.raises(DataError, match="^imagenet val has classes missing from train: n00000007, n00000009 "):
        _check(tiny)


def test_check_data_finds_train_classes_missing_from_val(tiny: Path) -> None:
    shutil.rmtree(tiny / "val" / "n00000001")
    with pytest.raises(DataError, match="^imagenet train has classes missing from val: n00000001 "):
        _check(tiny)


def test_check_data_names_a_missing_split(tiny: Path) -> None:
    shutil.rmtree(tiny / "val")
    with pytest.raises(DataError, match=re.escape(str(tiny / "val")) + " not found"):
        _check(tiny)
