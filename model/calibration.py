"""BatchNorm calibration of the memory encoder on real clip latents.

The released DiT-Mem checkpoint carries parameters only, so at inference each frequency filter's
BatchNorm normalises with the default statistics (mean 0, variance 1) that the reference never
trained with. Calibration runs the resamplers over a bank's latents without gradients, replaces
those defaults with the measured statistics and reports how far they were off.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from model.encoder import FrequencyFilter3d, MemoryEncoder


@dataclass(frozen=True)
class NormShift:
    """How far one BatchNorm's calibrated statistics are from the defaults."""

    name: str
    mean_abs_mean: float  # mean over channels of |running_mean - 0|
    max_abs_mean: float
    mean_var_ratio: float  # mean over channels of running_var / 1
    min_var_ratio: float
    max_var_ratio: float


@dataclass(frozen=True)
class CalibrationReport:
    clips: int
    norms: list[NormShift]

    def table(self) -> str:
        lines = [
            "| BatchNorm | mean abs(mean) | max abs(mean) | mean var | min var | max var |",
            "|---|---|---|---|---|---|",
        ]
        for n in self.norms:
            lines.append(
                f"| {n.name} | {n.mean_abs_mean:.4g} | {n.max_abs_mean:.4g} "
                f"| {n.mean_var_ratio:.4g} | {n.min_var_ratio:.4g} | {n.max_var_ratio:.4g} |"
            )
        return "\n".join(lines)


def used_batchnorms(encoder: MemoryEncoder) -> dict[str, nn.BatchNorm3d]:
    """The BatchNorms the forward applies (those inside the frequency filters), by name,
    shallowest first."""
    return {
        f"{name}.norm": module.norm
        for name, module in encoder.named_modules()
        if isinstance(module, FrequencyFilter3d)
    }


class _Moments:
    """Per-channel count, sum and sum of squares of a BatchNorm's inputs, in float64."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sum_sq = torch.zeros(channels, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to("cpu", torch.float64)
        self.count += flat.shape[1]
        self.sum += flat.sum(dim=1)
        self.sum_sq += (flat**2).sum(dim=1)

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.sum / self.count
        # Unbiased, as BatchNorm stores it.
        var = (self.sum_sq - self.count * mean**2) / max(self.count - 1, 1)
        return mean, var.clamp_min(0.0)


def _depth(name: str) -> int:
    return 0 if ".conv_block1." in name else 1


@torch.no_grad()
def calibrate_batchnorm(
    encoder: MemoryEncoder, batches: Callable[[], Iterable[torch.Tensor]]
) -> CalibrationReport:
    """Set the used BatchNorms' running statistics to the exact moments of their inputs.

    Args:
        encoder: Changed in place; left in eval mode.
        batches: Returns a fresh iterable of canonical clip latents ``(N, C, D, H, W)``, e.g.
            from a memory bank; it is walked once per filter depth.

    The statistics are exact averages over every clip (order and batching do not matter). The
    second filter's input depends on the first filter's normalisation, so depths are calibrated
    in order, each pass running the encoder as at inference with the shallower depths already
    calibrated.
    """
    norms = used_batchnorms(encoder)
    encoder.eval()
    clips = 0
    for depth in sorted({_depth(name) for name in norms}):
        level = {name: bn for name, bn in norms.items() if _depth(name) == depth}
        moments = {name: _Moments(bn.num_features) for name, bn in level.items()}
        handles = [
            bn.register_forward_pre_hook(lambda _, args, m=moments[name]: m.add(args[0]))
            for name, bn in level.items()
        ]
        try:
            clips = 0
            for latents in batches():
                encoder.resample(latents.to(encoder.device))
                clips += latents.shape[0]
        finally:
            for handle in handles:
                handle.remove()
        if clips == 0:
            raise ValueError("no clip latents to calibrate on")
        for name, bn in level.items():
            mean, var = moments[name].mean_var()
            bn.running_mean.copy_(mean.to(bn.running_mean))
            bn.running_var.copy_(var.to(bn.running_var))
            bn.num_batches_tracked.fill_(clips)
    shifts = []
    for name, bn in norms.items():
        mean, var = bn.running_mean.float(), bn.running_var.float()
        shifts.append(
            NormShift(
                name=name,
                mean_abs_mean=mean.abs().mean().item(),
                max_abs_mean=mean.abs().max().item(),
                mean_var_ratio=var.mean().item(),
                min_var_ratio=var.min().item(),
                max_var_ratio=var.max().item(),
            )
        )
    return CalibrationReport(clips=clips, norms=shifts)
