"""``ditmem demo``: the product's central claim, seen in one process through its own HTTP API.

On the ``toy`` preset (trained weights shipped with the package, CPU only) it starts the API in
embedded mode, seeds a memory bank with toy clips whose captions name their motion ("a blue ball
falling"), retrieves k clips for "a ball falling", and generates "a red ball" (a prompt that does
not say how the ball moves) once with that memory and once without. It writes both mp4s and one
PNG strip: the memory clips, the video made with them, the video made without.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from model.presets import TOY
from model.toy.classify import read
from model.toy.strips import frame_strip
from model.toy.world import COLOURS, MOTIONS, ClipSpec, render_one, sample_spec
from model.video_io import read_video, write_video
from service.app import create_app
from service.local_server import running_server
from service.settings import Settings

QUERY = "a ball falling"
PROMPT = "a red ball"


@dataclass
class DemoResult:
    with_memory: Path
    without_memory: Path
    strip: Path
    memory_captions: list[str]
    motion_with_memory: str | None
    motion_without_memory: str | None


def _wait_job(client: httpx.Client, job_id: str, report: Callable[[str], None] | None) -> dict:
    last = None
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        progress = f"{job['kind']} {job['status']} step {job['step']}/{job['total_steps']}"
        if report is not None and progress != last:
            report(progress)
            last = progress
        if job["status"] not in ("queued", "running"):
            if job["status"] != "succeeded":
                raise RuntimeError(f"{job['kind']} {job['status']}: {job['error']}")
            return job
        time.sleep(0.05)


def _seed_bank(
    client: httpx.Client, scratch: Path, per_combo: int, seed: int
) -> dict[int, ClipSpec]:
    """Upload ``per_combo`` clips of every colour x motion through ``POST /memory``."""
    generator = torch.Generator().manual_seed(seed)
    combos = [(c, m) for c in COLOURS for m in MOTIONS for _ in range(per_combo)]
    random.Random(seed).shuffle(combos)
    pending = []
    for index, (colour, motion) in enumerate(combos):
        spec = sample_spec(generator, colour, motion)
        frames = (render_one(spec).permute(1, 2, 3, 0) + 1.0) / 2.0
        path = write_video(frames, scratch / f"toy-{index:03d}.mkv", fps=TOY.fps, lossless=True)
        with open(path, "rb") as handle:
            accepted = client.post(
                "/memory",
                files={"file": (path.name, handle, "video/x-matroska")},
                data={"caption": spec.caption, "tags": f"toy,{colour}"},
            ).raise_for_status()
        pending.append((accepted.json()["id"], spec))
    specs = {}
    for job_id, spec in pending:
        job = _wait_job(client, job_id, None)
        specs[job["result"]["clip_id"]] = spec
    return specs


def _generate(client: httpx.Client, body: dict, out: Path, report: Callable[[str], None]) -> dict:
    accepted = client.post("/generate", json=body).raise_for_status()
    job = _wait_job(client, accepted.json()["id"], report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(client.get(job["links"]["video"]).raise_for_status().content)
    return job


def _model_pixels(path: Path, scale: int) -> torch.Tensor:
    """A downloaded (enlarged) video back at model size: ``(3, F, H, W)`` in [-1, 1]."""
    frames = torch.from_numpy(read_video(path)).float() / 127.5 - 1.0  # (F, H, W, 3)
    centre = scale // 2
    return frames[:, centre::scale, centre::scale].permute(3, 0, 1, 2)


def run_demo(
    settings: Settings,
    out_dir: Path,
    report: Callable[[str], None] = print,
    *,
    per_combo: int = 2,
    k: int = 3,
    seed: int = 0,
) -> DemoResult:
    """Serve, seed the bank, retrieve, generate with and without memory, download, draw."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch, running_server(create_app(settings)) as url:
        report(f"API up on {url} (embedded worker, preset {settings.preset})")
        with httpx.Client(base_url=url, timeout=600) as client:
            specs = _seed_bank(client, Path(scratch), per_combo, seed)
            report(f"memory bank seeded with {len(specs)} toy clips")
            hits = client.get("/memory/search", params={"q": QUERY, "k": k}).raise_for_status()
            memory = hits.json()["hits"]
            for hit in memory:
                report(f"memory clip {hit['clip_id']} ({hit['score']:.3f}): {hit['caption']}")
            ids = [hit["clip_id"] for hit in memory]
            with_path, without_path = out_dir / "with-memory.mp4", out_dir / "without-memory.mp4"
            body = {"prompt": PROMPT, "seed": seed}
            _generate(client, body | {"memory": {"clip_ids": ids}}, with_path, report)
            _generate(client, body | {"memory": {"k": 0}}, without_path, report)

    with_video = _model_pixels(with_path, TOY.display_scale)
    without_video = _model_pixels(without_path, TOY.display_scale)
    rows = [(f"memory: {specs[i].caption}", render_one(specs[i])) for i in ids]
    rows += [(f"'{PROMPT}' with memory", with_video), (f"'{PROMPT}' without", without_video)]
    strip = frame_strip(rows, out_dir / "demo-strip.png", scale=6)
    result = DemoResult(
        with_memory=with_path,
        without_memory=without_path,
        strip=strip,
        memory_captions=[hit["caption"] for hit in memory],
        motion_with_memory=read(with_video).motion,
        motion_without_memory=read(without_video).motion,
    )
    report(
        f"the ball reads as {result.motion_with_memory or 'no clear motion'} with memory, "
        f"{result.motion_without_memory or 'no clear motion'} without"
    )
    return result
