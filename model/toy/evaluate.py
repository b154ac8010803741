"""Measuring the memory effect in the toy world: sampling, judging, and the loss-gap check.

Everything here takes memory as cached per-clip tokens (``ClipTokens``), exactly what the
memory bank hands the pipeline for a request, so the measured path is the served path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.caching import CacheSpec, counting_passes
from model.tokens import ClipTokens
from model.toy.classify import read
from model.toy.world import FRAMES, SIZE, ClipSpec, render


@torch.no_grad()
def sample(
    pipe,
    prompts: Sequence[str],
    memories: Sequence[ClipTokens] | None,
    seeds: Sequence[int],
    *,
    steps: int,
    guidance_scale: float,
    memory_guidance: bool = False,
    batch_size: int = 64,
    cache: CacheSpec | None = None,
    passes: list[int] | None = None,
) -> torch.Tensor:
    """Generate one clip per prompt: ``(N, 3, F, H, W)`` float in [-1, 1].

    Sample ``i`` starts from noise seeded with ``seeds[i]``, so two conditions with the same
    seeds differ only by their memory. ``passes`` receives, per clip, the full transformer
    passes that made it (a step cache makes fewer).
    """
    out = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start:stop]]
        with counting_passes(pipe.transformer) as counter:
            frames = pipe(
                prompt=list(prompts[start:stop]),
                negative_prompt=[""] * (stop - start),
                memory=None if memories is None else list(memories[start:stop]),
                memory_guidance=memory_guidance,
                height=SIZE,
                width=SIZE,
                num_frames=FRAMES,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=generators,
                max_sequence_length=pipe.tokenizer.model_max_length,
                output_type="pt",
                cache=cache,
            ).frames  # (B, F, 3, H, W) in [0, 1]
        if passes is not None:
            passes += [counter.passes] * (stop - start)
        out.append(frames.permute(0, 2, 1, 3, 4) * 2.0 - 1.0)
    return torch.cat(out)


@dataclass(frozen=True)
class Judgement:
    """How a set of generated clips reads against what was asked."""

    motion_accuracy: float  # fraction whose motion is the expected one
    colour_accuracy: float  # fraction whose colour is the prompt's
    missing: float  # fraction where the ball vanished in some frame
    motions: tuple[str | None, ...]
    colours: tuple[str | None, ...]


def judge(videos: torch.Tensor, motions: Sequence[str], colours: Sequence[str]) -> Judgement:
    readings = [read(v) for v in videos]
    n = len(readings)
    return Judgement(
        motion_accuracy=sum(r.motion == m for r, m in zip(readings, motions, strict=True)) / n,
        colour_accuracy=sum(r.colour == c for r, c in zip(readings, colours, strict=True)) / n,
        missing=sum(r.centres is None for r in readings) / n,
        motions=tuple(r.motion for r in readings),
        colours=tuple(r.colour for r in readings),
    )


@torch.no_grad()
def denoising_losses(
    pipe,
    targets: Sequence[ClipSpec],
    memories: dict[str, Sequence[ClipTokens] | None],
    *,
    t_range: tuple[float, float] = (0.6, 0.9),
    seed: int = 0,
) -> dict[str, float]:
    """Mean rectified-flow loss of the frozen transformer on ``targets`` under each memory
    condition, with the same noise and timesteps for all, prompted without the motion.

    A memory that carries the target's motion should lower the loss at high noise, where the
    motion is decided; if it does not, sampling cannot show a memory effect either.
    """
    from model.toy.components import pixels_to_latents
    from model.training import encode_prompts, flow_matching_inputs

    generator = torch.Generator().manual_seed(seed)
    x0 = pixels_to_latents(render(list(targets)), pipe.vae)
    low, high = t_range
    t = low + (high - low) * torch.rand(len(targets), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    x_t, velocity = flow_matching_inputs(x0, t, noise)
    prompts = [spec.prompt for spec in targets]
    text = encode_prompts(pipe, prompts, pipe.tokenizer.model_max_length)
    losses = {}
    for name, memory in memories.items():
        tokens = pipe.encode_memory(None if memory is None else list(memory))
        with pipe.memory_injector.use(tokens):
            prediction = pipe.transformer(
                hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=text, return_dict=False
            )[0]
        losses[name] = F.mse_loss(prediction.float(), velocity).item()
    return losses
