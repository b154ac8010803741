"""Peak resident memory of one generation with memory, per offload and quantisation choice (CPU).

Each configuration runs in a fresh process: the pipeline is built and placed
(``model.placement``), freed memory is returned to the OS (``malloc_trim``) and the kernel's
high-water mark is reset (``/proc/self/clear_refs``), then
one video is generated with memory tokens of two random clips. Reported: the resident set once
placed, its peak during the generation, the generation time, and how far the video is from the
unplaced one. Targets:

* ``toy`` and ``tiny``: the presets as a worker loads them (``model.loading.load_pipeline``);
* ``dit-1.3b``: the tiny pipeline around a transformer of Wan2.1-T2V-1.3B's shape with random
  weights (30 blocks, width 1536, float32: 5.7 GB), at the tiny preset's 64x64x9 and 2 steps:
  the weights, not the activations, dominate, as they do for the real model on a small GPU.

    python -m bench.offload_memory [--targets toy tiny dit-1.3b] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PLACEMENTS = {
    "none": {},
    "model": {"offload": "model"},
    "group(1)": {"offload": "group", "group_blocks": 1},
    "group(6)": {"offload": "group", "group_blocks": 6},
    "int8": {"quantize": "int8"},
}
TARGETS = ("toy", "tiny", "dit-1.3b")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _pipeline(target: str, placement):
    import torch

    from model.loading import load_pipeline
    from model.pipeline import MemoryWanPipeline
    from model.placement import place_pipeline

    if target in ("toy", "tiny"):
        return load_pipeline(target, device="cpu", placement=placement)
    from diffusers import WanTransformer3DModel

    from bench.step_time import WAN_1_3B_CONFIG
    from model.encoder import MemoryEncoder
    from model.tiny import TINY_DIT_CONFIG, TINY_ENCODER_CONFIG, build_tiny_components

    components = build_tiny_components(0)
    torch.manual_seed(0)
    # The tiny text encoder's width feeds the text projection; everything else is 1.3B's.
    config = {**WAN_1_3B_CONFIG, "text_dim": TINY_DIT_CONFIG["text_dim"]}
    components["transformer"] = WanTransformer3DModel(**config).eval()
    width = config["num_attention_heads"] * config["attention_head_dim"]
    components["memory_encoder"] = MemoryEncoder(
        **{**TINY_ENCODER_CONFIG, "token_dim": width}, filter_seed=0
    ).eval()
    pipe = MemoryWanPipeline(**components)
    place_pipeline(pipe, placement, torch.device("cpu"))
    return pipe


def measure(target: str, label: str, offload_dir: Path) -> dict:
    """One configuration, in this process (run it in a fresh one)."""
    import torch

    from model.placement import Placement, return_freed_memory
    from model.presets import get_preset

    placement = Placement(**PLACEMENTS[label], offload_dir=offload_dir)
    preset = get_preset("toy" if target == "toy" else "tiny")
    pipe = _pipeline(target, placement)
    pipe.set_progress_bar_config(disable=True)
    clips = torch.rand(
        2, 3, preset.memory_frames, preset.memory_height, preset.memory_width,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    memory = pipe.resample_clips(clips * 2 - 1)
    # The resident set should count what is live, not what the allocator kept while placing.
    return_freed_memory()
    placed_mb = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the peak from here on
    started = time.perf_counter()
    frames = pipe(
        "a red ball falls", "blurry", memory=memory,
        num_inference_steps=2 if target == "dit-1.3b" else preset.steps,
        guidance_scale=preset.guidance_scale, num_frames=preset.num_frames,
        height=preset.height, width=preset.width,
        max_sequence_length=preset.max_sequence_length,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).frames[0]  # fmt: skip
    seconds = time.perf_counter() - started
    video = offload_dir / f"{target}-{label}.npy"
    import numpy as np

    np.save(video, frames)
    return {
        "target": target,
        "placement": label,
        "placed_rss_mb": placed_mb,
        "peak_rss_mb": _status_mb("VmHWM"),
        "seconds": seconds,
        "video": str(video),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    parser.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=3, metavar=("TARGET", "PLACEMENT", "DIR"))
    args = parser.parse_args()
    if args.one:
        target, label, folder = args.one
        print(json.dumps(measure(target, label, Path(folder))))
        return
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory(prefix="ditmem-offload-bench-") as folder:
        for target in args.targets:
            base = None
            for label in args.placements:
                done = subprocess.run(
                    [sys.executable, "-m", "bench.offload_memory", "--one", target, label,
                     folder],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = json.loads(done.stdout.strip().splitlines()[-1])
                video = np.load(row.pop("video"))
                if base is None:
                    base, base_video = row, video
                row["peak_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
                row["placed_ratio"] = row["placed_rss_mb"] / base["placed_rss_mb"]
                row["time_ratio"] = row["seconds"] / base["seconds"]
                row["max_abs_diff"] = float(np.abs(video - base_video).max())
                rows.append(row)
                print(f"{target:9s} {label:9s} placed {row['placed_rss_mb']:7.0f} MB "
                      f"({row['placed_ratio']:.2f}x), peak {row['peak_rss_mb']:7.0f} MB "
                      f"({row['peak_ratio']:.2f}x), {row['seconds']:6.2f} s "
                      f"({row['time_ratio']:.2f}x), max diff {row['max_abs_diff']:.1e}",
                      flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
