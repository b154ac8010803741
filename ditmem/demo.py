"""``ditmem demo``: the product's central claim, seen in one process through its own HTTP API.

On the ``toy`` preset (trained weights shipped with the package, CPU only) it starts the API in
embedded mode, seeds a memory bank with toy clips whose captions name their motion ("a blue ball
falling"), retrieves k clips for "a ball falling", and generates "a red ball" (a prompt that does
not say how the ball moves) with that memory and without, for a few seeds. It writes the mp4s and
one PNG strip: the memory clips, the videos made with them, the videos made without.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

from ditmem.compose import build_app
from ditmem.toy import bank_specs, write_toy_clip
from model.presets import TOY
from model.toy.classify import read
from model.toy.strips import frame_strip
from model.toy.world import ClipSpec, render_one
from model.video_io import read_video
from runtime.settings import Settings
from service.local_server import running_server

QUERY = "a ball falling"
PROMPT = "a red ball"


@dataclass
class DemoResult:
    with_memory: list[Path]
    without_memory: list[Path]
    strip: Path
    memory_captions: list[str]
    motions_with_memory: list[str | None]
    motions_without_memory: list[str | None]


def _wait_job(client: httpx.Client, job_id: str, report: Callable[[str], None] | None) -> dict:
    last = None
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        progress = f"{job['kind']} {job['status']}"
        if job["status"] == "running" and job["step"] > 0:
            progress += f" step {job['step']}/{job['total_steps']}"
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
    pending = []
    for index, spec in enumerate(bank_specs(per_combo, seed)):
        path = write_toy_clip(spec, scratch / f"toy-{index:03d}.mkv")
        with open(path, "rb") as handle:
            accepted = client.post(
                "/memory",
                files={"file": (path.name, handle, "video/x-matroska")},
                data={"caption": spec.caption, "tags": f"toy,{spec.colour}"},
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
    samples: int = 4,
) -> DemoResult:
    """Serve, seed the bank, retrieve, generate with and without memory, download, draw."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as scratch, running_server(build_app(settings)) as url:
        report(f"API up on {url} (embedded worker, preset {settings.preset})")
        with httpx.Client(base_url=url, timeout=600) as client:
            specs = _seed_bank(client, Path(scratch), per_combo, seed)
            report(f"memory bank seeded with {len(specs)} toy clips")
            hits = client.get("/memory/search", params={"q": QUERY, "k": k}).raise_for_status()
            memory = hits.json()["hits"]
            for hit in memory:
                report(f"memory clip {hit['clip_id']} ({hit['score']:.3f}): {hit['caption']}")
            ids = [hit["clip_id"] for hit in memory]
            with_paths, without_paths = [], []
            # The same seeds with and without memory: each pair differs only by the memory.
            for s in range(seed, seed + samples):
                body = {"prompt": PROMPT, "seed": s}
                with_paths.append(out_dir / f"with-memory-{s}.mp4")
                without_paths.append(out_dir / f"without-memory-{s}.mp4")
                _generate(client, body | {"memory": {"clip_ids": ids}}, with_paths[-1], report)
                _generate(client, body | {"memory": {"k": 0}}, without_paths[-1], report)

    with_videos = [_model_pixels(p, TOY.display_scale) for p in with_paths]
    without_videos = [_model_pixels(p, TOY.display_scale) for p in without_paths]
    rows = [(f"memory: {specs[i].caption}", render_one(specs[i])) for i in ids]
    rows += [(f"'{PROMPT}' + memory, seed {seed + n}", v) for n, v in enumerate(with_videos)]
    rows += [(f"'{PROMPT}', seed {seed + n}", v) for n, v in enumerate(without_videos)]
    strip = frame_strip(rows, out_dir / "demo-strip.png", scale=6)
    result = DemoResult(
        with_memory=with_paths,
        without_memory=without_paths,
        strip=strip,
        memory_captions=[hit["caption"] for hit in memory],
        motions_with_memory=[read(v).motion for v in with_videos],
        motions_without_memory=[read(v).motion for v in without_videos],
    )

    def tally(motions: list[str | None]) -> str:
        target = "falling"
        return f"{sum(m == target for m in motions)}/{len(motions)} falling ({motions})"

    report(f"with memory: {tally(result.motions_with_memory)}")
    report(f"without:     {tally(result.motions_without_memory)}")
    return result
