"""Runtime configuration: the one place that reads ``DITMEM_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Service, worker and CLI settings (env vars ``DITMEM_<FIELD>``, or a ``.env`` file)."""

    model_config = SettingsConfigDict(env_prefix="DITMEM_", env_file=".env", extra="ignore")

    preset: Literal["tiny", "wan2.1-t2v-1.3b"] = "tiny"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    wan_path: Path | None = Field(None, description="local Wan2.1-T2V-1.3B-Diffusers folder")
    dit_mem_path: Path | None = Field(None, description="local DiT-Mem-1.3B.safetensors")
    cpu_offload: bool = Field(False, description="offload idle components to CPU between stages")
    vae_tiling: bool = Field(True, description="tiled VAE decode (bounds decode memory)")
    seed: int = Field(0, description="seed of the tiny preset's random weights")
    output_dir: Path = Path("outputs")
    log_level: str = "INFO"

    # memory bank
    bank_dir: Path = Field(Path("data/bank"), description="memory bank directory")
    keep_latents: bool = Field(True, description="store canonical VAE latents (re-encoding)")
    keep_sources: bool = Field(False, description="store uploaded clip files")
    embedder_path: Path | None = Field(
        None, description="sentence-transformers folder for captions (default all-MiniLM-L6-v2)"
    )
    visual_model: str = Field("ViT-B-32", description="open_clip architecture of the visual index")
    visual_checkpoint: Path | None = Field(
        None, description="local open_clip weights; set to turn the visual index on"
    )
    visual_weight: float = Field(0.3, ge=0, le=1, description="visual share of the fused score")
    max_upload_mb: float = Field(512, gt=0)
    max_clip_duration_s: float = Field(600, gt=0)
    max_clip_width: int = Field(4096, gt=0)
    max_clip_height: int = Field(4096, gt=0)
    index_exact_max: int = Field(50_000, ge=1, description="exact search up to this many clips")
    index_nprobe: int = Field(32, ge=1, description="IVF lists probed per search above that")

    @model_validator(mode="after")
    def _real_preset_needs_weights(self) -> Settings:
        if self.preset != "tiny" and (self.wan_path is None or self.dit_mem_path is None):
            raise ValueError(
                f"preset {self.preset} needs DITMEM_WAN_PATH and DITMEM_DIT_MEM_PATH "
                "(local weights; nothing is downloaded)"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return Settings()
