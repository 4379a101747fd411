"""The device a rank trains on, why CUDA is not usable when it is not, and its float32 precision.

PyTorch's wheels are built for one CUDA version (``torch.version.cuda``) and need an NVIDIA
driver that supports at least that version's major release. When the driver is older,
``torch.cuda.is_available()`` is simply False, and a run that asked for ``auto`` would train
on the CPU without a word. ``choose`` refuses that whenever there is evidence of a GPU, and
``cuda_problem`` says what to install.
"""

from __future__ import annotations

import ctypes
import os
import resource
import warnings
from pathlib import Path

import torch

from gunn.config import ConfigError

# Minimum Linux driver of each CUDA major release (NVIDIA's CUDA toolkit release notes, table 3).
MIN_DRIVER = {12: "525.60.13", 13: "580.65.06"}
_DRIVER_FILE = Path("/proc/driver/nvidia/version")
_GPU_ENV = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")


def cuda_usable() -> bool:
    """Whether this process can use at least one CUDA device."""
    with warnings.catch_warnings():  # torch warns about an old driver; cuda_problem says it better
        warnings.simplefilter("ignore")
        return torch.cuda.is_available()


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version (``580.65.06``), or None without one."""
    try:
        text = _DRIVER_FILE.read_text()
    except OSError:
        return None
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return word
    return None


def driver_cuda_version() -> int | None:
    """The newest CUDA version the installed driver supports, as CUDA encodes it (13000 = 13.0), or None."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def driver_devices() -> int:
    """How many GPUs the NVIDIA driver itself lets this process see (0 without a driver), whatever torch can do."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0  # e.g. a CPU-only job on a GPU node, whose devices the cgroup hides
    return count.value


def gpu_evidence() -> str | None:
    """What shows that this process is meant to have an NVIDIA GPU, or None: GPUs that Slurm gave the
    job, CUDA_VISIBLE_DEVICES naming some, or GPUs the driver lets it see. (A driver installed on a
    node does not: CPU-only jobs on GPU nodes train on the CPU.)"""
    for name in _GPU_ENV:
        if os.environ.get(name, "").strip() not in ("", "0"):
            return f"Slurm gave this job GPUs ({name}={os.environ[name]})"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible not in ("-1", "NoDevFiles"):
        return f"CUDA_VISIBLE_DEVICES={visible}"
    count = driver_devices()
    return f"the NVIDIA driver sees {count} GPU(s)" if count else None


def gpu_expected() -> bool:
    """Whether this machine or job evidently has an NVIDIA GPU (see ``gpu_evidence``)."""
    return gpu_evidence() is not None


def cuda_problem(torch_cuda: str | None = None, driver_cuda: int | None = None, driver: str | None = None,
                 evidence: str | None = None) -> str:
    """Why CUDA cannot be used here and what to install; the arguments default to this machine's
    (``evidence``: ``gpu_evidence()``)."""
    torch_cuda = torch.version.cuda if torch_cuda is None else torch_cuda
    driver_cuda = driver_cuda_version() if driver_cuda is None else driver_cuda
    driver = driver_version() if driver is None else driver
    evidence = gpu_evidence() if evidence is None else evidence
    build = f"torch {torch.__version__}"
    if not torch_cuda:
        return (f"{build} is a CPU-only build: install a CUDA build of torch and torchvision "
                "(docs/gpus.md), e.g. pip install torch torchvision --index-url https://download.pytorch.org/whl/cu130")
    major = int(torch_cuda.split(".")[0])
    if driver_cuda is None:
        return (f"no NVIDIA driver is visible to this process (libcuda.so.1 does not load)"
                f"{', although ' + evidence if evidence else ''}; {build} is built for CUDA {torch_cuda}. Run on "
                "a GPU node (Slurm: --gpus-per-node) with the NVIDIA driver installed, or set runtime.device=cpu")
    if driver_cuda // 1000 < major:
        supports = f"{driver_cuda // 1000}.{driver_cuda % 1000 // 10}"
        cu12 = ("install torch's CUDA 12 build and DALI's CUDA 12 wheel instead: pip install torch torchvision "
                "--index-url https://download.pytorch.org/whl/cu128 and pip install -e \".[dali-cuda12]\"")
        return (f"the NVIDIA driver {driver or ''} supports CUDA up to {supports}, but {build} is built for CUDA "
                f"{torch_cuda}, which needs driver {MIN_DRIVER.get(major, 'a newer one')} or newer. Either ask "
                f"for a newer driver, or {cu12 if driver_cuda // 1000 == 12 else 'install a torch build for your CUDA'}"
                " (docs/gpus.md); runtime.device=cpu trains on the CPU instead")
    return (f"an NVIDIA GPU is present (driver {driver or 'unknown'}) but {build} (CUDA {torch_cuda}) cannot use "
            "it: check CUDA_VISIBLE_DEVICES, the device files' permissions and `nvidia-smi`; "
            "python -c 'import torch; torch.cuda.init()' shows CUDA's own error; runtime.device=cpu trains on the "
            "CPU instead")


def resolve(requested: str) -> str:
    """``cpu`` or ``cuda`` for runtime.device ``requested``; an error where CUDA is wanted but not usable.

    ``auto`` means CUDA when usable, and the CPU only where there is no sign of a GPU: a GPU
    that torch cannot use (usually a driver older than the torch build) is an error, never a
    silent fallback to training on the CPU.
    """
    if requested == "cpu":
        return "cpu"
    if cuda_usable():
        return "cuda"
    if requested == "cuda":
        raise ConfigError(f"runtime.device='cuda' but CUDA is not usable: {cuda_problem()}")
    if gpu_expected():
        raise ConfigError(f"runtime.device='auto': this machine has an NVIDIA GPU but CUDA is not usable: "
                          f"{cuda_problem()}")
    return "cpu"


def choose(requested: str, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: GPU ``local_rank`` (modulo the visible ones)."""
    if resolve(requested) == "cpu":
        return torch.device("cpu")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", torch.cuda.current_device())


def set_tf32(enabled: bool) -> None:
    """TF32 tensor cores for float32 matrix products and cuDNN convolutions alike (or neither)."""
    # torch's older switches only: after them both kinds of reads work (allow_tf32 and
    # get_float32_matmul_precision, which Inductor reads; cudnn.allow_tf32, which torch.export reads;
    # and the newer fp32_precision). Set through the newer API, the older reads raise ("mix of the
    # legacy and new APIs").
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def peak_memory_mb(device: torch.device, unseen_bytes: int = 0) -> float:
    """The device's peak since it was last reset, with ``unseen_bytes`` that the allocator does not count (CUDA
    graphs' replays); on the CPU the process's peak resident memory."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated(device) + unseen_bytes) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux
