"""scikit-learn's handwritten digits: real images shipped with the package, no download."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

SIZE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the split is fixed: every run and every test sees the same test set


class Digits:
    """1,797 8x8 grey digits upsampled to 32x32; a fixed stratified 80/20 train/test split."""

    num_classes = 10
    in_chans = 1

    def __init__(self, train: bool) -> None:
        from sklearn.datasets import load_digits  # optional at import time: only this data set needs it

        data = load_digits()
        images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
        images = F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        labels = torch.from_numpy(data.target.astype(np.int64))
        test = _stratified_test_mask(labels.numpy(), TEST_FRACTION, SPLIT_SEED)
        train_images = images[~test]
        self.mean, self.std = train_images.mean().item(), train_images.std().item()
        keep = ~test if train else test
        self.images = (images[keep] - self.mean) / self.std
        self.labels = labels[keep].tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """The normalised image; training shifts it by up to 2 pixels (zero padding)."""
        image = self.images[index]
        if augment:
            padded = F.pad(image, (2, 2, 2, 2), value=float(-self.mean / self.std))
            dy, dx = torch.randint(0, 5, (2,)).tolist()
            image = padded[:, dy : dy + SIZE, dx : dx + SIZE]
        return image, self.labels[index]


def _stratified_test_mask(labels: np.ndarray, fraction: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mask = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        mask[rng.choice(where, size=round(len(where) * fraction), replace=False)] = True
    return torch.from_numpy(mask)
