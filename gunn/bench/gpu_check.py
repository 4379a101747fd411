"""python -m gunn.bench.gpu_check STEP --out DIR [--dry-run]: the Python steps of ``.ci/gpu-check``.

The GPU check proves on a machine with an NVIDIA GPU what the CPU test suite cannot: the CUDA
paths run, resume, stay free of host synchronisation, and are fast. It runs as two commands
(``.ci/gpu-check DIR first``, then ``.ci/gpu-check DIR second``), the figures that matter most first:

  first:
  versions    torch, CUDA, driver, cuDNN, NCCL, DALI, pytest; fails if the driver is too old for torch
  bench       activation memory of GUNN-18 and SUNN-18, then training steps (bf16): GUNN-18, SUNN-18 and
              ResNeXt-50 at batch 256 (eager) and 32 (eager and CUDA graphs), then fp32 (TF32) rows at
              batch 32 if time allows: images/s, peak memory, graph pool, kernels, dispatched operations.
              The targets are recorded as soon as their rows exist
  syncs       host synchronisations per training step in the engine's own loop (train_one_epoch),
              GUNN-18 at batch 32, eager and CUDA graphs, fp32/bf16/fp16, its generic path and SUNN-18
  engine      GUNN-18 on synthetic 224 px images in bf16 and channels_last, stopped after 20 steps,
              resumed in the same directory with CUDA graphs, finished
  second:
  tests       tests/layers and tests/models on CUDA with TF32 off (GUNN_TEST_DEVICE=cuda; a dry run only
              collects them); pytest's output is streamed into DIR/tests.log as it runs
  ddp         one rank in an NCCL process group (jobs/launch.py --nproc 1 dist.backend=nccl; gloo in a
              dry run), then two ranks (NCCL with two GPUs, else gloo sharing one), resumed, and with
              dist.sync_bn (CUDA only)
  dali        DALI's mixed decoder against ImageFolder, one engine epoch on a JPEG tree, images/s
  bench-more  the rest: GUNN-18 and SUNN-18 compiled (torch.compile, reduce-overhead) beside their
              eager and CUDA graph rows, DenseNet-169, batch 256 with CUDA graphs, fp32 (TF32) rows
  report      DIR/summary.json and DIR/summary.md from every step's DIR/STEP.json

Each step writes DIR/STEP.json (ok, seconds, figures, targets, notes) and exits 1 if it failed;
the bench steps save it after every row, so a step killed by its time limit keeps what it
measured. ``report`` exits 1 unless every step (of ``--steps``, if given) passed and met its
targets. ``--dry-run`` runs the steps on the CPU with tiny shapes (the host syncs counted with the
dispatcher): the test suite does, so that the check cannot rot. MLflow, Ray and submitit are never
imported; DALI only where it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The folder that holds the gunn package: a checkout (whose tests the tests step runs) or site-packages.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
COMMANDS = {
    "first": ("versions", "bench", "syncs", "engine"),
    "second": ("tests", "ddp", "dali", "bench-more"),
}
STEPS = tuple(step for steps in COMMANDS.values() for step in steps)
# Targets of the GPU work (issue 24): benchmarks printed as met / NOT met, never timed tests.
SPEED_VS_RESNEXT = 1.0  # GUNN-18 images/s / ResNeXt-50 images/s at batch 256, bf16: at least
TIME_VS_SUNN = 1.3  # GUNN-18 step time / SUNN-18 step time at batch 256, bf16: at most
MEMORY_VS_SUNN = 1.05  # GUNN-18 activation memory / SUNN-18's: at most
# A dry run compiles with AOTAutograd and no code generation: Dynamo's graph and the joint forward and
# backward are what the check's compile rows need; Inductor's C++ build of every kernel would take
# minutes on a small CPU (the layers' own tests run Inductor on the CPU).
DRY_COMPILE = {"backend": "aot_eager"}
DRY_SIDE = 16  # the image side of a dry run's steps (the CPU's bfloat16 is slow)


@dataclass
class Record:
    """What one step found: the content of DIR/STEP.json."""

    step: str
    dry_run: bool
    ok: bool = True
    seconds: float = 0.0
    figures: dict[str, Any] = field(default_factory=dict)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _started: float = field(default_factory=time.perf_counter, repr=False)  # not saved

    def as_dict(self) -> dict[str, Any]:
        """The record as DIR/STEP.json holds it."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def target(self, name: str, value: float, bound: float, at_least: bool = False, rows: str | None = None) -> None:
        """Records a target, met or not, in place of an earlier one of that name; ``rows``: what it was computed
        from. (A dry run's figures come from tiny shapes: not judged.)"""
        met = value >= bound if at_least else value <= bound
        wanted = f"{'>=' if at_least else '<='} {bound}"
        entry = {"name": name, "value": round(value, 3), "target": wanted, "met": None if self.dry_run else met}
        if rows is not None:
            entry["rows"] = rows
        self.targets = [t for t in self.targets if t["name"] != name] + [entry]
        print(f"  target {name}{f' ({rows})' if rows else ''}: {value:.3f} ({wanted}): "
              f"{'not judged (dry run)' if self.dry_run else 'met' if met else 'NOT met'}", flush=True)

    def fail(self, note: str) -> None:
        self.ok = False
        self.note(f"FAILED: {note}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def save(self, out: Path, final: bool = True, doing: str | None = None) -> None:
        """Writes out/STEP.json; before the end (``final=False``) as failed and incomplete, naming what it is
        ``doing`` next, so that a step killed by its time limit still leaves what it measured."""
        data = self.as_dict()
        if not final:
            during = f" while {doing}" if doing else ""
            data.update(ok=False, seconds=round(time.perf_counter() - self._started, 1),
                        notes=[*self.notes, f"FAILED: incomplete: killed or crashed{during}"])
        (out / f"{self.step}.json").write_text(json.dumps(data, indent=1, default=str))

    def figure(self, name: str, value: Any) -> None:
        self.figures[name] = value
        print(f"  {name}: {value}", flush=True)


def _device(dry_run: bool) -> torch.device:
    if dry_run:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        from gunn.train.device import cuda_problem

        raise RuntimeError(f"CUDA is not usable: {cuda_problem()}")
    return torch.device("cuda", 0)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


# -- versions -------------------------------------------------------------------------------------

def versions(record: Record) -> None:
    from gunn.train import device

    f = record.figures
    f.update(torch=torch.__version__, torch_cuda=torch.version.cuda, python=platform.python_version(),
             cpu_cores=os.cpu_count(), driver=device.driver_version())
    driver_cuda = device.driver_cuda_version()
    f["driver_cuda"] = None if driver_cuda is None else f"{driver_cuda // 1000}.{driver_cuda % 1000 // 10}"
    try:
        import nvidia.dali

        f["dali"] = nvidia.dali.__version__
    except ImportError:
        f["dali"] = "not installed"
    try:
        import pytest

        f["pytest"] = f"{pytest.__version__} ({Path(pytest.__file__).parents[1]})"
    except ImportError:
        f["pytest"] = "not installed (.ci/gpu-check installs it from .ci/wheels for the tests step)"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        f.update(gpu=props.name, gpus=torch.cuda.device_count(), capability=f"{props.major}.{props.minor}",
                 memory_gib=round(props.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version(),
                 nccl=".".join(map(str, torch.cuda.nccl.version())))
    for key, value in f.items():
        print(f"  {key:12s} {value}", flush=True)
    if record.dry_run:
        record.note("dry run: CUDA not required")
        return
    if not torch.cuda.is_available():
        record.fail(f"CUDA is not usable: {device.cuda_problem()}")
        return
    need = int(torch.version.cuda.split(".")[0])
    if driver_cuda is not None and driver_cuda // 1000 < need:
        record.fail(f"the driver supports CUDA {f['driver_cuda']}, torch is built for {torch.version.cuda}")


# -- tests ----------------------------------------------------------------------------------------

def tests(record: Record, out: Path) -> None:
    if not (PACKAGE_PARENT / "tests" / "layers").is_dir():
        record.fail(f"the tests step runs a checkout's tests/layers and tests/models; {PACKAGE_PARENT} holds none "
                    "(gunn is installed, not checked out): run .ci/gpu-check from a checkout")
        return
    try:
        import pytest  # noqa: F401
    except ImportError:
        record.fail("pytest is not importable, and .ci/gpu-check could not install it from .ci/wheels")
        return
    env = dict(os.environ, GUNN_TEST_DEVICE="cpu" if record.dry_run else "cuda",  # conftest.py: TF32 off on CUDA
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "tests/layers", "tests/models"]
    if record.dry_run:  # the suite runs them on the CPU anyway: here only that they import without MLflow & co.
        command += ["-q", "--collect-only"]
    else:  # one line per test as it ends, so that a run killed by its time limit says where it was
        command += ["-v", "-rfE", "--durations=15", f"--junitxml={out / 'tests-junit.xml'}"]
    lines: list[str] = []
    with subprocess.Popen(command, cwd=PACKAGE_PARENT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1) as done:
        assert done.stdout is not None
        for line in done.stdout:  # streamed into DIR/tests.log (the step's output) as pytest writes it
            if not (record.dry_run and line.startswith("tests/")):  # a dry run's list of the tests collected
                print(line, end="", flush=True)
            lines.append(line.rstrip("\n"))
    summary = next((line for line in reversed(lines)
                    if re.search(r"\d+ (passed|failed|errors?|tests? collected)\b", line)), "no summary line")
    record.figures["pytest"] = summary.strip("= ")
    if done.returncode != 0:
        record.fail(f"pytest exit status {done.returncode}: {summary}")


# -- syncs ----------------------------------------------------------------------------------------

def _side(model: str) -> int:
    """The image side a registered model was designed for (its ``default_cfg``)."""
    from gunn.models import default_cfg

    return default_cfg(model).input_size[1]


def syncs(record: Record, out: Path) -> None:
    from gunn.bench.steps import release
    from gunn.bench.syncs import engine_syncs

    dry = record.dry_run
    gunn, sunn = ("gunn_tiny", "sunn_tiny") if dry else ("gunn18", "sunn18")
    batch, warmup, steps = (2, 1, 2) if dry else (32, 3, 10)
    size = DRY_SIDE if dry else _side(gunn)
    # (label, model, CUDA graphs, precision, fast path), the most telling first.
    cases = [(f"{gunn} {mode} {precision}", gunn, mode == "graphs", precision, True)
             for precision in ("bf16", "fp32", "fp16") for mode in ("eager", "graphs")]
    cases += [(f"{gunn} generic path eager bf16", gunn, False, "bf16", False),
              (f"{sunn} eager bf16", sunn, False, "bf16", True)]
    record.figures.update({"model": gunn, "batch": batch, "steps counted": steps, "after warm-up steps": warmup,
                           "counted with": "the dispatcher (host reads: .item(), nonzero, ...)" if dry else
                           "CUDA's sync-debug mode 'warn'",
                           "left out": "the stop poll (its reads are counted apart), the progress bar (off)"})
    per_step: dict[str, Any] = {}
    record.figures["host syncs per step"] = per_step
    worst = 0.0
    for label, model, graphs, precision, fast in cases:
        if dry and (graphs or precision == "fp16"):
            per_step[label] = "needs CUDA"
            continue
        record.save(out, final=False, doing=f"counting {label}")
        overrides = [f"model.name={model}", "data.name=synthetic", f"data.image_size={size}", "data.classes=100",
                     f"data.samples={batch * (warmup + steps)}", "data.workers=0", f"optim.batch_size={batch}",
                     f"runtime.amp={'none' if precision == 'fp32' else precision}",
                     f"runtime.cuda_graphs={'true' if graphs else 'false'}",
                     f"runtime.device={'cpu' if dry else 'cuda'}"]
        try:
            found = engine_syncs(label, overrides, warmup=warmup, steps=steps, fast_path=fast)
        except Exception as err:  # a failed capture or step is a finding; the other cases still run
            traceback.print_exc()
            per_step[label] = f"failed: {_first_line(err)}"
            record.fail(f"{label}: {_first_line(err)}")
            found = None
        release(_device(dry))
        if found is None:
            continue
        per_step[label] = round(found.per_step, 2)
        worst = max(worst, found.per_step)
        print(f"  {label:36s} {found.per_step:6.2f} host syncs per step ({found.syncs} in {steps} steps; "
              f"{found.polls} stop poll(s) left out, {found.poll_syncs} sync(s))", flush=True)
        if found.where:
            record.figures.setdefault("where", {})[label] = found.where
            print(f"    where: {found.where}", flush=True)
        if found.polls:
            record.figures.setdefault("stop polls left out", {})[label] = f"{found.polls} ({found.poll_syncs} syncs)"
    if any(isinstance(value, float) for value in per_step.values()):  # else no case was counted: failed above
        record.target("host syncs per training step, worst case", worst, 0)
        if record.targets[-1]["met"] is False:
            record.fail("a training step waits for the device")


# -- engine ---------------------------------------------------------------------------------------

def engine(record: Record, out: Path) -> None:
    from gunn import config as cfgmod
    from gunn.train.engine import train

    dry = record.dry_run
    batch, size, model = (8, 16, "gunn_tiny") if dry else (32, _side("gunn18"), "gunn18")
    stop, steps = (3, 6) if dry else (20, 30)
    run_dir = out / "engine-run"
    overrides = [
        f"model.name={model}", "data.name=synthetic", f"data.image_size={size}", "data.classes=100",
        f"data.samples={batch * steps}", f"data.workers={0 if dry else min(8, os.cpu_count() or 1)}",
        f"optim.batch_size={batch}", "optim.epochs=1", "runtime.amp=bf16", "runtime.channels_last=true",
        f"runtime.device={'cpu' if dry else 'cuda'}", "logging.mlflow=false", "logging.progress=false",
        f"checkpoint.dir={run_dir}",
    ]
    first = train(cfgmod.load("digits", overrides), stop_after=stop)
    record.note(f"first run: {first.status} after {stop} steps")
    if first.status != "interrupted":
        record.fail(f"the first run should have been interrupted after {stop} steps, it ended {first.status}")
        return
    graphs = [] if dry else ["runtime.cuda_graphs=true"]
    started = time.perf_counter()
    second = train(cfgmod.load("digits", overrides + graphs))
    record.note(f"resumed{' with CUDA graphs' if graphs else ''}: {second.status}, {second.epochs_done} epoch(s)")
    if second.status != "finished" or second.epochs_done != 1:
        record.fail("the resumed run did not finish")
        return
    last = second.history[-1]
    record.figures.update({"resumed steps": steps - stop, "resumed seconds": round(time.perf_counter() - started, 1),
                           "epoch images/s": round(last["images_per_s"], 1),
                           "peak memory MB": round(last["peak_memory_mb"], 1),
                           "eval top-1 error %": round(last["eval_top1_error"], 2)})


# -- ddp ------------------------------------------------------------------------------------------

def _launch(args: list[str], record: Record, label: str, out: Path) -> str | None:
    """Runs the launcher (``gunn-launch``, as ``python -m gunn.cluster.launch``: no checkout needed) with ``args``
    in ``out``; its output, or None (recorded as a failure) if it failed."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=os.pathsep.join(filter(None, [str(PACKAGE_PARENT), os.environ.get("PYTHONPATH")])))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gunn.cluster.launch", *args], cwd=out, env=env,
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    rates = re.findall(r"([\d.]+) img/s", output)
    record.figure(f"{label}: seconds", round(time.perf_counter() - started, 1))
    if rates:
        record.figure(f"{label}: last epoch's images/s", float(rates[-1]))
    if done.returncode != 0:
        record.fail(f"{label}: jobs/launch.py exited {done.returncode}:\n{output[-3000:]}")
        return None
    return output


def _in_group(output: str, ranks: int, backend: str, record: Record, label: str) -> None:
    """Fails unless the run said it trained in a ``backend`` process group of ``ranks`` ranks."""
    found = re.search(r"(\d+) ranks? in an? (\w+) process group", output)
    if found is None or (int(found[1]), found[2]) != (ranks, backend):
        said = found[0] if found else "nothing about a process group"
        record.fail(f"{label}: expected {ranks} rank(s) in a {backend} process group, the run said {said}")


def ddp(record: Record, out: Path) -> None:
    dry = record.dry_run
    gpus = 0 if dry else torch.cuda.device_count()
    # One rank in a process group takes every multi-rank code path (DDP, object collectives, the
    # stop poll); with NCCL on a GPU it also runs NCCL's start-up. NCCL refuses two ranks on one
    # GPU: two ranks share it through gloo (host memory: slow, but correct).
    one = "gloo" if dry else "nccl"
    two = "nccl" if gpus >= 2 else "gloo"
    record.figures.update({"1 rank": one, "2 ranks": two, "gpus": gpus})
    base = ["digits", "data.name=synthetic", "data.image_size=32", "data.classes=10", "data.workers=0",
            f"data.samples={256 if dry else 2048}", f"optim.batch_size={32 if dry else 128}",
            "logging.mlflow=false", "logging.progress=false", f"runtime.device={'cpu' if dry else 'cuda'}"]
    label = f"1 rank, {one}"
    output = _launch(base + [f"dist.backend={one}", "optim.epochs=1", f"checkpoint.dir={out / 'ddp-one'}",
                             "--nproc", "1"], record, label, out)
    if output is not None:
        _in_group(output, 1, one, record, label)
    plain = out / "ddp-two"
    pair = base + [f"dist.backend={two}", f"checkpoint.dir={plain}", "--nproc", "2"]
    label = f"2 ranks, {two}"
    output = _launch(pair + ["optim.epochs=1"], record, label, out)
    if output is None:
        return
    _in_group(output, 2, two, record, label)
    resumed = _launch(pair + ["optim.epochs=2"], record, f"{label}, resumed", out)
    if resumed is not None and "resuming" not in resumed:
        record.fail("the second two-rank launch did not resume from the first one's checkpoint")
    if dry:  # SyncBatchNorm needs CUDA: on the CPU dist.sync_bn is ignored (with a warning)
        return
    synced = _launch(base + [f"dist.backend={two}", "optim.epochs=1", "dist.sync_bn=true",
                             f"checkpoint.dir={out / 'ddp-syncbn'}", "--nproc", "2"],
                     record, f"{label}, dist.sync_bn", out)
    if synced is not None and "BatchNorm layers synchronised" not in synced:
        record.fail("dist.sync_bn did not convert any BatchNorm")
    converted = re.search(r"dist.sync_bn: (\d+) BatchNorm layers synchronised", synced or "")
    if converted:
        # torch's SyncBatchNorm drops the statistics of ranks with an empty batch through a boolean mask, whose
        # shape it reads back: one host sync per converted layer and step (torch/nn/modules/_functions.py).
        record.figure("dist.sync_bn host syncs per step (torch's SyncBatchNorm, one per converted layer)",
                      int(converted.group(1)))


# -- dali -----------------------------------------------------------------------------------------

def dali(record: Record, out: Path) -> None:
    from gunn.data.imagenet import dali_available

    if not dali_available():
        record.note("skipped: DALI not installed")
        record.figures["dali"] = "skipped: DALI not installed"
        return
    from gunn import config as cfgmod
    from gunn.bench.loaders import images_per_s
    from gunn.data.imagenet import DaliLoader, ImageFolderSamples, find_images, make_jpeg_tree
    from gunn.data.loader import ShardedLoader
    from gunn.train.engine import train

    dry = record.dry_run
    device = _device(dry)
    root = out / "jpeg"
    make_jpeg_tree(root, classes=4, train_per_class=2 if dry else 32, val_per_class=2 if dry else 8,
                   sides=(60, 120) if dry else (200, 400))
    files, labels, _ = find_images(root, "val")
    common = dict(batch_size=8, rank=0, world_size=1, seed=0, workers=2 if dry else 4)
    decoded = DaliLoader(files, labels, train=False, device=device, **common)
    reference = ShardedLoader(ImageFolderSamples(root, "val", train=False), train=False, **common)
    worst = 0.0
    for (x, y), (rx, ry) in zip(decoded.iterate(0), reference.iterate(0)):
        if x.device.type != device.type or y.device.type != device.type or not torch.equal(y.cpu(), ry):
            record.fail(f"DALI gave images on {x.device}, labels on {y.device} or other labels than ImageFolder")
            return
        worst = max(worst, float((x.cpu() - rx).abs().mean(dim=(1, 2, 3)).max()))
    record.figures["mean |DALI - ImageFolder| per image, worst"] = round(worst, 4)
    if worst > 0.05:
        record.fail(f"DALI's {'mixed ' if device.type == 'cuda' else ''}decoder differs from ImageFolder by {worst}")
    run = train(cfgmod.load("digits", [
        f"model.name={'gunn_tiny' if dry else 'gunn18'}", "data.name=imagenet", f"data.root={root}",
        "data.loader=dali", "data.workers=2", f"optim.batch_size={8 if dry else 32}", "optim.epochs=1",
        f"runtime.device={device.type}", f"runtime.amp={'none' if dry else 'bf16'}",  # the CPU's bf16 is slow
        "logging.mlflow=false", "logging.progress=false",
        f"checkpoint.dir={out / 'dali-run'}"]))
    record.note(f"engine epoch with DALI: {run.status}, {run.history[-1]['images_per_s']:.0f} images/s")
    if run.status != "finished":
        record.fail("the engine epoch on DALI did not finish")
    batch = 16 if dry else 256
    big = out / "jpeg-throughput"
    # Two batches' worth, cycled epoch after epoch: the figure includes DALI's epoch starts.
    make_jpeg_tree(big, classes=8, train_per_class=(2 * batch) // 8, val_per_class=1,
                   sides=(100, 200) if dry else (200, 400))
    files, labels, _ = find_images(big, "train")
    loader = DaliLoader(files, labels, train=True, device=device, batch_size=batch, rank=0, world_size=1, seed=0,
                        workers=2 if dry else min(16, os.cpu_count() or 1))
    record.figures[f"DALI training images/s at batch {batch}"] = round(images_per_s(loader, 2 if dry else 10), 1)


# -- bench, bench-more ----------------------------------------------------------------------------

Row = tuple[str, int, str, str]  # model, batch, precision, mode


class Bench:
    """The rows of a bench step, measured in order and saved as they come, and the ratios between them,
    recorded as soon as the rows they need exist."""

    def __init__(self, record: Record, out: Path, budget_s: float) -> None:
        self.record, self.out, self.budget_s = record, out, budget_s
        self.dry = record.dry_run
        self.device = _device(self.dry)
        self.results: dict[Row, Any] = {}
        self.failed: dict[Row, str] = {}
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = record.figures.setdefault("steps", [])
        self.ratios: dict[str, tuple[float, str]] = {}
        if self.device.type == "cuda":
            from gunn.train.device import set_tf32

            torch.backends.cudnn.benchmark = True
            set_tf32(True)  # as the engine trains (runtime.tf32): the fp32 rows are labelled "fp32 (TF32)"

    def measure(self, rows: list[Row], optional: bool = False, after: Callable[[], None] = lambda: None) -> None:
        """Measures ``rows`` in order, calling ``after`` after each; ``optional`` ones only while the step's
        time budget lasts."""
        from gunn.bench.steps import measure, release

        for row in rows:
            name, batch, precision, mode = row
            label = f"{name} b{batch} {precision} {mode}"
            if optional and time.perf_counter() - self.started > self.budget_s:
                self.record.note(f"{label}: left out, the step's time budget ({self.budget_s:.0f} s) is spent")
                continue
            if self.dry and mode.startswith("graphs"):  # CUDA graphs need CUDA
                if not any(n.startswith("CUDA graph rows") for n in self.record.notes):
                    self.record.note("CUDA graph rows need CUDA: left out in a dry run")
                continue
            self.record.save(self.out, final=False, doing=f"measuring {label}")
            compile_options = DRY_COMPILE if self.dry and mode == "compile" else None
            try:
                r = measure(name, batch, self.size, self.device, precision, mode, warmup=1 if self.dry else 3,
                            steps=1 if self.dry else (10 if batch >= 256 else 20),
                            tf32=self.device.type == "cuda", compile_options=compile_options)
            except Exception as err:  # an OOM, a failed capture or compile is a finding, reported with the rest
                traceback.print_exc()
                self.failed[row] = _first_line(err)
                if mode == "compile":  # torch.compile on these models is work in progress: a finding, not a failure
                    self.record.note(f"{label}: no row, torch.compile failed: {_first_line(err)}")
                else:
                    self.record.fail(f"{label}: {_first_line(err)}")
                r = None
            if r is None:
                release(self.device)  # what the failed row held (its traceback is gone now)
                after()
                continue
            self.results[row] = r
            self.rows.append(r.as_dict())
            print(f"  {label:40s} {r.images_per_s:9.1f} images/s {r.step_ms:8.1f} ms  peak {r.memory_mb:8.0f} MB"
                  f"{f' (pool {r.pool_mb:.0f})' if r.pool_mb is not None else ''}  kernels {r.kernels}  "
                  f"launches {r.launches}  ops {r.ops}", flush=True)
            after()
            self.record.save(self.out, final=False, doing="measuring the next row")

    @property
    def size(self) -> int:
        """The image side of every row: GUNN-18's (the peers run at the same size); 16 px in a dry run."""
        return DRY_SIDE if self.dry else _side("gunn18")

    def best(self, name: str, batch: int, precision: str, modes: tuple[str, ...]) -> tuple[Any, str] | None:
        """The fastest measured row of ``name`` among ``modes``, and a note if a wanted mode is missing."""
        found = [self.results[name, batch, precision, m] for m in modes if (name, batch, precision, m) in self.results]
        if not found:
            return None
        fastest = min(found, key=lambda r: r.step_ms)
        lost = [m for m in modes if (name, batch, precision, m) in self.failed]
        why = f"{name} b{batch} {precision} {'/'.join(lost)} failed: its {fastest.mode} row stands in" if lost else ""
        return fastest, why

    def ratio(self, name: str, a: str, b: str, batch: int, precision: str, modes: tuple[str, ...],
              bound: float | None = None, at_least: bool = False, images: bool = False) -> None:
        """Records a / b of step time (or of images/s), each model's fastest row among ``modes``, as a target
        (``bound``) or a figure, once both models have a row; again when a faster row comes."""
        pa, pb = self.best(a, batch, precision, modes), self.best(b, batch, precision, modes)
        if pa is None or pb is None:
            return
        (ra, why_a), (rb, why_b) = pa, pb
        value = ra.images_per_s / rb.images_per_s if images else ra.step_ms / rb.step_ms
        for why in (why_a, why_b):
            if why and why not in self.record.notes:
                self.record.note(why)
        used = f"{a} {ra.mode}, {b} {rb.mode}"
        if self.ratios.get(name) == (value, used):
            return
        self.ratios[name] = (value, used)
        if bound is None:
            self.record.figure(name, f"{value:.3f} ({used})")
        else:
            self.record.target(name, value, bound, at_least, rows=used)

    def done(self) -> None:
        if any(t["met"] is False for t in self.record.targets):
            self.record.fail("a target was missed")


def bench(record: Record, budget_s: float, out: Path) -> None:
    """The figures that matter most: memory, then GUNN-18 against ResNeXt-50 and SUNN-18 in bf16."""
    from gunn.bench.measure import activation_bytes
    from gunn.bench.steps import build

    b = Bench(record, out, budget_s)
    gunn, sunn, peer = ("gunn_tiny", "sunn_tiny", "resnet18") if b.dry else ("gunn18", "sunn18", "resnext50_32x4d")
    small, large = (2, 4) if b.dry else (32, 256)
    # Activation memory kept for backward, as the benchmark's memory section measures it: first, as it
    # needs nothing else.
    record.save(out, final=False, doing="measuring activation memory")
    memory = {}
    try:
        for name in (gunn, sunn):
            model = build(name).to(b.device, memory_format=torch.channels_last)
            x = torch.randn(small, 3, b.size, b.size, device=b.device).to(memory_format=torch.channels_last)
            with torch.autocast(b.device.type, dtype=torch.bfloat16):
                memory[name] = activation_bytes(model, x)
            del model, x
    except Exception as err:
        traceback.print_exc()
        record.fail(f"activation memory: {_first_line(err)}")
    if len(memory) == 2:
        record.figure(f"activation MiB, batch {small} bf16", {k: round(v / 2**20, 1) for k, v in memory.items()})
        record.target(f"{gunn}/{sunn} activation memory, batch {small}, bf16", memory[gunn] / memory[sunn],
                      MEMORY_VS_SUNN)
    eager, best = ("eager",), ("eager", "graphs")

    def ratios() -> None:
        b.ratio(f"{gunn}/{peer} images/s, batch {large}, bf16, eager", gunn, peer, large, "bf16", eager,
                SPEED_VS_RESNEXT, at_least=True, images=True)
        b.ratio(f"{gunn}/{sunn} step time, batch {large}, bf16, eager", gunn, sunn, large, "bf16", eager, TIME_VS_SUNN)
        b.ratio(f"{gunn}/{sunn} step time, batch {small}, bf16, best of eager and CUDA graphs", gunn, sunn, small,
                "bf16", best)
        b.ratio(f"{gunn}/{peer} images/s, batch {small}, bf16, best of eager and CUDA graphs", gunn, peer, small,
                "bf16", best, images=True)
        b.ratio(f"{sunn}/{peer} step time, batch {small}, bf16, eager", sunn, peer, small, "bf16", eager)

    b.measure([(gunn, large, "bf16", "eager"), (peer, large, "bf16", "eager"), (sunn, large, "bf16", "eager"),
               *[(name, small, "bf16", mode) for mode in best for name in (gunn, sunn, peer)]], after=ratios)
    # Kernels and dispatched operations per step in fp32 (TF32 on a GPU), beside the bf16 rows'.
    b.measure([(name, small, "fp32", "eager") for name in (gunn, sunn, peer)], optional=True)
    b.done()


def bench_more(record: Record, budget_s: float, out: Path) -> None:
    """The remaining rows: eager, CUDA graphs and torch.compile side by side, DenseNet-169, batch 256 with
    CUDA graphs, fp32 (TF32)."""
    b = Bench(record, out, budget_s)
    gunn, sunn, peer = ("gunn_tiny", "sunn_tiny", "resnet18") if b.dry else ("gunn18", "sunn18", "resnext50_32x4d")
    small, large = (2, 4) if b.dry else (32, 256)
    first = out / "bench.json"  # the first command's rows: the eager and CUDA graph rows beside these
    earlier = json.loads(first.read_text())["figures"].get("steps", []) if first.is_file() else []
    options = DRY_COMPILE if b.dry else {"mode": "reduce-overhead"}
    record.figure("compile", f"torch.compile(model, {', '.join(f'{k}={v!r}' for k, v in options.items())})")

    def side_by_side() -> None:
        rows = [r for r in [*earlier, *b.rows] if r["batch"] == small and r["precision"] == "bf16"
                and r["model"] in (gunn, sunn)]
        table = {name: {r["mode"]: round(r["step_ms"], 2) for r in rows if r["model"] == name} for name in (gunn, sunn)}
        record.figures[f"ms per step, batch {small} bf16, by mode"] = table
        name = f"{gunn}/{sunn} step time, batch {small}, bf16, compiled"
        if "compile" in table[gunn] and "compile" in table[sunn] and name not in record.figures:
            record.figure(name, round(table[gunn]["compile"] / table[sunn]["compile"], 3))

    # With several ranks the engine captures a GunnNet stage by stage, so that DDP's all-reduce overlaps the
    # backward; on one GPU this shows what the split costs (one activation copy per stage boundary).
    b.measure([(gunn, small, "bf16", "graphs-stages")], after=side_by_side)
    whole, staged = (b.results.get((gunn, small, "bf16", m)) for m in ("graphs", "graphs-stages"))
    whole_ms = next((r["step_ms"] for r in earlier if (r["model"], r["batch"], r["precision"], r["mode"])
                     == (gunn, small, "bf16", "graphs")), None) if whole is None else whole.step_ms
    if staged is not None and whole_ms:
        record.figure(f"{gunn} b{small} bf16 CUDA graphs stage by stage / whole, step time",
                      round(staged.step_ms / whole_ms, 3))
    # Batch 256 with CUDA graphs; then compiling, which may take the rest of the step's time (SUNN-18's
    # smaller graph first), then what is left while the budget lasts.
    b.measure([(name, large, "bf16", "graphs") for name in (gunn, peer, sunn)], after=side_by_side)
    b.measure([(sunn, small, "bf16", "compile"), (gunn, small, "bf16", "compile")], after=side_by_side)
    rest: list[Row] = [] if b.dry else [("densenet169", large, "bf16", "eager")]
    rest += [(gunn, small, "fp32", "graphs"), (gunn, large, "fp32", "eager"), (peer, large, "fp32", "eager")]
    b.measure(rest, optional=True, after=side_by_side)
    side_by_side()
    b.done()


# -- report ---------------------------------------------------------------------------------------

def report(out: Path, steps: tuple[str, ...] = STEPS) -> int:
    """Gathers the records in DIR into DIR/summary.json and DIR/summary.md; 0 if every one of ``steps`` passed
    and met its targets (a command's own steps: the other command's may not have run yet)."""
    records, missing = [], []
    for step in STEPS:
        path = out / f"{step}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            missing.append(step)
    by_step = {r["step"]: r for r in records}

    def passed(names: tuple[str, ...]) -> bool:
        return all(n in by_step and by_step[n].get("ok") and all(t["met"] is not False for t in by_step[n]["targets"])
                   for n in names)

    everything = passed(STEPS)
    dry = any(r.get("dry_run") for r in records)
    lines = [f"# GPU check{' (dry run on the CPU: tiny shapes, figures not judged)' if dry else ''}", ""]
    versions = by_step.get("versions")
    if versions:
        f = versions["figures"]
        lines += [f"Machine: {f.get('gpu', 'no GPU')} x{f.get('gpus', 0)}, {f.get('cpu_cores')} CPU cores; "
                  f"torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), driver {f.get('driver')} (CUDA "
                  f"{f.get('driver_cuda')}), cuDNN {f.get('cudnn')}, NCCL {f.get('nccl')}, DALI {f.get('dali')}, "
                  f"Python {f.get('python')}", ""]
    lines += ["| command | step | result | seconds |", "| --- | --- | --- | --- |"]
    for command, names in COMMANDS.items():
        for step in names:
            r = by_step.get(step)
            result = "not run (no record)" if r is None else "passed" if r.get("ok") else "FAILED"
            seconds = "" if r is None else f"{r.get('seconds', 0):.0f}"
            lines.append(f"| {command} | {step} | {result} | {seconds} |")
    targets = [t for r in records for t in r.get("targets", [])]
    if targets:
        lines += ["", "| target | value | wanted | |", "| --- | --- | --- | --- |"]
        for t in targets:
            verdict = "not judged" if t["met"] is None else "met" if t["met"] else "NOT met"
            rows_used = f" ({t['rows']})" if t.get("rows") else ""
            lines.append(f"| {t['name']}{rows_used} | {t['value']} | {t['target']} | {verdict} |")
    rows = [s for step in ("bench", "bench-more") for s in by_step.get(step, {}).get("figures", {}).get("steps", [])]
    if rows:
        lines += ["", "Training steps (forward, cross entropy, backward, SGD), channels_last. Peak MB: the "
                  "allocator's peak after warm-up plus, for CUDA graphs, their pool's memory it does not count.", "",
                  "| model | batch | precision | mode | images/s | ms/step | peak MB | graph pool MB | kernels | "
                  "launches | ATen ops |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in rows:
            lines.append(f"| {s['model']} | {s['batch']} | {s['precision']} | {s['mode']} | {s['images_per_s']:.1f} | "
                         f"{s['step_ms']:.1f} | {s['memory_mb']:.0f} | {_cell(s, 'pool_mb', '.0f')} | "
                         f"{_cell(s, 'kernels')} | {_cell(s, 'launches')} | {_cell(s, 'ops')} |")
    syncs = by_step.get("syncs", {}).get("figures", {}).get("host syncs per step")
    if syncs:
        lines += ["", "| host syncs per step (engine loop) | |", "| --- | --- |",
                  *[f"| {label} | {value} |" for label, value in syncs.items()]]
    for r in records:
        if r["step"] == "versions":  # in the machine line above
            continue
        shown = ("steps", "host syncs per step")
        notes = [*r.get("notes", []), *(f"{k}: {v}" for k, v in r.get("figures", {}).items() if k not in shown)]
        if notes:
            lines += ["", f"**{r['step']}**", *[f"- {n}" for n in notes]]
    if missing:
        lines += ["", f"not run yet: {', '.join(missing)}"]
    failures = not passed(tuple(by_step))
    lines += ["", f"gpu-check: {'FAILURES' if failures else 'INCOMPLETE' if missing else 'all passed'}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"passed": everything, "dry_run": dry, "missing": missing,
                                                   "steps": records}, indent=1))
    print("\n".join(lines))
    return 0 if passed(steps) else 1


def _cell(row: dict[str, Any], key: str, spec: str = "") -> str:
    return "-" if row.get(key) is None else format(row[key], spec)


# -- main -----------------------------------------------------------------------------------------

def mark_ended(out: Path, step: str, dry_run: bool, why: str) -> None:
    """Marks out/STEP.json as failed for ``why``, keeping the figures it saved; writes one if the step left none."""
    path = out / f"{step}.json"
    record = json.loads(path.read_text()) if path.is_file() else Record(step, dry_run).as_dict()
    record["ok"] = False
    record["notes"] = [*record.get("notes", []), f"FAILED: {why}"]
    path.write_text(json.dumps(record, indent=1, default=str))


def run_step(name: str, out: Path, work: Path, dry_run: bool, budget_s: float) -> int:
    """Runs one step with its files in ``work``, writes out/NAME.json, returns its exit status."""
    record = Record(name, dry_run)
    actions: dict[str, Callable[[], None]] = {
        "versions": lambda: versions(record), "tests": lambda: tests(record, out),
        "syncs": lambda: syncs(record, out), "engine": lambda: engine(record, work),
        "ddp": lambda: ddp(record, work), "dali": lambda: dali(record, work),
        "bench": lambda: bench(record, budget_s, out), "bench-more": lambda: bench_more(record, budget_s, out),
    }
    print(f"gpu-check step {name}{' (dry run on the CPU)' if dry_run else ''}", flush=True)
    started = time.perf_counter()
    try:
        actions[name]()
    except Exception as err:  # the record says what failed; the traceback goes to the log
        traceback.print_exc()
        record.fail(f"{type(err).__name__}: {err}")
    record.seconds = round(time.perf_counter() - started, 1)
    record.save(out)
    print(f"gpu-check step {name}: {'passed' if record.ok else 'FAILED'} in {record.seconds:.0f} s", flush=True)
    return 0 if record.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gunn.bench.gpu_check", description=__doc__.splitlines()[0],
                                     epilog="\n".join(__doc__.splitlines()[2:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*STEPS, "report"])
    parser.add_argument("--out", type=Path, required=True, help="folder for STEP.json, summary.json and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (the test suite's run)")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="bench, bench-more: seconds after "
                        "which optional rows are left out (default: none)")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS),
                        help="report: exit 0 if these steps passed (default: all)")
    parser.add_argument("--ended", metavar="WHY", help="mark the step's record as failed for this reason (after it "
                        "was stopped or crashed), keeping what it saved; runs nothing")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        return report(args.out, tuple(args.steps))
    if args.ended:
        mark_ended(args.out, args.step, args.dry_run, args.ended)
        return 1
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    (args.out / f"{args.step}.json").unlink(missing_ok=True)  # a step that dies leaves no stale record
    with tempfile.TemporaryDirectory(prefix=f"gunn-gpu-check-{args.step}-") as work:  # run directories, JPEGs
        return run_step(args.step, args.out, Path(work), args.dry_run, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
