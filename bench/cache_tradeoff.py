"""The step caches' trade-off on the toy world: fewer transformer passes vs the memory's gain.

``ditmem toy eval`` (the same prompts, noise and memory for every run) without a cache and with
each cache setting (``kind:knob``: first-block and mag thresholds, taylorseer intervals):
transformer passes per video (both guidance branches), generation time, motion accuracy with and
without memory, and the memory gain. One run on this machine; the PNG plots the gain against the
speed-up in passes, one line per cache kind.

    python -m bench.cache_tradeoff [--samples 128]
        [--caches first-block:0.2 mag:0.06 taylorseer:3 ...] [--json out.json] [--png curve.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ditmem.toy import ToyEvalConfig, ToyEvalReport, run_toy_eval
from model.caching import CacheSpec
from model.pipeline import MemoryWanPipeline
from model.toy.components import build_toy_components

DEFAULT_CACHES = ("first-block:0.2", "first-block:0.3", "mag:0.06", "mag:0.15", "mag:0.3",
                  "taylorseer:2", "taylorseer:3", "taylorseer:4")  # fmt: skip


def parse_cache(text: str) -> CacheSpec:
    """``first-block:0.2``, ``mag:0.06``, ``taylorseer:3``."""
    kind, _, knob = text.partition(":")
    if kind == "taylorseer":
        return CacheSpec(kind=kind, interval=int(knob) if knob else None)
    return CacheSpec.model_validate({"kind": kind, "threshold": float(knob) if knob else None})


def _knob(cache: CacheSpec) -> float | None:
    return cache.interval if cache.kind == "taylorseer" else cache.threshold


def _row(cache: CacheSpec, report: ToyEvalReport) -> dict:
    right, none = report.condition("right"), report.condition("none")
    passes = (right.passes_per_video + none.passes_per_video) / 2
    seconds = right.seconds + none.seconds
    return {
        "kind": cache.kind,
        "knob": _knob(cache),
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
    parser.add_argument("--caches", nargs="+", default=list(DEFAULT_CACHES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    args = parser.parse_args()
    pipe = MemoryWanPipeline(**build_toy_components(None))
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for cache in [CacheSpec(), *(parse_cache(text).resolved() for text in args.caches)]:
        config = ToyEvalConfig(samples=args.samples, cache=cache)
        report = run_toy_eval(pipe, config, report=lambda _: None)
        rows.append(_row(cache, report))
        base = rows[0]
        row = rows[-1]
        row["pass_speedup"] = base["passes_per_video"] / row["passes_per_video"]
        row["time_speedup"] = base["seconds"] / row["seconds"]
        label = "no cache" if not cache.active else f"{cache.kind} {_knob(cache):g}"
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

        figure, axis = plt.subplots(figsize=(6, 3.8), dpi=120)
        base = rows[0]
        for kind in dict.fromkeys(row["kind"] for row in rows[1:]):
            line = [base, *(row for row in rows if row["kind"] == kind)]
            speedups = [row["pass_speedup"] for row in line]
            gains = [100 * row["memory_gain"] for row in line]
            errors = [100 * row["memory_gain_stderr"] for row in line]
            axis.errorbar(speedups, gains, yerr=errors, marker="o", capsize=3, label=kind)
            for row, x, y in zip(line[1:], speedups[1:], gains[1:], strict=True):
                axis.annotate(f"{row['knob']:g}", (x, y), textcoords="offset points",
                              xytext=(4, 4), fontsize=7)  # fmt: skip
        axis.axhline(30, color="grey", linestyle="--", linewidth=1)
        axis.legend(fontsize=8)
        axis.set_xlabel("fewer transformer passes per video (x; threshold or interval labelled)")
        axis.set_ylabel("memory gain (motion accuracy points)")
        axis.set_title(f"Toy world, {args.samples} samples per condition")
        figure.tight_layout()
        figure.savefig(args.png)


if __name__ == "__main__":
    main()
