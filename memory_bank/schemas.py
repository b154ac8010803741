"""Records of the memory bank, as returned to callers (pydantic at the boundary)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class ClipRecord(BaseModel):
    """One reference clip in the bank."""

    clip_id: int = Field(description="stable id, the same in the manifest, the indexes and the API")
    caption: str
    source_name: str = Field(description="file name the clip was uploaded as")
    content_hash: str = Field(description="sha256 of the uploaded bytes; equal uploads share an id")
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    size_bytes: int
    created_at: datetime
    tags: list[str] = Field(default_factory=list)
    encoder_version: str | None = Field(
        None, description="fingerprint of the encoder of its cached tokens"
    )
    owner: str | None = Field(None, description="the API key that added it; None: the operator")


class SearchHit(BaseModel):
    clip_id: int
    score: float = Field(description="ranking score: caption similarity, or the fused score")
    caption: str
    text_score: float | None = Field(None, description="cosine similarity prompt vs caption")
    visual_score: float | None = Field(None, description="CLIP similarity prompt vs keyframes")


class ClipPage(BaseModel):
    """Clips newest first; the next page starts ``before`` the ``next_cursor`` id."""

    items: list[ClipRecord]
    next_cursor: int | None = Field(None, description="pass as ``before`` for the next page")
    limit: int
