"""Denoising step time: no memory vs memory as the reference injects it vs compact memory.

One step = the conditional and the unconditional transformer forward of classifier-free
guidance (same timestep tensor, as WanPipeline does). Memory: k clips x 2 bands, each one
distinct token repeated ``num_tokens`` times, as the released encoder produces.

    python -m bench.step_time --config tiny                       # CPU
    python -m bench.step_time --config wan1.3b --device cuda      # GPU, random weights, bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from diffusers import WanTransformer3DModel

from bench.reference_injection import ExpandedMemoryAttnProcessor
from model.attention import set_fused_merge
from model.injection import MemoryInjector
from model.tiny import TINY_DIT_CONFIG
from model.tokens import MemoryTokens

WAN_1_3B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

CONFIGS = {
    # name: (transformer config, latent (C, F, H, W), text length)
    "tiny": (TINY_DIT_CONFIG, (16, 3, 8, 8), 32),
    "wan1.3b": (WAN_1_3B_CONFIG, (16, 21, 60, 104), 512),  # 81 frames at 832x480
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cast_like_from_pretrained(model: WanTransformer3DModel, dtype: torch.dtype) -> None:
    """Cast to ``dtype`` but keep the modules diffusers keeps in float32 when loading weights."""
    keep = set(model._keep_in_fp32_modules or [])
    for name, param in model.named_parameters():
        wanted = torch.float32 if keep & set(name.split(".")) else dtype
        param.data = param.data.to(wanted)


def measure(
    config_name: str,
    device: torch.device,
    dtype: torch.dtype,
    num_clips: int = 5,
    num_tokens: int = 100,
    warmup: int = 2,
    repeats: int = 5,
) -> dict:
    config, latent_shape, text_len = CONFIGS[config_name]
    torch.manual_seed(0)
    with torch.device(device):
        ours = WanTransformer3DModel(**config).eval()
    _cast_like_from_pretrained(ours, dtype)
    reference = copy.deepcopy(ours)
    ours_injector = MemoryInjector(ours)
    reference_injector = MemoryInjector(reference, processor_class=ExpandedMemoryAttnProcessor)

    width = config["num_attention_heads"] * config["attention_head_dim"]
    gen = torch.Generator(device="cpu").manual_seed(1)
    latents = torch.randn(1, *latent_shape, generator=gen).to(device, dtype)
    text = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, dtype)
    negative = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device, dtype)
    distinct = torch.randn(1, 2 * num_clips, width, generator=gen).to(device, dtype)
    memory = MemoryTokens(distinct, torch.full((2 * num_clips,), num_tokens, device=device))

    def step(model: WanTransformer3DModel, t: float) -> torch.Tensor:
        timestep = torch.tensor([t], device=device)
        cond = model(latents, timestep, text, return_dict=False)[0]
        uncond = model(latents, timestep, negative, return_dict=False)[0]
        return uncond + 5.0 * (cond - uncond)

    variants = {
        "no memory": (ours, ours_injector, None, True),
        "reference injection (1,000 tokens as q/k/v)": (
            reference,
            reference_injector,
            memory,
            True,
        ),
        "compact injection (distinct k/v + log-count bias)": (ours, ours_injector, memory, True),
    }
    if device.type == "cuda":
        variants["compact injection, eager merge"] = (ours, ours_injector, memory, False)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for round_index in range(warmup + repeats):
            for name, (model, injector, mem, fused) in variants.items():  # interleaved
                set_fused_merge(fused)
                with injector.use(mem):
                    _sync(device)
                    start = time.perf_counter()
                    out = step(model, 500.0 + round_index)
                    _sync(device)
                    elapsed = time.perf_counter() - start
                if round_index >= warmup:
                    times[name].append(elapsed)
                outputs[name] = out.float()
    base = statistics.median(times["no memory"])
    rows = {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "ratio_to_no_memory": statistics.median(t) / base,
        }
        for name, t in times.items()
    }
    names = list(variants)
    agreement = (outputs[names[1]] - outputs[names[2]]).abs().max().item()
    memory_effect = (outputs[names[0]] - outputs[names[1]]).abs().max().item()
    return {
        "config": config_name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype),
        "video_tokens": latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2),
        "memory_tokens_expanded": memory.num_expanded,
        "memory_tokens_distinct": memory.tokens.shape[1],
        "repeats": repeats,
        "results": rows,
        "max_abs_diff_reference_vs_compact": agreement,
        "max_abs_memory_effect_reference_vs_none": memory_effect,
        "output_absmax": outputs[names[1]].abs().max().item(),
    }


def precision_check(
    device: torch.device, config_name: str, latent_shape=(16, 5, 30, 52), num_clips: int = 5
) -> dict:
    """bf16 reference and compact injection against a float32 reference injection."""
    config, _, text_len = CONFIGS[config_name]
    torch.manual_seed(0)
    with torch.device(device):
        fp32 = WanTransformer3DModel(**config).eval()
    gen = torch.Generator(device="cpu").manual_seed(1)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    latents = torch.randn(1, *latent_shape, generator=gen).to(device)
    text = torch.randn(1, text_len, config["text_dim"], generator=gen).to(device)
    distinct = torch.randn(1, 2 * num_clips, width, generator=gen).to(device)
    memory = MemoryTokens(distinct, torch.full((2 * num_clips,), 100, device=device))
    timestep = torch.tensor([700.0], device=device)
    models = {}
    for name, dtype, processor in [
        ("fp32 reference", torch.float32, ExpandedMemoryAttnProcessor),
        ("bf16 reference", torch.bfloat16, ExpandedMemoryAttnProcessor),
        ("bf16 compact", torch.bfloat16, None),
    ]:
        model = copy.deepcopy(fp32)
        _cast_like_from_pretrained(model, dtype)
        injector = MemoryInjector(model, **({"processor_class": processor} if processor else {}))
        with torch.no_grad(), injector.use(memory):
            models[name] = model(latents.to(dtype), timestep, text.to(dtype), return_dict=False)[0]
        del model
    with torch.no_grad():
        nomem = fp32(latents, timestep, text, return_dict=False)[0]
    exact = models["fp32 reference"].float()
    return {
        "video_tokens": latent_shape[1] * (latent_shape[2] // 2) * (latent_shape[3] // 2),
        "fp32_memory_effect_max_abs": (exact - nomem).abs().max().item(),
        "fp32_output_absmax": exact.abs().max().item(),
        **{
            f"{name} vs fp32": {
                "max_abs": (out.float() - exact).abs().max().item(),
                "mean_abs": (out.float() - exact).abs().mean().item(),
            }
            for name, out in models.items()
            if name != "fp32 reference"
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--precision", action="store_true", help="compare bf16 variants with float32 instead"
    )
    args = parser.parse_args()
    if args.precision:
        result = precision_check(torch.device(args.device), args.config)
        print(json.dumps(result, indent=2))
        return
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    result = measure(args.config, device, dtype, warmup=args.warmup, repeats=args.repeats)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
