"""Random images and labels of any shape, for benchmarks."""

from __future__ import annotations

import torch
from torch import Tensor


class Synthetic:
    """``size`` random normal images of ``in_chans`` x ``image_size``^2 with random labels."""

    in_chans = 3

    def __init__(self, size: int, image_size: int, num_classes: int, seed: int = 0) -> None:
        self.size, self.image_size, self.num_classes, self.seed = size, image_size, num_classes, seed

    def __len__(self) -> int:
        return self.size

    def load(self, index: int, augment: bool) -> tuple[Tensor, int]:
        """A fixed random image per index (generated, never stored)."""
        generator = torch.Generator().manual_seed(self.seed * 7_919 + index)
        image = torch.randn(self.in_chans, self.image_size, self.image_size, generator=generator)
        return image, int(torch.randint(0, self.num_classes, (1,), generator=generator))
