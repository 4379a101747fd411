"""python -m gunn.bench.gpu_check STEP --out DIR [--dry-run]: the Python steps of ``.ci/gpu-check``.

The GPU check proves on a machine with an NVIDIA GPU what the CPU test suite cannot: the CUDA
paths run, resume, stay free of host synchronisation, and are fast. Steps:

  versions  torch, CUDA, driver, cuDNN, NCCL, DALI; fails if the driver is too old for torch
  tests     tests/layers and tests/models on CUDA with TF32 off (GUNN_TEST_DEVICE=cuda; a dry
            run only collects them)
  syncfree  training steps of the fast and the generic GUNN path, and SUNN, with CUDA's
            sync-debug mode set to error
  engine    GUNN-18 on synthetic 224 px images in bf16 and channels_last, stopped after 20
            steps, resumed in the same directory with CUDA graphs, finished
  ddp       two ranks through jobs/launch.py --nproc 2 (NCCL with two GPUs, else gloo), with and
            without dist.sync_bn (a dry run leaves that out: it needs CUDA), and a resume
  dali      DALI's mixed decoder against ImageFolder, one engine epoch on a JPEG tree, images/s
  bench     whole training steps: images/s, peak memory and kernels per step of GUNN-18 (fp32 and
            bf16, eager and CUDA graphs), SUNN-18, ResNeXt-50 and DenseNet-169, batch 32 and 256
  report    DIR/summary.json and DIR/summary.md from every step's DIR/STEP.json

Each step writes DIR/STEP.json (ok, seconds, figures, targets, notes) and exits 1 if it failed;
``report`` exits 1 unless every step passed and every target was met. ``--dry-run`` runs every
step on the CPU with tiny shapes (the host-sync check on the meta device, where any read of a
value on the host fails): the test suite does, so that the check cannot rot. MLflow, Ray and
submitit are never imported; DALI only where it is installed.
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

REPO = Path(__file__).resolve().parents[2]
STEPS = ("versions", "tests", "syncfree", "engine", "ddp", "dali", "bench")
# Targets of the GPU work (issue 12): benchmarks printed as met / NOT met, never timed tests.
SPEED_VS_RESNEXT = 1.0  # GUNN-18 images/s / ResNeXt-50 images/s at batch 256, bf16: at least
TIME_VS_SUNN = 1.3  # GUNN-18 step time / SUNN-18 step time at batch 32: at most
MEMORY_VS_SUNN = 1.05  # GUNN-18 activation memory / SUNN-18's: at most


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

    def target(self, name: str, value: float, bound: float, at_least: bool = False) -> None:
        """Records a target, met or not (a dry run's figures come from tiny shapes: not judged)."""
        met = value >= bound if at_least else value <= bound
        self.targets.append({"name": name, "value": round(value, 3), "target": f"{'>=' if at_least else '<='} {bound}",
                             "met": None if self.dry_run else met})
        print(f"  target {name}: {value:.3f} ({'>=' if at_least else '<='} {bound}): "
              f"{'not judged (dry run)' if self.dry_run else 'met' if met else 'NOT met'}", flush=True)

    def fail(self, note: str) -> None:
        self.ok = False
        self.note(f"FAILED: {note}")

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def save(self, out: Path, final: bool = True) -> None:
        """Writes out/STEP.json; before the end (``final=False``) as failed and incomplete, so that a step
        killed by its timeout still leaves what it measured."""
        data = dict(self.__dict__)
        if not final:
            data.update(ok=False, notes=[*self.notes, "FAILED: incomplete (killed or crashed before the end)"])
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


# -- 0. versions ----------------------------------------------------------------------------------

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


# -- 1. tests -------------------------------------------------------------------------------------

def tests(record: Record) -> None:
    try:
        import pytest  # noqa: F401
    except ImportError:
        record.fail("pytest is not installed: put its wheels in .ci/wheels (.ci/gpu-wheels does) and rerun")
        return
    env = dict(os.environ, GUNN_TEST_DEVICE="cpu" if record.dry_run else "cuda")  # conftest.py: TF32 off on CUDA
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/layers", "tests/models"]
    if record.dry_run:  # the suite runs them on the CPU anyway: here only that they import without MLflow & co.
        command.append("--collect-only")
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-2000:], sep="\n", flush=True)
    summary = next((line for line in reversed(done.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed|errors?|tests? collected)\b", line)), "no summary line")
    record.figures["pytest"] = summary.strip("= ")
    if done.returncode != 0:
        record.fail(f"pytest exit status {done.returncode}: {summary}")


# -- 2. syncfree ----------------------------------------------------------------------------------

def _side(model: str) -> int:
    """The image side a registered model was designed for (its ``default_cfg``)."""
    from gunn.models import default_cfg

    return default_cfg(model).input_size[1]


def syncfree(record: Record) -> None:
    from gunn.bench.steps import TrainingStep, build, host_syncs
    from gunn.layers import GunnLayer

    if record.dry_run:
        # On the meta device every read of a value on the host raises: the same property, on the CPU.
        cases, device, size, batch = [("gunn_tiny", "fp32", True), ("gunn_tiny", "fp32", False),
                                      ("sunn_tiny", "fp32", True)], torch.device("meta"), 16, 4
    else:
        cases = [(name, precision, fast) for name, fast in (("gunn18", True), ("gunn18", False), ("sunn18", True))
                 for precision in ("fp32", "bf16")]
        device, size, batch = torch.device("cuda", 0), _side("gunn18"), 8
    clean = True
    for name, precision, fast in cases:
        model = build(name)
        for layer in model.modules():
            if isinstance(layer, GunnLayer):
                layer.fast_path = fast
        path = "" if name.startswith("sunn") else " fast path" if fast else " generic path"
        label = f"{name}{path} {precision}"
        step = TrainingStep(model, batch, size, device, precision)
        for _ in range(2):  # warm-up: cuDNN's algorithm search synchronises
            step()
        if device.type == "meta":
            step()
            found = None
        else:
            found = host_syncs(step, device)
        record.figure(label, "no host sync" if found is None else found)
        clean = clean and found is None
        del step, model
    record.targets.append({"name": "no host sync inside a training step", "value": clean, "target": "true",
                           "met": None if record.dry_run else clean})
    if not clean:
        record.fail("a training step waits for the device (sync-debug mode fired)")


# -- 3. engine ------------------------------------------------------------------------------------

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


# -- 4. ddp ---------------------------------------------------------------------------------------

def _launch(args: list[str], record: Record, label: str) -> str | None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               MLFLOW_DISABLE_TELEMETRY="true")
    done = subprocess.run([sys.executable, str(REPO / "jobs" / "launch.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True)
    output = done.stdout + done.stderr
    rates = re.findall(r"([\d.]+) img/s", output)
    if rates:
        record.figure(f"{label}, last epoch's images/s", float(rates[-1]))
    if done.returncode != 0:
        record.fail(f"{label}: jobs/launch.py exited {done.returncode}:\n{output[-3000:]}")
        return None
    return output


def ddp(record: Record, out: Path) -> None:
    dry = record.dry_run
    gpus = 0 if dry else torch.cuda.device_count()
    # NCCL refuses two ranks on one GPU; gloo shares it (through host memory: slow, but correct).
    backend = "nccl" if gpus >= 2 else "gloo"
    record.figures.update(backend=backend, ranks=2, gpus=gpus)
    base = ["digits", "data.name=synthetic", "data.image_size=32", "data.classes=10", "data.workers=0",
            f"data.samples={256 if dry else 4096}", f"optim.batch_size={32 if dry else 128}",
            "logging.mlflow=false", "logging.progress=false", f"dist.backend={backend}",
            f"runtime.device={'cpu' if dry else 'cuda'}", "--nproc", "2"]
    plain = out / "ddp-plain"
    if _launch(base + ["optim.epochs=1", f"checkpoint.dir={plain}"], record, "2 ranks") is None:
        return
    resumed = _launch(base + ["optim.epochs=2", f"checkpoint.dir={plain}"], record, "2 ranks resumed")
    if resumed is not None and "resuming" not in resumed:
        record.fail("the second launch did not resume from the first one's checkpoint")
    if dry:  # SyncBatchNorm needs CUDA: on the CPU dist.sync_bn is ignored (with a warning)
        return
    synced = _launch(base + ["optim.epochs=1", "dist.sync_bn=true", f"checkpoint.dir={out / 'ddp-syncbn'}"],
                     record, "2 ranks with dist.sync_bn")
    if synced is not None and "BatchNorm layers synchronised" not in synced:
        record.fail("dist.sync_bn did not convert any BatchNorm")


# -- 5. dali --------------------------------------------------------------------------------------

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
    make_jpeg_tree(root, classes=4, train_per_class=8 if dry else 64, val_per_class=4 if dry else 8,
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
        f"runtime.device={device.type}", "runtime.amp=bf16", "logging.mlflow=false", "logging.progress=false",
        f"checkpoint.dir={out / 'dali-run'}"]))
    record.note(f"engine epoch with DALI: {run.status}, {run.history[-1]['images_per_s']:.0f} images/s")
    if run.status != "finished":
        record.fail("the engine epoch on DALI did not finish")
    batch = 16 if dry else 256
    big = out / "jpeg-throughput"
    make_jpeg_tree(big, classes=8, train_per_class=(3 * batch) // 8 if dry else 330, val_per_class=1,
                   sides=(100, 200) if dry else (200, 400))
    files, labels, _ = find_images(big, "train")
    loader = DaliLoader(files, labels, train=True, device=device, batch_size=batch, rank=0, world_size=1, seed=0,
                        workers=2 if dry else min(16, os.cpu_count() or 1))
    record.figures[f"DALI training images/s at batch {batch}"] = round(images_per_s(loader, 2 if dry else 20), 1)


# -- 6. bench -------------------------------------------------------------------------------------

def bench(record: Record, budget_s: float, out: Path) -> None:
    from gunn.bench.measure import activation_bytes
    from gunn.bench.steps import build, measure

    dry = record.dry_run
    device = _device(dry)
    if device.type == "cuda":
        from gunn.train.device import set_tf32

        torch.backends.cudnn.benchmark = True
        set_tf32(True)  # as the engine trains (runtime.tf32)
    gunn, sunn, peer = ("gunn_tiny", "sunn_tiny", "resnet18") if dry else ("gunn18", "sunn18", "resnext50_32x4d")
    size = _side(gunn)  # the peers run at the same size
    small, large = (4, 8) if dry else (32, 256)
    graphs = [False] if dry else [False, True]  # CUDA graphs need CUDA
    plan = [(gunn, b, p, g) for b in (small, large) for p in ("fp32", "bf16") for g in graphs]
    plan += [(sunn, b, "bf16", g) for b in (small, large) for g in graphs]
    plan += [(peer, b, "bf16", g) for b in (small, large) for g in graphs] + [(peer, large, "fp32", False)]
    optional = [] if dry else [("densenet169", large, "bf16", False)]
    results: dict[tuple, Any] = {}
    started = time.perf_counter()
    rows = []
    for i, (name, batch, precision, graph) in enumerate(plan + optional):
        if i >= len(plan) and time.perf_counter() - started > 0.6 * budget_s:
            record.note(f"{name}: left out, the step's time budget ({budget_s:.0f} s) is mostly spent")
            continue
        label = f"{name} b{batch} {precision}{' graphs' if graph else ''}"
        try:
            r = measure(name, batch, size, device, precision, graphs=graph, warmup=2 if dry else 3,
                        steps=2 if dry else (10 if batch == large else 20))
        except Exception as err:  # an OOM or a capture failure is a finding, reported with the rest
            record.fail(f"{label}: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}")
            continue
        results[(name, batch, precision, graph)] = r
        rows.append(r.as_dict())
        record.figures["steps"] = rows
        record.save(out, final=False)
        print(f"  {label:34s} {r.images_per_s:9.1f} images/s  {r.step_ms:8.1f} ms  peak {r.peak_mb:9.1f} MB  "
              f"kernels {r.kernels}  launches {r.launches}", flush=True)
    record.figures["steps"] = rows

    def best(name: str, batch: int, precision: str) -> float | None:
        rates = [results[k].images_per_s for k in results if k[:3] == (name, batch, precision)]
        return max(rates) if rates else None

    g, p = best(gunn, large, "bf16"), best(peer, large, "bf16")
    if g and p:
        record.target(f"{gunn}/{peer} images/s, batch {large}, bf16 (best of eager and graphs)", g / p,
                      SPEED_VS_RESNEXT, at_least=True)
    mode = graphs[-1]
    g, s = results.get((gunn, small, "bf16", mode)), results.get((sunn, small, "bf16", mode))
    if g and s:
        record.target(f"{gunn}/{sunn} step time, batch {small}, bf16{' graphs' if mode else ''}",
                      g.step_ms / s.step_ms, TIME_VS_SUNN)
    # Activation memory kept for backward, as the benchmark's memory section measures it.
    memory = {}
    for name in (gunn, sunn):
        model = build(name).to(device, memory_format=torch.channels_last)
        x = torch.randn(small, 3, size, size, device=device).to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            memory[name] = activation_bytes(model, x)
        del model, x
    record.figures["activation MiB, batch %d bf16" % small] = {k: round(v / 2**20, 1) for k, v in memory.items()}
    record.target(f"{gunn}/{sunn} activation memory, batch {small}, bf16", memory[gunn] / memory[sunn],
                  MEMORY_VS_SUNN)
    if any(t["met"] is False for t in record.targets):
        record.fail("a target was missed")


# -- report ---------------------------------------------------------------------------------------

def report(out: Path) -> int:
    """Gathers the steps' records into DIR/summary.json and DIR/summary.md; 0 if all passed."""
    records, missing = [], []
    for step in STEPS:
        path = out / f"{step}.json"
        if path.is_file():
            records.append(json.loads(path.read_text()))
        else:
            missing.append(step)
    targets = [t for r in records for t in r.get("targets", [])]
    passed = not missing and all(r.get("ok") for r in records) and all(t["met"] is not False for t in targets)
    dry = any(r.get("dry_run") for r in records)
    lines = [f"# GPU check{' (dry run on the CPU: tiny shapes, figures not judged)' if dry else ''}", ""]
    versions = next((r for r in records if r["step"] == "versions"), None)
    if versions:
        f = versions["figures"]
        lines += [f"Machine: {f.get('gpu', 'no GPU')} x{f.get('gpus', 0)}, {f.get('cpu_cores')} CPU cores; "
                  f"torch {f.get('torch')} (CUDA {f.get('torch_cuda')}), driver {f.get('driver')} (CUDA "
                  f"{f.get('driver_cuda')}), cuDNN {f.get('cudnn')}, NCCL {f.get('nccl')}, DALI {f.get('dali')}", ""]
    lines += ["| step | result | seconds |", "| --- | --- | --- |"]
    for r in records:
        result = "passed" if r.get("ok") else "FAILED"
        lines.append(f"| {r['step']} | {result} | {r.get('seconds', 0):.0f} |")
    lines += [f"| {step} | FAILED (no record: crashed or timed out) | |" for step in missing]
    if targets:
        lines += ["", "| target | value | wanted | |", "| --- | --- | --- | --- |"]
        for t in targets:
            verdict = "not judged" if t["met"] is None else "met" if t["met"] else "NOT met"
            lines.append(f"| {t['name']} | {t['value']} | {t['target']} | {verdict} |")
    steps = next((r["figures"].get("steps") for r in records if r["step"] == "bench"), None)
    if steps:
        lines += ["", "| model | batch | precision | CUDA graphs | images/s | ms/step | peak MB | kernels | launches |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s in steps:
            lines.append(f"| {s['model']} | {s['batch']} | {s['precision']} | {'yes' if s['graphs'] else 'no'} | "
                         f"{s['images_per_s']:.1f} | {s['step_ms']:.1f} | {s['peak_mb']:.0f} | {s['kernels']} | "
                         f"{s['launches'] if s['launches'] is not None else '-'} |")
    for r in records:
        if r["step"] == "versions":  # in the machine line above
            continue
        notes = [*r.get("notes", []), *(f"{k}: {v}" for k, v in r.get("figures", {}).items() if k != "steps")]
        if notes:
            lines += ["", f"**{r['step']}**", *[f"- {n}" for n in notes]]
    lines += ["", f"gpu-check: {'all passed' if passed else 'FAILURES'}"]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps({"passed": passed, "dry_run": dry, "missing": missing,
                                                   "steps": records}, indent=1))
    print("\n".join(lines))
    return 0 if passed else 1


# -- main -----------------------------------------------------------------------------------------

def run_step(name: str, out: Path, work: Path, dry_run: bool, budget_s: float) -> int:
    """Runs one step with its files in ``work``, writes out/NAME.json, returns its exit status."""
    record = Record(name, dry_run)
    actions: dict[str, Callable[[], None]] = {
        "versions": lambda: versions(record), "tests": lambda: tests(record), "syncfree": lambda: syncfree(record),
        "engine": lambda: engine(record, work), "ddp": lambda: ddp(record, work), "dali": lambda: dali(record, work),
        "bench": lambda: bench(record, budget_s, out),
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
    parser = argparse.ArgumentParser(prog="python -m gunn.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=[*STEPS, "report"])
    parser.add_argument("--out", type=Path, required=True, help="folder for STEP.json, summary.json and summary.md")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with tiny shapes (the test suite's run)")
    parser.add_argument("--budget-s", type=float, default=200.0, help="bench: seconds after which optional models "
                        "are left out (default 200)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.step == "report":
        return report(args.out)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    (args.out / f"{args.step}.json").unlink(missing_ok=True)  # a step that dies leaves no stale record
    with tempfile.TemporaryDirectory(prefix=f"gunn-gpu-check-{args.step}-") as work:  # run directories, JPEGs
        return run_step(args.step, args.out, Path(work), args.dry_run, args.budget_s)


if __name__ == "__main__":
    sys.exit(main())
