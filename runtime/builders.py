"""Builds the long-lived objects (pipeline, storage, bank, ingestor) from :class:`Settings`.

The CLI, the API process and the workers all build them here, so one setting means the same
thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import EmbedderOptions, open_text_embedder
from memory_bank.index import IndexConfig
from memory_bank.ingest import ClipIngestor, IngestLimits
from memory_bank.storage import LocalStorage, ObjectStorage, child, open_storage
from model.pipeline import MemoryWanPipeline
from model.presets import get_preset
from runtime.settings import Settings


def check_placement_of(settings: Settings) -> None:
    """Raise ``UnsupportedPlacement`` when the offload and quantisation settings cannot run on
    the configured device (before anything loads)."""
    from model.loading import resolve_device
    from model.placement import check_placement

    check_placement(settings.placement, resolve_device(settings.device))


def load_pipeline_from(settings: Settings) -> MemoryWanPipeline:
    from model.loading import load_pipeline

    pipe = load_pipeline(
        settings.preset,
        wan_path=settings.wan_path,
        dit_mem_path=settings.dit_mem_path,
        device=settings.device,
        placement=settings.placement,
        vae_tiling=settings.vae_tiling,
        seed=settings.seed,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bank_options(settings: Settings) -> BankOptions:
    return BankOptions(
        keep_latents=settings.keep_latents,
        keep_sources=settings.keep_sources,
        index=IndexConfig(exact_max=settings.index_exact_max, nprobe=settings.index_nprobe),
        visual_weight=settings.visual_weight,
    )


@dataclass(frozen=True)
class Storages:
    """Where the files that cross processes live: the bank's latents and sources, uploads
    waiting for ingest, the videos and records of jobs, and datasets to import (placed there
    by the operator, only read)."""

    bank: ObjectStorage
    uploads: ObjectStorage
    results: ObjectStorage
    imports: ObjectStorage


def open_storages(settings: Settings) -> Storages:
    """The four local folders, or one bucket with ``bank/``, ``uploads/``, ``results/`` and
    ``imports/``."""
    if settings.storage_url is None:
        return Storages(
            LocalStorage(settings.bank_dir),
            LocalStorage(settings.uploads_dir),
            LocalStorage(settings.results_dir),
            LocalStorage(settings.imports_dir),
        )
    root = open_storage(
        settings.storage_url, settings.bank_dir, endpoint_url=settings.s3_endpoint_url
    )
    return Storages(
        child(root, "bank"), child(root, "uploads"), child(root, "results"), child(root, "imports")
    )


def open_bank(
    settings: Settings, storages: Storages | None = None, *, rebuild_index: bool = False
) -> MemoryBank:
    embedder = open_text_embedder(
        settings.embedder_path,
        settings.embedder_backend,
        settings.embedder_cache_dir,
        EmbedderOptions(
            pooling=settings.embedder_pooling,
            max_length=settings.embedder_max_length,
            trust_remote_code=settings.embedder_trust_remote_code,
        ),
    )
    visual = None
    if settings.visual_checkpoint is not None:
        from memory_bank.visual import ClipVisualEmbedder

        visual = ClipVisualEmbedder(settings.visual_model, settings.visual_checkpoint)
    return MemoryBank(
        settings.bank_dir,
        embedder,
        bank_options(settings),
        visual=visual,
        database_url=settings.database_url,
        files=(storages or open_storages(settings)).bank,
        rebuild_index=rebuild_index,
    )


def ingest_limits(settings: Settings) -> IngestLimits:
    return IngestLimits(
        max_bytes=int(settings.max_upload_mb * 2**20),
        max_duration_s=settings.max_clip_duration_s,
        max_width=settings.max_clip_width,
        max_height=settings.max_clip_height,
    )


def build_ingestor(settings: Settings, bank: MemoryBank, pipe: MemoryWanPipeline) -> ClipIngestor:
    return ClipIngestor(bank, pipe, get_preset(settings.preset), ingest_limits(settings))
