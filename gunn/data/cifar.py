"""CIFAR-10/100 through torchvision's reader, with the paper's augmentation (docs/lifecycle.md, "The paper's recipes")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gunn.data.base import DataError

FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


def check_cifar(root: str | Path | None, classes: int) -> Path:
    """The CIFAR folder under ``root``, or a DataError saying where it belongs and how to get it."""
    name = f"cifar{classes}"
    if root is None:
        raise DataError(f"data.root is required for {name}: the directory that holds {FOLDERS[classes]}/")
    folder = Path(root).expanduser() / FOLDERS[classes]
    if not folder.is_dir():
        raise DataError(
            f"{name} not found: expected {folder}/ (data.root={str(root)!r}). This machine cannot "
            f"download it during a run; fetch it once where there is internet access with\n"
            f"    python -m gunn.data download {name} --root {root}\n"
            f"and copy the {FOLDERS[classes]}/ folder there."
        )
    return folder


class Cifar:
    """A CIFAR split in memory; training crops the 4-pixel zero-padded image and flips it."""

    in_chans = 3

    def __init__(self, root: str | Path | None, classes: int, train: bool) -> None:
        from torchvision.datasets import CIFAR10, CIFAR100

        check_cifar(root, classes)
        reader = CIFAR10 if classes == 10 else CIFAR100
        try:
            train_set = reader(str(Path(root).expanduser()), train=True, download=False)
            split = train_set if train else reader(str(Path(root).expanduser()), train=False, download=False)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise DataError(f"cifar{classes} in {root} is incomplete or corrupt ({err}); download it again") from None
        self.num_classes = classes
        # Normalisation with the per-channel mean and std of the training set (the paper's recipe).
        pixels = train_set.data.reshape(-1, 3).astype(np.float64) / 255.0
        self.mean = torch.tensor(pixels.mean(0), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(pixels.std(0), dtype=torch.float32).view(3, 1, 1)
        self.images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()  # N, 3, 32, 32 uint8
        self.labels = list(split.targets)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """The normalised image; training: random 32x32 crop of the zero-padded image, random flip."""
        image = self.images[index].float() / 255.0
        if augment:
            padded = F.pad(image, (4, 4, 4, 4))
            dy, dx = torch.randint(0, 9, (2,)).tolist()
            image = padded[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                image = image.flip(-1)
        return (image - self.mean) / self.std, self.labels[index]
