"""C++ kernels of the GUNN fast path on the CPU: whole update units, BatchNorm(+ReLU) on thin
tensors, layout copies.

The fast path (``fastpath.py``) normalises 12 to 36 channels per unit, where ATen's
channels_last BatchNorm is slower than a plain two-pass kernel, and runs one unit after
another, where each unit's dozen ATen calls from Python cost as much as its arithmetic on
small feature maps (the benchmark's ``kernels`` section, ``python -m gunn.bench --only
kernels``, and docs/benchmark.md give the figures). ``cpu_kernels.cpp`` holds the BatchNorm kernels,
a tiled NCHW <-> channels_last copy and a unit's forward and backward as one call each
(ATen's convolutions and matrix products, these BatchNorms). It is compiled with the
system's C++ compiler on first use (once per machine, see below) and registered as
``torch.ops.gunn_cpu``. Without a compiler, or with ``GUNN_CPU_KERNELS=0``, the fast path
composes the same units from ATen ops in Python: same numbers up to rounding, slower.

The build cache. Builds live under ``GUNN_KERNEL_DIR`` (by default
``$XDG_CACHE_HOME/gunn/kernels``, else ``~/.cache/gunn/kernels``), one directory per key:
a hash of the source's contents, the compiler flags, the torch build (version, git
revision, C++ ABI) and the CPU's instruction set (the flags depend on it). The source is
copied into that directory and compiled there, and a finished build (marked by ``BUILT``)
is loaded as it is, without asking ninja, whose build file names the venv's include paths:
so every checkout and venv with the same source and torch shares one build per machine,
and a changed source gets a new one. An exclusive ``flock`` on the directory's
``gunn-build.lock`` makes concurrent first uses (DDP ranks, Ray trials) build once: the
others wait and then load. A real build prints "gunn: compiling the CPU kernels (once per
machine)" and, when done, how long it took to stderr; loading a finished one prints nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # not POSIX: no lock between processes
    fcntl = None

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")

# Tests switch this off to cover the ATen path.
ENABLED = os.environ.get("GUNN_CPU_KERNELS", "1") != "0"

# Instruction sets the build may use, by what torch reports for this CPU (the build
# directory is per instruction set, so one shared home directory serves mixed nodes).
_ARCH_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma"],
}

NAME = "gunn_cpu_kernels"
MARKER = "BUILT"  # written after a build succeeded: its presence means "load, don't build"
LOCK_FILE = "gunn-build.lock"  # not cpp_extension's own "lock" in the same directory
COMPILING = "gunn: compiling the CPU kernels (once per machine, ~20 s)"  # the wording users see

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


def cache_root() -> Path:
    """The per-user build cache: ``GUNN_KERNEL_DIR``, else ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    if os.environ.get("GUNN_KERNEL_DIR"):
        return Path(os.environ["GUNN_KERNEL_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gunn" / "kernels"


def compiler_flags(capability: str | None = None) -> list[str]:
    """The extra flags of the build: CPU-specific, by torch's view of this CPU."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    # -fopenmp for at::parallel_for's pragmas; the OpenMP runtime is the one torch loaded.
    return ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, [])]


def cache_key(source: Path | str | None = None) -> str:
    """The name of the build directory for ``source`` (by default ``SOURCE``) on this machine:
    torch version and CPU type to read, a hash of everything the binary depends on to match."""
    capability = torch.backends.cpu.get_cpu_capability()
    digest = hashlib.sha256()
    parts = [
        Path(source or SOURCE).read_bytes(),
        NAME,
        *compiler_flags(capability),
        torch.__version__,
        str(getattr(torch.version, "git_version", "")),
        str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")),
        capability,
        platform.machine(),
        sys.platform,
    ]
    for part in parts:
        digest.update(part if isinstance(part, bytes) else part.encode())
        digest.update(b"\0")
    version = torch.__version__.split("+")[0]
    return f"torch{version}-{capability.lower()}-{digest.hexdigest()[:16]}"


def build_directory(source: Path | str | None = None) -> Path:
    """Where the compiled kernels for ``source`` (by default ``SOURCE``), this CPU and torch are kept."""
    return cache_root() / cache_key(source)


class _FileLock:
    """An exclusive ``flock`` on ``path`` (released by the kernel if the holder dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> _FileLock:
        if fcntl is None:
            return self
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"gunn: another process is building the CPU kernels in {self.path.parent}; waiting for it",
                  file=sys.stderr, flush=True)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _built(directory: Path) -> bool:
    return (directory / MARKER).is_file() and (directory / f"{NAME}.so").is_file()


def _load() -> bool:
    source = Path(SOURCE)  # read at call time: tests point it at copies
    directory = None
    try:
        directory = build_directory(source)
        if not _built(directory):
            directory.mkdir(parents=True, exist_ok=True)
            with _FileLock(directory / LOCK_FILE):
                if not _built(directory):  # nobody built it while this process waited
                    _build(source, directory)
                    return True
        # A finished build, loaded as it is: ninja is not asked, so no rebuild.
        torch.ops.load_library(str(directory / f"{NAME}.so"))
    except Exception as error:  # noqa: BLE001 (any build failure means: use ATen's kernels)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"gunn: could not build the CPU BatchNorm kernels in {directory} ({first_line[:300]}); GUNN "
            "layers use ATen's slower kernels instead. Install a C++ compiler and ninja (`ninja -C "
            f"{directory}` shows the compiler's errors; deleting the directory forces a fresh build), or set "
            "GUNN_CPU_KERNELS=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _build(source: Path, directory: Path) -> None:
    """Compile ``source`` in ``directory`` and load it; the caller holds the directory's lock."""
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
    print(f"{COMPILING} into {directory}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    # The build refers to a copy inside the cache, not to this checkout.
    copy = directory / "cpu_kernels.cpp"
    text = source.read_bytes()
    if not copy.is_file() or copy.read_bytes() != text:
        partial = copy.with_name(f"{copy.name}.{os.getpid()}.tmp")
        partial.write_bytes(text)
        os.replace(partial, copy)
    # A leftover of an interrupted build; old torch versions wait for it forever. No one
    # else builds here while this process holds the directory's lock.
    (directory / "lock").unlink(missing_ok=True)
    cpp_extension.load(
        NAME,
        [str(copy)],
        extra_cflags=compiler_flags(),
        build_directory=str(directory),
        is_python_module=False,
    )
    marker = directory / f"{MARKER}.{os.getpid()}.tmp"
    marker.write_text(f"torch {torch.__version__} ({getattr(torch.version, 'git_version', '')})\n"
                      f"flags {' '.join(compiler_flags())}\nsource {source}\n")
    os.replace(marker, directory / MARKER)
    print(f"gunn: CPU kernels ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
