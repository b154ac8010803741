"""Clip ingest: validate, canonicalise, encode, embed, store, index. Safe to run again.

The expensive work (decode, VAE, resampler) happens once per distinct file: uploads are
content-addressed, and a file already in the bank returns its existing id.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, Field

from memory_bank.bank import ClipToAdd, MemoryBank, NewClip
from memory_bank.errors import ClipRejected
from memory_bank.schemas import ClipRecord
from model.errors import InvalidClip
from model.pipeline import MemoryWanPipeline
from model.preprocess import ClipInfo, load_memory_clip, probe_clip
from model.presets import Preset
from model.tokens import ClipTokens

logger = logging.getLogger(__name__)

MAX_CAPTION_CHARS = 2000
MAX_TAGS = 32


class IngestLimits(BaseModel):
    """What an uploaded clip may be; anything else is rejected before it touches the bank."""

    max_bytes: int = Field(512 * 2**20, description="largest accepted file")
    min_duration_s: float = Field(0.0, ge=0)
    max_duration_s: float = Field(600.0, gt=0)
    max_width: int = Field(4096, gt=0)
    max_height: int = Field(4096, gt=0)


@dataclass
class TokenRefresh:
    """Outcome of recomputing cached tokens for a new encoder."""

    updated: list[int] = field(default_factory=list)
    unrecoverable: list[int] = field(default_factory=list)  # neither latent nor source kept


@dataclass(frozen=True)
class IngestItem:
    """One file to ingest and what to store with it."""

    path: Path
    caption: str
    tags: tuple[str, ...] = ()
    source_name: str | None = None  # the name it was uploaded as (default: the file's)
    owner: str | None = None  # the API key adding it; None: the operator


@dataclass(frozen=True)
class _Encoded:
    """A clip ingest has validated and encoded, waiting for its batch's caption embeddings."""

    item: IngestItem
    caption: str
    content_hash: str
    info: ClipInfo
    size_bytes: int
    tags: tuple[str, ...]
    latent: torch.Tensor
    tokens: ClipTokens
    poster_jpeg: bytes
    visual_embedding: np.ndarray | None


@dataclass(frozen=True)
class IngestResult:
    record: ClipRecord
    created: bool  # False: the same file was already in the bank


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clean_tags(tags: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    cleaned = tuple(sorted({tag.strip() for tag in tags if tag.strip()}))
    if len(cleaned) > MAX_TAGS or any(len(tag) > 64 for tag in cleaned):
        raise ClipRejected(f"at most {MAX_TAGS} tags of at most 64 characters each")
    return cleaned


def validate_clip(path: Path, caption: str, limits: IngestLimits) -> ClipInfo:
    """Check the upload and return its probe; raises :class:`ClipRejected` naming the problem."""
    if not caption or not caption.strip():
        raise ClipRejected("caption must not be empty")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ClipRejected(
            f"caption is {len(caption)} characters, the limit is {MAX_CAPTION_CHARS}"
        )
    if not path.is_file():
        raise ClipRejected(f"{path.name}: file not found")
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ClipRejected(
            f"{path.name} is {size / 2**20:.1f} MiB, "
            f"the limit is {limits.max_bytes / 2**20:.0f} MiB"
        )
    try:
        info = probe_clip(path, max_width=limits.max_width, max_height=limits.max_height)
    except InvalidClip as error:
        raise ClipRejected(str(error)) from None
    if not limits.min_duration_s <= info.duration_s <= limits.max_duration_s:
        raise ClipRejected(
            f"{path.name} lasts {info.duration_s:.2f} s; accepted: "
            f"{limits.min_duration_s:g} to {limits.max_duration_s:g} s"
        )
    if info.width > limits.max_width or info.height > limits.max_height:
        raise ClipRejected(
            f"{path.name} is {info.width}x{info.height}; the limit is "
            f"{limits.max_width}x{limits.max_height}"
        )
    return info


def poster_jpeg(path: Path, max_side: int = 320, min_side: int = 128) -> bytes:
    """A JPEG of the clip's middle keyframe, at most ``max_side`` pixels wide or high.

    Clips smaller than ``min_side`` (the toy world's 16x16) are enlarged by a whole factor with
    nearest-neighbour sampling, so their pixels stay sharp in the gallery.
    """
    from memory_bank.visual import read_keyframes

    frame = Image.fromarray(read_keyframes(path, 3)[1])
    factor = min_side // max(frame.size)
    if factor > 1:
        frame = frame.resize(
            (frame.width * factor, frame.height * factor), Image.Resampling.NEAREST
        )
    frame.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


class ClipIngestor:
    """Adds clips to a bank with one model's clip preprocessing and memory encoder.

    Args:
        bank: The bank to write to.
        pipe: Supplies the VAE (canonical latents) and the memory encoder (per-clip tokens).
        preset: Clip geometry (frames, size) of the model.
        limits: Upload bounds.
    """

    def __init__(
        self,
        bank: MemoryBank,
        pipe: MemoryWanPipeline,
        preset: Preset,
        limits: IngestLimits | None = None,
    ) -> None:
        self.bank = bank
        self.pipe = pipe
        self.preset = preset
        self.limits = limits or IngestLimits()
        self.encoder_version = pipe.memory_encoder.fingerprint()

    def ingest(
        self,
        path: str | Path,
        caption: str,
        tags: list[str] | tuple[str, ...] = (),
        *,
        source_name: str | None = None,
        owner: str | None = None,
    ) -> IngestResult:
        """Validate and add one clip; an identical file already in the bank is returned as is.

        Raises:
            ClipRejected: the file or its caption is refused, with the reason.
        """
        item = IngestItem(Path(path), caption, tuple(tags), source_name, owner)
        [outcome] = self.ingest_many([item])
        if isinstance(outcome, ClipRejected):
            raise outcome
        return outcome

    def ingest_many(self, items: Sequence[IngestItem]) -> list[IngestResult | ClipRejected]:
        """Validate, encode and add several clips, written to the bank in one transaction.

        Returns one outcome per item, in order: its result, or the :class:`ClipRejected` that
        says why it was refused (the other items are stored all the same).
        """
        outcomes: list[IngestResult | ClipRejected | _Encoded] = []
        for item in items:
            try:
                outcomes.append(self._encode(item))
            except ClipRejected as error:
                outcomes.append(error)
        encoded = [outcome for outcome in outcomes if isinstance(outcome, _Encoded)]
        if not encoded:
            return outcomes  # type: ignore[return-value]
        # One embedder call for the batch's captions: cheaper than one per clip.
        embeddings = self.bank.embedder.embed([e.caption for e in encoded])
        visual = self.bank.visual
        to_add = [
            ClipToAdd(
                NewClip(
                    caption=e.caption,
                    source_name=e.item.source_name or e.item.path.name,
                    content_hash=e.content_hash,
                    duration_s=e.info.duration_s,
                    fps=e.info.fps,
                    num_frames=e.info.num_frames,
                    width=e.info.width,
                    height=e.info.height,
                    size_bytes=e.size_bytes,
                    tags=e.tags,
                    embedder=self.bank.embedder.name,
                    text_embedding=embedding,
                    visual_embedder=visual.name if visual is not None else None,
                    visual_embedding=e.visual_embedding,
                    owner=e.item.owner,
                ),
                tokens=e.tokens,
                encoder_version=self.encoder_version,
                poster_jpeg=e.poster_jpeg,
                latent=e.latent,  # the bank keeps it, and the file, only if its options say so
                source=e.item.path,
            )
            for e, embedding in zip(encoded, embeddings, strict=True)
        ]
        added = iter(self.bank.add_clips(to_add))
        return [
            IngestResult(*next(added)) if isinstance(outcome, _Encoded) else outcome
            for outcome in outcomes
        ]

    def _encode(self, item: IngestItem) -> IngestResult | _Encoded:
        """Everything about one clip but its caption embedding, or the clip already stored."""
        path = item.path
        content_hash = None
        if path.is_file() and path.stat().st_size <= self.limits.max_bytes:
            # Hashing first makes re-running an import cheap: known files skip all decoding.
            content_hash = file_sha256(path)
            existing = self.bank.find_by_hash(content_hash)
            if existing is not None:
                return IngestResult(existing, created=False)
        info = validate_clip(path, item.caption, self.limits)  # a missing or oversize file too
        tags = clean_tags(item.tags)
        content_hash = content_hash or file_sha256(path)
        try:
            video = load_memory_clip(path, self.preset)
        except InvalidClip as error:
            raise ClipRejected(str(error)) from None
        with torch.no_grad():
            latent = self.pipe.encode_clip_latents(video.unsqueeze(0))
            tokens = self.pipe.memory_encoder.resample(latent.to(self.pipe.memory_encoder.device))
        visual = self.bank.visual
        return _Encoded(
            item=item,
            caption=item.caption.strip(),
            content_hash=content_hash,
            info=info,
            size_bytes=path.stat().st_size,
            tags=tags,
            latent=latent[0],
            tokens=tokens,
            poster_jpeg=poster_jpeg(path),
            visual_embedding=visual.embed_clip(path) if visual is not None else None,
        )

    def refresh_tokens(self) -> TokenRefresh:
        """Recompute the cached tokens of clips encoded by another encoder version.

        From the stored latent when the bank keeps latents (cheap: resampler only), else from
        the stored source file (full preprocessing); a clip with neither keeps its old tokens
        and is reported, since this encoder cannot use them.
        """
        outcome = TokenRefresh()
        for clip_id in self.bank.stale_clips(self.encoder_version):
            latent = self.bank.clip_latent(clip_id)
            if latent is not None:
                latent = latent.unsqueeze(0)
            elif (source := self.bank.clip_source(clip_id)) is not None:
                with source as path:
                    video = load_memory_clip(path, self.preset)
                latent = self.pipe.encode_clip_latents(video.unsqueeze(0))
            else:
                outcome.unrecoverable.append(clip_id)
                continue
            with torch.no_grad():
                encoder = self.pipe.memory_encoder
                tokens = encoder.resample(latent.to(encoder.device))
            self.bank.replace_tokens(clip_id, self.encoder_version, tokens)
            outcome.updated.append(clip_id)
        return outcome
