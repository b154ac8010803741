"""Small real videos for tests, encoded with PyAV."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 40),
}


def moving_square(
    colour: str = "red", direction: int = 1, num_frames: int = 12, size: int = 48
) -> np.ndarray:
    """``(F, H, W, 3)`` uint8: a square of one colour sliding left (-1) or right (+1)."""
    frames = np.zeros((num_frames, size, size, 3), dtype=np.uint8)
    side = size // 4
    for index in range(num_frames):
        x = (size // 2 + direction * index * 2 - side // 2) % (size - side)
        frames[index, size // 3 : size // 3 + side, x : x + side] = COLOURS[colour]
    return frames


def write_clip(
    path: Path, frames: np.ndarray, fps: int = 8, codec: str = "libx264", pix_fmt: str = "yuv420p"
) -> Path:
    """Encode ``frames`` into ``path`` (container from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
