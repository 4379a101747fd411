"""python -m gunn.bench: GUNN vs SUNN, efficient vs plain autograd, side by side in one run.

Sections (``--only`` picks some):
  describe  parameters and FLOPs of every model;
  dispatch  ATen operations dispatched per training step of GUNN-18, SUNN-18 and ResNeXt-50 (fp32
            and bf16 autocast): on a GPU each is a kernel launch, so this hardware-independent
            count says how launch-bound a step is;
  layer     GUNN-15's first layer, and
  models    whole models: activation memory kept for backward and forward+backward time of
            GUNN (memory-saving backward, hand-written for the paper's units), the same on
            the generic container's path, GUNN (recompute), GUNN (plain autograd loop) and
            SUNN with the same weights, and their ratios;
  training  training images/s of GUNN-15 vs SUNN-15 through the training engine, on
            synthetic CIFAR-sized data;
  loaders   images/s of the ImageNet training loaders, DALI on the CPU vs torchvision, on a
            generated JPEG tree.
Times are medians over repetitions taken round-robin, so that load on the machine hits every
variant alike. ``--out FILE`` also writes the output as a markdown page (docs/benchmark.md) that
names the commit, the date, the machine and the command that regenerates it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn.bench.measure import activation_bytes, dispatched_ops, flops, interleaved_medians
from gunn.layers import GunnLayer, set_memory, set_mode
from gunn.models import create_model, default_cfg

# (name, mode, memory, fast path) of every variant measured; all share one set of weights.
VARIANTS = (
    ("gunn", "gunn", "efficient", True),
    ("gunn-generic", "gunn", "efficient", False),
    ("gunn-recompute", "gunn", "recompute", True),
    ("gunn-autograd", "gunn", "autograd", True),
    ("sunn", "sunn", "efficient", True),
)
# Acceptance targets of the model core (issue 2), checked on the printed ratios.
TARGETS = {
    "memory gunn/sunn": 1.15,
    "time gunn/sunn": 1.3,
    "time gunn/gunn-autograd": 1.1,
}
# Dispatched operations per training step (issue 24): the SUNN twin is as lean as a standard
# network of its kind, and bfloat16 autocast adds no operations to a GUNN step.
DISPATCH_MODELS = ("gunn18", "sunn18", "resnext50_32x4d")
DISPATCH_TARGETS = {
    "ops sunn18/resnext50_32x4d, fp32": 1.5,
    "ops gunn18 bf16/fp32": 1.0,
}


def machine() -> str:
    """One line naming the processor, the accelerator if used, and the software."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{cpu}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads){gpu}; "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def _use(module: nn.Module, mode: str, memory: str, fast_path: bool = True) -> nn.Module:
    set_mode(module, mode)
    for layer in module.modules():
        if isinstance(layer, GunnLayer):
            layer.fast_path = fast_path
    return set_memory(module, memory)


def _train_step(module: nn.Module, x: Tensor, target: Tensor | None, autocast: bool) -> Callable[[], None]:
    """One forward + backward; a classifier gets cross entropy, a layer a fixed random gradient."""
    grad = None if target is not None else torch.randn_like(x)

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = module(x)
        if target is not None:
            F.cross_entropy(out.float(), target).backward()
        else:
            out.backward(grad.to(out.dtype))
        module.zero_grad(set_to_none=True)

    return step


def compare(
    title: str,
    module: nn.Module,
    make_input: Callable[[int], Tensor],
    num_classes: int | None,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Measures every variant of ``module`` and prints a table and the target ratios."""
    device = torch.device(args.device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    module = module.to(device, memory_format=fmt).train()
    ratios: dict[str, float] = {}
    print(f"\n## {title} ({'channels_last' if args.channels_last else 'NCHW'}"
          f"{', bf16 autocast' if args.autocast else ''})")

    x_mem = make_input(args.memory_batch).to(device, memory_format=fmt).requires_grad_(num_classes is None)
    memory = {}
    for name, mode, mem, fast in VARIANTS:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.autocast):
            memory[name] = activation_bytes(_use(module, mode, mem, fast), x_mem)
    del x_mem

    x = make_input(args.batch).to(device, memory_format=fmt).requires_grad_(num_classes is None)
    target = torch.randint(0, num_classes, (args.batch,), device=device) if num_classes else None
    steps = {}
    for name, mode, mem, fast in VARIANTS:
        step = _train_step(module, x, target, args.autocast)
        steps[name] = lambda step=step, mode=mode, mem=mem, fast=fast: (_use(module, mode, mem, fast), step())[1]
    seconds = interleaved_medians(steps, repeats=args.repeats, warmup=1, device=device)

    print(f"{'variant':16s} {'activations (MiB)':>18s} {'vs sunn':>8s} {'fwd+bwd (ms)':>13s} {'vs sunn':>8s}")
    for name, *_ in VARIANTS:
        print(
            f"{name:16s} {memory[name] / 2**20:18.1f} {memory[name] / memory['sunn']:8.2f} "
            f"{seconds[name] * 1e3:13.1f} {seconds[name] / seconds['sunn']:8.2f}"
        )
    ratios["memory gunn/sunn"] = memory["gunn"] / memory["sunn"]
    ratios["memory gunn-autograd/sunn"] = memory["gunn-autograd"] / memory["sunn"]
    ratios["memory gunn-recompute/sunn"] = memory["gunn-recompute"] / memory["sunn"]
    ratios["time gunn/sunn"] = seconds["gunn"] / seconds["sunn"]
    ratios["time gunn/gunn-autograd"] = seconds["gunn"] / seconds["gunn-autograd"]
    ratios["time gunn/gunn-generic"] = seconds["gunn"] / seconds["gunn-generic"]
    ratios["time gunn-recompute/gunn"] = seconds["gunn-recompute"] / seconds["gunn"]
    for key, value in ratios.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else f"   (target <= {target}: {'met' if value <= target else 'NOT met'})"
        print(f"  {key:28s} {value:6.2f}{verdict}")
    _use(module, "gunn", "efficient")
    return ratios


def describe_model(name: str, size: tuple[int, int, int]) -> None:
    """Parameters and FLOPs of a model and its SUNN twin (they must be equal) on one ``size`` (C, H, W) input."""
    model = create_model(name)
    x = torch.randn(1, *size)
    params = sum(p.numel() for p in model.parameters())
    gunn_flops = flops(set_mode(model, "gunn"), x)
    sunn_flops = flops(set_mode(model, "sunn"), x)
    print(
        f"{name:12s} {params:>12,d} parameters   {gunn_flops / 2e9:7.2f} GMAC/image (GUNN)   "
        f"{sunn_flops / 2e9:7.2f} GMAC/image (SUNN)   {size[1]}x{size[2]}"
    )


def step_dispatches(name: str, precision: str, batch: int = 2, size: int = 224) -> collections.Counter[str]:
    """ATen operations one training step of ``name`` dispatches (``gunn.bench.steps.TrainingStep``:
    forward under autocast, cross entropy, backward, SGD; channels_last) on the CPU, as on a GPU: the
    fast path's C++ kernels off, the fused SGD."""
    from gunn.bench.steps import TrainingStep, build
    from gunn.layers import cpu_kernels

    torch.manual_seed(0)
    enabled, cpu_kernels.ENABLED = cpu_kernels.ENABLED, False
    try:
        step = TrainingStep(build(name), batch, size, torch.device("cpu"), precision, fused_sgd=True)
        step()  # warm-up: lazy initialisation, the optimiser's state
        return dispatched_ops(step)
    finally:
        cpu_kernels.ENABLED = enabled


def dispatch_counts(size: int = 224) -> dict[tuple[str, str], int]:
    """Prints the dispatched operations per training step of ``DISPATCH_MODELS`` (at ``size`` px; the counts
    do not depend on it) and their target ratios; returns the counts by (model, precision)."""
    print(f"\n## Dispatched operations per training step: batch 2, {size}x{size}, channels_last, forward + cross "
          "entropy + backward + fused SGD, views not counted, the fast path's CPU kernels off (a GPU's operations)")
    counts = {(name, precision): sum(step_dispatches(name, precision, size=size).values())
              for name in DISPATCH_MODELS for precision in ("fp32", "bf16")}
    print(f"{'model':18s} {'fp32':>7s} {'bf16':>7s}")
    for name in DISPATCH_MODELS:
        print(f"{name:18s} {counts[name, 'fp32']:7,d} {counts[name, 'bf16']:7,d}")
    ratios = {
        "ops sunn18/resnext50_32x4d, fp32": counts["sunn18", "fp32"] / counts["resnext50_32x4d", "fp32"],
        "ops gunn18/resnext50_32x4d, fp32": counts["gunn18", "fp32"] / counts["resnext50_32x4d", "fp32"],
        "ops gunn18 bf16/fp32": counts["gunn18", "bf16"] / counts["gunn18", "fp32"],
    }
    for key, value in ratios.items():
        target = DISPATCH_TARGETS.get(key)
        verdict = "" if target is None else f"   (target <= {target}: {'met' if value <= target else 'NOT met'})"
        print(f"  {key:34s} {value:6.3f}{verdict}")
    extra = {name: counts[name, "bf16"] - counts[name, "fp32"] for name in DISPATCH_MODELS}
    print("  bf16 adds " + ", ".join(f"{extra[name]} ({name})" for name in DISPATCH_MODELS)
          + ": autocast's casts of weights and inputs outside the GUNN layers, and per GUNN layer one cast of all "
          "its weights and one of all its weight gradients")
    return counts


def training_throughput(args: argparse.Namespace) -> None:
    """Images/s of the training engine for GUNN-15 and SUNN-15 (second epoch, after warm-up)."""
    from gunn import config as cfgmod
    from gunn.train.engine import train

    print(f"\n## Training images/s through the engine: synthetic CIFAR (32x32, 10 classes), batch {args.train_batch}")
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model in ("gunn15", "sunn15"):
            config = cfgmod.load("gunn15-cifar10", [
                f"model.name={model}", "data.name=synthetic", "data.image_size=32", "data.classes=10",
                f"data.samples={args.train_batch * args.train_batches}", "data.workers=0",
                f"optim.batch_size={args.train_batch}", "optim.epochs=2", "logging.mlflow=false",
                "logging.progress=false", f"runtime.channels_last={str(args.channels_last).lower()}",
                f"runtime.device={args.device}", f"checkpoint.dir={Path(tmp) / model}",
            ] + (["runtime.amp=bf16"] if args.autocast else []))
            with contextlib.redirect_stdout(io.StringIO()):  # the engine's epoch lines
                rates[model] = train(config).history[-1]["images_per_s"]
            print(f"{model:8s} {rates[model]:8.1f} images/s")
    print(f"  training gunn15/sunn15 images/s   {rates['gunn15'] / rates['sunn15']:6.2f}")


def loaders_throughput(args: argparse.Namespace) -> None:
    """Images/s of the DALI (CPU) and torchvision ImageNet training loaders on a generated tree."""
    from gunn.bench.loaders import loader_throughput
    from gunn.data.imagenet import make_jpeg_tree

    batch, batches = 64, 20
    with tempfile.TemporaryDirectory() as tmp:
        make_jpeg_tree(Path(tmp), classes=10, train_per_class=(batches + 1) * batch // 10 + 1, val_per_class=1,
                       sides=(300, 500))
        rates = loader_throughput(Path(tmp), batch_size=batch, batches=batches, workers=os.cpu_count() or 1)
    print(f"\n## ImageNet training loaders: generated JPEGs of 300-500 px, batch {batch}, "
          f"{os.cpu_count()} workers, decode + random-resized-crop 224 + flip")
    for name, rate in rates.items():
        print(f"{name:12s} {rate:8.1f} images/s")
    print(f"  loaders dali_cpu/torchvision       {rates['dali_cpu'] / rates['torchvision']:6.2f}")


SECTIONS = ("describe", "dispatch", "kernels", "layer", "models", "training", "loaders")
PAPER_MODELS = ["gunn15", "gunn24", "gunn18", "wide_gunn18"]


def kernels_speed(args: argparse.Namespace) -> None:
    """ATen vs the fast path's C++ kernels on GUNN-15's BatchNorm shapes and layout copies."""
    from gunn.layers import cpu_kernels  # noqa: PLC0415

    print(f"\n## CPU kernels vs ATen: BatchNorm(+ReLU) fwd and bwd at batch {args.batch}, NCHW <-> channels_last copy")
    if not cpu_kernels.available():
        print("kernels not available (no C++ compiler, or GUNN_CPU_KERNELS=0): nothing to compare")
        return
    aten, ops, cl = torch.ops.aten, torch.ops.gunn_cpu, torch.channels_last
    for size in (32, 16, 8):
        for channels in (36, 24, 12):  # conv1 + projection, hidden, segment: GUNN-15's widths
            x = torch.randn(args.batch, channels, size, size).to(memory_format=cl)
            grad = torch.randn_like(x)
            gamma, beta = torch.ones(channels), torch.zeros(channels)
            out, none = torch.empty_like(x), x.new_empty(0, 0)  # the kernels read channels_last as matrices
            _, mean, invstd = aten.native_batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5)
            seconds = interleaved_medians({
                "aten fwd": lambda: aten.native_batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5),
                "kernel fwd": lambda: ops.bn_forward(x, gamma, beta, None, None, 0.1, 1e-5, none, out, None, False),
                "aten bwd": lambda: aten.native_batch_norm_backward(
                    grad, x, gamma, None, None, mean, invstd, True, 1e-5, [True, True, True]),
                "kernel bwd": lambda: ops.bn_backward(none, none, grad, x, mean, invstd, gamma, out),
            }, repeats=max(args.repeats, 21), warmup=3)
            ms = {k: v * 1e3 for k, v in seconds.items()}
            print(f"{channels:3d} ch {size:2d}x{size:<2d}  fwd aten {ms['aten fwd']:6.3f} ms  kernel "
                  f"{ms['kernel fwd']:6.3f} ms ({ms['aten fwd'] / ms['kernel fwd']:4.1f}x)   bwd aten "
                  f"{ms['aten bwd']:6.3f} ms  kernel {ms['kernel bwd']:6.3f} ms "
                  f"({ms['aten bwd'] / ms['kernel bwd']:4.1f}x)")
    state = torch.randn(args.batch, 240, 32, 32)
    state_cl = torch.empty_like(state, memory_format=cl)
    back = torch.empty_like(state)
    seconds = interleaved_medians({
        "aten to cl": lambda: state_cl.copy_(state), "kernel to cl": lambda: ops.copy_layout(state_cl, state),
        "aten to nchw": lambda: back.copy_(state_cl), "kernel to nchw": lambda: ops.copy_layout(back, state_cl),
    }, repeats=max(args.repeats, 21), warmup=3)
    print(f"copy {args.batch}x240x32x32  to channels_last: aten/kernel "
          f"{seconds['aten to cl'] / seconds['kernel to cl']:4.1f}x   to NCHW: aten/kernel "
          f"{seconds['aten to nchw'] / seconds['kernel to nchw']:4.1f}x")


def input_size(model: str) -> tuple[int, int, int]:
    """The input (channels, height, width) a model was designed for: its ``default_cfg``."""
    defaults = default_cfg(model)
    if defaults is None:
        raise ValueError(f"model {model!r} has no default configuration (input size)")
    return defaults.input_size


# The part of a page that ``--out`` writes; what lies outside the markers is kept as it is.
PAGE_BEGIN = "<!-- begin: written by python -m gunn.bench --out; edits between these markers are overwritten -->"
PAGE_END = "<!-- end: written by python -m gunn.bench --out -->"


def source_commit() -> str:
    """The checkout's commit (short hash), and the files under ``gunn/`` that differ from it, if any."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", "gunn").splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + (f" with uncommitted changes to {', '.join(changed)}" if changed else "")


def _load() -> str:
    """The machine's 1-minute load average, where the system tells it: other work skews the times."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "unknown"


def write_page(path: Path, output: str, argv: list[str], seconds: float, load_before: str) -> None:
    """Writes ``output`` between the page's markers in ``path`` (a new page if it has none), headed by the
    commit, the date, the machine (and its load) and the command that regenerates it."""
    command = shlex.join(["python", "-m", "gunn.bench", *argv])
    block = "\n".join([
        PAGE_BEGIN,
        f"Measured at commit {source_commit()} on {datetime.now(timezone.utc).date().isoformat()} on "
        f"{machine()} (load average {load_before} before, {_load()} after); regenerate with: `{command}` "
        f"(it took {seconds / 60:.1f} minutes).",
        "",
        "```text",
        output.strip("\n"),
        "```",
        PAGE_END,
    ])
    old = path.read_text() if path.exists() else ""
    if PAGE_BEGIN in old and PAGE_END in old:
        head, rest = old.split(PAGE_BEGIN, 1)
        page = head + block + rest.split(PAGE_END, 1)[1]
    else:
        page = "# Benchmark\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page)
    tmp.replace(path)


class _Tee(io.StringIO):
    """Keeps what is printed and passes it on."""

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gunn.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["gunn15"], choices=PAPER_MODELS,
                        help="models timed and measured as a whole (default: gunn15)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the timed steps (default 16)")
    parser.add_argument("--memory-batch", type=int, default=32,
                        help="batch size of the memory measurement (default 32)")
    parser.add_argument("--repeats", type=int, default=11, help="timed repetitions per variant (default 11)")
    parser.add_argument("--layer", default="240,20", help="CHANNELS,SEGMENTS[,SIZE] of the layer measured alone")
    parser.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    parser.add_argument("--autocast", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                        help=f"run only these sections ({', '.join(SECTIONS)}; default: all)")
    parser.add_argument("--train-batch", type=int, default=32, help="batch size of the training section")
    parser.add_argument("--train-batches", type=int, default=6, help="batches per epoch of the training section")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="also write the output as a markdown page headed by the commit, the date, the machine "
                             "and this command (docs/benchmark.md; text outside its markers is kept)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    for name in ("batch", "memory_batch", "repeats", "train_batch", "train_batches"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    try:
        channels, segments, *size = (int(v) for v in args.layer.split(","))
    except ValueError:
        parser.error(f"--layer must be CHANNELS,SEGMENTS[,SIZE], got {args.layer!r}")
    size = size[0] if size else 32
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.out is None:
        run(args, channels, segments, size)
        return 0
    start, load_before = time.monotonic(), _load()
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        run(args, channels, segments, size)
    write_page(args.out, tee.getvalue(), argv, time.monotonic() - start, load_before)
    print(f"\nwritten: {args.out}")
    return 0


def run(args: argparse.Namespace, channels: int, segments: int, size: int) -> None:
    """Every section that ``args.only`` names, printed."""
    torch.manual_seed(0)
    print(f"# gunn benchmark\nmachine: {machine()}")
    print(f"time: batch {args.batch}, median of {args.repeats}; memory: batch {args.memory_batch}")
    if "describe" in args.only:
        print("\n## Models: parameters and FLOPs (1 multiply-add = 1 MAC)")
        for name in PAPER_MODELS:
            describe_model(name, input_size(name))
    if "dispatch" in args.only:
        dispatch_counts()
    if "kernels" in args.only and args.device == "cpu":
        kernels_speed(args)
    if "layer" in args.only:
        layer = GunnLayer(channels, segments)
        compare(f"GunnLayer({channels}, {segments}) at {size}x{size}", layer,
                lambda n: torch.randn(n, channels, size, size), None, args)
    if "models" in args.only:
        for name in args.models:
            model = create_model(name)
            s = input_size(name)
            compare(f"{name} at {s[1]}x{s[2]}", model, lambda n, s=s: torch.randn(n, *s), model.num_classes, args)
    if "training" in args.only:
        training_throughput(args)
    if "loaders" in args.only:
        loaders_throughput(args)


if __name__ == "__main__":
    sys.exit(main())
