"""Training the toy world's Wan transformer from scratch with rectified flow.

This is the one place the backbone learns; afterwards it is frozen and only the memory encoder
trains (:mod:`model.training`), as with the real Wan2.1 weights.

For the memory to have something to steer, the backbone must already know the motions as
concepts: about half of the training captions name the motion ("a red ball falling"), the rest
only colour and object ("a red ball"), and a few are empty so classifier-free guidance works.
Evaluation uses motion-free prompts only.

Run directory::

    checkpoints/step-000500/state.pt   model, EMA, optimizer, scheduler, step, RNG, loss history
    transformer/                       EMA weights (what the toy preset loads), a diffusers
                                       model folder: config.json + diffusion_pytorch_model.*
    text_encoder/                      the frozen random text encoder in float16, a
                                       transformers model folder: config.json + model.safetensors
    loss.csv

``ditmem toy train`` adds the memory encoder and the code-made parts (model_index.json,
tokenizer/, scheduler/, vae/) to make the pipeline folder the toy preset serves.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from safetensors.torch import save_file
from tqdm.auto import tqdm

from model.atomic import atomic_path
from model.injection import transformer_width
from model.toy.components import (
    MAX_SEQUENCE_LENGTH,
    TEXT_ENCODER_DIR,
    TRANSFORMER_FILE,
    PixelSpaceVAE,
    new_memory_encoder,
    new_text_encoder,
    new_transformer,
    pixels_to_latents,
    save_text_encoder,
    toy_scheduler,
)
from model.toy.world import COLOURS, MOTIONS, prompt_for, render, sample_spec
from model.training import (
    CHECKPOINT_PREFIX,
    flow_matching_inputs,
    latest_checkpoint,
    write_loss_csv,
)

logger = logging.getLogger(__name__)


class BackboneTrainConfig(BaseModel):
    run_dir: Path
    steps: int = Field(6000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    motion_caption_rate: float = Field(0.5, ge=0, le=1)
    empty_caption_rate: float = Field(0.1, ge=0, le=1)
    timestep_shift: float = Field(
        3.0, gt=0, description="train on t' = s t / (1 + (s - 1) t): s > 1 favours high noise"
    )
    dit_config: dict = Field(
        default_factory=dict, description="overrides of the toy transformer configuration"
    )
    seed: int = 0
    checkpoint_every: int = Field(250, ge=1)
    progress: bool = True


def all_captions() -> list[str]:
    """Every caption the backbone trains on: empty, colour only, colour + motion."""
    captions = [""]
    for colour in COLOURS:
        captions.append(prompt_for(colour))
        captions.extend(prompt_for(colour, motion) for motion in MOTIONS)
    return captions


def _text_encoder_fp16_exact(text_encoder: torch.nn.Module) -> None:
    """Round the weights through float16 so the shipped float16 file reproduces them exactly."""
    with torch.no_grad():
        for p in text_encoder.parameters():
            p.copy_(p.half().float())


@torch.no_grad()
def caption_states(
    text_encoder: torch.nn.Module, transformer: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Text states of :func:`all_captions` exactly as the pipeline computes them."""
    from model.pipeline import MemoryWanPipeline
    from model.tiny import offline_tokenizer
    from model.training import encode_captions

    tokenizer = offline_tokenizer()
    tokenizer.model_max_length = MAX_SEQUENCE_LENGTH
    pipe = MemoryWanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        vae=PixelSpaceVAE(),
        scheduler=toy_scheduler(),
        transformer=transformer,
        memory_encoder=new_memory_encoder(token_dim=transformer_width(transformer)),
    )
    captions = all_captions()
    states = encode_captions(pipe, captions, MAX_SEQUENCE_LENGTH)
    return dict(zip(captions, states, strict=True))


def train_backbone(config: BackboneTrainConfig, resume: bool = True) -> Path:
    """Train (or continue training) the toy transformer; returns the exported weights file."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.set_flush_denormal(True)  # denormals slow CPU training several-fold

    text_encoder = new_text_encoder(config.seed)
    _text_encoder_fp16_exact(text_encoder)
    save_text_encoder(text_encoder, run_dir / TEXT_ENCODER_DIR)
    model = new_transformer(config.seed, **config.dit_config).train()
    states = caption_states(text_encoder, model)
    vae = PixelSpaceVAE()

    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    warmup = max(1, config.warmup_steps)

    def lr_factor(step: int) -> float:
        # Linear warm-up, then cosine decay to 10%.
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, config.steps - warmup)
        return 0.1 + 0.45 * (1 + torch.cos(torch.tensor(progress * torch.pi)).item())

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data_gen = torch.Generator().manual_seed(config.seed * 1000 + 1)
    noise_gen = torch.Generator().manual_seed(config.seed * 1000 + 2)
    start, history = 0, []
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data_gen.set_state(state["rng"]["data"])
        noise_gen.set_state(state["rng"]["noise"])
        start, history = state["step"], state["history"]
        logger.info("resumed from %s", checkpoint)

    colour_only = {c: prompt_for(c) for c in COLOURS}
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc="train toy backbone",
        disable=not config.progress,
    )
    for step in range(start, config.steps):
        specs = [sample_spec(data_gen) for _ in range(config.batch_size)]
        draws = torch.rand(config.batch_size, generator=data_gen).tolist()
        captions = [
            ""
            if u < config.empty_caption_rate
            else spec.caption
            if u < config.empty_caption_rate + config.motion_caption_rate
            else colour_only[spec.colour]
            for spec, u in zip(specs, draws, strict=True)
        ]
        x0 = pixels_to_latents(render(specs), vae)
        t = torch.rand(config.batch_size, generator=noise_gen)
        s = config.timestep_shift
        t = s * t / (1 + (s - 1) * t)
        noise = torch.randn(x0.shape, generator=noise_gen)
        x_t, velocity = flow_matching_inputs(x0, t, noise)
        prediction = model(
            hidden_states=x_t,
            timestep=t * 1000,
            encoder_hidden_states=torch.stack([states[c] for c in captions]),
            return_dict=False,
        )[0]
        loss = F.mse_loss(prediction, velocity)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        with torch.no_grad():
            decay = min(config.ema_decay, (step + 1) / (step + 10))
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        done = step + 1
        history.append(
            dict(step=done, loss=loss.item(), lr=lr, seconds=time.perf_counter() - started)
        )
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if done % config.checkpoint_every == 0 or done == config.steps:
            state = dict(
                step=done,
                history=history,
                model=model.state_dict(),
                ema=ema.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                rng=dict(data=data_gen.get_state(), noise=noise_gen.get_state()),
                config=config.model_dump(mode="json"),
            )
            with atomic_path(run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{done:06d}") as tmp:
                tmp.mkdir()
                torch.save(state, tmp / "state.pt")
            export_transformer(ema, run_dir / TRANSFORMER_FILE)
            write_loss_csv(run_dir / "loss.csv", history)
            for old in sorted((run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}[0-9]*"))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
    bar.close()
    return run_dir / TRANSFORMER_FILE


def export_transformer(model: torch.nn.Module, path: Path) -> None:
    """Weights to ``path`` and the architecture next to it (``config.json``).

    ``path`` is ``<folder>/diffusion_pytorch_model.safetensors``: the folder is then a diffusers
    model folder (``WanTransformer3DModel.from_pretrained`` loads it).
    """
    model.save_config(path.parent)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
