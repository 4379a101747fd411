"""The paper's published results (Qiao et al., ICML 2018, Tables 3-5), the one place they are written down.

Each row says the table and the row it comes from, the model of this project that builds that network
(None where none does), the data set and the published figures. The sweep report puts a row's error
beside the measured one when a run used the paper's recipe for that data set (`PAPER_RECIPE`); the
studies ``paper-cifar`` and ``paper-imagenet`` train the rows that have a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaperResult:
    table: str  # "Table 3"
    row: str  # the row's label in the paper
    model: str | None  # the model name that builds it here (gunn.models.create_model), None if none does
    data: str  # cifar10, cifar100 or imagenet
    params_m: float  # published parameters, millions
    top1: float  # published top-1 error, %
    top5: float | None = None  # published top-5 error, % (ImageNet)


def _cifar(row: str, model: str | None, params_m: float, c10: float, c100: float,
           table: str = "Table 3") -> list[PaperResult]:
    return [PaperResult(table, row, model, "cifar10", params_m, c10), PaperResult(table, row, model, "cifar100", params_m, c100)]


RESULTS: tuple[PaperResult, ...] = (
    # Table 3: CIFAR-10/100 test error (%), all with the standard augmentation.
    *_cifar("ResNet-110 (He et al., 2016a; as reported by Huang et al., 2016)", "resnet110", 1.7, 6.41, 27.22),
    *_cifar("FractalNet (Larsson et al., 2016)", None, 38.6, 5.22, 23.30),
    *_cifar("Stochastic Depth (Huang et al., 2016), 1202 layers", None, 10.2, 4.91, 24.58),
    *_cifar("ResNet with pre-act (He et al., 2016b), 1001 layers", None, 10.2, 4.62, 22.71),
    *_cifar("WideResNet-28-10 (Zagoruyko & Komodakis, 2016)", "wrn28_10", 36.5, 4.17, 20.50),
    *_cifar("WideResNet-40-10 (Zagoruyko & Komodakis, 2016)", "wrn40_10", 55.8, 3.80, 18.30),
    *_cifar("ResNeXt-29, 16x64d (Xie et al., 2017)", "resnext29_16x64d", 68.1, 3.58, 17.31),
    *_cifar("DenseNet-BC, L=190, k=40 (Huang et al., 2017b)", "densenet_bc190", 25.6, 3.46, 17.18),
    *_cifar("Snapshot Ensemble, 6 DenseNet-100 (Huang et al., 2017a)", None, 163.2, 3.44, 17.41),
    *_cifar("GUNN-15", "gunn15", 1.6, 4.15, 20.45),
    *_cifar("GUNN-24", "gunn24", 29.6, 3.21, 16.69),
    *_cifar("GUNN-24 Ensemble (6 snapshots)", None, 177.6, 3.02, 15.61),
    # Table 5: the ablation on SUNN (its GUNN rows repeat Table 3's).
    *_cifar("SUNN-15", "sunn15", 1.6, 5.64, 23.75, table="Table 5"),
    *_cifar("SUNN-24", "sunn24", 29.6, 3.88, 19.60, table="Table 5"),
    # Table 4: ImageNet validation error (%), single 224x224 crop.
    PaperResult("Table 4", "VGG-16 (Simonyan & Zisserman, 2014)", "torchvision.vgg16", "imagenet", 138, 28.5, 9.9),
    PaperResult("Table 4", "ResNet-50 (He et al., 2016a)", "torchvision.resnet50", "imagenet", 25.6, 24.0, 7.0),
    PaperResult("Table 4", "ResNeXt-50 (Xie et al., 2017)", "torchvision.resnext50_32x4d", "imagenet", 25.0, 22.2, 6.0),
    PaperResult("Table 4", "DenseNet-264 (Huang et al., 2017b)", "densenet264", "imagenet", 33.3, 22.15, 6.12),
    PaperResult("Table 4", "SUNN-18", "sunn18", "imagenet", 28.9, 26.16, 8.48),
    PaperResult("Table 4", "GUNN-18", "gunn18", "imagenet", 28.9, 21.65, 5.87),
    PaperResult("Table 4", "ResNet-101 (He et al., 2016a)", "torchvision.resnet101", "imagenet", 44.5, 22.0, 6.0),
    PaperResult("Table 4", "ResNeXt-101, 32x4d (Xie et al., 2017)", "resnext101_32x4d", "imagenet", 44.1, 21.2, 5.6),
    # 37.7M as the paper prints it, which is DPN-92's count (Chen et al., 2017, Table 2: DPN-98 has 61.6M).
    PaperResult("Table 4", "DPN-98 (Chen et al., 2017)", "timm.dpn98", "imagenet", 37.7, 20.73, 5.37),
    PaperResult("Table 4", "SE-ResNeXt-101 (Hu et al., 2017)", "timm.seresnext101_32x4d", "imagenet", 49.0, 20.70, 5.01),
    PaperResult("Table 4", "Wide GUNN-18", "wide_gunn18", "imagenet", 45.6, 20.59, 5.52),
)

# The paper's recipes (Section 6.2) as the configuration fields that decide them; a run's result is
# comparable with the paper's when its data set is the paper's and these fields have these values.
PAPER_RECIPE: dict[str, dict[str, Any]] = {
    "cifar": {"optim.epochs": 300, "optim.batch_size": 64, "optim.lr": 0.1, "optim.momentum": 0.9,
              "optim.weight_decay": 1e-4, "optim.schedule": "step", "optim.lr_steps": [0.5, 0.75],
              "optim.gamma": 0.1},
    "imagenet": {"optim.epochs": 90, "optim.batch_size": 256, "optim.lr": 0.1, "optim.momentum": 0.9,
                 "optim.weight_decay": 1e-4, "optim.schedule": "step", "optim.lr_steps": [1 / 3, 2 / 3],
                 "optim.gamma": 0.1},
}


def results(data: str | None = None, *, buildable: bool = False) -> list[PaperResult]:
    """The rows for data set ``data`` (all when None); ``buildable``: only those with a model here."""
    return [r for r in RESULTS if (data is None or r.data == data) and (r.model is not None or not buildable)]


def published(model: str, data: str) -> PaperResult | None:
    """The paper's row for ``model`` trained on ``data``, if the paper has one."""
    return next((r for r in RESULTS if r.model == model and r.data == data), None)


def differs_from_recipe(data: str, settings: dict[str, Any]) -> list[str]:
    """The fields of ``settings`` (configuration field -> value) that differ from the paper's recipe for
    ``data``, as ``field=value (paper: value)``; every field when ``data`` is not one of the paper's."""
    recipe = PAPER_RECIPE.get("imagenet" if data == "imagenet" else "cifar" if data in ("cifar10", "cifar100") else "")
    if recipe is None:
        return [f"data.name={data} (paper: cifar10, cifar100 or imagenet)"]
    return [f"{field}={settings.get(field)} (paper: {value})" for field, value in recipe.items()
            if not _same(settings.get(field), value)]


def _same(given: Any, value: Any) -> bool:
    if isinstance(value, list):
        return isinstance(given, list) and len(given) == len(value) and all(map(_same, given, value))
    if isinstance(value, str):
        return given == value
    return isinstance(given, (int, float)) and not isinstance(given, bool) and math.isclose(given, value, rel_tol=1e-9)


# The throughput the GPU-hours of `gpu_hours` assume: 50 TFLOP/s of useful training work per GPU (an H100
# with bf16 autocast and channels_last reaches about 5-10% of its 989 dense TFLOP/s on these networks;
# an assumption, not a measurement). One training image costs 3 forwards' worth: forward and backward.
ASSUMED_TFLOPS = 50.0
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}


def gpu_hours(macs_per_image: int, data: str) -> float:
    """GPU-hours of one training run of the paper's recipe on ``data`` for a model of ``macs_per_image``
    multiply-adds per image (2 FLOPs each), at ``ASSUMED_TFLOPS``."""
    epochs = PAPER_RECIPE["imagenet" if data == "imagenet" else "cifar"]["optim.epochs"]
    return 3 * 2 * macs_per_image * TRAIN_IMAGES[data] * epochs / (ASSUMED_TFLOPS * 1e12) / 3600


def main() -> None:
    """Prints the paper's rows that gunn builds with their parameters, GMAC per image and the GPU-hours of one
    run of the paper's recipe (python -m gunn.models.paper; the studies table of docs/sweeps.md)."""
    from gunn.models import is_model
    from gunn.models.cost import model_cost

    print(f"| table | row | model | data | parameters | GMAC/image | GPU-hours per run ({ASSUMED_TFLOPS:g} TFLOP/s) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in RESULTS:
        if row.model is None or row.data == "cifar100":
            continue
        if not is_model(row.model):
            print(f"| {row.table} | {row.row} | {row.model} (needs timm) | {row.data} | {row.params_m}M | - | - |")
            continue
        size, classes = (224, 1000) if row.data == "imagenet" else (32, 10)
        count, macs, _ = model_cost(row.model, (3, size, size), num_classes=classes)
        print(f"| {row.table} | {row.row} | {row.model} | {row.data} | {count:,} | {macs / 1e9:.3g} | "
              f"{gpu_hours(macs, row.data):.3g} |")


if __name__ == "__main__":
    main()
