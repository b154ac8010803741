"""A process killed in the middle of an ingest leaves a bank that opens and is consistent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memory_bank.bank import MemoryBank
from memory_bank.ingest import ClipIngestor
from model.presets import TINY

REPO_ROOT = Path(__file__).resolve().parents[3]

# Ingests one clip and SIGKILLs itself at the chosen point; nothing gets to clean up.
SCRIPT = """
import os, signal, sys
from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.embed import open_text_embedder
from memory_bank.ingest import ClipIngestor
from memory_bank.storage import LocalStorage
from memory_bank.store import ClipStore
from model.pipeline import MemoryWanPipeline
from model.presets import TINY
from model.tiny import build_tiny_components

root, clip, point = sys.argv[1:4]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "after-files":  # every file written, manifest row not yet
    ClipStore.insert_many = die
elif point == "mid-file":  # inside the atomic write of the first file (the latent)
    def write_then_die(self, key, data):
        partial = self.root / ".partial" / "half.safetensors"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(data[: len(data) // 2])
        die()
    LocalStorage.put_bytes = write_then_die
bank = MemoryBank(root, open_text_embedder(), BankOptions())
ClipIngestor(bank, MemoryWanPipeline(**build_tiny_components(0)), TINY).ingest(clip, "a red square")
"""


@pytest.mark.parametrize("point", ["mid-file", "after-files"])
def test_killed_ingest_leaves_a_consistent_bank(
    tmp_path, embedder, bank_options, tiny_pipe, clips, point
):
    root = tmp_path / "bank"
    with MemoryBank(root, embedder, bank_options) as bank:
        kept = (
            ClipIngestor(bank, tiny_pipe, TINY).ingest(clips["blue_left"], "a blue square").record
        )

    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(root), str(clips["red_right"]), point],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == -9, completed.stderr[-2000:]

    with MemoryBank(root, embedder, bank_options) as bank:
        assert len(bank) == 1 and bank.index_size == 1
        assert bank.get(kept.clip_id) == kept
        assert [h.clip_id for h in bank.search("a red square", k=5)] == [kept.clip_id]
        # Leftovers are unreferenced files only; collecting them keeps the live clip intact.
        bank.store.collect_garbage(min_age_s=-1)
        assert bank.clip_tokens([kept.clip_id], ClipIngestor(bank, tiny_pipe, TINY).encoder_version)
        # The interrupted clip can simply be ingested again.
        again = ClipIngestor(bank, tiny_pipe, TINY).ingest(clips["red_right"], "a red square")
        assert again.created and len(bank) == 2
