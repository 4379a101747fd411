"""Many BatchNorm2d modules applied as one call over consecutive channel groups."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def batch_norm_many(x: Tensor, norms: Sequence[nn.BatchNorm2d]) -> Tensor:
    """Applies ``norms[i]`` to the i-th group of channels of ``x``, exactly as each would alone.

    BatchNorm is per channel, so concatenating the modules' parameters and statistics gives
    the same result as running them one by one; running statistics are written back to
    each module and ``num_batches_tracked`` advances once, as in ``nn.BatchNorm2d.forward``.
    """
    first = norms[0]
    for norm in norms[1:]:
        if (
            norm.training != first.training
            or norm.momentum != first.momentum
            or norm.eps != first.eps
            or norm.affine != first.affine
            or norm.track_running_stats != first.track_running_stats
        ):
            raise ValueError("batch_norm_many needs BatchNorm modules with identical settings")
    factor = count_batch(norms)
    use_batch_stats = first.training or first.running_mean is None
    keep_stats = not first.training or first.track_running_stats
    mean = torch.cat([n.running_mean for n in norms]) if keep_stats and first.running_mean is not None else None
    var = torch.cat([n.running_var for n in norms]) if keep_stats and first.running_var is not None else None
    weight = torch.cat([n.weight for n in norms]) if first.affine else None
    bias = torch.cat([n.bias for n in norms]) if first.affine else None
    out = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, first.eps)
    if use_batch_stats and mean is not None and var is not None:
        write_running_stats(norms, mean, var)
    return out


def count_batch(norms: Sequence[nn.BatchNorm2d]) -> float:
    """Counts a training batch in each module as ``nn.BatchNorm2d.forward`` does and returns
    the running-statistics factor it would use (the modules share their settings)."""
    first = norms[0]
    factor = 0.0 if first.momentum is None else first.momentum
    if first.training and first.track_running_stats:
        torch._foreach_add_([norm.num_batches_tracked for norm in norms], 1)
        if first.momentum is None:  # cumulative moving average
            factor = 1.0 / _batches_counted(first)
    return factor


def _batches_counted(norm: nn.BatchNorm2d) -> int:
    """``norm.num_batches_tracked`` as a number, read from the device only when something other
    than ``count_batch`` changed it (a checkpoint load, the module's own forward): reading it
    every step would wait for the device every step."""
    counter = norm.num_batches_tracked
    known = getattr(norm, "_gunn_batches", None)  # (counter's version, value) after our last count
    if known is not None and known[0] + 1 == counter._version:  # only our increment since
        value = known[1] + 1
    else:
        value = _read(counter)
    norm._gunn_batches = (counter._version, value)
    return value


def _read(counter: Tensor) -> int:
    return int(counter)


def write_running_stats(norms: Sequence[nn.BatchNorm2d], mean: Tensor, var: Tensor) -> None:
    """Copies concatenated running statistics back into the modules they came from."""
    sizes = [n.num_features for n in norms]
    with torch.no_grad():
        for norm, m, v in zip(norms, mean.split(sizes), var.split(sizes)):
            norm.running_mean.copy_(m)
            norm.running_var.copy_(v)


def conv_bn_many(
    x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.BatchNorm2d], groups: int = 1
) -> Tensor:
    """Several conv + BatchNorm pairs as one convolution (their weights stacked) and one norm.

    With ``groups=1`` every conv reads all of ``x`` (a wide conv); with ``groups=len(convs)``
    conv i reads the i-th group of channels (a grouped conv). The convs must agree in
    kernel size, stride, padding and dilation and have no bias.
    """
    first = convs[0]
    weight = first.weight if len(convs) == 1 else torch.cat([c.weight for c in convs])
    out = F.conv2d(x, weight, None, first.stride, first.padding, first.dilation, groups)
    return batch_norm_many(out, norms)
