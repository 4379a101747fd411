"""ImageNet from a class-folder tree, decoded by NVIDIA DALI or by torchvision behind one interface.

Layout (torchvision's ImageFolder): ``ROOT/train/<class>/*.JPEG`` and ``ROOT/val/<class>/*.JPEG``
with the same class folders in both; ``.jpeg``, ``.jpg`` and ``.png`` in any case. Classes are
sorted by name and numbered from 0; both loaders read the same samples in the same order.

Training: a random resized crop to 224 (area 8-100%, aspect ratio 3/4-4/3) and a random
horizontal flip. Evaluation: shorter side resized to 256, centre crop 224. Both normalise with
the ImageNet mean and standard deviation.

Corrupt images stop the run: the first unreadable image raises a ``DataError`` that names it,
under either loader. Nothing is skipped silently, because a skipped image would change the
number of batches of one rank (and hang distributed training) and the data a result was
trained on. ``python -m gunn.data verify ROOT`` lists every unreadable image at once so that
they can be removed before a run. Other DALI failures (a pipeline that cannot start, e.g. on a
driver too old for the installed DALI wheel, or an error while PIL decodes every image of the
batches in flight) are a plain ``RuntimeError`` that says what DALI was doing, never a ``DataError``.

DALI (``DaliLoader``) decodes on the GPU (``mixed`` decoder) when the target device is CUDA and
entirely on the CPU otherwise, so it also runs on machines without a GPU. It reads exactly
``ShardedLoader``'s per-epoch order, but draws its random crops and flips from per-pipeline
streams seeded by (seed, epoch, rank): they differ from the torchvision loader's, and a run
resumed mid-epoch (``iterate(epoch, start)``) gets the same images in the same batches as an
uninterrupted epoch but other crops and flips (DALI's random streams cannot be fast-forwarded
without decoding the skipped batches). DALI's augmentation is reproducible for the same
(seed, epoch, rank, start, batch size). The torchvision loader seeds every sample separately,
so its resumed batches equal the uninterrupted ones exactly.
"""

from __future__ import annotations

import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from gunn.data.base import Batch, DataBundle, DataError, ShardPlan
from gunn.data.loader import ShardedLoader
from gunn.models.registry import IMAGENET_MEAN, IMAGENET_STD

EXTENSIONS = (".jpeg", ".jpg", ".png")
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the ImageNet models' default_cfg normalisation
CROP = 224  # training crop and evaluation centre crop
RESIZE = 256  # shorter side before the evaluation centre crop
LOADERS = ("auto", "dali", "torchvision")

LAYOUT = (
    "expected an ImageFolder tree:\n"
    "    ROOT/train/<class>/<image>.JPEG   e.g. ROOT/train/n01440764/n01440764_10026.JPEG\n"
    "    ROOT/val/<class>/<image>.JPEG     the same class folders as train/\n"
    "(.jpeg, .jpg or .png in any case). The flat ILSVRC2012 val/ folder must first be sorted\n"
    "into class folders, e.g. with the valprep.sh script of the PyTorch ImageNet example."
)

_READER = "Reader"  # name of the DALI file reader, for the iterator's epoch size and padding


def find_images(root: Path, split: str) -> tuple[list[Path], list[int], list[str]]:
    """Files, labels and class names of ``root/split``, in torchvision ImageFolder's order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} is not a directory; {LAYOUT}")
    directory = root / split
    if not directory.is_dir():
        raise DataError(f"ImageNet {split} directory {directory} not found; {LAYOUT}")
    classes = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
    if not classes:
        raise DataError(f"no class folders in {directory}; {LAYOUT}")
    files: list[Path] = []
    labels: list[int] = []
    empty = []
    for label, name in enumerate(classes):
        count = len(files)
        # ImageFolder walks each class folder recursively, folders and files sorted by name.
        for folder, _, names in sorted(os.walk(directory / name, followlinks=True)):
            for fname in sorted(names):
                if fname.lower().endswith(EXTENSIONS):
                    files.append(Path(folder) / fname)
                    labels.append(label)
        if len(files) == count:
            empty.append(name)
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) of {directory} hold no {'/'.join(EXTENSIONS)} image: "
            f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}; {LAYOUT}"
        )
    return files, labels, classes


def check_tree(root: Path) -> None:
    """Cheap checks of an ImageNet tree before a run: both splits exist, hold the same class folders, and
    each class folder holds an image. Lists folders only, each up to its first image; decodes nothing."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageNet root {root} is not a directory; {LAYOUT}")
    classes: dict[str, list[str]] = {}
    for split in ("train", "val"):
        directory = root / split
        if not directory.is_dir():
            raise DataError(f"ImageNet {split} directory {directory} not found; {LAYOUT}")
        with os.scandir(directory) as entries:
            names = sorted(entry.name for entry in entries if entry.is_dir())  # find_images' classes
        if not names:
            raise DataError(f"no class folders in {directory}; {LAYOUT}")
        # An empty class folder (likely a copy that broke off) would stop the loaders or shift every label.
        empty = [f"{split}/{name}" for name in names if not _holds_image(directory / name)]
        if empty:
            raise DataError(
                f"imagenet {_listed(empty)} {'holds' if len(empty) == 1 else 'hold'} no images "
                f"(no {'/'.join(EXTENSIONS)} file, subfolders included) under {root}; {LAYOUT}"
            )
        classes[split] = names
    for split, other in (("val", "train"), ("train", "val")):
        missing = sorted(set(classes[split]) - set(classes[other]))
        if missing:
            raise DataError(f"imagenet {split} has classes missing from {other}: {_listed(missing)} (under {root}); "
                            f"{LAYOUT}")


def _holds_image(folder: Path) -> bool:
    """Whether ``folder`` or a folder below it holds an image file; stops at the first."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir():  # followed like os.walk(followlinks=True) in find_images
                    stack.append(Path(entry.path))
                elif entry.name.lower().endswith(EXTENSIONS):
                    return True
    return False


def _listed(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _open_rgb(path: Path | str) -> Image.Image:
    """The decoded RGB image, as torchvision's ImageFolder reads it, or a DataError naming the file."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise DataError(
            f"cannot read image {path}: {type(err).__name__}: {err}. Find every unreadable image with "
            f"`python -m gunn.data verify ROOT` and remove them."
        ) from err


def _unreadable(path: Path | str) -> str | None:
    """Why ``path`` cannot be decoded, or None when it can."""
    try:
        with Image.open(path) as image:
            image.convert("RGB")  # a full decode: truncated or corrupt data fails only here
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return None


class ImageFolderSamples:
    """The images of ``root/split`` read with PIL and torchvision transforms (a ``Samples``)."""

    in_chans = 3

    def __init__(self, root: Path, split: str, train: bool) -> None:
        from torchvision import transforms as T

        files, self.labels, self.classes = find_images(Path(root), split)
        self.files = [str(f) for f in files]  # str: a fraction of a Path's memory, copied to every worker
        self.num_classes = len(self.classes)
        self.train = train
        normalise = [T.ToTensor(), T.Normalize(MEAN, STD)]
        # Random transforms draw from torch's global RNG, which ShardedLoader seeds per sample.
        self.train_transform = T.Compose([T.RandomResizedCrop(CROP), T.RandomHorizontalFlip(), *normalise])
        self.eval_transform = T.Compose([T.Resize(RESIZE), T.CenterCrop(CROP), *normalise])

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """Image ``index``: training augmentation if ``augment`` and ``train``, else the evaluation crop."""
        image = _open_rgb(self.files[index])
        transform = self.train_transform if augment and self.train else self.eval_transform
        return transform(image), self.labels[index]


class DaliLoader:
    """One rank's batches decoded by NVIDIA DALI, in ShardedLoader's order (an ``EpochLoader``)."""

    def __init__(
        self,
        files: Sequence[Path | str],
        labels: Sequence[int],
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        train: bool,
        device: torch.device,
        workers: int,
        prefetch: int = 2,
    ) -> None:
        if len(files) != len(labels):
            raise ValueError(f"files and labels differ in length: {len(files)} != {len(labels)}")
        self.files = [str(f) for f in files]
        self.labels = [int(label) for label in labels]
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.train, self.device, self.prefetch = train, torch.device(device), prefetch
        self.threads = max(1, workers)
        self.plan = ShardPlan(len(self.files), batch_size, rank, world_size, seed, train)

    def __len__(self) -> int:
        return len(self.plan)

    def iterate(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch`` from batch ``start`` on: images float32 (B, 3, 224, 224), labels int64."""
        indices = self.plan.indices(epoch, start)
        if not indices:
            return iter(())
        return self._batches([self.files[i] for i in indices], [self.labels[i] for i in indices], epoch, start)

    def _batches(self, files: list[str], labels: list[int], epoch: int, start: int) -> Iterator[Batch]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        try:
            # A fresh pipeline per epoch: its reader gets this epoch's file order (building is
            # cheap next to an epoch) and its random streams restart from (seed, epoch, rank). Building it
            # starts DALI on the device: a missing GPU or a driver too old for DALI's CUDA fails here.
            pipe = self._pipeline(files, labels, epoch)
            pipe.build()
        except RuntimeError as err:  # before any image is read: never a data error
            raise self._dali_failure(f"could not start its pipeline on {self.device}", err) from err
        read = 0
        try:
            batches = DALIGenericIterator(  # decodes the first batch already
                pipe, ["images", "labels"], reader_name=_READER, last_batch_policy=LastBatchPolicy.PARTIAL,
            )
            for out in batches:
                images, targets = out[0]["images"], out[0]["labels"]  # labels: int32 (B, 1)
                yield images, targets.view(-1).to(device=self.device, dtype=torch.int64)
                read += 1
        except RuntimeError as err:  # DALI reports every failure of its operators as RuntimeError
            # A data error only if PIL cannot decode some image of the batches DALI was working on.
            window = self._in_flight(files, read)
            bad = [(path, why) for path, why in zip(window, map(_unreadable, window)) if why is not None]
            if bad:
                raise self._data_error(bad, err) from err
            raise self._dali_failure(
                f"failed while reading batch {start + read} of epoch {epoch} on {self.device} (PIL decodes all "
                f"{len(window)} files of the batches in flight, so this is not a bad image)", err,
            ) from err

    def _pipeline(self, files: list[str], labels: list[int], epoch: int):
        from nvidia.dali import fn, types
        from nvidia.dali.pipeline import Pipeline

        gpu = self.device.type == "cuda"
        device_id = None  # DALI without CUDA: no mixed or gpu operator may appear
        if gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        decoder, ops = ("mixed", "gpu") if gpu else ("cpu", "cpu")
        # Preallocated decoder buffers (NVIDIA's ImageNet example) avoid regrowing them for large images.
        buffers = dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512) if gpu else {}
        pipe = Pipeline(
            batch_size=self.batch_size, num_threads=self.threads, device_id=device_id,
            seed=_pipeline_seed(self.seed, epoch, self.rank), prefetch_queue_depth=self.prefetch,
        )
        with pipe:
            jpegs, targets = fn.readers.file(
                files=files, labels=labels, random_shuffle=False, pad_last_batch=True, name=_READER,
            )
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=decoder, output_type=types.RGB, **buffers,
                    random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3], num_attempts=10,
                )
                images = fn.resize(images, device=ops, resize_x=CROP, resize_y=CROP, interp_type=types.INTERP_LINEAR)
                extra = {"mirror": fn.random.coin_flip(probability=0.5)}
            else:
                images = fn.decoders.image(jpegs, device=decoder, output_type=types.RGB, **buffers)
                images = fn.resize(images, device=ops, resize_shorter=RESIZE, interp_type=types.INTERP_LINEAR)
                extra = {"crop": (CROP, CROP)}  # centred: crop_pos_x = crop_pos_y = 0.5
            images = fn.crop_mirror_normalize(
                images, device=ops, dtype=types.FLOAT, output_layout="CHW",
                mean=[255 * m for m in MEAN], std=[255 * s for s in STD], **extra,
            )
            if gpu:
                # Labels as a GPU output, as in NVIDIA's examples: DALIGenericIterator then delivers
                # them on the device instead of us copying them from unpinned host memory every batch.
                # Not exercised by the tests, which run on machines without a GPU.
                targets = targets.gpu()
            pipe.set_outputs(images, targets)
        return pipe

    def _in_flight(self, files: list[str], read: int) -> list[str]:
        """The files of the batches DALI may have been working on after ``read`` delivered batches."""
        # DALI's message does not name the file. The failing batch is the next one or one of
        # those it had prefetched.
        b = self.batch_size
        return files[read * b : (read + self.prefetch + 2) * b]

    def _data_error(self, bad: list[tuple[str, str]], err: RuntimeError) -> DataError:
        """A DataError listing the files that neither DALI nor PIL can decode."""
        listed = "\n".join(f"    {path}: {why}" for path, why in bad)
        return DataError(
            f"DALI cannot decode {len(bad)} image(s):\n{listed}\nFind every unreadable image with "
            f"`python -m gunn.data verify ROOT` and remove them (DALI said: {_dali_summary(err)})"
        )

    def _dali_failure(self, doing: str, err: RuntimeError) -> RuntimeError:
        """A RuntimeError (not a DataError) saying what DALI was doing when it failed, and why."""
        summary = _dali_summary(err)
        hint = ""
        if self.device.type == "cuda" and re.search(r"cuda|driver|nvml", str(err), re.IGNORECASE):
            hint = (
                "\nThe DALI wheel must match the CUDA version of the NVIDIA driver (nvidia-smi shows it): "
                "nvidia-dali-cuda130 (the extra `dali`) for CUDA 13 drivers, nvidia-dali-cuda120 (the "
                "extra `dali-cuda12`) for CUDA 12 drivers."
            )
        return RuntimeError(f"DALI {doing}; DALI said: {summary}{hint}")


def _dali_summary(err: RuntimeError) -> str:
    """The last informative line of a DALI error (its message ends with boilerplate and tracebacks)."""
    lines = str(err).strip().splitlines()
    return next((line for line in reversed(lines) if "no longer valid" not in line and line.strip()), "")


def _pipeline_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of one rank's DALI pipeline in one epoch (DALI takes non-negative 32-bit seeds)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + rank) % (2**31 - 1)


def dali_available() -> bool:
    """Whether NVIDIA DALI and its PyTorch plugin import."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def build_imagenet(
    root: Path,
    *,
    loader: str = "auto",
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
    workers: int,
) -> DataBundle:
    """ImageNet's training and validation loaders of one rank; ``batch_size`` is per rank."""
    if loader not in LOADERS:
        raise ValueError(f"data.loader must be one of {', '.join(LOADERS)}; got {loader!r}")
    root = Path(root)
    for directory in (root, root / "train", root / "val"):  # cheap checks before listing 1.3M files
        if not directory.is_dir():
            raise DataError(f"ImageNet directory {directory} not found (data.root={str(root)!r}); {LAYOUT}")
    use_dali = dali_available() if loader == "auto" else loader == "dali"
    if use_dali and not dali_available():
        raise DataError(
            "data.loader='dali' but nvidia.dali does not import; install it (pip install "
            "nvidia-dali-cuda120, or -cuda130 to match your CUDA) or use data.loader='torchvision'"
        )
    if use_dali:
        train_files, train_labels, classes = find_images(root, "train")
        val_files, val_labels, val_classes = find_images(root, "val")
        common = dict(
            batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, device=device, workers=workers,
        )
        train: DaliLoader | ShardedLoader = DaliLoader(train_files, train_labels, train=True, **common)
        evaluate: DaliLoader | ShardedLoader = DaliLoader(val_files, val_labels, train=False, **common)
        sizes = len(train_files), len(val_files)
    else:
        train_set = ImageFolderSamples(root, "train", train=True)
        val_set = ImageFolderSamples(root, "val", train=False)
        classes, val_classes = train_set.classes, val_set.classes
        common = dict(batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, workers=workers,
                      pin_memory=torch.device(device).type == "cuda")
        train = ShardedLoader(train_set, train=True, **common)
        evaluate = ShardedLoader(val_set, train=False, **common)
        sizes = len(train_set), len(val_set)
    if val_classes != classes:
        missing = sorted(set(classes) ^ set(val_classes))
        raise DataError(
            f"{root / 'train'} and {root / 'val'} hold different class folders ({len(classes)} vs "
            f"{len(val_classes)}; not in both: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); {LAYOUT}"
        )
    return DataBundle(
        train=train, eval=evaluate, num_classes=len(classes), in_chans=3, train_images=sizes[0], eval_images=sizes[1],
        image_size=CROP,
    )


def verify(root: Path, *, workers: int | None = None, progress_every_s: float = 10.0) -> list[tuple[Path, str]]:
    """Every image under ``root/train`` and ``root/val`` that cannot be decoded, with the reason."""
    root = Path(root)
    files = [f for split in ("train", "val") for f in find_images(root, split)[0]]
    bad: list[tuple[Path, str]] = []
    last = started = time.monotonic()
    # PIL releases the GIL while decoding, so threads decode in parallel; chunks keep the number
    # of pending futures small on a 1.3-million-image tree.
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for begin in range(0, len(files), 1024):
            chunk = files[begin : begin + 1024]
            bad += [(path, why) for path, why in zip(chunk, pool.map(_unreadable, chunk)) if why is not None]
            done = begin + len(chunk)
            if time.monotonic() - last >= progress_every_s:
                last = time.monotonic()
                rate = done / (last - started)
                print(
                    f"verified {done}/{len(files)} images, {len(bad)} unreadable "
                    f"({rate:.0f}/s, {(len(files) - done) / rate:.0f} s left)",
                    file=sys.stderr, flush=True,
                )
    return bad


def make_jpeg_tree(
    root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0, sides: tuple[int, int] = (40, 90)
) -> None:
    """An ImageNet-like tree of smooth random JPEGs, ``sides`` px on each side, for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            name = f"n{c:08d}"
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                width, height = (int(v) for v in rng.integers(sides[0], sides[1] + 1, size=2))
                # Smooth (an upsampled 4x4 grid): resizers that differ by a fraction of a pixel
                # then give nearly equal pixels, as on natural photographs.
                grid = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
                image = Image.fromarray(grid).resize((width, height), Image.BICUBIC)
                image.save(folder / f"{name}_{i}.JPEG", quality=90)
