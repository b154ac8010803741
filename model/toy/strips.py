"""PNG frame strips: one labelled row of frames per clip, for docs and the demo."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

LABEL_WIDTH = 200
GAP = 2


def frame_strip(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path, scale: int = 4) -> Path:
    """Write ``rows`` of ``(label, (3, F, H, W) video in [-1, 1])`` as one PNG; returns ``path``.

    Frames are enlarged ``scale`` times with nearest-neighbour sampling, so pixels stay pixels.
    """
    if not rows:
        raise ValueError("no rows to draw")
    _, frames, height, width = rows[0][1].shape
    cell_w, cell_h = width * scale, height * scale
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + frames * (cell_w + GAP), len(rows) * (cell_h + GAP) + GAP),
        (40, 40, 40),
    )
    draw = ImageDraw.Draw(canvas)
    for r, (label, video) in enumerate(rows):
        top = GAP + r * (cell_h + GAP)
        draw.text((6, top + cell_h // 2 - 6), label, fill=(230, 230, 230))
        pixels = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        for f in range(frames):
            frame = pixels[:, f].permute(1, 2, 0).cpu().numpy()
            tile = Image.fromarray(np.ascontiguousarray(frame)).resize(
                (cell_w, cell_h), Image.Resampling.NEAREST
            )
            canvas.paste(tile, (LABEL_WIDTH + f * (cell_w + GAP), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
