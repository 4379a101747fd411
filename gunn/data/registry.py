"""The data sets by name: the one list that the configuration (``data.name``), the loaders and the sweep report
read. A data set is a function registered with ``register_dataset``, from the data configuration and one
rank's ``Loading`` to its ``DataBundle``, with what its images are before any is read.

This module imports nothing of gunn: the configuration reads it while it checks ``data.name`` (importing it runs
``gunn/data/__init__.py``, which registers the data sets that come with gunn, in ``gunn.data.datasets``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class DataSet:
    """A registered data set: its function, and what its images are before any is read.

    ``image_size`` (side of the square training images, as the loaders give them) and ``num_classes`` None:
    the configuration's ``data.image_size`` and ``data.classes``. ``train_images``: the training images, where
    that is known without reading them (a number, or a function of the data configuration; None: unknown).
    ``check``: a cheap check, given the data configuration, that the data is where it says (DataError if not).
    """

    name: str
    read: Callable[..., Any]
    in_chans: int
    image_size: int | None
    num_classes: int | None
    train_images: int | Callable[[Any], int | None] | None = None
    check: Callable[[Any], None] | None = None


_DATASETS: dict[str, DataSet] = {}


def register_dataset(name: str, *, in_chans: int, image_size: int | None, num_classes: int | None,
                     train_images: int | Callable[[Any], int | None] | None = None,
                     check: Callable[[Any], None] | None = None) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: registers the function as data set ``name`` (``data.name=NAME``), described as ``DataSet``."""

    def register(read: Callable[..., Any]) -> Callable[..., Any]:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is already registered")
        _DATASETS[name] = DataSet(name, read, in_chans, image_size, num_classes, train_images, check)
        return read

    return register


def list_datasets() -> list[str]:
    """The registered data sets' names, in the order they were registered."""
    return list(_DATASETS)


def find_dataset(name: str) -> DataSet | None:
    """The data set registered as ``name``, or None."""
    return _DATASETS.get(name)
