"""The C++ BatchNorm(+ReLU) kernels of the fast path (gunn.layers.cpu_kernels) against ATen."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gunn.layers import GunnLayer, cpu_kernels
from tests.reference import DEVICE

aten = torch.ops.aten
pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU kernels")

TOLERANCE = {torch.float64: {"atol": 1e-12, "rtol": 0}, torch.float32: {"atol": 2e-5, "rtol": 2e-5}}


@pytest.fixture(scope="module")
def ops():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the fast path uses ATen's BatchNorm")
    assert cpu_kernels.available(), "the kernels did not build although a compiler is installed"
    return torch.ops.gunn_cpu


def columns(rows: int, cols: int, dtype: torch.dtype, stride: int | None = None) -> torch.Tensor:
    """A (rows, cols) matrix with contiguous channels, its rows ``stride`` apart (a segment view)."""
    stride = stride or cols
    return (torch.randn(rows, stride, dtype=dtype) * 2 + 0.5)[:, :cols]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("relu_cols", [0, 5, 12])
def test_forward_matches_native_batch_norm_and_relu(ops, dtype, relu_cols):
    x = columns(300, 12, dtype)
    gamma, beta = torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)
    mean, var = torch.randn(12, dtype=dtype), torch.rand(12, dtype=dtype) + 0.5
    want_mean, want_var = mean.clone(), var.clone()
    want, save_mean, save_invstd = aten.native_batch_norm(x, gamma, beta, want_mean, want_var, True, 0.3, 1e-5)
    out_a, out_b = torch.empty(300, relu_cols, dtype=dtype), torch.empty(300, 12 - relu_cols, dtype=dtype)
    got_mean, got_invstd = ops.bn_forward(x, gamma, beta, mean, var, 0.3, 1e-5, out_a, out_b, None, False)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out_a, want[:, :relu_cols].relu(), **tol)
    torch.testing.assert_close(out_b, want[:, relu_cols:], **tol)
    torch.testing.assert_close(got_mean, save_mean, **tol)
    torch.testing.assert_close(got_invstd, save_invstd, **tol)
    torch.testing.assert_close(mean, want_mean, **tol)  # running statistics, unbiased variance
    torch.testing.assert_close(var, want_var, **tol)


@pytest.mark.parametrize("accumulate", [False, True])
def test_forward_adds_into_a_strided_segment(ops, accumulate):
    x = columns(200, 10, torch.float64, stride=17)  # strided rows in and out
    gamma, beta = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    state = torch.randn(200, 30, dtype=torch.float64)
    before = state.clone()
    add = columns(200, 6, torch.float64, stride=9)
    h = torch.empty(200, 4, dtype=torch.float64)
    ops.bn_forward(x, gamma, beta, None, None, 0.1, 1e-5, h, state[:, 20:26], add, accumulate)
    y, _, _ = aten.native_batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5)
    want = before.clone()
    want[:, 20:26] = (before[:, 20:26] if accumulate else 0) + y[:, 4:] + add
    torch.testing.assert_close(state, want, atol=1e-12, rtol=0)  # nothing outside the segment moved
    torch.testing.assert_close(h, y[:, :4].relu(), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("relu_cols", [0, 7, 12])
def test_backward_matches_native_batch_norm_backward_through_the_relu(ops, dtype, relu_cols):
    x = columns(300, 12, dtype)
    gamma, beta = torch.randn(12, dtype=dtype), torch.randn(12, dtype=dtype)
    y, mean, invstd = aten.native_batch_norm(x, gamma, beta, None, None, True, 0.1, 1e-5)
    relu = y[:, :relu_cols].relu().contiguous()
    grad_a, grad_b = columns(300, relu_cols, dtype, stride=15), columns(300, 12 - relu_cols, dtype, stride=20)
    grad = torch.cat([aten.threshold_backward(grad_a, relu, 0), grad_b], 1)
    want = aten.native_batch_norm_backward(grad, x, gamma, None, None, mean, invstd, True, 1e-5, [True] * 3)
    block = torch.zeros(300, 40, dtype=dtype)
    got_gamma, got_beta = ops.bn_backward(grad_a, relu, grad_b, x, mean, invstd, gamma, block[:, 10:22])
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(block[:, 10:22], want[0], **tol)
    assert block[:, :10].abs().sum() == 0 and block[:, 22:].abs().sum() == 0
    torch.testing.assert_close(got_gamma, want[1], **tol)
    torch.testing.assert_close(got_beta, want[2], **tol)


def test_inputs_that_are_not_matrices_with_contiguous_channels_are_refused(ops):
    x = torch.randn(4, 8, dtype=torch.float64)
    gamma = torch.ones(8, dtype=torch.float64)
    empty = torch.empty(4, 0, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="needs contiguous channels"):
        ops.bn_forward(x.t().contiguous().t(), gamma, gamma, None, None, 0.1, 1e-5, empty, torch.empty(4, 8,
                       dtype=torch.float64), None, False)
    with pytest.raises(RuntimeError, match=r"\(pixels, channels\) matrix"):
        ops.bn_forward(x.view(4, 8, 1), gamma, gamma, None, None, 0.1, 1e-5, empty, empty, None, False)
    with pytest.raises(RuntimeError, match="must split x's columns"):
        ops.bn_forward(x, gamma, gamma, None, None, 0.1, 1e-5, empty, empty, None, False)
    nchw = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="x must be channels_last"):
        ops.bn_forward(nchw, gamma, gamma, None, None, 0.1, 1e-5, empty, torch.empty(18, 8, dtype=torch.float64),
                       None, False)


@pytest.mark.parametrize("shape", [(3, 20, 5, 4), (3, 20, 1, 1), (1, 20, 1, 6)])
def test_channels_last_tensors_and_their_channel_slices_read_as_pixel_matrices(ops, shape):
    # What the fast path passes: slices of a channels_last state, as (pixels, channels) matrices.
    b, c, h, w = shape
    state = torch.randn(shape, dtype=torch.float64).to(memory_format=torch.channels_last)
    x, segment = state[:, 2:14], state[:, 14:18]
    gamma, beta = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    pixels = b * h * w
    matrix = x.permute(0, 2, 3, 1).reshape(pixels, 12)
    want_a, want_b = torch.empty(pixels, 8, dtype=torch.float64), torch.empty(pixels, 4, dtype=torch.float64)
    want = ops.bn_forward(matrix, gamma, beta, None, None, 0.1, 1e-5, want_a, want_b, None, False)
    out_a = torch.empty(b, 8, h, w, dtype=torch.float64, memory_format=torch.channels_last)
    got = ops.bn_forward(x, gamma, beta, None, None, 0.1, 1e-5, out_a, segment, None, False)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    torch.testing.assert_close(out_a.permute(0, 2, 3, 1).reshape(pixels, 8), want_a, atol=0, rtol=0)
    torch.testing.assert_close(segment.permute(0, 2, 3, 1).reshape(pixels, 4), want_b, atol=0, rtol=0)


def test_the_fast_path_uses_the_kernels_on_the_cpu(ops):
    layer = GunnLayer(24, 4).to(memory_format=torch.channels_last)
    x = torch.randn(2, 24, 6, 6, requires_grad=True)
    with torch.profiler.profile() as prof:
        layer(x).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"gunn_cpu::unit_forward", "gunn_cpu::unit_backward", "gunn_cpu::copy_layout"} <= names
    assert not names & {"aten::native_batch_norm", "aten::native_batch_norm_backward"}


@pytest.mark.slow
def test_without_a_compiler_the_layer_warns_once_and_trains_on_atens_kernels(tmp_path):
    script = textwrap.dedent(
        """
        import warnings, torch
        from gunn.layers import GunnLayer
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = GunnLayer(12, 3)
            for _ in range(2):
                layer(torch.randn(2, 12, 4, 4, requires_grad=True)).sum().backward()
        messages = [str(w.message) for w in caught if "CPU BatchNorm kernels" in str(w.message)]
        assert len(messages) == 1, messages
        print(messages[0])
        print("grad", layer.units[0].blocks[0].conv1.weight.grad.abs().sum().item() > 0)
        """
    )
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), GUNN_KERNEL_DIR=str(tmp_path / "kernels"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "could not build the CPU BatchNorm kernels" in done.stdout
    assert "grad True" in done.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 13, 5, 7), (3, 16, 8, 8), (2, 24, 2, 9)])
def test_copy_layout_converts_between_nchw_and_channels_last(ops, dtype, shape):
    x = torch.randn(*shape, dtype=dtype)
    cl = torch.empty_like(x, memory_format=torch.channels_last)
    ops.copy_layout(cl, x)
    assert torch.equal(cl, x)
    back = torch.empty_like(x)
    ops.copy_layout(back, cl)
    assert torch.equal(back, x)


def test_copy_layout_writes_and_reads_channel_slices(ops):
    b, c, h, w = 2, 11, 6, 5
    x = torch.randn(b, c + 9, h, w)[:, 4 : 4 + c]  # an NCHW slice
    state = torch.zeros(b, c + 20, h, w).to(memory_format=torch.channels_last)
    ops.copy_layout(state[:, 7 : 7 + c], x)
    assert torch.equal(state[:, 7 : 7 + c], x)
    assert state[:, :7].abs().sum() == 0 and state[:, 7 + c :].abs().sum() == 0


def test_copy_layout_refuses_two_tensors_of_one_layout(ops):
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match="between NCHW and channels_last only"):
        ops.copy_layout(torch.empty_like(x), x)


# The build cache: real builds in a temporary GUNN_KERNEL_DIR, in subprocesses (a process can
# register the gunn_cpu operators once). Two fresh builds in all.

COMPILING = "compiling the CPU kernels"

USE = textwrap.dedent(
    """
    import hashlib, sys
    from pathlib import Path
    import torch
    from gunn.layers import cpu_kernels
    if len(sys.argv) > 1:
        cpu_kernels.SOURCE = Path(sys.argv[1])  # another checkout's copy of the source
    assert cpu_kernels.available(), "the kernels did not load"
    torch.manual_seed(0)
    x = torch.randn(300, 12, dtype=torch.float64)
    gamma, beta = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    out_a, out_b = torch.empty(300, 5, dtype=torch.float64), torch.empty(300, 7, dtype=torch.float64)
    mean, invstd = torch.ops.gunn_cpu.bn_forward(x, gamma, beta, None, None, 0.1, 1e-5, out_a, out_b, None, False)
    result = torch.cat([out_a.flatten(), out_b.flatten(), mean, invstd])
    print("result", hashlib.sha256(result.numpy().tobytes()).hexdigest())
    """
)


def _compiler():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")


def _start(root, source=None):
    env = dict(os.environ, GUNN_KERNEL_DIR=str(root), OMP_NUM_THREADS="1")
    env.pop("GUNN_CPU_KERNELS", None)
    args = [sys.executable, "-c", USE] + ([str(source)] if source else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])


def _finish(process):
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, err
    result = [line for line in out.splitlines() if line.startswith("result ")]
    return result[0], err


def _libraries(root):
    """Every compiled library under the cache root, with its modification time."""
    return {path: path.stat().st_mtime_ns for path in root.rglob("*.so")}


@pytest.mark.slow
def test_processes_starting_at_once_build_once_and_another_checkout_loads_that_build(tmp_path):
    # One build for both checks (a build takes seconds): three processes of one checkout start at once, then a
    # process of a second checkout (another path, as in another venv) finds the build in the shared cache.
    _compiler()
    root = tmp_path / "kernels"
    copies = []
    for checkout in ("checkout-a", "venv-b/checkout-b"):
        copy = tmp_path / checkout / "gunn" / "layers" / "cpu_kernels.cpp"
        copy.parent.mkdir(parents=True)
        shutil.copy(cpu_kernels.SOURCE, copy)
        copies.append(copy)

    processes = [_start(root, copies[0]) for _ in range(3)]
    finished = [_finish(process) for process in processes]
    messages = sum(err.count(COMPILING) for _, err in finished)
    assert messages == 1, [err for _, err in finished]
    assert len({result for result, _ in finished}) == 1
    built = _libraries(root)
    assert len(built) == 1, built

    second, err = _finish(_start(root, copies[1]))
    assert COMPILING not in err, err
    assert _libraries(root) == built  # loaded as it was: not rebuilt, not relinked
    assert second == finished[0][0]
    ninja_files = list(root.rglob("build.ninja"))
    assert len(ninja_files) == 1
    text = ninja_files[0].read_text()
    assert "checkout-a" not in text and "checkout-b" not in text  # builds the cache's own copy


def test_the_cache_is_keyed_by_the_source_contents_not_its_path(tmp_path, monkeypatch):
    monkeypatch.setenv("GUNN_KERNEL_DIR", str(tmp_path / "kernels"))
    same, changed = tmp_path / "a" / "cpu_kernels.cpp", tmp_path / "b" / "cpu_kernels.cpp"
    for copy in (same, changed):
        copy.parent.mkdir()
        shutil.copy(cpu_kernels.SOURCE, copy)
    with changed.open("a") as file:
        file.write("\n// an edit\n")
    directory = cpu_kernels.build_directory()
    assert directory.parent == tmp_path / "kernels"
    assert cpu_kernels.build_directory(same) == directory
    assert cpu_kernels.build_directory(changed) != directory
    assert cpu_kernels.build_directory(changed).parent == tmp_path / "kernels"


def test_the_default_cache_is_per_user(monkeypatch, tmp_path):
    monkeypatch.delenv("GUNN_KERNEL_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.build_directory().parent == tmp_path / "xdg" / "gunn" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cpu_kernels.build_directory().parent == Path.home() / ".cache" / "gunn" / "kernels"
