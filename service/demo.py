"""``ditmem demo``: the whole product in one process, driven through its own HTTP API.

Starts the API in embedded mode on a local port, uploads a reference clip into a fresh memory
bank, generates a video that retrieves it, downloads the mp4 and stops. What a new user runs to
see every part work together, with no Redis and no GPU.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from model.video_io import write_video
from service.app import create_app
from service.local_server import running_server
from service.settings import Settings


def reference_clip(path: Path, num_frames: int = 16, size: int = 64) -> Path:
    """A red square sliding right on black: a small reference clip for the demo bank."""
    frames = np.zeros((num_frames, size, size, 3), dtype=np.float32)
    side = size // 4
    for index in range(num_frames):
        x = 4 + index * (size - side - 8) // max(num_frames - 1, 1)
        frames[index, size // 3 : size // 3 + side, x : x + side] = (0.9, 0.1, 0.1)
    return write_video(frames, path, fps=8)


def _wait_job(client: httpx.Client, job_id: str, report: Callable[[str], None]) -> dict:
    last = None
    while True:
        job = client.get(f"/jobs/{job_id}").raise_for_status().json()
        progress = f"{job['kind']} {job['status']} step {job['step']}/{job['total_steps']}"
        if progress != last:
            report(progress)
            last = progress
        if job["status"] not in ("queued", "running"):
            return job
        time.sleep(0.1)


def run_demo(
    settings: Settings, prompt: str, out: Path, report: Callable[[str], None] = print
) -> Path:
    """Serve, upload, generate with memory, download; returns the written mp4."""
    with tempfile.TemporaryDirectory() as scratch, running_server(create_app(settings)) as url:
        report(f"API up on {url} (embedded worker)")
        with httpx.Client(base_url=url, timeout=600) as client:
            clip = reference_clip(Path(scratch) / "red-square.mp4")
            with open(clip, "rb") as handle:
                accepted = client.post(
                    "/memory",
                    files={"file": (clip.name, handle, "video/mp4")},
                    data={"caption": "a red square sliding to the right", "tags": "demo"},
                ).raise_for_status()
            ingest = _wait_job(client, accepted.json()["id"], report)
            if ingest["status"] != "succeeded":
                raise RuntimeError(f"ingest {ingest['status']}: {ingest['error']}")
            accepted = client.post(
                "/generate", json={"prompt": prompt, "memory": {"k": 1}, "seed": 0}
            ).raise_for_status()
            job = _wait_job(client, accepted.json()["id"], report)
            if job["status"] != "succeeded":
                raise RuntimeError(f"generation {job['status']}: {job['error']}")
            for used in job["memory_used"]:
                report(f"memory clip {used['clip_id']} ({used['score']:.3f}): {used['caption']}")
            video = client.get(job["links"]["video"]).raise_for_status()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(video.content)
    return out
