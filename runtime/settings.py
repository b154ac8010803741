"""Runtime configuration: the one place that reads ``DITMEM_*`` environment variables."""

from __future__ import annotations

import base64
import binascii
import difflib
import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from memory_bank.errors import BankCorrupt
from memory_bank.manifest import database_url
from memory_bank.storage import parse_storage_url
from model.placement import OffloadMode, Placement, QuantizeMode
from runtime.keys import ApiKey

logger = logging.getLogger(__name__)
ENV_PREFIX = "DITMEM_"


class Settings(BaseSettings):
    """Service, worker and CLI settings, from environment variables ``DITMEM_<FIELD>``.

    No ``.env`` file is read implicitly: the compose ``.env`` holds container paths, and picking
    it up on the host would point local runs at them. Pass ``_env_file=...`` to read one.
    """

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # toy: trained weights ship in the repository, so a fresh clone serves a working model.
    preset: Literal["tiny", "toy", "wan2.1-t2v-1.3b"] = "toy"
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    wan_path: Path | None = Field(None, description="local Wan2.1-T2V-1.3B-Diffusers folder")
    dit_mem_path: Path | None = Field(None, description="local DiT-Mem-1.3B.safetensors")
    offload: OffloadMode = Field(
        "none",
        description="keep idle weights off the GPU: 'model' (one component at a time), 'group' "
        "(offload_group_blocks transformer blocks at a time); on a CPU they wait in files",
    )
    offload_group_blocks: int = Field(1, ge=1, le=64, description="group offload: group size")
    offload_streams: bool = Field(
        False, description="group offload on CUDA: prefetch the next group on a side stream"
    )
    offload_dir: Path | None = Field(
        None, description="CPU offload: folder for the weights' files (default: the temp dir)"
    )
    quantize: QuantizeMode = Field(
        "none", description="weights of the transformer blocks' linear layers (torchao)"
    )
    cpu_offload: bool = Field(False, description="deprecated: DITMEM_OFFLOAD=model")
    vae_tiling: bool = Field(True, description="tiled VAE decode (bounds decode memory)")
    seed: int = Field(0, description="seed of the tiny preset's random weights")
    output_dir: Path = Path("outputs")
    log_level: str = "INFO"

    # memory bank
    bank_dir: Path = Field(Path("data/bank"), description="memory bank directory")
    database_url: str | None = Field(
        None,
        description="the bank's manifest: unset, the SQLite file in bank_dir; postgresql://... "
        "to share one manifest between hosts",
    )
    keep_latents: bool = Field(True, description="store canonical VAE latents (re-encoding)")
    keep_sources: bool = Field(False, description="store uploaded clip files")
    embedder_path: Path | None = Field(
        None, description="sentence-transformers folder for captions (default all-MiniLM-L6-v2)"
    )
    embedder_backend: Literal["onnx", "torch"] = Field(
        "onnx", description="run the caption embedder with ONNX Runtime (same vectors, faster)"
    )
    embedder_pooling: Literal["mean", "cls"] | None = Field(
        None,
        description="pool token states by mean or [CLS] (gte-base-en-v1.5: cls); unset: "
        "the model folder's own",
    )
    embedder_max_length: int | None = Field(
        None,
        ge=1,
        le=8192,
        description="tokens embedded per caption (gte: 512); unset: the folder's",
    )
    embedder_trust_remote_code: bool = Field(
        False, description="run model code shipped in the embedder folder (gte needs it)"
    )
    embedder_cache_dir: Path | None = Field(
        None, description="where ONNX exports of the embedder are kept (~/.cache/ditmem/onnx)"
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
    # HTTP API
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    auth: Literal["open", "keys"] = Field(
        "open", description="'open': no keys, every caller is 'local' (local use only)"
    )
    api_keys: list[ApiKey] = Field(
        default_factory=list, description='JSON list of {"name", "sha256", "scopes"}'
    )
    max_upload_stream_chunk: int = Field(1 << 20, gt=0)
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the API answers to (JSON list; '*': any); unset: localhost "
        "names in open mode, any with keys",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="other origins (https://ui.example.org) whose pages may POST/DELETE",
    )

    # jobs, queue and results
    redis_url: str | None = Field(
        None, description="Redis for the Celery broker and job records; unset: embedded mode"
    )
    results_dir: Path = Field(Path("data/results"), description="videos and records of jobs")
    uploads_dir: Path = Field(Path("data/uploads"), description="uploads waiting for ingest")
    imports_dir: Path = Field(
        Path("data/imports"),
        description="datasets for POST /memory/imports (with storage_url: imports/ in the bucket)",
    )
    storage_url: str | None = Field(
        None,
        description="s3://bucket/prefix: bank files, uploads and results in an S3-compatible "
        "store every host reaches; unset: bank_dir, uploads_dir, results_dir and imports_dir",
    )
    s3_endpoint_url: str | None = Field(
        None, description="endpoint of a non-AWS S3 server (MinIO, Ceph, R2); credentials: AWS_*"
    )
    presigned_downloads: bool = Field(
        False,
        description="with S3 storage, GET /jobs/{id}/video redirects to a short-lived presigned "
        "URL instead of streaming the video through the API",
    )
    presigned_ttl_s: int = Field(300, ge=10, le=7 * 24 * 3600, description="presigned URL life")
    job_lease_s: float = Field(
        120, gt=0, description="a running job whose worker is silent this long may run again"
    )
    visibility_timeout_s: int = Field(
        3 * 3600, gt=0, description="Celery redelivers unacknowledged tasks after this"
    )
    max_queued_per_key: int = Field(20, ge=1, description="queued jobs per API key before 429")
    webhook_secret: SecretStr | None = Field(
        None, description="signs webhook deliveries (Standard Webhooks, whsec_<base64>)"
    )
    webhook_allow_private: bool = Field(
        False, description="let webhooks reach private, loopback and link-local addresses"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="per delivery attempt")
    webhook_retry_for_s: float = Field(
        3600.0, gt=0, description="how long a failing delivery is retried before giving up"
    )
    webhook_backoff_s: float = Field(2.0, gt=0, description="the first retry's delay (doubles)")
    webhook_backoff_max_s: float = Field(300.0, gt=0, description="the longest retry delay")
    webhook_poll_s: float = Field(0.5, gt=0, le=60, description="outbox check when idle")
    public_url: str | None = Field(
        None,
        description="the API's external base URL (https://api.example.com): webhook payloads "
        "carry absolute links with it",
    )
    event_ping_s: float = Field(
        15.0, gt=0, le=300, description="keep-alive comment interval of idle event streams"
    )
    max_concurrent_uploads: int = Field(4, ge=1)
    worker_name: str | None = Field(None, description="worker name (default: host and pid)")

    index_exact_max: int = Field(20_000, ge=1, description="exact search up to this many clips")
    index_nprobe: int = Field(32, ge=1, description="IVF lists probed per search above that")

    @property
    def served_hosts(self) -> list[str]:
        """``allowed_hosts``, or its default: open mode answers to local names only."""
        if self.allowed_hosts is not None:
            return self.allowed_hosts
        return ["*"] if self.auth == "keys" else ["localhost", "127.0.0.1", "[::1]"]

    @model_validator(mode="after")
    def _keys_mode_needs_keys(self) -> Settings:
        if self.auth == "keys" and not self.api_keys:
            raise ValueError("DITMEM_AUTH=keys needs DITMEM_API_KEYS (see `ditmem keys new`)")
        return self

    @field_validator("api_keys")
    @classmethod
    def _one_key_per_name_and_secret(cls, keys: list[ApiKey]) -> list[ApiKey]:
        # A name owns jobs and clips: two keys of one name would read each other's jobs.
        for what, values in (
            ("name", [k.name for k in keys]),
            ("secret", [k.sha256 for k in keys]),
        ):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                shown = repeated if what == "name" else [f"{v[:8]}..." for v in repeated]
                raise ValueError(f"DITMEM_API_KEYS: two keys share the {what} {', '.join(shown)}")
        return keys

    @property
    def placement(self) -> Placement:
        """Offload and quantisation of the worker's pipeline (``model.placement``)."""
        offload = "model" if self.cpu_offload and self.offload == "none" else self.offload
        return Placement(
            offload=offload,
            group_blocks=self.offload_group_blocks,
            streams=self.offload_streams,
            offload_dir=self.offload_dir,
            quantize=self.quantize,
        )

    @model_validator(mode="after")
    def _real_preset_needs_weights(self) -> Settings:
        missing = self.wan_path is None or self.dit_mem_path is None
        if self.preset == "wan2.1-t2v-1.3b" and missing:
            raise ValueError(
                f"preset {self.preset} needs DITMEM_WAN_PATH and DITMEM_DIT_MEM_PATH "
                "(local weights; nothing is downloaded)"
            )
        return self

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_format(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is None:
            return None
        value = secret.get_secret_value()
        body = value.removeprefix("whsec_")
        try:
            raw = base64.b64decode(body + "==", validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if not value.startswith("whsec_") or len(raw) < 16:
            raise ValueError("must be whsec_ followed by base64 of at least 16 random bytes")
        return secret

    @field_validator("storage_url")
    @classmethod
    def _storage_url_is_a_bucket(cls, url: str | None) -> str | None:
        if url is not None:
            parse_storage_url(url)  # a bad one fails here, not when a process opens it
        return url

    @field_validator("database_url")
    @classmethod
    def _database_url_is_supported(cls, url: str | None) -> str | None:
        if url is not None:
            try:
                database_url(Path("."), url)
            except BankCorrupt as error:
                raise ValueError(str(error)) from None
        return url

    @model_validator(mode="after")
    def _warn_about_unknown_variables(self) -> Settings:
        for problem in unknown_variables(os.environ):
            if problem not in _warned:
                _warned.add(problem)
                logger.warning("%s", problem)
        return self


_warned: set[str] = set()
# Read by the deployment around ditmem (compose, images, scripts, tests), not by a setting.
NOT_SETTINGS = frozenset(
    f"{ENV_PREFIX}{name}"
    for name in (
        "WEIGHTS_DIR", "API_IMAGE", "WORKER_IMAGE", "REDIS_PASSWORD", "GPU_WORKERS",
        "GPU_LOCK_DIR", "SERVICES", "VENV", "FIXTURES", "SCREENSHOTS",
        "POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET",  # compose fleet
        "IMPORTS_HOST_DIR",
    )
)  # fmt: skip


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One message per ``DITMEM_*`` variable that no setting reads, naming the closest one.

    A typo (``DITMEM_PRESETT``) would otherwise be ignored in silence and the default used.
    """
    known = {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields}
    problems = []
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        closest = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {closest[0]}?" if closest else ""
        problems.append(f"environment variable {name} is not a ditmem setting{hint}")
    return problems


@lru_cache
def get_settings() -> Settings:
    """Settings of this process, read once."""
    return Settings()
