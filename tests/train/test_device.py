"""Which device a run trains on, the error when it asks for a GPU that CUDA cannot use, and TF32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gunn import config as cfgmod
from gunn.config import ConfigError
from gunn.train import device
from gunn.train.checks import validate
from tests.mlflow_server import REPO_ROOT

without_cuda = pytest.mark.skipif(device.cuda_usable(), reason="describes a machine without usable CUDA")


@pytest.fixture
def no_slurm_gpus(monkeypatch):
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)


@without_cuda
def test_a_driver_too_old_for_the_torch_build_names_both_versions_and_the_cuda_12_packages():
    message = device.cuda_problem(torch_cuda="13.0", driver_cuda=12040, driver="550.54.15", evidence="/dev/nvidia0")
    assert "550.54.15 supports CUDA up to 12.4" in message and "built for CUDA 13.0" in message
    assert "580.65.06" in message  # the driver CUDA 13 needs
    assert "download.pytorch.org/whl/cu128" in message and ".[dali-cuda12]" in message


@without_cuda
def test_a_cpu_only_torch_build_says_to_install_a_cuda_build():
    assert "CPU-only build" in device.cuda_problem(torch_cuda="", driver_cuda=None, driver=None, evidence="x")


@without_cuda
def test_no_driver_says_where_to_run_and_what_showed_a_gpu():
    message = device.cuda_problem(torch_cuda="13.0", driver_cuda=None, driver=None, evidence="")
    assert "no NVIDIA driver is visible" in message and "runtime.device=cpu" in message
    slurm = "Slurm gave this job GPUs (SLURM_GPUS_ON_NODE=1)"
    assert f"although {slurm}" in device.cuda_problem(torch_cuda="13.0", driver_cuda=None, driver=None, evidence=slurm)


@without_cuda
def test_a_driver_new_enough_that_still_fails_points_at_visibility_and_permissions():
    message = device.cuda_problem(torch_cuda="13.0", driver_cuda=13000, driver="580.65.06", evidence="/dev/nvidia0")
    assert "cannot use it" in message and "CUDA_VISIBLE_DEVICES" in message


@without_cuda
def test_asking_for_cuda_without_it_is_an_error_with_the_reason(no_slurm_gpus):
    with pytest.raises(ConfigError, match=r"runtime.device='cuda' but CUDA is not usable: .*"):
        device.resolve("cuda")


@without_cuda
def test_auto_refuses_to_fall_back_to_the_cpu_in_a_job_given_gpus(monkeypatch):
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    with pytest.raises(ConfigError, match=r"has an NVIDIA GPU but CUDA is not usable.*although Slurm gave this job "
                                          r"GPUs \(SLURM_GPUS_ON_NODE=4\).*runtime.device=cpu"):
        device.resolve("auto")
    assert device.resolve("cpu") == "cpu"


@without_cuda
def test_auto_trains_on_the_cpu_where_there_is_no_gpu(no_slurm_gpus, monkeypatch):
    if device.gpu_expected():
        pytest.skip("the NVIDIA driver shows this process a GPU")
    assert device.resolve("auto") == "cpu"
    for hidden in ("", "-1", "NoDevFiles"):  # how users and sites hide every GPU from a process
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", hidden)
        assert device.resolve("auto") == "cpu"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match=r"although CUDA_VISIBLE_DEVICES=0,1"):
        device.resolve("auto")


@without_cuda
@pytest.mark.parametrize("overrides,message", [
    (["runtime.device=cuda"], r"runtime.device='cuda' but CUDA is not usable"),
    (["runtime.cuda_graphs=true"], r"runtime.cuda_graphs=true needs a GPU"),
    (["runtime.cuda_graphs=true", "runtime.compile=true"], r"cuda_graphs and runtime.compile exclude each other"),
])
def test_gpu_only_settings_fail_validation_before_any_work(no_slurm_gpus, overrides, message):
    if device.gpu_expected():
        pytest.skip("the NVIDIA driver shows this process a GPU")
    with pytest.raises(ConfigError, match=message):
        validate(cfgmod.load("digits", overrides))


@without_cuda
def test_a_login_node_does_not_check_the_device_of_a_job(no_slurm_gpus):
    validate(cfgmod.load("digits", ["runtime.device=cuda"]), check_device=False)


# Run in a fresh interpreter: the switches are process-wide, and other tests must not inherit them.
_TF32_EVERY_READ = """
import json, torch
from torch import nn
from gunn.train.device import set_tf32

def reads():
    return {"matmul precision": torch.get_float32_matmul_precision(),  # what Inductor reads
            "matmul allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn allow_tf32": torch.backends.cudnn.allow_tf32,  # what torch.export reads
            "matmul fp32_precision": torch.backends.cuda.matmul.fp32_precision,
            "conv fp32_precision": torch.backends.cudnn.conv.fp32_precision}

seen = {}
for enabled in (True, False):
    set_tf32(enabled)
    seen[str(enabled)] = reads()
    torch.compile(lambda a, b: (a @ b).relu())(torch.randn(4, 4), torch.randn(4, 4))  # Inductor, on the CPU
    torch.export.export(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval(), (torch.randn(2, 3, 8, 8),))
print(json.dumps(seen))
"""


@pytest.mark.slow
def test_tf32_on_and_off_leaves_every_switch_readable_both_ways_for_inductor_and_export():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", _TF32_EVERY_READ], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    on, off = seen["True"], seen["False"]
    assert (on["matmul precision"], on["matmul allow_tf32"], on["cudnn allow_tf32"]) == ("high", True, True)
    assert (off["matmul precision"], off["matmul allow_tf32"], off["cudnn allow_tf32"]) == ("highest", False, False)
    assert on["matmul fp32_precision"] == on["conv fp32_precision"] == "tf32"
    assert "tf32" not in (off["matmul fp32_precision"], off["conv fp32_precision"])
