"""Writing generated videos to disk, and reading them back for tests and tools.

Reference clips that feed the model are decoded by :mod:`model.preprocess`, not here.
"""

from __future__ import annotations

import os
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np
import torch

from model.atomic import atomic_path
from model.errors import InvalidClip

__all__ = ["read_video", "write_video"]

PathLike = str | os.PathLike[str]

# CRF 18 is visually lossless for libx264.
_X264_OPTIONS = {"crf": "18", "preset": "medium"}
# mpeg4 has no CRF; a fixed quantiser at its finest usual step keeps quality independent of size.
_MPEG4_QSCALE = 2


def write_video(
    frames: torch.Tensor | np.ndarray,
    path: PathLike,
    fps: int = 16,
    *,
    lossless: bool = False,
    scale: int = 1,
) -> Path:
    """Encode frames as an H.264 (yuv420p) mp4, atomically.

    The video is encoded into a temporary file in the destination directory which then
    replaces ``path`` with :func:`os.replace`, so a reader sees either the previous file or
    the complete new one, never a partial write. Parent directories are created as needed.

    yuv420p subsamples chroma by two in both directions and therefore needs even dimensions:
    an odd width or height is padded by one pixel that repeats the last column or row, so the
    written video may be one pixel wider and/or taller than ``frames``.

    ``libx264`` is used when PyAV was built with it; otherwise FFmpeg's native ``mpeg4``
    encoder is used (still in an mp4 container, yuv420p).

    Args:
        frames: ``(F, H, W, 3)`` RGB frames, ``F >= 1``, as a torch tensor or numpy array,
            either float in ``[0, 1]`` (clamped, then scaled to 0..255 and rounded) or uint8.
        path: Destination file; an ``.mp4`` suffix is expected but not enforced.
        fps: Frame rate written to the file, at least 1.
        lossless: Write FFV1 RGB in Matroska instead (use an ``.mkv`` path): exact pixels, no
            chroma subsampling, for reference clips whose colours must survive (the toy world).
        scale: Enlarge every frame this many times with nearest-neighbour sampling first, so
            tiny videos (the toy preset's 16x16) are watchable and keep their colours through
            chroma subsampling.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``frames`` does not have shape ``(F, H, W, 3)`` with ``F, H, W >= 1``, has
            an unsupported dtype, or ``fps`` is smaller than 1.
    """
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    pixels = _to_uint8(frames)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    if not lossless:
        pixels = _pad_to_even(pixels)
    target = Path(path)
    with atomic_path(target, durable=True) as tmp:
        (_encode_lossless if lossless else _encode)(pixels, tmp, fps)
    return target


def read_video(path: PathLike) -> np.ndarray:
    """Decode every frame of a video's first video stream.

    Args:
        path: Path to a video file in any format PyAV can decode.

    Returns:
        A uint8 numpy array of shape ``(F, H, W, 3)`` holding RGB frames.

    Raises:
        InvalidClip: The file is missing, cannot be decoded, has no video stream, or yields no
            frame.
    """
    if not Path(path).is_file():
        raise InvalidClip(f"{path}: file not found")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise InvalidClip(f"{path}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise InvalidClip(f"{path}: cannot be decoded: {exc}") from exc
    if not frames:
        raise InvalidClip(f"{path}: the video stream yields no frames")
    return np.stack(frames)


def _to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Validate ``(F, H, W, 3)`` frames and return them as a C-contiguous uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    array = np.asarray(frames)
    if array.ndim != 4 or array.shape[-1] != 3 or min(array.shape[:3]) < 1:
        raise ValueError(
            f"frames must have shape (F, H, W, 3) with F, H, W >= 1, got {array.shape}"
        )
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {array.dtype}")
    scaled = np.rint(np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0)
    return scaled.astype(np.uint8)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad height and width up to even sizes by repeating the last row / column."""
    _, height, width, _ = frames.shape
    pad = ((0, 0), (0, height % 2), (0, width % 2), (0, 0))
    return np.pad(frames, pad, mode="edge") if height % 2 or width % 2 else frames


@cache
def _video_codec() -> str:
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def _encode(frames: np.ndarray, path: Path, fps: int) -> None:
    """Encode ``(F, H, W, 3)`` uint8 RGB frames with even H and W into an mp4 at ``path``."""
    codec = _video_codec()
    _, height, width, _ = frames.shape
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w", format="mp4") as container:
        options = dict(_X264_OPTIONS) if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = time_base
        if codec != "libx264":
            stream.codec_context.qscale = True
            stream.codec_context.global_quality = _MPEG4_QSCALE
        _mux_frames(container, stream, frames, time_base)


def _encode_lossless(frames: np.ndarray, path: Path, fps: int) -> None:
    """FFV1 (exact RGB) in Matroska."""
    _, height, width, _ = frames.shape
    time_base = Fraction(1, fps)
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "bgr0"
        stream.codec_context.time_base = time_base
        _mux_frames(container, stream, frames, time_base)


def _mux_frames(container, stream, frames: np.ndarray, time_base: Fraction) -> None:
    """Encode RGB frames one per time-base tick, then flush the encoder."""
    for index, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts, frame.time_base = index, time_base
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
