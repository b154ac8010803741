"""Ingest throughput of the memory bank on the tiny preset (CPU).

Generates distinct real mp4 clips with PyAV, ingests them into a fresh bank and reports clips per
second plus where the time goes. Re-ingesting the same files measures the dedup path.

    python -m bench.ingest_throughput [--clips 40]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import SentenceTransformerEmbedder
from memory_bank.ingest import ClipIngestor
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components
from tests.media import COLOURS, moving_square, write_clip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(2)

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        colours = list(COLOURS)
        paths = [
            write_clip(
                root / f"clip{i}.mp4",
                moving_square(colours[i % 4], 1 if i % 2 else -1, num_frames=12 + i, size=64),
            )
            for i in range(args.clips)
        ]
        pipe = MemoryWanPipeline(**build_tiny_components(0))
        bank = MemoryBank(root / "bank", SentenceTransformerEmbedder(), BankOptions())
        ingestor = ClipIngestor(bank, pipe, TINY)
        ingestor.ingest(paths[0], "warm-up clip")  # first call pays one-off initialisation

        start = time.perf_counter()
        for i, path in enumerate(paths[1:], start=1):
            ingestor.ingest(path, f"a {colours[i % 4]} square moving, clip {i}")
        fresh_s = time.perf_counter() - start

        start = time.perf_counter()
        for path in paths:
            assert not ingestor.ingest(path, "again").created
        dedup_s = time.perf_counter() - start

        count = len(bank)
        bank.close()  # the last connection checkpoints the WAL into the manifest file
        token_bytes = sum(
            p.stat().st_size for p in (root / "bank" / "tokens").rglob("*.safetensors")
        )
        latent_bytes = sum(
            p.stat().st_size for p in (root / "bank" / "latents").rglob("*.safetensors")
        )
        poster_bytes = sum(p.stat().st_size for p in (root / "bank" / "posters").rglob("*.jpg"))
        manifest_bytes = sum(p.stat().st_size for p in (root / "bank").glob("manifest.sqlite3*"))

    result = {
        "preset": "tiny",
        "threads": 2,
        "clips": count,
        "ingest_clips_per_s": (args.clips - 1) / fresh_s,
        "ingest_ms_per_clip": 1e3 * fresh_s / (args.clips - 1),
        "duplicate_upload_ms_per_clip": 1e3 * dedup_s / len(paths),
        "token_bytes_per_clip": token_bytes / count,
        "latent_bytes_per_clip_tiny": latent_bytes / count,
        "poster_bytes_per_clip": poster_bytes / count,
        "manifest_bytes_per_clip": manifest_bytes / count,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
