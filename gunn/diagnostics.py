"""Overlap-singularity diagnostics (paper, Section 4): collapsed channels and effective dimension.

Two output channels of a layer are *collapsed* when their activations are (nearly) the same
function of the input: |correlation| above a threshold over many positions and images. The
paper proves that the gradual (GUNN) order removes such pairs; these numbers let users
measure it. The *participation ratio* of the channel covariance's eigenvalues,
``(sum l)^2 / sum l^2``, is the effective number of dimensions the channels span (between 1
and the channel count).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from gunn.layers.gradual import GradualUpdate


@dataclass(frozen=True)
class ChannelStats:
    """Diagnostics of one layer's output channels over a batch."""

    channels: int
    collapsed_pairs: int  # channel pairs with |correlation| > threshold
    collapsed_channels: int  # channels in at least one such pair
    dead_channels: int  # channels that are constant over the batch (no correlation defined)
    participation_ratio: float  # effective dimensionality of the channel covariance

    def as_dict(self) -> dict[str, float]:
        """Plain numbers, for logging."""
        return {k: float(v) for k, v in asdict(self).items()}


def channel_stats(activations: Tensor, threshold: float = 0.99, max_positions: int = 8192) -> ChannelStats:
    """Diagnostics of activations (N, C, *spatial) or (N, C): positions are samples, channels variables."""
    if activations.dim() < 2:
        raise ValueError(f"activations need a batch and a channel dimension, got shape {tuple(activations.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    channels = activations.shape[1]
    x = activations.detach().double().movedim(1, -1).reshape(-1, channels)
    if x.shape[0] > max_positions:  # a fixed, evenly spread subset keeps the cost bounded
        x = x[torch.linspace(0, x.shape[0] - 1, max_positions, device=x.device).long()]
    x = x - x.mean(0)
    std = x.pow(2).mean(0).sqrt()
    scale = std.max().clamp_min(1e-30)
    dead = std <= 1e-6 * scale
    cov = x.T @ x / x.shape[0]
    eig = torch.linalg.eigvalsh(cov).clamp_min(0)
    participation = float(eig.sum() ** 2 / eig.pow(2).sum()) if eig.sum() > 0 else 0.0
    live = ~dead
    z = x[:, live] / std[live]
    corr = (z.T @ z / z.shape[0]).abs()
    upper = torch.triu(corr > threshold, diagonal=1)
    in_pair = upper.any(0) | upper.any(1)
    return ChannelStats(
        channels=channels,
        collapsed_pairs=int(upper.sum()),
        collapsed_channels=int(in_pair.sum()),
        dead_channels=int(dead.sum()),
        participation_ratio=participation,
    )


@torch.no_grad()
def singularity_report(model: nn.Module, x: Tensor, threshold: float = 0.99) -> dict[str, ChannelStats]:
    """``channel_stats`` of the output of every GUNN/SUNN layer of ``model`` on the batch ``x``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GradualUpdate)}
    outputs: dict[str, Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.__setitem__(name, out))
             for name, m in layers.items()]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name: channel_stats(outputs[name], threshold) for name in layers}


def diagnostic_metrics(model: nn.Module, x: Tensor) -> dict[str, float]:
    """``singularity_report`` of every GUNN layer of ``model`` on the batch ``x``, as metrics named
    ``diag/<layer>/<measure>``."""
    report = singularity_report(model, x)
    return {f"diag/{layer}/{key}": value for layer, stats in report.items()
            for key, value in stats.as_dict().items() if key != "channels"}
