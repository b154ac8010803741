"""Cost of live previews on the toy preset: what a preview adds to a denoising step.

A generation with ``preview_every=1`` (a preview after every step, the most there can be) runs
the real worker path: the projection on the denoising thread (``PreviewPublisher.offer``), the
PNG and its storage on the publisher's thread. Measured in one process:

* a step's time without previews (median over runs, from the progress callback's clock);
* the time ``offer`` takes on the denoising thread at every step (what a step pays: a clock
  check, and at most every ``MIN_INTERVAL_S`` a copy of one latent frame), mean and p99;
* the publisher thread's time per stored preview (projection, PNG, store: beside the loop);
* whole generations with and without previews (median wall time ratio).

    python -m bench.preview_cost [--runs 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

from memory_bank.storage import LocalStorage
from model.generation import GenerationParams, generate
from model.presets import TOY
from model.previews import LatentPreviewer, png_bytes
from runtime.builders import load_pipeline_from
from runtime.settings import Settings
from worker.previews import MIN_INTERVAL_S, PreviewPublisher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipe = load_pipeline_from(Settings(_env_file=None, preset="toy", device="cpu"))
    pipe.set_progress_bar_config(disable=True)
    previewer = LatentPreviewer.for_vae(pipe.vae)
    params = GenerationParams.resolve(TOY, "a red ball falling", seed=0)
    generate(pipe, TOY, params)  # warm up

    step_times: list[float] = []
    plain_runs: list[float] = []
    for run in range(args.runs):
        marks = [time.perf_counter()]

        def mark(step: int, total: int, marks: list[float] = marks) -> None:
            marks.append(time.perf_counter())

        started = time.perf_counter()
        generate(pipe, TOY, params.model_copy(update={"seed": run}), on_progress=mark)
        plain_runs.append(time.perf_counter() - started)
        step_times += [b - a for a, b in itertools.pairwise(marks)]

    offer_times: list[float] = []
    store_times: list[float] = []
    preview_runs: list[float] = []
    with tempfile.TemporaryDirectory() as scratch:
        storage = LocalStorage(Path(scratch))
        for run in range(args.runs):
            publisher = PreviewPublisher(previewer, storage, f"run-{run}.png")

            def timed_offer(step, latents, publisher=publisher):
                began = time.perf_counter()
                publisher.offer(step, latents)
                offer_times.append(time.perf_counter() - began)

            started = time.perf_counter()
            with publisher:
                generate(pipe, TOY, params.model_copy(update={"seed": run}),
                         on_latents=timed_offer, latents_every=1)  # fmt: skip
            preview_runs.append(time.perf_counter() - started)
        # The publisher thread's work per preview, timed alone.
        frame = pipe.prepare_latents(1, 3, 16, 16, 9, None, "cpu", None)
        for number in range(200):
            began = time.perf_counter()
            storage.put_bytes(f"alone-{number % 4}.png", png_bytes(previewer.image(frame)))
            store_times.append(time.perf_counter() - began)

    step = statistics.median(step_times)
    offer = statistics.fmean(offer_times)
    result = {
        "step_ms_p50": step * 1e3,
        "offer_us_mean": offer * 1e6,
        "offer_us_p50": statistics.median(offer_times) * 1e6,
        "offer_us_p99": sorted(offer_times)[int(len(offer_times) * 0.99)] * 1e6,
        "offer_share_of_step": offer / step,
        "store_us_p50_publisher_thread": statistics.median(store_times) * 1e6,
        "video_s_p50_without": statistics.median(plain_runs),
        "video_s_p50_with_every_step": statistics.median(preview_runs),
        "runs": args.runs,
        "min_interval_s": MIN_INTERVAL_S,
        "steps": params.steps,
    }
    result["wall_ratio"] = result["video_s_p50_with_every_step"] / result["video_s_p50_without"]
    print(f"step {result['step_ms_p50']:.2f} ms; previews on the denoising thread "
          f"{result['offer_us_mean']:.1f} us a step on average "
          f"({result['offer_share_of_step']:.3%} of a step), p50 {result['offer_us_p50']:.1f} us, "
          f"p99 {result['offer_us_p99']:.0f} us; projection + PNG + store on the publisher thread "
          f"{result['store_us_p50_publisher_thread']:.0f} us; video "
          f"{result['video_s_p50_without']:.3f} s without, "
          f"{result['video_s_p50_with_every_step']:.3f} s with a preview every step "
          f"({result['wall_ratio']:.3f}x)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
