"""Procedural clips of the toy world: one ball, one colour, one motion, black background.

A clip is ``(3, FRAMES, SIZE, SIZE)`` float in [-1, 1]. The ball is an anti-aliased disk whose
centre follows one of four motions. Prompts name colour and object but never the motion
("a red ball"), so the text alone cannot decide how the ball moves; reference clips of the same
motion can.

Every random draw goes through one ``torch.Generator``, so a seed fixes a clip exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FRAMES = 8
SIZE = 16
RADIUS = 2.5
# The ball's centre stays inside [MARGIN, SIZE - 1 - MARGIN] so it never leaves the frame.
MARGIN = RADIUS
FLOOR = SIZE - 1 - MARGIN

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
MOTIONS: tuple[str, ...] = ("bouncing", "moving left", "moving right", "falling")


@dataclass(frozen=True)
class ClipSpec:
    """One clip: its colour, motion and the ball centre ``(x, y)`` per frame, in pixels."""

    colour: str
    motion: str
    centres: tuple[tuple[float, float], ...]

    @property
    def prompt(self) -> str:
        """The motion-free prompt used for evaluation: ``"a red ball"``."""
        return prompt_for(self.colour)

    @property
    def caption(self) -> str:
        """The full caption, motion included: ``"a red ball falling"``."""
        return prompt_for(self.colour, self.motion)


def prompt_for(colour: str | None = None, motion: str | None = None) -> str:
    words = ["a"] + ([colour] if colour else []) + ["ball"] + ([motion] if motion else [])
    return " ".join(words)


# Each motion has a few start positions across its path and one speed. The world stays random
# (which track, which colour) but small enough that a transformer trained for minutes on a CPU
# renders every track as one coherent motion; with continuous positions and speeds it learned
# the ball's look long before its dynamics.
LANES: tuple[float, ...] = (3.5, 6.5, 9.5, 12.5)


def trajectory(motion: str, lane: float) -> list[tuple[float, float]]:
    """Ball centres for ``FRAMES`` frames of ``motion``; ``lane`` is the coordinate across it."""
    low, high = MARGIN, SIZE - 1 - MARGIN
    span = FRAMES - 1
    if motion in ("moving left", "moving right"):
        xs = [low + (high - low) * f / span for f in range(FRAMES)]
        if motion == "moving left":
            xs = xs[::-1]
        return [(x, lane) for x in xs]
    if motion == "falling":
        # From rest under constant gravity: y = y0 + g f^2 / 2.
        return [(lane, low + (FLOOR - low) * (f / span) ** 2) for f in range(FRAMES)]
    if motion == "bouncing":
        # |sin| arcs on the floor with a contact at frame 3, so the rise after it is visible:
        # that is what tells a bounce from a fall.
        height, period, contact = 7.0, 5.0, 3.0
        return [
            (lane, FLOOR - height * abs(math.sin(math.pi * (f - contact) / period)))
            for f in range(FRAMES)
        ]
    raise ValueError(f"unknown motion {motion!r}; choose one of {MOTIONS}")


def sample_spec(
    generator: torch.Generator, colour: str | None = None, motion: str | None = None
) -> ClipSpec:
    """A random clip; ``colour`` and ``motion`` are drawn uniformly unless given."""
    names = list(COLOURS)
    if colour is None:
        colour = names[torch.randint(len(names), (), generator=generator).item()]
    if motion is None:
        motion = MOTIONS[torch.randint(len(MOTIONS), (), generator=generator).item()]
    lane = LANES[torch.randint(len(LANES), (), generator=generator).item()]
    return ClipSpec(colour, motion, tuple(trajectory(motion, lane)))


def render(specs: list[ClipSpec]) -> torch.Tensor:
    """``(N, 3, FRAMES, SIZE, SIZE)`` float32 videos in [-1, 1]."""
    centres = torch.tensor([spec.centres for spec in specs], dtype=torch.float32)  # (N, F, 2)
    colours = torch.tensor([COLOURS[spec.colour] for spec in specs], dtype=torch.float32)
    axis = torch.arange(SIZE, dtype=torch.float32)
    dx = axis.view(1, 1, 1, SIZE) - centres[..., 0, None, None]
    dy = axis.view(1, 1, SIZE, 1) - centres[..., 1, None, None]
    # Coverage of each pixel by the disk, linear over the one-pixel rim: sub-pixel positions
    # stay visible, so slow motion is still motion.
    alpha = (RADIUS + 0.5 - torch.sqrt(dx**2 + dy**2)).clamp(0.0, 1.0)  # (N, F, H, W)
    ball = (colours + 1.0).view(-1, 3, 1, 1, 1)
    return -1.0 + alpha.unsqueeze(1) * ball


def render_one(spec: ClipSpec) -> torch.Tensor:
    """``(3, FRAMES, SIZE, SIZE)``."""
    return render([spec])[0]
