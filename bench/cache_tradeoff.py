"""The step cache's trade-off on the toy world: fewer transformer passes vs the memory's gain.

``ditmem toy eval`` (the same prompts, noise and memory for every run) without a cache and with
First Block Cache at each threshold: transformer passes per video (both guidance branches),
generation time, motion accuracy with and without memory, and the memory gain. One run on
this machine; the PNG plots the gain against the speed-up in passes.

    python -m bench.cache_tradeoff [--samples 128] [--thresholds 0.05 0.1 0.2 0.3 0.5]
        [--json out.json] [--png curve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditmem.toy import ToyEvalConfig, ToyEvalReport, run_toy_eval
from model.caching import CacheSpec
from model.pipeline import MemoryWanPipeline
from model.toy.components import build_toy_components


def _row(threshold: float | None, report: ToyEvalReport) -> dict:
    right, none = report.condition("right"), report.condition("none")
    passes = (right.passes_per_video + none.passes_per_video) / 2
    seconds = right.seconds + none.seconds
    return {
        "threshold": threshold,
        "passes_per_video": passes,
        "seconds": seconds,
        "motion_with_memory": right.motion_accuracy,
        "motion_without_memory": none.motion_accuracy,
        "memory_gain": report.memory_gain,
        "memory_gain_stderr": report.memory_gain_stderr,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    pipe = MemoryWanPipeline(**build_toy_components(None))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for threshold in [None, *args.thresholds]:
        cache = CacheSpec() if threshold is None else CacheSpec(kind="first-block",
                                                                threshold=threshold)  # fmt: skip
        report = run_toy_eval(pipe, ToyEvalConfig(samples=args.samples, cache=cache),
                              report=lambda _: None)  # fmt: skip
        rows.append(_row(threshold, report))
        base = rows[0]
        row = rows[-1]
        row["pass_speedup"] = base["passes_per_video"] / row["passes_per_video"]
        row["time_speedup"] = base["seconds"] / row["seconds"]
        label = "no cache" if threshold is None else f"first-block {threshold:g}"
        print(f"{label:18s} passes/video {row['passes_per_video']:5.1f} "
              f"({row['pass_speedup']:.2f}x fewer), time {row['seconds']:.1f} s "
              f"({row['time_speedup']:.2f}x), motion {row['motion_with_memory']:.1%} with "
              f"memory / {row['motion_without_memory']:.1%} without, gain "
              f"{100 * row['memory_gain']:+.1f} points (se {100 * row['memory_gain_stderr']:.1f})",
              flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=2) + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5.5, 3.6), dpi=120)
        speedups = [row["pass_speedup"] for row in rows]
        gains = [100 * row["memory_gain"] for row in rows]
        errors = [100 * row["memory_gain_stderr"] for row in rows]
        axis.errorbar(speedups, gains, yerr=errors, marker="o", capsize=3)
        for row, x, y in zip(rows, speedups, gains, strict=True):
            label = "none" if row["threshold"] is None else f"{row['threshold']:g}"
            axis.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        axis.axhline(30, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("fewer transformer passes per video (x, first-block threshold labelled)")
        axis.set_ylabel("memory gain (motion accuracy points)")
        axis.set_title(f"Toy world, {args.samples} samples per condition")
        figure.tight_layout()
        figure.savefig(args.png)


if __name__ == "__main__":
    main()
