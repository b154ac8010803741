"""`ditmem train` under `accelerate launch` with two processes (gloo on CPU, as on a GPU host
with NCCL): ranks sync, rank 0 writes the checkpoint, the export loads strictly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from memory_bank.bank import MemoryBank
from memory_bank.embed import open_text_embedder
from memory_bank.ingest import ClipIngestor
from model.encoder import MemoryEncoder
from model.loading import load_encoder_state, load_memory_encoder
from model.presets import TINY
from model.tiny import TINY_ENCODER_CONFIG, build_tiny_components
from tests.media import moving_square, write_clip

REPO = Path(__file__).resolve().parents[2]


def make_bank(root: Path) -> Path:
    from model.pipeline import MemoryWanPipeline

    bank = MemoryBank(root / "bank", open_text_embedder())
    ingestor = ClipIngestor(bank, MemoryWanPipeline(**build_tiny_components(0)), TINY)
    for colour, direction in (("red", 1), ("blue", -1), ("green", 1), ("yellow", -1)):
        path = write_clip(root / f"{colour}.mp4", moving_square(colour, direction))
        ingestor.ingest(path, f"a {colour} square", ["train"])
    bank.close()
    return root / "bank"


def test_two_process_training_with_accelerate_launch(tmp_path: Path) -> None:
    bank = make_bank(tmp_path)
    run_dir = tmp_path / "run"
    env = os.environ | {"DITMEM_BANK_DIR": str(bank), "DITMEM_PRESET": "tiny"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "ditmem", "--log-level", "INFO",
        "train", "--run-dir", str(run_dir), "--steps", "4", "--k", "2",
        "--checkpoint-every", "2", "--lr", "1e-3",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2" in done.stderr and "process 1 of 2" in done.stderr
    finals = [line for line in done.stdout.splitlines() if line.startswith("final loss")]
    # Both ranks report the loss averaged over all processes, so the lines agree.
    assert len(finals) == 2 and finals[0] == finals[1], done.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000002",
        "step-000004",
    ]
    assert len((run_dir / "loss.csv").read_text().strip().splitlines()) == 1 + 4
    load_encoder_state(MemoryEncoder(**TINY_ENCODER_CONFIG), _official(run_dir))
    load_memory_encoder(run_dir / "encoder")


def _official(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "dit_mem.safetensors")
