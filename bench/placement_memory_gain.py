"""Does the memory still steer the toy world with quantised or offloaded weights?

``ditmem toy eval`` on the toy preset placed as each ``model.placement`` choice (CPU): motion
accuracy with and without memory and the memory gain, against the unplaced model in the same run.

    python -m bench.placement_memory_gain [--samples 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ditmem.toy import ToyEvalConfig, run_toy_eval
from model.pipeline import MemoryWanPipeline
from model.placement import Placement, place_pipeline
from model.toy.components import build_toy_components

CHOICES = {
    "none": Placement(),
    "int8": Placement(quantize="int8"),
    "group(1)": Placement(offload="group"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for label, placement in CHOICES.items():
        pipe = MemoryWanPipeline(**build_toy_components(None))
        pipe.set_progress_bar_config(disable=True)
        place_pipeline(pipe, placement, torch.device("cpu"))
        report = run_toy_eval(pipe, ToyEvalConfig(samples=args.samples), report=lambda _: None)
        right, none = report.condition("right"), report.condition("none")
        row = {
            "placement": label,
            "motion_with_memory": right.motion_accuracy,
            "motion_without_memory": none.motion_accuracy,
            "memory_gain": report.memory_gain,
            "memory_gain_stderr": report.memory_gain_stderr,
            "seconds": right.seconds + none.seconds,
        }
        rows.append(row)
        print(f"{label:9s} motion {row['motion_with_memory']:.1%} with memory / "
              f"{row['motion_without_memory']:.1%} without, gain "
              f"{100 * row['memory_gain']:+.1f} points (se {100 * row['memory_gain_stderr']:.1f}),"
              f" {row['seconds']:.1f} s", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
