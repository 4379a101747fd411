"""Many BatchNorm2d modules applied as one call over consecutive channel groups.

The running statistics of such a group can be kept in one tensor (``TiedStatistics``), each
module's own ``running_mean`` and ``running_var`` being a view of it: one BatchNorm call then
updates every module's statistics in place, where copying them back would cost two operations
(two kernels on a GPU) per module and step.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TiedStatistics:
    """The running means and variances of BatchNorm2d modules held in one tensor each, in order.

    ``tie()`` concatenates the modules' current statistics and makes each module's buffers views
    of the result, so that a BatchNorm call over the concatenated channels (``batch_norm_many``)
    updates all modules in place. Whatever replaces a module's buffers instead of writing into
    them breaks the tie: ``nn.Module._apply`` (``.to()``, ``.cuda()``, ``.double()``), a
    ``load_state_dict(assign=True)``, ``torch.func.functional_call``, an assignment. The owner
    ties again after the first two (``GunnLayer`` does); ``intact()`` tells whether the modules
    still hold the views, and callers use the modules' own buffers when they do not.
    """

    def __init__(self, norms: Sequence[nn.BatchNorm2d]) -> None:
        self.norms = list(norms)
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self._views: list[tuple[dict, str, Tensor]] = []
        self.tie()

    def tie(self) -> None:
        """(Re)concatenates the modules' statistics and gives each module views of them."""
        self.mean = self.var = None
        self._views = []
        if any(n.running_mean is None or n.running_var is None for n in self.norms):
            return  # track_running_stats=False: nothing to tie
        sizes = [n.num_features for n in self.norms]
        with torch.no_grad():
            mean = torch.cat([n.running_mean for n in self.norms])
            var = torch.cat([n.running_var for n in self.norms])
        for norm, m, v in zip(self.norms, mean.split(sizes), var.split(sizes)):
            norm._buffers["running_mean"], norm._buffers["running_var"] = m, v
            self._views += [(norm._buffers, "running_mean", m), (norm._buffers, "running_var", v)]
        self.mean, self.var = mean, var

    def intact(self) -> bool:
        """Whether every module still holds the views ``tie()`` gave it (a check of object identity)."""
        return self.mean is not None and all(buffers[name] is view for buffers, name, view in self._views)


def batch_norm_many(x: Tensor, norms: Sequence[nn.BatchNorm2d], tied: TiedStatistics | None = None) -> Tensor:
    """Applies ``norms[i]`` to the i-th group of channels of ``x``, exactly as each would alone.

    BatchNorm is per channel, so concatenating the modules' parameters and statistics gives
    the same result as running them one by one; ``num_batches_tracked`` advances once, as in
    ``nn.BatchNorm2d.forward``. Running statistics are updated in place where ``tied`` holds
    the modules' statistics (``tied.intact()``), else concatenated and written back to each module.
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
    in_place = keep_stats and tied is not None and tied.intact()
    if in_place:
        mean, var = tied.mean, tied.var
    else:
        mean = torch.cat([n.running_mean for n in norms]) if keep_stats and first.running_mean is not None else None
        var = torch.cat([n.running_var for n in norms]) if keep_stats and first.running_var is not None else None
    weight = _cat([n.weight for n in norms]) if first.affine else None
    bias = _cat([n.bias for n in norms]) if first.affine else None
    out = F.batch_norm(x, mean, var, weight, bias, use_batch_stats, factor, first.eps)
    if use_batch_stats and mean is not None and var is not None and not in_place:
        write_running_stats(norms, mean, var)
    return out


def _cat(tensors: Sequence[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


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


def fusable(module: nn.Module) -> bool:
    """Whether every BatchNorm in ``module`` is a plain ``nn.BatchNorm2d``: only those can be applied as one call
    (SyncBatchNorm and other norms run module by module)."""
    return all(type(m) is nn.BatchNorm2d for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase))


def conv_bn_many(
    x: Tensor, convs: Sequence[nn.Conv2d], norms: Sequence[nn.BatchNorm2d], groups: int = 1,
    tied: TiedStatistics | None = None,
) -> Tensor:
    """Several conv + BatchNorm pairs as one convolution (their weights stacked) and one norm.

    With ``groups=1`` every conv reads all of ``x`` (a wide conv); with ``groups=len(convs)``
    conv i reads the i-th group of channels (a grouped conv). The convs must agree in
    kernel size, stride, padding and dilation and have no bias. ``tied``: the norms' statistics
    (see ``batch_norm_many``).
    """
    first = convs[0]
    weight = _cat([c.weight for c in convs])
    out = F.conv2d(x, weight, None, first.stride, first.padding, first.dilation, groups)
    return batch_norm_many(out, norms, tied)
