"""Tests for reference-clip decoding (model.preprocess) and video writing (model.video_io).

Every clip is synthesised with PyAV in a temporary directory. Frame ``i`` of the "gradient"
clips has a background grey level that grows with ``i``, so the brightness of a decoded frame
tells which source frame it came from even through a lossy codec.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from model import video_io
from model.errors import InvalidClip
from model.preprocess import ClipInfo, load_clip, probe_clip, sample_frame_indices
from model.video_io import read_video, write_video

SRC_W, SRC_H = 64, 48
NUM_SRC_FRAMES = 24
FPS = 8
# Decoded grey levels may drift a little through lossy codecs; adjacent frames differ by ~8.7.
GREY_TOL = 3.0


def _needs(codec: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        codec not in av.codecs_available, reason=f"PyAV built without {codec}"
    )


# (suffix, encoder, encoder pixel format, encoder options)
CLIP_FORMATS = [
    pytest.param(
        ("mp4", "libx264", "yuv420p", {"crf": "10"}), id="mp4-h264", marks=_needs("libx264")
    ),
    pytest.param(
        (
            "webm",
            "libvpx-vp9",
            "yuv420p",
            {"crf": "10", "b": "0", "deadline": "realtime", "cpu-used": "8"},
        ),
        id="webm-vp9",
        marks=_needs("libvpx-vp9"),
    ),
    pytest.param(
        ("mov", "mpeg4", "yuv420p", {"b": "2000000"}), id="mov-mpeg4", marks=_needs("mpeg4")
    ),
    pytest.param(("mkv", "ffv1", "yuv420p", {}), id="mkv-ffv1", marks=_needs("ffv1")),
    pytest.param(("gif", "gif", "gray", {}), id="gif", marks=_needs("gif")),
]


def grey_level(index: int, total: int = NUM_SRC_FRAMES) -> float:
    """Background grey level of source frame ``index``: 20 for the first, 220 for the last."""
    return 20.0 + 200.0 * index / max(total - 1, 1)


def gradient_frames(total: int = NUM_SRC_FRAMES) -> np.ndarray:
    """``(total, H, W, 3)`` uint8 frames: grey background per frame plus a moving white square.

    The square stays in the top 8 rows so the bottom half measures the background only.
    """
    frames = np.empty((total, SRC_H, SRC_W, 3), dtype=np.uint8)
    for i in range(total):
        frames[i] = round(grey_level(i, total))
        x = (2 * i) % (SRC_W - 8)
        frames[i, 0:8, x : x + 8] = 255
    return frames


def encode_clip(
    path: Path,
    frames: np.ndarray,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
) -> Path:
    """Encode ``(F, H, W, 3)`` uint8 RGB frames into ``path`` (format taken from the suffix)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=FPS, options=options or {})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, FPS)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def to_levels(video: torch.Tensor) -> torch.Tensor:
    """Map model input in [-1, 1] back to 0..255 levels."""
    return (video + 1.0) * 127.5


def background_levels(video: torch.Tensor) -> list[float]:
    """Mean grey level of the bottom half of each frame of a ``(3, F, H, W)`` clip."""
    height = video.shape[2]
    return to_levels(video[:, :, height // 2 :, :]).mean(dim=(0, 2, 3)).tolist()


@pytest.fixture(scope="module", params=CLIP_FORMATS)
def gradient_clip(request: pytest.FixtureRequest, tmp_path_factory) -> Path:
    suffix, codec, pix_fmt, options = request.param
    path = tmp_path_factory.mktemp("clips") / f"gradient.{suffix}"
    return encode_clip(path, gradient_frames(), codec, pix_fmt, options)


@pytest.fixture(scope="module")
def mp4_clip(tmp_path_factory) -> Path:
    if "libx264" not in av.codecs_available:
        pytest.skip("PyAV built without libx264")
    path = tmp_path_factory.mktemp("clips") / "gradient.mp4"
    return encode_clip(path, gradient_frames(), options={"crf": "10"})


# --- sample_frame_indices -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (10, 1, [0]),
        (1, 1, [0]),
        (2, 2, [0, 1]),
        (5, 5, [0, 1, 2, 3, 4]),
        (10, 4, [0, 3, 6, 9]),
        (24, 7, [0, 3, 7, 11, 15, 19, 23]),
        (3, 6, [0, 1, 2, 2, 2, 2]),
        (1, 4, [0, 0, 0, 0]),
    ],
)
def test_sample_frame_indices_examples(total: int, count: int, expected: list[int]) -> None:
    assert sample_frame_indices(total, count) == expected


def test_sample_frame_indices_are_truncated_linspace_over_whole_clip() -> None:
    for total in range(1, 41):
        for count in range(2, total + 1):
            indices = sample_frame_indices(total, count)
            assert indices == sample_frame_indices(total, count)  # deterministic
            assert len(indices) == count
            assert indices[0] == 0 and indices[-1] == total - 1
            assert len(set(indices)) == count  # no frame picked twice when there are enough
            exact = np.linspace(0, total - 1, count)
            offset = exact - np.array(indices)
            assert np.all((offset > -1e-9) & (offset < 1))


@pytest.mark.parametrize(("total", "count"), [(0, 3), (-1, 3), (5, 0), (5, -2)])
def test_sample_frame_indices_rejects_non_positive(total: int, count: int) -> None:
    with pytest.raises(ValueError):
        sample_frame_indices(total, count)


# --- probe_clip -----------------------------------------------------------------------------


def test_probe_clip_reports_mp4_metadata(mp4_clip: Path) -> None:
    info = probe_clip(mp4_clip)

    assert isinstance(info, ClipInfo)
    assert info.num_frames == NUM_SRC_FRAMES
    assert info.fps == pytest.approx(FPS)
    assert info.duration_s == pytest.approx(NUM_SRC_FRAMES / FPS, abs=0.2)
    assert (info.width, info.height) == (SRC_W, SRC_H)
    assert info.codec == "h264"
    assert "mp4" in info.container_format
    with pytest.raises(AttributeError):
        info.fps = 1.0  # type: ignore[misc]


def test_probe_clip_counts_frames_in_every_format(gradient_clip: Path) -> None:
    info = probe_clip(gradient_clip)

    assert info.num_frames == NUM_SRC_FRAMES
    assert (info.width, info.height) == (SRC_W, SRC_H)
    assert info.fps == pytest.approx(FPS, rel=0.05)
    assert info.duration_s == pytest.approx(NUM_SRC_FRAMES / FPS, abs=0.3)


# --- load_clip ------------------------------------------------------------------------------


def test_load_clip_shape_dtype_and_range(gradient_clip: Path) -> None:
    video = load_clip(gradient_clip, num_frames=6, height=32, width=32)

    assert video.shape == (3, 6, 32, 32)
    assert video.dtype == torch.float32
    assert video.is_contiguous()
    assert video.min() >= -1.0 and video.max() <= 1.0
    # The white square survives decoding, so the range is actually used.
    assert video.max() > 0.9


def test_load_clip_samples_uniformly_over_whole_clip(gradient_clip: Path) -> None:
    video = load_clip(gradient_clip, num_frames=7, height=SRC_H, width=SRC_W)

    expected = [grey_level(i) for i in sample_frame_indices(NUM_SRC_FRAMES, 7)]
    assert background_levels(video) == pytest.approx(expected, abs=GREY_TOL)


def test_load_clip_takes_first_and_last_frame(mp4_clip: Path) -> None:
    video = load_clip(mp4_clip, num_frames=2, height=SRC_H, width=SRC_W)

    first, last = grey_level(0), grey_level(NUM_SRC_FRAMES - 1)
    assert background_levels(video) == pytest.approx([first, last], abs=GREY_TOL)


def test_load_clip_single_frame_is_first_frame(mp4_clip: Path) -> None:
    video = load_clip(mp4_clip, num_frames=1, height=16, width=16)

    assert video.shape == (3, 1, 16, 16)
    assert background_levels(video) == pytest.approx([grey_level(0)], abs=GREY_TOL)


def test_load_clip_short_clip_repeats_last_frame(tmp_path: Path) -> None:
    clip = encode_clip(tmp_path / "short.mkv", gradient_frames(total=5), "ffv1")

    video = load_clip(clip, num_frames=8, height=SRC_H, width=SRC_W)

    assert video.shape == (3, 8, SRC_H, SRC_W)
    expected = [grey_level(i, total=5) for i in (0, 1, 2, 3, 4, 4, 4, 4)]
    assert background_levels(video) == pytest.approx(expected, abs=GREY_TOL)
    for t in range(5, 8):
        assert torch.equal(video[:, t], video[:, 4])


def test_load_clip_resizes_to_non_square_target_without_cropping(tmp_path: Path) -> None:
    # Four flat quadrants: any crop, flip or transpose would move them.
    quadrants = np.empty((4, SRC_H, SRC_W, 3), dtype=np.uint8)
    quadrants[:, : SRC_H // 2, : SRC_W // 2] = 30
    quadrants[:, : SRC_H // 2, SRC_W // 2 :] = 220
    quadrants[:, SRC_H // 2 :, : SRC_W // 2] = 120
    quadrants[:, SRC_H // 2 :, SRC_W // 2 :] = 180
    clip = encode_clip(tmp_path / "quadrants.mkv", quadrants, "ffv1")

    for height, width in [(20, 50), (90, 40)]:
        video = to_levels(load_clip(clip, num_frames=2, height=height, width=width))
        assert video.shape == (3, 2, height, width)
        h, w = height // 2, width // 2
        # Stay two pixels away from the seams, where bilinear filtering blends quadrants.
        corners = {
            30: video[:, :, : h - 2, : w - 2],
            220: video[:, :, : h - 2, w + 2 :],
            120: video[:, :, h + 2 :, : w - 2],
            180: video[:, :, h + 2 :, w + 2 :],
        }
        for level, region in corners.items():
            assert region.mean().item() == pytest.approx(level, abs=2.0)
            assert (region - level).abs().max().item() <= 4.0


def test_load_clip_returns_rgb_channel_order(tmp_path: Path) -> None:
    frames = np.empty((3, SRC_H, SRC_W, 3), dtype=np.uint8)
    frames[...] = (200, 60, 20)
    clip = encode_clip(tmp_path / "orange.mp4", frames, options={"crf": "10"})

    video = to_levels(load_clip(clip, num_frames=3, height=16, width=16))

    channel_means = video.mean(dim=(1, 2, 3)).tolist()
    assert channel_means == pytest.approx([200, 60, 20], abs=6.0)


def test_load_clip_rejects_bad_sizes(mp4_clip: Path) -> None:
    for kwargs in (
        {"num_frames": 0, "height": 8, "width": 8},
        {"num_frames": 2, "height": 0, "width": 8},
        {"num_frames": 2, "height": 8, "width": -1},
    ):
        with pytest.raises(ValueError):
            load_clip(mp4_clip, **kwargs)


# --- invalid inputs -------------------------------------------------------------------------


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _text_file(path: Path) -> Path:
    path.write_text("this is not a video\n" * 50)
    return path


def _empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _truncated_mp4(path: Path) -> Path:
    # PyAV writes the mp4 index (moov) at the end, so the first half alone is undecodable.
    full = encode_clip(path.with_name("full.mp4"), gradient_frames(), options={"crf": "10"})
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _zeroed_payload_mp4(path: Path) -> Path:
    # Valid container and index, but every coded frame is replaced by zero bytes.
    full = encode_clip(path.with_name("full.mp4"), gradient_frames(), options={"crf": "10"})
    data = bytearray(full.read_bytes())
    box = data.find(b"mdat")
    size = int.from_bytes(data[box - 4 : box], "big")
    data[box + 4 : box - 4 + size] = bytes(size - 8)
    path.write_bytes(bytes(data))
    return path


def _audio_only(path: Path) -> Path:
    codec = "pcm_s16le" if path.suffix == ".wav" else "aac"
    samples = (np.sin(np.linspace(0, 200, 8000)) * 8000).astype(np.int16)[None, :]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        container.mux(stream.encode(None))
    return path


def _missing(path: Path) -> Path:
    return path


def _directory(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        ("random.mp4", _random_bytes, "cannot be decoded"),
        ("notes.mp4", _text_file, "cannot be decoded"),
        ("empty.mp4", _empty_file, "cannot be decoded"),
        ("truncated.mp4", _truncated_mp4, "cannot be decoded"),
        ("zeroed.mp4", _zeroed_payload_mp4, "cannot be decoded|no frame"),
        ("tone.wav", _audio_only, "no video stream"),
        pytest.param("tone.m4a", _audio_only, "no video stream", marks=_needs("aac")),
        ("missing.mp4", _missing, "file not found"),
        ("folder.mp4", _directory, "not a regular file"),
    ],
)
@pytest.mark.parametrize(
    "read", [probe_clip, lambda p: load_clip(p, 4, 16, 16)], ids=["probe_clip", "load_clip"]
)
def test_invalid_clips_raise_invalid_clip(tmp_path: Path, name, make, message, read) -> None:
    path = make(tmp_path / name)

    with pytest.raises(InvalidClip, match=message) as excinfo:
        read(path)
    assert name in str(excinfo.value)


# --- write_video / read_video ---------------------------------------------------------------


def _ramp_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth float frames in [0, 1]: horizontal/vertical ramps shifted per frame."""
    y = np.linspace(0.1, 0.9, height)[:, None]
    x = np.linspace(0.1, 0.9, width)[None, :]
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    for t in range(num_frames):
        shift = 0.05 * t / max(num_frames - 1, 1)
        frames[t, ..., 0] = x + shift
        frames[t, ..., 1] = y
        frames[t, ..., 2] = 0.5
    return frames


@pytest.mark.parametrize(("height", "width"), [(48, 64), (33, 45), (31, 64), (48, 47)])
def test_write_video_round_trips_tensor(tmp_path: Path, height: int, width: int) -> None:
    frames = _ramp_frames(9, height, width)
    target = tmp_path / "out" / "nested" / "video.mp4"

    written = write_video(torch.from_numpy(frames), target, fps=12)

    assert written == target and target.is_file()
    decoded = read_video(target)
    padded_h, padded_w = height + height % 2, width + width % 2
    assert decoded.shape == (9, padded_h, padded_w, 3)
    assert decoded.dtype == np.uint8
    original = frames * 255.0
    assert np.abs(decoded[:, :height, :width].astype(np.float32) - original).mean() < 4.0
    # Padding repeats the edge, so an extra row/column looks like the last original one.
    last_row = decoded[:, -1, :width].astype(np.float32)
    last_col = decoded[:, :height, -1].astype(np.float32)
    assert np.abs(last_row - original[:, -1]).mean() < 6.0
    assert np.abs(last_col - original[:, :, -1]).mean() < 6.0
    assert probe_clip(target).fps == pytest.approx(12)


def test_write_video_accepts_uint8_numpy(tmp_path: Path) -> None:
    frames = gradient_frames(total=6)

    written = write_video(frames, str(tmp_path / "grey.mp4"), fps=FPS)

    assert isinstance(written, Path)
    decoded = read_video(written)
    assert decoded.shape == frames.shape
    levels = decoded[:, SRC_H // 2 :].reshape(6, -1).mean(axis=1)
    assert levels == pytest.approx([grey_level(i, total=6) for i in range(6)], abs=GREY_TOL)


def test_write_video_falls_back_to_mpeg4(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(video_io, "_video_codec", lambda: "mpeg4")
    frames = _ramp_frames(5, 33, 45)

    written = write_video(frames, tmp_path / "fallback.mp4", fps=10)

    assert probe_clip(written).codec == "mpeg4"
    decoded = read_video(written)
    assert decoded.shape == (5, 34, 46, 3)
    assert np.abs(decoded[:, :33, :45].astype(np.float32) - frames * 255.0).mean() < 4.0


def test_write_video_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "video.mp4"
    write_video(_ramp_frames(4, 16, 16), target)
    write_video(_ramp_frames(7, 16, 16), target)  # overwrite in place

    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]
    assert read_video(target).shape[0] == 7
    assert target.stat().st_mode & 0o777 == 0o644


def test_write_video_failure_keeps_previous_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "video.mp4"
    write_video(_ramp_frames(4, 16, 16), target)
    before = target.read_bytes()

    def broken_encode(frames: np.ndarray, path: Path, fps: int) -> None:
        path.write_bytes(b"half a video")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr(video_io, "_encode", broken_encode)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(_ramp_frames(4, 16, 16), target)

    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


@pytest.mark.parametrize(
    ("frames", "fps"),
    [
        (np.zeros((4, 16, 16), dtype=np.uint8), 16),
        (np.zeros((4, 16, 16, 4), dtype=np.uint8), 16),
        (np.zeros((0, 16, 16, 3), dtype=np.uint8), 16),
        (np.zeros((4, 16, 16, 3), dtype=np.int32), 16),
        (np.zeros((4, 16, 16, 3), dtype=np.uint8), 0),
    ],
    ids=["no-channels", "rgba", "no-frames", "int32", "zero-fps"],
)
def test_write_video_rejects_bad_input(tmp_path: Path, frames: np.ndarray, fps: int) -> None:
    with pytest.raises(ValueError):
        write_video(frames, tmp_path / "video.mp4", fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_read_video_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidClip, match="file not found"):
        read_video(tmp_path / "missing.mp4")


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A valid PNG of a few hundred bytes whose header declares ``width`` x ``height``."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)  # far too little data: it is never decoded
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def test_still_images_are_refused_before_decoding(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from model import preprocess
    from model.errors import StillImage

    decoded = []
    monkeypatch.setattr(preprocess, "_first_frame", lambda *a: decoded.append(a))
    jpeg = tmp_path / "photo.mp4"  # the name says video; the bytes are a JPEG
    Image.new("RGB", (64, 48), "red").save(jpeg, format="JPEG")
    png = tmp_path / "frame.bin"
    Image.new("RGB", (64, 48), "blue").save(png, format="PNG")
    bomb = _png_declaring(tmp_path / "bomb.png", 16000, 16000)
    for path, kind in ((jpeg, "jpeg"), (png, "png"), (bomb, "png")):
        with pytest.raises(StillImage, match=f"still image \\({kind}\\)"):
            probe_clip(path)
    assert decoded == []  # refused from the headers alone


def test_an_animated_gif_and_a_one_frame_video_are_videos(tmp_path: Path) -> None:
    from PIL import Image

    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "green", "blue")]
    gif = tmp_path / "anim.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert probe_clip(gif).num_frames == 3
    from tests.media import write_clip

    one = write_clip(tmp_path / "one.mp4", np.zeros((1, 32, 32, 3), dtype=np.uint8))
    assert probe_clip(one).num_frames == 1


def test_frames_over_the_limit_are_refused_from_the_header(mp4_clip: Path, monkeypatch) -> None:
    from model import preprocess
    from model.errors import ClipTooLarge

    decoded = []
    monkeypatch.setattr(preprocess, "_first_frame", lambda *a: decoded.append(a))
    info = probe_clip(mp4_clip)
    with pytest.raises(ClipTooLarge, match=f"{info.width}x{info.height}; the limit is 16x"):
        probe_clip(mp4_clip, max_width=16, max_height=4096)
    assert len(decoded) == 1  # only the unlimited probe got as far as decoding
