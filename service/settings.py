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
