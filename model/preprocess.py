"""Reference-clip decoding and conversion to model input.

This module is the single place where reference clips are decoded. Everything else in the
project receives either a :class:`ClipInfo` or the tensor built by :func:`load_clip`.

Decoding goes through PyAV, so any container/codec pair that FFmpeg can demux and decode is
accepted (mp4/h264, webm/vp9, mov, mkv, animated GIF, ...). Failures are reported as
:class:`~model.errors.InvalidClip` with a message naming the problem.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from av.container import InputContainer
from av.video.stream import VideoStream
from PIL import Image

from model.errors import ClipTooLarge, InvalidClip, StillImage
from model.presets import Preset

__all__ = ["ClipInfo", "load_clip", "probe_clip", "sample_frame_indices"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ClipInfo:
    """Basic facts about a reference clip's first video stream.

    Attributes:
        duration_s: Duration of the video stream in seconds (container duration, or
            ``num_frames / fps`` when neither the stream nor the container records one).
        fps: Average frame rate in frames per second (``0.0`` if it cannot be determined).
        num_frames: Number of frames in the video stream: the count recorded in the container
            header when present, otherwise the number of demuxed video packets (exact for the
            usual one-frame-per-packet codecs, an estimate otherwise).
        width: Frame width in pixels.
        height: Frame height in pixels.
        codec: FFmpeg decoder name of the video stream, e.g. ``"h264"``, ``"vp9"``, ``"gif"``.
        container_format: FFmpeg demuxer name, e.g. ``"mov,mp4,m4a,3gp,3g2,mj2"``, ``"gif"``.
    """

    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    container_format: str


def probe_clip(
    path: PathLike, *, max_width: int | None = None, max_height: int | None = None
) -> ClipInfo:
    """Read a clip's metadata and check that its video stream decodes.

    Still images and frames larger than ``max_width`` x ``max_height`` are refused from the
    container's and stream's headers, before any frame is decoded: a few-KB file that declares
    16000x16000 pixels costs kilobytes, not the gigabyte its frames would take. Only the first
    frame is decoded; the rest of the stream is demuxed (not decoded) when the container header
    does not record a frame count.

    Args:
        path: Path to a video file in any format PyAV can open.
        max_width: Widest frame accepted (``None``: any).
        max_height: Highest frame accepted (``None``: any).

    Returns:
        A :class:`ClipInfo` describing the first video stream.

    Raises:
        StillImage: The file is a still image, not a video (an animated GIF is a video).
        ClipTooLarge: The stream declares frames over the limits.
        InvalidClip: The file is missing, is not a media file, has no video stream, or its
            video stream cannot be decoded.
    """
    with _open_video(path) as (container, stream):
        _refuse_still_image(container, path)
        _refuse_oversize(stream, path, max_width, max_height)
        _first_frame(container, stream, path)
        num_frames = _frame_count(path)
        fps = _frame_rate(stream)
        return ClipInfo(
            duration_s=_duration_s(container, stream, num_frames, fps),
            fps=fps,
            num_frames=num_frames,
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            container_format=container.format.name,
        )


def sample_frame_indices(total: int, count: int) -> list[int]:
    """Pick ``count`` frame indices spread uniformly over a clip of ``total`` frames.

    The indices are numpy's ``linspace(0, total - 1, count)`` truncated to integers: the frame
    selection the DiT-Mem encoder was trained with, so bank clips look like its training data.
    With ``count > 1`` the first and last frames are always included; ``count == 1`` gives
    ``[0]``. When the clip is shorter than ``count``, every frame is taken once and the last frame
    is repeated to fill.

    Args:
        total: Number of frames in the clip, at least 1.
        count: Number of indices wanted, at least 1.

    Returns:
        ``count`` non-decreasing indices in ``[0, total - 1]``.

    Raises:
        ValueError: ``total`` or ``count`` is smaller than 1.
    """
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if count >= total:
        return list(range(total)) + [total - 1] * (count - total)
    if count == 1:
        return [0]
    return np.linspace(0, total - 1, count).astype(np.int64).tolist()


def load_clip(path: PathLike, num_frames: int, height: int, width: int) -> torch.Tensor:
    """Decode a clip into the model's pixel-space input.

    ``num_frames`` frames are picked with :func:`sample_frame_indices` over the whole clip.
    Frames are decoded as a stream and only the picked ones are kept (already resized), so
    memory stays bounded by the output size regardless of the clip's length.

    Each picked frame is converted to RGB and resized to exactly ``(width, height)`` with
    Pillow's bilinear filter, which widens its kernel when downscaling and therefore
    antialiases. The aspect ratio is NOT preserved: there is no cropping or letterboxing, so a
    clip with a different aspect ratio is stretched to the target size.

    Args:
        path: Path to a video file in any format PyAV can decode.
        num_frames: Number of frames in the output, at least 1.
        height: Output height in pixels, at least 1.
        width: Output width in pixels, at least 1.

    Returns:
        A float32 tensor of shape ``(3, num_frames, height, width)`` holding RGB values in
        ``[-1, 1]`` (``uint8 / 127.5 - 1``), channels first then time.

    Raises:
        InvalidClip: The file is missing, is not a media file, has no video stream, or yields
            no decodable frame.
        ValueError: ``num_frames``, ``height`` or ``width`` is smaller than 1.
    """
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")

    expected_total = _frame_count(path)
    indices = sample_frame_indices(expected_total, num_frames)
    kept, decoded_total = _decode_selected(path, set(indices), (width, height))
    if decoded_total == 0:
        raise InvalidClip(f"{path}: no frame of the video stream could be decoded")
    if decoded_total != expected_total:
        # The packet count was off (e.g. frames dropped by the decoder); the exact count is
        # known now, so sample again against it rather than return a skewed selection.
        indices = sample_frame_indices(decoded_total, num_frames)
        kept, _ = _decode_selected(path, set(indices), (width, height))

    pixels = np.stack([kept[i] for i in indices])  # (F, H, W, 3) uint8
    video = torch.from_numpy(pixels).permute(3, 0, 1, 2).to(torch.float32)
    return (video / 127.5 - 1.0).contiguous()


@contextmanager
def _open_video(path: PathLike) -> Iterator[tuple[InputContainer, VideoStream]]:
    """Open ``path`` and yield it with its first video stream, mapping failures to InvalidClip."""
    file = Path(path)
    if not file.exists():
        raise InvalidClip(f"{path}: file not found")
    if not file.is_file():
        raise InvalidClip(f"{path}: not a regular file")
    try:
        container = av.open(str(file), mode="r")
    except (av.FFmpegError, OSError) as exc:
        raise InvalidClip(f"{path}: cannot be decoded: not a readable media file ({exc})") from exc
    try:
        if not container.streams.video:
            raise InvalidClip(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        # As many decoding threads as the process gives torch (OMP_NUM_THREADS, or the cores):
        # FFmpeg's default, one per core, oversubscribes a worker limited to fewer.
        stream.thread_count = torch.get_num_threads()
        yield container, stream
    except (av.FFmpegError, OSError) as exc:
        raise InvalidClip(f"{path}: cannot be decoded: {exc}") from exc
    finally:
        container.close()


# FFmpeg's demuxers of single images: "image2" (by file name) and "<codec>_pipe" (by content:
# png_pipe, jpeg_pipe, webp_pipe, bmp_pipe, ...). GIF has a demuxer of its own and is a video.
def _is_still_image_format(names: str) -> bool:
    return any(name == "image2" or name.endswith("_pipe") for name in names.split(","))


def _refuse_still_image(container: InputContainer, path: PathLike) -> None:
    if _is_still_image_format(container.format.name):
        kind = container.format.name.split(",")[0].removesuffix("_pipe")
        raise StillImage(f"{path}: a still image ({kind}), not a video")


def _refuse_oversize(
    stream: VideoStream, path: PathLike, max_width: int | None, max_height: int | None
) -> None:
    width, height = stream.codec_context.width, stream.codec_context.height
    if (max_width is not None and width > max_width) or (
        max_height is not None and height > max_height
    ):
        raise ClipTooLarge(
            f"{path} is {width}x{height}; the limit is {max_width or 'any'}x{max_height or 'any'}"
        )


def _first_frame(container: InputContainer, stream: VideoStream, path: PathLike) -> None:
    """Decode until the first frame so a stream that cannot be decoded is reported early."""
    for _ in container.decode(stream):
        return
    raise InvalidClip(f"{path}: cannot be decoded: the video stream yields no frames")


def _frame_count(path: PathLike) -> int:
    """Frame count from the container header, else the number of demuxed video packets.

    Demuxing reads packets without decoding them, which is far cheaper than a decode pass.

    Raises:
        InvalidClip: The video stream holds no frame at all.
    """
    with _open_video(path) as (container, stream):
        # The demuxer ends with an empty flush packet, which is not a frame.
        count = stream.frames or sum(1 for p in container.demux(stream) if p.size > 0)
    if count == 0:
        raise InvalidClip(f"{path}: video stream has no frames")
    return count


def _decode_selected(
    path: PathLike, wanted: set[int], size: tuple[int, int]
) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame, keeping the ``wanted`` ones resized to ``size`` = (width, height).

    Returns:
        The kept frames as ``(height, width, 3)`` uint8 RGB arrays keyed by frame index, and
        the total number of frames decoded.
    """
    kept: dict[int, np.ndarray] = {}
    total = 0
    with _open_video(path) as (container, stream):
        for index, frame in enumerate(container.decode(stream)):
            if index in wanted:
                kept[index] = _resize_rgb(frame.to_image(), size)
            total = index + 1
    return kept, total


def _resize_rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``(height, width, 3)`` uint8 RGB array of ``image`` resized to ``size`` = (width, height)."""
    rgb = image.convert("RGB")
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


def _frame_rate(stream: VideoStream) -> float:
    rate: Fraction | None = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _duration_s(
    container: InputContainer, stream: VideoStream, num_frames: int, fps: float
) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return num_frames / fps if fps > 0 else 0.0


def load_memory_clip(path: PathLike, preset: Preset) -> torch.Tensor:
    """A reference clip at the preset's memory geometry: ``(3, F, H, W)`` float32 in [-1, 1].

    Ingest, generation with clip files and token recomputation all come through here, so a
    clip is canonicalised one way for a given preset.
    """
    return load_clip(path, preset.memory_frames, preset.memory_height, preset.memory_width)
