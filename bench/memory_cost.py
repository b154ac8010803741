"""Request-time memory cost and per-clip cache size, on the released encoder configuration.

Reference: every request runs the full encoder on the k retrieved latents (5 x [16, 21, 60, 104]).
Ours: the bank caches each clip's distinct resampler tokens at ingest; a request only mixes them.

    python -m bench.memory_cost [--device cpu] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from safetensors.torch import save

from model.encoder import MemoryEncoder
from model.tokens import ClipTokens


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def measure(device: torch.device, num_clips: int = 5, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    encoder = MemoryEncoder().to(device).eval()
    latents = torch.randn(1, num_clips, *encoder.latent_shape, device=device)
    with torch.no_grad():
        cached = [encoder.resample(latents[0, i : i + 1]) for i in range(num_clips)]
        reference_out = encoder(latents)  # warm-up and the value to compare against
        ours_out = encoder.mix(ClipTokens.stack(cached)).expand()
        reference_times = _timed(lambda: encoder(latents), repeats, device)
        mix_times = _timed(lambda: encoder.mix(ClipTokens.stack(cached)), repeats * 20, device)

    one_clip = cached[0]
    token_bytes = len(
        save(
            {
                "high": one_clip.high.to(torch.bfloat16).cpu(),
                "low": one_clip.low.to(torch.bfloat16).cpu(),
                "counts": one_clip.counts.cpu(),
            }
        )
    )
    latent_bytes = len(save({"latent": latents[0, 0].to(torch.bfloat16).cpu()}))
    reference_s = statistics.median(reference_times)
    mix_s = statistics.median(mix_times)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "num_clips": num_clips,
        "reference_encode_per_request_s": reference_s,
        "cached_tokens_mix_per_request_s": mix_s,
        "speedup": reference_s / mix_s,
        "max_abs_diff": (reference_out - ours_out).abs().max().item(),
        "cache_bytes_per_clip_tokens_bf16": token_bytes,
        "cache_bytes_per_clip_latent_bf16": latent_bytes,
        "cache_size_ratio": latent_bytes / token_bytes,
        "distinct_tokens_per_clip_and_band": int(one_clip.high.shape[1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(measure(torch.device(args.device), repeats=args.repeats), indent=2))


if __name__ == "__main__":
    main()
