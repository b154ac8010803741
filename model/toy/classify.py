"""Rule-based reading of a toy clip: where the ball is in each frame, how it moves, its colour.

It is the judge of :mod:`model.toy.evaluate`, so it is deliberately strict: a frame without a
ball, or a trajectory that fits no motion cleanly, is ``None`` (counted wrong), never a guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.toy.world import COLOURS

# A pixel belongs to the ball when its brightest channel is this far from black (0..1).
INK_THRESHOLD = 0.3
# A frame shows a ball when it holds at least this much ink (one full disk is ~16).
MIN_INK = 4.0
# Tolerances in pixels.
STILL = 2.5  # the other axis of a straight motion moves less than this
TRAVEL = 3.0  # a motion covers at least this much
JITTER = 0.6  # per-frame noise allowed against a monotone fall
BOUNCE = 2.0  # a bounce rises at least this much on both sides of a floor contact


@dataclass(frozen=True)
class Reading:
    motion: str | None
    colour: str | None
    centres: tuple[tuple[float, float], ...] | None


def ink(video: torch.Tensor) -> torch.Tensor:
    """``(3, F, H, W)`` in [-1, 1] -> ``(F, H, W)`` brightness of the brightest channel, 0..1."""
    return ((video.amax(dim=0) + 1.0) / 2.0).clamp(0.0, 1.0)


def track(video: torch.Tensor) -> list[tuple[float, float]] | None:
    """Ink-weighted ball centre per frame; ``None`` when the ball is missing from any frame."""
    weights = ink(video)
    weights = torch.where(weights > INK_THRESHOLD, weights, torch.zeros_like(weights))
    mass = weights.sum(dim=(1, 2))
    if bool((mass < MIN_INK).any()):
        return None
    height, width = weights.shape[1:]
    ys = torch.arange(height, dtype=weights.dtype).view(1, -1, 1)
    xs = torch.arange(width, dtype=weights.dtype).view(1, 1, -1)
    cx = (weights * xs).sum(dim=(1, 2)) / mass
    cy = (weights * ys).sum(dim=(1, 2)) / mass
    return list(zip(cx.tolist(), cy.tolist(), strict=True))


def motion_of(centres: Sequence[tuple[float, float]]) -> str | None:
    """The one motion a trajectory fits, or ``None``."""
    xs = [c[0] for c in centres]
    ys = [c[1] for c in centres]
    x_range, y_range = max(xs) - min(xs), max(ys) - min(ys)
    dx = xs[-1] - xs[0]
    if y_range < STILL and abs(dx) >= TRAVEL and x_range <= abs(dx) + JITTER:
        return "moving right" if dx > 0 else "moving left"
    if x_range >= STILL:
        return None
    steps = [b - a for a, b in zip(ys, ys[1:], strict=False)]
    if all(s > -JITTER for s in steps) and ys[-1] - ys[0] >= TRAVEL:
        # Falling accelerates: the second half covers more ground than the first.
        half = len(ys) // 2
        return "falling" if ys[-1] - ys[half] > ys[half] - ys[0] else None
    # A bounce has a floor contact: a frame with the ball clearly higher both before and after.
    contact_depth = max(min(ys[j] - min(ys[: j + 1]), ys[j] - min(ys[j:])) for j in range(len(ys)))
    return "bouncing" if contact_depth >= BOUNCE else None


def colour_of(video: torch.Tensor) -> str | None:
    """Palette colour nearest to the mean colour of the ball's core pixels."""
    core = ink(video) > 0.6
    if int(core.sum()) == 0:
        return None
    mean = video[:, core].mean(dim=1)
    palette = torch.tensor(list(COLOURS.values()))
    return list(COLOURS)[int(torch.cdist(mean[None], palette).argmin())]


def read(video: torch.Tensor) -> Reading:
    """Motion, colour and track of one ``(3, F, H, W)`` clip in [-1, 1]."""
    centres = track(video)
    if centres is None:
        return Reading(None, None, None)
    return Reading(motion_of(centres), colour_of(video), tuple(centres))
