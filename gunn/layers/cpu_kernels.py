"""C++ kernels of the GUNN fast path on the CPU: whole update units, BatchNorm(+ReLU) on thin
tensors, layout copies.

The fast path (``fastpath.py``) normalises 12 to 36 channels per unit, where ATen's
channels_last BatchNorm is 1.7 to 4.4 times slower than a plain two-pass kernel, and runs
one unit after another, where each unit's dozen ATen calls from Python cost about as much
as its arithmetic on 8x8 and 16x16 inputs. ``cpu_kernels.cpp`` holds the BatchNorm kernels,
a tiled NCHW <-> channels_last copy and a unit's forward and backward as one call each
(ATen's convolutions and matrix products, these BatchNorms). It is compiled with the
system's C++ compiler on first use (10 to 60 seconds, once per machine, CPU type and torch
version; cached under ``GUNN_KERNEL_DIR``, by default ``~/.cache/gunn/kernels``) and
registered as ``torch.ops.gunn_cpu``. Without a compiler, or with ``GUNN_CPU_KERNELS=0``,
the fast path composes the same units from ATen ops in Python: same numbers up to
rounding, slower.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

# Tests switch this off to cover the ATen path.
ENABLED = os.environ.get("GUNN_CPU_KERNELS", "1") != "0"

# Instruction sets the build may use, by what torch reports for this CPU (the build
# directory is per instruction set, so one shared home directory serves mixed nodes).
_ARCH_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}

_lock = threading.Lock()
_loaded: bool | None = None


def available() -> bool:
    """Whether the kernels can be used in this process, building them on the first call."""
    global _loaded
    if not ENABLED:
        return False
    if _loaded is None:
        with _lock:
            if _loaded is None:
                _loaded = _load()
    return _loaded


def build_directory() -> Path:
    """Where the compiled kernels for this CPU and torch version are kept."""
    root = Path(os.environ.get("GUNN_KERNEL_DIR", Path.home() / ".cache" / "gunn" / "kernels"))
    version = torch.__version__.split("+")[0]
    return root / f"torch{version}-{torch.backends.cpu.get_cpu_capability().lower()}"


def _load() -> bool:
    # cpp_extension logs "No CUDA runtime is found" on import: irrelevant to a CPU build.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension  # noqa: PLC0415 (slow import, needed once)
    finally:
        log.setLevel(level)

    if shutil.which("ninja") is None:  # the pip package's binary, when its venv is not on PATH
        try:
            import ninja  # noqa: PLC0415

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    capability = torch.backends.cpu.get_cpu_capability()
    name = "gunn_cpu_kernels"
    directory = build_directory()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fresh = not (directory / f"{name}.so").exists()
        if fresh:
            print(f"gunn: compiling the CPU kernels into {directory} (once, 10-60 s)",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        cpp_extension.load(
            name,
            [str(SOURCE)],
            # -fopenmp for at::parallel_for's pragmas; the OpenMP runtime is the one torch loaded.
            extra_cflags=["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, [])],
            build_directory=str(directory),
            is_python_module=False,
        )
        if fresh:
            print(f"gunn: CPU kernels ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    except Exception as error:  # noqa: BLE001 (any build failure means: use ATen's kernels)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"gunn: could not build the CPU BatchNorm kernels in {directory} ({first_line[:300]}); GUNN "
            "layers use ATen's slower kernels instead. Install a C++ compiler and ninja (`ninja -C "
            f"{directory}` shows the compiler's errors), or set GUNN_CPU_KERNELS=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
