"""GUNN mode of ``GunnLayer`` as one autograd Function with a hand-written backward.

The generic container (``gradual.py``) runs any update units gradually and gets the
paper's Algorithm 1 memory from saved-tensor hooks around ordinary autograd. For the
paper's own bottleneck units (M = 1) this module does the same work in fewer, cheaper
steps. The units' first 1x1 convs and projections, with their BatchNorm parameters and
statistics, are concatenated once per layer. The backward runs the units in reverse
order as direct ATen calls and rebuilds the state before unit i from the layer's input x
and output y (Algorithm 1).

In channels_last (always on the CPU: an NCHW input is converted on entry and the output
converted back) a 1x1 conv is a product of (pixels, channels) matrices, and the backward
of the first convs of a block of consecutive units is computed together: one in-place
``addmm_`` adds the block's input gradients to the state gradient, and one product gives
its weight gradients, corrected on the block's own segments. Autograd would instead make
two passes over the N-channel state per unit, and allocate and add an N-channel input
gradient per unit. (The forward convs stay one call per unit: batching them did not pay in
the benchmark, ``python -m gunn.bench``.) The units' last 1x1 convs are matrix products
there too. On the CPU each unit's forward and backward is one call of the C++ kernels
(``cpu_kernels.py``: ATen's convolutions, and BatchNorms fused with the ReLU after them,
the projection's sum and the write into the state); where they cannot be built,
``_unit_forward`` and ``_unit_backward`` compose the same unit from ATen ops.

Under autocast (bfloat16, or float16 with a gradient scaler) it computes what autocast
would: the convolutions and matrix products in the lower precision from weights cast once
per step, BatchNorm on the lower-precision activations with float32 statistics, and the
segment writes into the state in the state's own dtype; gradients come back in the
parameters' dtype. It keeps exactly the tensors a plain autograd loop keeps inside each
unit, never the intermediate states, and gives the same numbers up to rounding (the tests
compare with the plain loop in float64, and under autocast with the generic path in the
same precision). What it does not cover (M >= 2, SyncBatchNorm or other norms, BatchNorm
in eval mode, hooks on the units) runs on the generic path instead; second-order gradients
recompute the layer's plain loop.

The unit computed here, in Python and in the C++ kernels, is the one ``STEPS`` below describes,
in the terms of ``Bottleneck.STEPS``. Whether a layer runs here is the layer's decision
(``GunnLayer.fast_path_applies``: units that declare other steps take the generic path, with
a warning; ``supported`` below says what this module can compute); the layer passes the units'
modules (``UnitModules``), its residual switch and its plain loop, and this module imports
nothing from ``bottleneck.py`` or ``gunn_layer.py``. See docs/layer.md, "The fast path of
GunnLayer", and docs/architecture.md, "Changing the paper's unit".
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gunn.layers import cpu_kernels
from gunn.layers.fused import TiedStatistics, count_batch, write_running_stats
from gunn.layers.gradual import check_fits, check_unchanged, check_width

aten = torch.ops.aten

# The bottleneck that ``_unit_forward`` and ``_unit_backward`` (and the C++ ``unit_forward`` and
# ``unit_backward``) compute, as ``Bottleneck.STEPS`` declares a unit: conv1 (1x1), bn1, ReLU,
# conv2 (3x3), bn2, ReLU, conv3 (1x1), bn3, the fields of ``UnitModules``. Change it only
# together with those functions (and the kernels).
STEPS: tuple[str, ...] = ("conv1", "bn1", "relu", "conv2", "bn2", "relu", "conv3", "bn3")

_CONV_1X1 = ((1, 1), (0, 0), (1, 1))  # stride, padding, dilation
_CONV_3X3 = ((1, 1), (1, 1), (1, 1))

# Run the state in channels_last on the CPU even for an NCHW input (tests turn it off to
# cover the other path).
CPU_CHANNELS_LAST = True

# The backward of the first convs of consecutive units is computed together, about this
# many output channels (rows of their stacked weights) at a time.
BLOCK_ROWS = 192

_KERNEL_DTYPES = (torch.float32, torch.float64)
_LOWER_PRECISION = (torch.bfloat16, torch.float16)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast gives the convolutions of input x, or None where autocast is off for it."""
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device) and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device)  # autocast leaves float64 alone
    return None


class UnitModules(NamedTuple):
    """One of the paper's bottleneck units (M = 1) as the fast path reads it: conv1 (1x1),
    bn1, ReLU, conv2 (3x3), bn2, ReLU, conv3 (1x1), bn3, plus, where ``proj_conv`` is not
    None, the projection ``proj_conv`` (1x1) and ``proj_bn`` of the same input."""

    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    conv3: nn.Conv2d
    bn3: nn.BatchNorm2d
    proj_conv: nn.Conv2d | None = None
    proj_bn: nn.BatchNorm2d | None = None


def supported(x: Tensor, convs: Iterable[nn.Conv2d], norms: Iterable[nn.BatchNorm2d]) -> bool:
    """Whether ``gradual_update`` computes for input x exactly what autograd would, given the
    units' convolutions and BatchNorms (plain ``nn.Conv2d`` and ``nn.BatchNorm2d``).

    Only what this module can compute is checked here: a 4-d floating input, without
    autocast or under autocast to bfloat16 or float16 (then with float32 weights);
    convolutions without bias or groups, 1x1 or 3x3 with zero padding that keeps the size,
    stride and dilation 1; BatchNorms in train mode, affine, all with the same settings.
    Whether a layer is made of such units only, without hooks, is the layer's decision
    (``GunnLayer.fast_path_applies``).
    """
    if x.dim() != 4 or not x.is_floating_point():
        return False
    lower = autocast_dtype(x)
    if lower is not None and lower not in _LOWER_PRECISION:
        return False
    # Under autocast the weights are float32, cast to the lower precision as autocast does.
    weights = None if lower is None else torch.float32
    reference: tuple | None = None
    for module in norms:
        settings = (module.training, module.momentum, module.eps, module.affine, module.track_running_stats)
        if reference is None:
            reference = settings
        if settings != reference or not module.training or not module.affine:
            return False
        if weights is not None and module.weight.dtype != weights:
            return False
    for module in convs:
        k = module.kernel_size
        if (
            module.bias is not None
            or module.groups != 1
            or module.padding_mode != "zeros"
            or k not in ((1, 1), (3, 3))
            or module.padding != (k[0] // 2, k[1] // 2)
            or module.stride != (1, 1)
            or module.dilation != (1, 1)
            or weights is not None and module.weight.dtype != weights
        ):
            return False
    return True


def _unit_parameters(unit: UnitModules) -> list[Tensor]:
    params = [
        unit.conv1.weight, unit.bn1.weight, unit.bn1.bias,
        unit.conv2.weight, unit.bn2.weight, unit.bn2.bias,
        unit.conv3.weight, unit.bn3.weight, unit.bn3.bias,
    ]  # fmt: skip
    if unit.proj_conv is not None:
        params += [unit.proj_conv.weight, unit.proj_bn.weight, unit.proj_bn.bias]
    return params


class _Unit:
    """One unit's parameters (``_unit_parameters`` order), BatchNorms and sizes, gathered once
    per forward: a module's attribute lookups cost microseconds, and the loops make thousands."""

    __slots__ = ("params", "bn1", "bn2", "bn3", "proj_bn", "hidden")

    def __init__(self, unit: UnitModules) -> None:
        self.params = _unit_parameters(unit)
        self.bn1, self.bn2, self.bn3 = unit.bn1, unit.bn2, unit.bn3
        self.proj_bn = None if unit.proj_conv is None else unit.proj_bn
        self.hidden = unit.conv1.out_channels

    @property
    def norms(self) -> list[nn.BatchNorm2d]:
        return [self.bn1, self.bn2, self.bn3] + ([] if self.proj_bn is None else [self.proj_bn])

    def first_pairs(self) -> list[tuple[Tensor, nn.BatchNorm2d]]:
        """(weight, BatchNorm) of the first conv, and of the projection if any."""
        pairs = [(self.params[0], self.bn1)]
        if self.proj_bn is not None:
            pairs.append((self.params[9], self.proj_bn))
        return pairs


def gradual_update(
    x: Tensor, units: Sequence[UnitModules], residual: bool, plain_loop: Callable[[Tensor], Tensor],
    first_stats: Sequence[TiedStatistics | None] = (),
) -> Tensor:
    """A GUNN layer's output in GUNN mode (train mode, with autograd), see the module docstring.

    ``units`` in update order, their segments one after the other along dim 1;
    ``residual``: add each update to its segment (else replace the segment);
    ``plain_loop``: the layer's plain differentiable loop, which the backward recomputes
    only for higher-order gradients (``create_graph=True``); ``first_stats``: where the
    running statistics of every unit's first BatchNorm (and of the projections' BatchNorms)
    are tied into one tensor each (``fused.TiedStatistics``), those, which are then updated in
    place. Call it only where ``supported`` says so.
    """
    parts = [_Unit(unit) for unit in units]
    params = [p for unit in parts for p in unit.params]
    return _GradualBottlenecks.apply(x, parts, tuple(first_stats), autocast_dtype(x), residual, plain_loop, *params)


class _FirstConvs:
    """Every unit's first 1x1 conv and projection, with their BatchNorms, concatenated.

    Unit i owns rows ``offsets[i]:offsets[i+1]`` (its conv1 rows, then its projection's);
    ``split(t)`` cuts a concatenated tensor into those per-unit parts. The running statistics
    are the tied tensors themselves without projections; with projections (whose rows come
    between the units' conv1 rows) the tied tensors interleaved; else concatenated.
    """

    def __init__(self, units: Sequence[_Unit], tied: Sequence[TiedStatistics | None] = ()) -> None:
        pairs = [pair for unit in units for pair in unit.first_pairs()]
        self.norms = [norm for _, norm in pairs]
        self.sizes = [sum(w.shape[0] for w, _ in unit.first_pairs()) for unit in units]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.weights = [w for w, _ in pairs]  # concatenated (and cast under autocast) by ``_weights``
        self.gamma = torch.cat([n.weight for n in self.norms])
        self.beta = torch.cat([n.bias for n in self.norms])
        kinds = len(pairs) // len(units)  # conv1, and the projection if any
        self.tied = list(tied) if len(tied) == kinds and all(
            t is not None and t.intact() and t.norms == self.norms[k::kinds] for k, t in enumerate(tied)) else None
        tracked = self.norms[0].running_mean is not None
        if self.tied is not None and kinds == 1:
            self.mean, self.var = self.tied[0].mean, self.tied[0].var
        elif self.tied is not None:
            per_unit = len(units)
            self.mean, self.var = (torch.cat([getattr(t, stat).view(per_unit, -1) for t in self.tied], 1).view(-1)
                                   for stat in ("mean", "var"))
        else:
            self.mean = torch.cat([n.running_mean for n in self.norms]) if tracked else None
            self.var = torch.cat([n.running_var for n in self.norms]) if tracked else None

    def split(self, t: Tensor | None) -> Sequence[Tensor | None]:
        return [None] * len(self.sizes) if t is None else t.split(self.sizes)

    def write_back(self) -> None:
        """Brings the updated running statistics into each BatchNorm module, where they were not updated in place."""
        if self.mean is None or self.var is None:
            return
        if self.tied is None:
            write_running_stats(self.norms, self.mean, self.var)
        elif len(self.tied) > 1:  # de-interleaved into the tied tensors: one copy per kind and statistic
            per_unit, start = len(self.sizes), 0
            with torch.no_grad():
                for t in self.tied:
                    width = t.norms[0].num_features
                    for stat in ("mean", "var"):
                        getattr(t, stat).view(per_unit, width).copy_(
                            getattr(self, stat).view(per_unit, -1)[:, start : start + width])
                    start += width


def _pixels(t: Tensor) -> Tensor:
    """A channels_last (B, C, H, W) tensor as its (B*H*W, C) matrix (a view when it can be)."""
    b, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(b * h * w, c)


def _image(m: Tensor, like: Tensor) -> Tensor:
    """The inverse of ``_pixels``: a (B*H*W, C) matrix as a channels_last (B, C, H, W) view."""
    b, _, h, w = like.shape
    return m.view(b, h, w, m.shape[1]).permute(0, 3, 1, 2)


def _norm(
    x: Tensor, gamma: Tensor, beta: Tensor, mean: Tensor | None, var: Tensor | None, momentum: float, eps: float,
    relu: int, layout: torch.memory_format, out: Tensor | None = None, add: Tensor | None = None,
    accumulate: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """Training-mode BatchNorm of x (ATen's; ``bn_forward`` of the C++ kernels does the same),
    updating the running statistics. Its first ``relu`` channels go through a ReLU (in place
    when they are all of them, else into a new tensor in ``layout``); the others, plus ``add``,
    are copied into ``out``, added to it if ``accumulate``, or returned as they are without
    ``out``. Returns (ReLU part or None, other part or None, batch mean, batch invstd).
    """
    o, m, v = aten.native_batch_norm(x, gamma, beta, mean, var, True, momentum, eps)
    if relu == o.shape[1]:
        return o.relu_(), None, m, v
    h = None
    if relu:
        h = _empty_like(o, relu, layout)
        torch.clamp_min(o[:, :relu], 0, out=h)
    rest = o[:, relu:] if relu else o
    if add is not None:
        rest.add_(add)
    if out is None:
        return h, rest, m, v
    if accumulate:
        out.add_(rest)
    else:
        out.copy_(rest)
    return h, None, m, v


def _norm_backward(
    grad_a: Tensor | None, relu_a: Tensor | None, grad_b: Tensor | None, x: Tensor, mean: Tensor, invstd: Tensor,
    gamma: Tensor, eps: float, out: Tensor | None = None, out_gamma: Tensor | None = None,
    out_beta: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ``_norm`` for the gradients of its ReLU part (``grad_a``, through
    ``relu_a``) and of its other part (``grad_b``): the gradients of x (into ``out`` if
    given), gamma and beta (into ``out_gamma`` and ``out_beta`` if given with ``out``).
    """
    a = 0 if grad_a is None else grad_a.shape[1]
    if grad_b is None:
        grad = aten.threshold_backward(grad_a, relu_a, 0)
    elif grad_a is None:
        grad = grad_b
    else:
        grad = torch.empty_like(x)
        aten.threshold_backward.grad_input(grad_a, relu_a, 0, grad_input=grad[:, :a])
        grad[:, a:] = grad_b
    args = (grad, x, gamma, None, None, mean, invstd, True, eps, [True, True, True])
    if out is None:
        return aten.native_batch_norm_backward(*args)
    return aten.native_batch_norm_backward.out(
        *args, out0=out, out1=gamma.new_empty(gamma.shape) if out_gamma is None else out_gamma,
        out2=gamma.new_empty(gamma.shape) if out_beta is None else out_beta)


def _copy(dst: Tensor, src: Tensor, kernels: bool) -> None:
    """``dst.copy_(src)``; between NCHW and channels_last by the C++ kernel if ``kernels``
    (faster than ATen's copy between the two layouts on the CPU: ``python -m gunn.bench
    --only kernels`` measures both)."""
    if kernels and src.dtype == dst.dtype and _between_layouts(dst, src):
        torch.ops.gunn_cpu.copy_layout(dst, src)
    else:
        dst.copy_(src)


def _contiguous(t: Tensor, kernels: bool) -> Tensor:
    """``t.contiguous()`` (NCHW), by ``_copy``."""
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    _copy(out, t, kernels)
    return out


def _between_layouts(dst: Tensor, src: Tensor) -> bool:
    """Whether one of two equally sized 4-d tensors (or channel slices) is NCHW and the
    other channels_last, with mergeable pixel dimensions: what ``copy_layout`` handles."""
    if dst.shape != src.shape or dst.dim() != 4 or 1 in dst.shape[1:]:
        return False  # layouts with a single pixel row or channel are ambiguous: leave them to ATen
    w = dst.shape[3]
    if any(t.stride(2) != w * t.stride(3) for t in (dst, src)):
        return False
    return (src.stride(3) == 1 and dst.stride(1) == 1) or (src.stride(1) == 1 and dst.stride(3) == 1)


def _conv1x1(x: Tensor, weight: Tensor, matrices: bool) -> Tensor:
    """A bias-free 1x1 conv; a matrix product in channels_last (mkldnn's fixed cost per call
    is several times that of a product of these thin matrices)."""
    if not matrices:
        return F.conv2d(x, weight)
    return _image(torch.mm(_pixels(x), weight.view(weight.shape[0], -1).t()), x)


def _conv1x1_backward(grad: Tensor, x: Tensor, weight: Tensor, matrices: bool) -> tuple[Tensor, Tensor]:
    """The gradients of ``_conv1x1``'s input and weight."""
    if not matrices:
        grad_x, grad_w, _ = aten.convolution_backward(
            grad, x, weight, None, *_CONV_1X1, False, (0, 0), 1, [True, True, False]
        )
        return grad_x, grad_w
    g, w = _pixels(grad), weight.view(weight.shape[0], -1)
    return _image(torch.mm(g, w), x), torch.mm(g.t(), _pixels(x)).view(weight.shape)


def _count_batches(units: Sequence[_Unit]) -> list[tuple[float, float, float]]:
    """Counts the batch in every BatchNorm of the units, as ``count_batch``, and returns each
    unit's running-statistics factors for its first norm (with the projection's), second
    and third."""
    if units[0].bn1.momentum is not None:  # the same factor everywhere: count all at once
        factor = count_batch([norm for unit in units for norm in unit.norms])
        return [(factor, factor, factor)] * len(units)
    # Cumulative moving averages: each factor from its module's own count.
    return [
        (count_batch([n for n in (u.bn1, u.proj_bn) if n is not None]), count_batch([u.bn2]), count_batch([u.bn3]))
        for u in units
    ]


def _stats(norm: nn.BatchNorm2d) -> tuple[Tensor | None, Tensor | None]:
    return norm.running_mean, norm.running_var


def _empty_like(x: Tensor, channels: int, layout: torch.memory_format) -> Tensor:
    """An uninitialised tensor of x's size, but ``channels`` channels, in ``layout``."""
    b, _, h, w = x.shape
    return torch.empty((b, channels, h, w), dtype=x.dtype, device=x.device, memory_format=layout)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _as_parameters(grads: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """``grads`` as ``_like`` makes each, those in another dtype than their parameters (under autocast)
    cast with one call into one buffer."""
    out = [_like(g, p) if g.dtype == p.dtype else None for g, p in zip(grads, params)]
    lower = [k for k, g in enumerate(out) if g is None]
    if not lower:
        return out  # type: ignore[return-value]
    buffer = params[lower[0]].new_empty(sum(params[k].numel() for k in lower))
    targets, sources, offset = [], [], 0
    for k in lower:
        p = params[k]
        dense = p.is_contiguous() or p.is_contiguous(memory_format=torch.channels_last)
        target = buffer.as_strided(p.shape, p.stride() if dense else _contiguous_strides(p.shape),
                                   buffer.storage_offset() + offset)
        offset += p.numel()
        targets.append(target)
        sources.append(_same_strides(grads[k], target))
        out[k] = target
    torch._foreach_copy_(targets, sources)
    return out  # type: ignore[return-value]


def _same_strides(t: Tensor, like: Tensor) -> Tensor:
    """``t`` viewed with ``like``'s strides where they differ only in dimensions of size 1 (the same elements)."""
    if t.stride() != like.stride() and all(
            a == b for a, b, n in zip(t.stride(), like.stride(), t.shape) if n != 1):
        return t.as_strided(t.shape, like.stride())
    return t


def _like(grad: Tensor, param: Tensor) -> Tensor:
    """``grad`` in the dtype (under autocast: float32, as autocast's casts give) and the strides of
    ``param``, as autograd's gradients are: DDP copies gradients whose strides differ from its
    buckets' (and warns). A 1x1 conv weight's strides differ only in dimensions of size 1, where
    a view fixes them."""
    grad = _cast(grad, param.dtype)
    if grad.stride() == param.stride():
        return grad
    if all(g == p for g, p, n in zip(grad.stride(), param.stride(), param.shape) if n != 1):
        return grad.as_strided(param.shape, param.stride())  # the same elements at the same places
    return torch.empty_like(param).copy_(grad)


def _explicit_precision(device_type: str, lower: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast off inside the fast path, which casts explicitly what autocast would cast, so that its
    forward and its backward (wherever that runs) compute the same way."""
    return torch.autocast(device_type, enabled=False) if lower is not None else contextlib.nullcontext()


def _weights(
    first: _FirstConvs, units: Sequence[_Unit], dtype: torch.dtype
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """The first convs' concatenated weight and every unit's second and third conv weights, in ``dtype``.

    Under autocast (weights in float32, convolutions in ``dtype``) all of the layer's weights are
    cast with one call into one buffer (autocast would cast each unit's, in the forward and again
    for the backward, which reuses these); the views keep their parameters' strides.
    """
    w2s, w3s = [u.params[3] for u in units], [u.params[6] for u in units]
    if all(w.dtype == dtype for w in first.weights):
        return torch.cat(first.weights), w2s, w3s
    sources = [*first.weights, *w2s, *w3s]
    buffer = sources[0].new_empty(sum(w.numel() for w in sources), dtype=dtype)
    targets, offset = [], 0
    for w in sources:
        dense = w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last)
        targets.append(buffer.as_strided(w.shape, w.stride() if dense else _contiguous_strides(w.shape),
                                         buffer.storage_offset() + offset))
        offset += w.numel()
    torch._foreach_copy_(targets, sources)
    rows = sum(w.shape[0] for w in first.weights)
    weight = buffer[: rows * first.weights[0][0].numel()].view(rows, *first.weights[0].shape[1:])
    k = len(first.weights)
    return weight, targets[k : k + len(units)], targets[k + len(units) :]


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _unit_forward(
    kernels: bool, matrices: bool, state: Tensor, conv_in: Tensor, unit: _Unit, first_conv: Sequence[Tensor | None],
    w2: Tensor, w3: Tensor, factors: tuple[float, float, float], start: int, residual: bool,
) -> list[Tensor]:
    """Writes one unit's update into the state's segment at ``start`` (Eq. 4: added, or
    without the residual, replacing it) and returns what its backward needs. ``conv_in``: the
    state as the convolutions read it (``state`` itself, or under autocast its copy in the
    lower precision, whose segment is updated too); ``first_conv``: the unit's rows of the
    concatenated first convs (weight in the convolutions' dtype, gamma, beta, running mean
    and variance); ``w2``, ``w3``: the second and third conv weights in the convolutions' dtype.
    With the kernels, one call of the C++ ``unit_forward``, which does exactly this.
    """
    weight, gamma, beta, mean, var = first_conv
    f1, f2, f3 = factors
    gamma2, beta2, _, gamma3, beta3 = unit.params[4:9]
    if kernels:
        return torch.ops.gunn_cpu.unit_forward(
            state, weight, gamma, beta, mean, var, f1, unit.bn1.eps, unit.hidden,
            w2, gamma2, beta2, *_stats(unit.bn2), f2, unit.bn2.eps,
            w3, gamma3, beta3, *_stats(unit.bn3), f3, unit.bn3.eps, start, residual,
        )  # fmt: skip
    layout = torch.channels_last if matrices else torch.contiguous_format
    a1 = F.conv2d(conv_in, weight)
    # The projection's part of the first BatchNorm (rows after conv1's) stays a view until bn3 adds it.
    h1, projected, m1, v1 = _norm(a1, gamma, beta, mean, var, f1, unit.bn1.eps, unit.hidden, layout)
    a2 = F.conv2d(h1, w2, None, *_CONV_3X3)
    h2, _, m2, v2 = _norm(a2, gamma2, beta2, *_stats(unit.bn2), f2, unit.bn2.eps, a2.shape[1], layout)
    a3 = _conv1x1(h2, w3, matrices)
    segment = state.narrow(1, start, a3.shape[1])
    # The update (bn3 + projection) in the convolutions' dtype, added to the state in its own.
    _, _, m3, v3 = _norm(a3, gamma3, beta3, *_stats(unit.bn3), f3, unit.bn3.eps, 0, layout, segment, projected,
                         residual)
    if conv_in is not state:
        conv_in.narrow(1, start, a3.shape[1]).copy_(segment)
    return [a1, m1, v1, h1, a2, m2, v2, h2, a3, m3, v3]


class _GradualBottlenecks(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, units: Sequence[_Unit], first_stats: tuple[TiedStatistics | None, ...],
        lower: torch.dtype | None, residual: bool, plain_loop: Callable[[Tensor], Tensor], *params: Tensor,
    ) -> Tensor:
        # ``lower``: autocast's dtype (the convolutions run in it), or None without autocast.
        ctx.residual, ctx.plain_loop = residual, plain_loop
        with _explicit_precision(x.device.type, lower):
            return _forward(ctx, x, units, _FirstConvs(units, first_stats), lower)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        check_unchanged(ctx.x, ctx.y, ctx.versions)
        if torch.is_grad_enabled():
            return _differentiable_backward(ctx, grad_y)
        with _explicit_precision(ctx.y.device.type, ctx.lower):
            grad, unit_grads = _backward(ctx, grad_y)
        grads = _as_parameters([g for ugrads in unit_grads for g in ugrads], [p for u in ctx.units for p in u.params])
        return (grad, *_NOT_DIFFERENTIABLE, *grads)


# ``_GradualBottlenecks.forward``'s arguments between x and the parameters: no gradients.
_NOT_DIFFERENTIABLE = (None, None, None, None, None)


def _forward(ctx: Any, x: Tensor, units: Sequence[_Unit], first: _FirstConvs, lower: torch.dtype | None) -> Tensor:
    """``_GradualBottlenecks.forward``."""
    # The state runs in channels_last wherever a 1x1 conv can be a matrix product: on the
    # CPU always (an NCHW input is converted here and the output converted back, which
    # costs two copies of the state and is much faster than NCHW on the CPU), elsewhere
    # when the input already is channels_last.
    matrices = (x.device.type == "cpu" and CPU_CHANNELS_LAST) or x.is_contiguous(memory_format=torch.channels_last)
    # The units (and layout changes) by the C++ kernels where they apply: on the CPU, without autocast.
    kernels = (matrices and x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and lower is None
               and cpu_kernels.available())
    dtype = lower or x.dtype
    state = torch.empty_like(x, memory_format=torch.channels_last if matrices else torch.preserve_format)
    _copy(state, x, kernels)
    # What autocast casts for every unit's first conv: the state, kept up to date segment by
    # segment, and the weights, cast once here.
    conv_in = state if dtype == x.dtype else state.to(dtype)
    factors = _count_batches(units)
    saved: list[Tensor] = []
    starts = [0]
    weight, w2s, w3s = _weights(first, units, dtype)
    parts = zip(*(first.split(t) for t in (weight, first.gamma, first.beta, first.mean, first.var)))
    for unit, first_conv, w2, w3, factor in zip(units, parts, w2s, w3s, factors):
        width = unit.params[6].shape[0]
        check_fits(state.shape[1], starts[-1], width, 1)
        saved += _unit_forward(kernels, matrices, state, conv_in, unit, first_conv, w2, w3, factor, starts[-1],
                               ctx.residual)
        starts.append(starts[-1] + width)
    check_width(x, starts[-1], 1)
    first.write_back()
    # The weights as the convolutions used them (cast under autocast: the backward reuses the casts).
    ctx.save_for_backward(x, weight, first.gamma, *saved, *w2s, *w3s)
    ctx.units, ctx.offsets, ctx.sizes, ctx.starts = units, first.offsets, first.sizes, starts
    if matrices and not x.is_contiguous(memory_format=torch.channels_last):
        state = _contiguous(state, kernels)  # back to the input's layout
    ctx.matrices, ctx.kernels, ctx.lower, ctx.dtype = matrices, kernels, lower, dtype
    # Detached aliases share the version counters: backward checks that x and y are intact.
    ctx.x, ctx.y = x.detach(), state.detach()
    ctx.versions = (x._version, state._version)
    return state


def _backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor, list[list[Tensor]]]:
    """The gradient of the layer's input and every unit's parameter gradients (``_unit_parameters`` order)."""
    x, weight, gamma, *saved = ctx.saved_tensors
    count = len(ctx.units)
    saved, w2s, w3s = saved[: 11 * count], saved[11 * count : 12 * count], saved[12 * count :]
    ctx.w2s, ctx.w3s = w2s, w3s
    if ctx.matrices:
        grad = torch.empty_like(ctx.y, memory_format=torch.channels_last)
        _copy(grad, grad_y, ctx.kernels)
        unit_grads = _backward_as_matrices(ctx, grad, weight, gamma, saved)
        if not x.is_contiguous(memory_format=torch.channels_last):
            grad = _contiguous(grad, ctx.kernels)
    else:
        grad = torch.empty_like(ctx.y)
        grad.copy_(grad_y)
        unit_grads = _backward_as_convs(ctx, grad, weight, gamma, saved)
    return grad, unit_grads


def _unit_backward(
    matrices: bool, kernels: bool, unit: _Unit, saved: Sequence[Tensor], grad_delta: Tensor, gamma: Tensor,
    w2: Tensor, w3: Tensor, out: Tensor | None = None, out_gamma: Tensor | None = None,
    out_beta: Tensor | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Backward of one unit down to its first BatchNorm's input (the C++ ``unit_backward``
    with the kernels, which needs ``out``); ``w2``, ``w3``: the weights as the forward used them;
    ``out_gamma``, ``out_beta``: where the first BatchNorm's parameter gradients go (with ``out``).

    Returns the gradient of the first conv's output (conv1 and projection rows; written
    into ``out`` if given) and the gradients of every parameter of the unit except that
    conv's weight, in ``_unit_parameters`` order with the weight left out.
    """
    gamma2, gamma3 = unit.params[4], unit.params[7]
    if kernels and out is not None:
        return out, torch.ops.gunn_cpu.unit_backward(saved, grad_delta, out, gamma, w2, gamma2, w3, gamma3)
    a1, m1, v1, h1, a2, m2, v2, h2, a3, m3, v3 = saved
    g3, gw_bn3, gb_bn3 = _norm_backward(None, None, grad_delta, a3, m3, v3, gamma3, unit.bn3.eps)
    gh2, gw3 = _conv1x1_backward(g3, h2, w3, matrices)
    g2, gw_bn2, gb_bn2 = _norm_backward(gh2, h2, None, a2, m2, v2, gamma2, unit.bn2.eps)
    gh1, gw2, _ = aten.convolution_backward(g2, h1, w2, None, *_CONV_3X3, False, (0, 0), 1, [True, True, False])
    hidden = unit.hidden
    # delta = bottleneck + projection: the projection's BatchNorm gets delta's gradient.
    g1, gw_bn1, gb_bn1 = _norm_backward(
        gh1, h1, None if unit.proj_bn is None else grad_delta, a1, m1, v1, gamma, unit.bn1.eps, out, out_gamma,
        out_beta,
    )
    grads = [gw_bn1[:hidden], gb_bn1[:hidden], gw2, gw_bn2, gb_bn2, gw3, gw_bn3, gb_bn3]
    if unit.proj_bn is not None:
        grads += [gw_bn1[hidden:], gb_bn1[hidden:]]
    return g1, grads


def _with_first_weight(unit: _Unit, grads: list[Tensor], grad_weight: Tensor) -> list[Tensor]:
    """``_unit_backward``'s gradients with the first conv's (and projection's) weight put back."""
    hidden = unit.hidden
    out = [grad_weight[:hidden], *grads[:8]]
    if unit.proj_bn is not None:
        out += [grad_weight[hidden:], *grads[8:]]
    return out


def _saved(saved: Sequence[Tensor], i: int) -> Sequence[Tensor]:
    return saved[11 * i : 11 * i + 11]


def _backward_as_convs(
    ctx: Any, grad: Tensor, weight: Tensor, gamma: Tensor, saved: Sequence[Tensor]
) -> list[list[Tensor]]:
    """Units in reverse order, each first conv's gradients by ``convolution_backward``."""
    units = ctx.units
    state = ctx.y.to(ctx.dtype, copy=True)  # becomes the state before unit i, one segment at a time
    weights, gammas = weight.split(ctx.sizes), gamma.split(ctx.sizes)
    out: list[list[Tensor]] = [[] for _ in units]
    for i in reversed(range(len(units))):
        start, end = ctx.starts[i], ctx.starts[i + 1]
        # Contiguous: BatchNorm is slow on strided tensors. In the update's dtype (autocast).
        grad_delta = grad[:, start:end].to(ctx.dtype, memory_format=torch.contiguous_format, copy=True)
        if not ctx.residual:
            grad[:, start:end].zero_()
        g1, grads = _unit_backward(False, False, units[i], _saved(saved, i), grad_delta, gammas[i], ctx.w2s[i],
                                   ctx.w3s[i])
        state[:, start:end] = ctx.x[:, start:end]
        g_state, grad_weight, _ = aten.convolution_backward(
            g1, state, weights[i], None, *_CONV_1X1, False, (0, 0), 1, [True, True, False]
        )
        grad.add_(g_state)
        out[i] = _with_first_weight(units[i], grads, grad_weight)
    return out


def _backward_as_matrices(
    ctx: Any, grad: Tensor, weight: Tensor, gamma: Tensor, saved: Sequence[Tensor]
) -> list[list[Tensor]]:
    """The same in channels_last, where a 1x1 conv is a product of (pixels, channels) matrices.

    The first convs' gradients of a block of consecutive units are applied at once: one
    ``addmm_`` adds their input gradients to the state gradient (one pass over it per block
    instead of per unit) and one product gives their weight gradients from the state
    before the block, corrected on the block's own segments. Inside a block a unit's
    update gradient adds the pending input gradients of the later units on its segment.
    """
    units, dtype = ctx.units, ctx.dtype
    offsets, starts = ctx.offsets, ctx.starts
    gammas = gamma.split(ctx.sizes)
    gm = _pixels(grad)
    # Under autocast the state gradient keeps the state's dtype; everything the convolutions
    # touch (their inputs, weights and output gradients) is in the lower precision.
    mixed = gm.dtype != dtype
    state = torch.empty_like(ctx.y, dtype=dtype, memory_format=torch.channels_last)
    _copy(state, ctx.y, ctx.kernels)
    sm = _pixels(state)
    w = weight.reshape(weight.shape[0], -1)
    # Without the identity term a segment's gradient stops at its unit: one unit per block.
    per_block = max(1, BLOCK_ROWS // max(offsets[1], 1)) if ctx.residual else 1
    # The first BatchNorms' parameter gradients, every unit's rows of one tensor each.
    grad_gammas, grad_betas = (gamma.new_empty(gamma.shape).split(ctx.sizes) for _ in range(2))
    out: list[list[Tensor]] = [[] for _ in units]
    end = len(units)
    while end > 0:
        begin = max(0, end - per_block)
        r0, r1 = offsets[begin], offsets[end]
        # Zeros, not new_empty: ATen's bfloat16 matrix product on CPUs with AMX also reads (and multiplies
        # by zero) elements before a column slice that starts unaligned, here the columns of the units not
        # done yet: a NaN or inf in their garbage made ``pending``'s products NaN.
        g_block = gm.new_zeros(gm.shape[0], r1 - r0, dtype=dtype)
        inner: list[list[Tensor]] = []
        for i in reversed(range(begin, end)):
            cols = slice(starts[i], starts[i + 1])
            if offsets[i + 1] < r1:
                pending, w_pending = g_block[:, offsets[i + 1] - r0 :], w[offsets[i + 1] : r1, cols]
                if mixed:
                    grad_delta = (gm[:, cols] + torch.mm(pending, w_pending)).to(dtype)
                else:
                    grad_delta = torch.addmm(gm[:, cols], pending, w_pending)
            else:
                grad_delta = gm[:, cols]
                if not ctx.residual:
                    grad_delta = grad_delta.clone()
                    gm[:, cols].zero_()
                elif not ctx.kernels and not mixed:
                    # ATen's channels_last BatchNorm backward is several times slower on a
                    # strided gradient (the C++ kernels are not).
                    grad_delta = grad_delta.clone()
                grad_delta = _cast(grad_delta, dtype)
            g_rows = _image(g_block[:, offsets[i] - r0 : offsets[i + 1] - r0], ctx.y)
            _, grads = _unit_backward(
                True, ctx.kernels, units[i], _saved(saved, i), _image(grad_delta, ctx.y), gammas[i], ctx.w2s[i],
                ctx.w3s[i], g_rows, grad_gammas[i], grad_betas[i]
            )
            inner.append(grads)
        # Unit i saw the block's segments before it updated: their part of its weight
        # gradient comes from y, which the state still holds there.
        seen_updated = [
            torch.mm(g_block[:, offsets[i] - r0 : offsets[i + 1] - r0].t(), sm[:, starts[begin] : starts[i]])
            for i in range(begin + 1, end)
        ]
        block_cols = slice(starts[begin], starts[end])
        _copy(state[:, block_cols], ctx.x[:, block_cols], ctx.kernels)  # the state before unit `begin`
        if mixed:
            gm.add_(torch.mm(g_block, w[r0:r1]))
        else:
            gm.addmm_(g_block, w[r0:r1])
        grad_weight = torch.mm(g_block.t(), sm)
        for i in range(begin, end):
            rows = slice(offsets[i] - r0, offsets[i + 1] - r0)
            if i > begin:
                grad_weight[rows, starts[begin] : starts[i]] = seen_updated[i - begin - 1]
            out[i] = _with_first_weight(units[i], inner[end - 1 - i], grad_weight[rows].view(-1, *weight.shape[1:]))
        end = begin
    return out


def _differentiable_backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:
    """Backward under ``create_graph=True``: the plain autograd loop, recomputed from x.

    Only for higher-order gradients (gradient penalties and the like); BatchNorm running
    statistics are restored so that the forward pass still counts once.
    """
    x = ctx.saved_tensors[0]
    params = [p for unit in ctx.units for p in unit.params]
    # The recomputation updates copies of the BatchNorm buffers, dropped afterwards;
    # writing the old values back would change tensors its graph has saved.
    originals = [(m, dict(m._buffers)) for unit in ctx.units for m in unit.norms if m._buffers]
    for module, buffers in originals:
        module._buffers.update({k: None if b is None else b.clone() for k, b in buffers.items()})
    autocast = contextlib.nullcontext() if ctx.lower is None else torch.autocast(x.device.type, dtype=ctx.lower)
    try:
        with torch.enable_grad(), autocast:  # the forward's precision
            inp = x if x.requires_grad else x.detach().requires_grad_()
            y = ctx.plain_loop(inp)
    finally:
        for module, buffers in originals:
            module._buffers.update(buffers)
    skip = 1 + len(_NOT_DIFFERENTIABLE)
    needs = ctx.needs_input_grad[:1] + ctx.needs_input_grad[skip:]  # x and the parameters
    wanted = [t for t, need in zip([inp, *params], needs) if need]
    got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    grads = [next(got) if need else None for need in needs]
    return (grads[0], *_NOT_DIFFERENTIABLE, *grads[1:])
