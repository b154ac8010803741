"""Denoising step time and peak memory with memory, per speed or memory option (GPU run).

The transformer alone (``bench.step_time`` configs, random weights), ``--steps`` denoising steps
of classifier-free guidance with 5 memory clips, inside the cache contexts diffusers' pipeline
opens, for each variant in a fresh process:

* ``none``: the transformer on the device;
* ``first-block``: First Block Cache at ``--threshold`` (``model.caching.step_cache``; with
  random weights the skip pattern says little, the per-step overhead of the cache does);
* ``group``: group offload, one block per group, prefetched on a CUDA stream (on a CPU: files);
* ``int8``: int8 weights in the blocks' linear layers (``model.placement``).

    python -m bench.gpu_placement --config wan1.3b --device cuda      # 832x480x81, bf16
    python -m bench.gpu_placement --config tiny --device cpu          # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("none", "first-block", "group", "int8")


def measure(config_name: str, device_name: str, variant: str, steps: int, threshold: float) -> dict:
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.hooks import apply_group_offloading

    from bench.step_time import CONFIGS, _cast_like_from_pretrained, _sync
    from model.caching import CacheSpec, counting_passes, step_cache
    from model.injection import MemoryInjector
    from model.placement import quantize_transformer
    from model.tokens import MemoryTokens

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config, latent_shape, text_len = CONFIGS[config_name]
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).eval()
    _cast_like_from_pretrained(model, dtype)
    injector = MemoryInjector(model)
    if variant == "group":
        apply_group_offloading(
            model, onload_device=device, offload_device=torch.device("cpu"),
            offload_type="block_level", num_blocks_per_group=1,
            use_stream=device.type == "cuda",
            offload_to_disk_path=tempfile.mkdtemp() if device.type == "cpu" else None,
        )  # fmt: skip
    else:
        model.to(device)
        if variant == "int8":
            quantize_transformer(model, "int8")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(1, *latent_shape, generator=gen).to(device, dtype)
    text = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, dtype)
    negative = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, dtype)
    memory = MemoryTokens(
        torch.randn(1, 10, width, generator=gen).to(device, dtype),
        torch.full((10,), 100, device=device),
    )
    cache = CacheSpec(kind="first-block", threshold=threshold) if variant == "first-block" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    cached = step_cache(model, cache, steps=steps)
    with torch.no_grad(), injector.use(memory), counting_passes(model) as counter, cached:
        for index in range(steps):
            timestep = torch.tensor([1000.0 * (1 - index / steps)], device=device)
            _sync(device)
            started = time.perf_counter()
            with model.cache_context("cond", step_index=index, num_inference_steps=steps):
                cond = model(latents, timestep, text, return_dict=False)[0]
            with model.cache_context("uncond", step_index=index, num_inference_steps=steps):
                uncond = model(latents, timestep, negative, return_dict=False)[0]
            latents = latents - 0.02 * (uncond + 5.0 * (cond - uncond)).to(dtype)
            _sync(device)
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "variant": variant,
        "median_step_s": statistics.median(times[1:] or times),  # the first step warms up
        "peak_gib": peak,
        "passes": counter.passes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--one", choices=VARIANTS)
    args = parser.parse_args()
    if args.one:
        row = measure(args.config, args.device, args.one, args.steps, args.threshold)
        print(json.dumps(row))
        return
    rows = []
    for variant in args.variants:
        command = [sys.executable, "-m", "bench.gpu_placement", "--one", variant,
                   "--config", args.config, "--device", args.device, "--steps", str(args.steps),
                   "--threshold", str(args.threshold)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"variant": variant, "error": done.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0].get("median_step_s")
    for row in rows:
        if base and "median_step_s" in row:
            row["step_ratio"] = row["median_step_s"] / base
    print(json.dumps({"config": args.config, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
