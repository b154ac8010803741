"""Training the DiT-Mem memory encoder against a frozen Wan2.1 transformer.

Objective (rectified flow, as Wan is trained): for a target clip latent ``x0`` draw
``t ~ U(t_min, t_max)`` and ``noise ~ N(0, I)``, form ``x_t = (1 - t) x0 + t noise`` and regress
the transformer's prediction (timestep ``1000 t``, the clip's caption, memory tokens of its ``k``
caption-nearest bank clips) onto the velocity ``noise - x0``. Only the memory encoder learns; a
transformer parameter that receives a gradient is an error.

Data never touches the VAE: targets and memory come from the latents the bank stored at ingest,
captions are encoded once with the pipeline's text encoder. Runs under ``accelerate`` (bf16 on
CUDA, ``accelerate launch`` for several GPUs; one process on CPU).

Layout of ``run_dir``::

    checkpoints/step-000100/   encoder/ (save_memory_encoder) + state.pt (optimizer, scheduler,
                               step, history, RNG states of every process)
    dit_mem.safetensors        final parameters in the official ``pipe.dit_mem.*`` layout
    encoder/                   final encoder with every buffer (load_memory_encoder)
    loss.csv, loss.png         step, loss, lr, seconds
"""

from __future__ import annotations

import csv
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, model_validator
from safetensors.torch import load_file, save_file
from torch import nn

from model.atomic import atomic_path
from model.encoder import MemoryEncoder
from model.loading import ENCODER_WEIGHTS_NAME, official_state_dict, save_memory_encoder
from model.tokens import MemoryTokens

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "state.pt"
OFFICIAL_NAME = "dit_mem.safetensors"


class BackboneGradientError(RuntimeError):
    """A parameter of the frozen Wan transformer received a gradient."""


class TrainConfig(BaseModel):
    """Hyper-parameters and outputs of one training run."""

    run_dir: Path = Field(description="checkpoints, exported weights and logs go here")
    steps: int = Field(1000, ge=1, description="optimizer steps")
    batch_size: int = Field(1, ge=1, description="target clips per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up")
    k: int = Field(5, ge=1, description="memory clips per sample (clamped to bank size - 1)")
    t_min: float = Field(0.0, ge=0, le=1, description="lowest timestep, as a fraction")
    t_max: float = Field(1.0, ge=0, le=1, description="highest timestep, as a fraction")
    seed: int = 0
    checkpoint_every: int = Field(500, ge=1)
    log_every: int = Field(10, ge=1, description="rewrite loss.csv every this many steps")
    train_tag: str | None = Field(
        "train", description="clips with this tag are targets (None: every clip)"
    )
    memory_tag: str | None = Field(
        None, description="memory comes only from clips with this tag (None: any clip)"
    )
    exclude_tag: str | None = Field(
        None, description="clips with this tag are never memory (e.g. the training targets)"
    )
    shuffle_memory: bool = Field(True, description="shuffle the memory clip order per sample")
    memory_pool: int | None = Field(
        None, ge=1, description="draw the k memory clips from this many nearest (None: k)"
    )
    max_sequence_length: int | None = Field(
        None, description="caption tokens (default: the tokenizer's limit, at most 512)"
    )
    progress: bool = Field(True, description="show a tqdm progress bar")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min {self.t_min} > t_max {self.t_max}")
        return self


@dataclass
class TrainResult:
    final_loss: float
    losses: list[float]
    run_dir: Path
    official_path: Path
    encoder_dir: Path
    loss_csv: Path
    loss_png: Path
    last_checkpoint: Path | None


# -- data ------------------------------------------------------------------------------------------


def nearest_neighbours(
    vectors: np.ndarray, rows: np.ndarray, k: int, candidates: np.ndarray | None = None
) -> np.ndarray:
    """``(len(rows), k)`` indices of the ``k`` highest inner products to each row, self excluded,
    among ``candidates`` (a boolean mask over all rows; ``None``: every row).

    Ties go to the lower index, so the choice is deterministic.
    """
    scores = vectors[rows] @ vectors.T
    if candidates is not None:
        scores[:, ~candidates] = -np.inf
    scores[np.arange(len(rows)), rows] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


class TrainingBank(Protocol):
    """What training reads from a memory bank (``memory_bank.bank.MemoryBank`` provides it).

    ``model`` never imports ``memory_bank``; the bank is handed in and used through these.
    """

    def caption_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (n,), unit-norm caption vectors (n, dim))`` of every clip, by ascending id."""
        ...

    def clip_latent(self, clip_id: int) -> torch.Tensor | None:
        """The clip's stored canonical latent ``(C, D, H, W)``; ``None`` if it kept none."""
        ...

    def get_many(self, clip_ids: list[int]) -> list[Any]:
        """Clip records (``caption``, ``clip_id``, ...) in the order of ``clip_ids``."""
        ...

    def iter_clips(self, tag: str | None = None) -> Iterable[Any]:
        """Every clip record (``caption``, ``clip_id``, ...), optionally of one tag."""
        ...


class MemoryTrainingSet:
    """Training items of a bank: target latent, the latents of its memory clips, its prompt.

    Args:
        bank: A ``MemoryBank`` whose clips kept their latents.
        k: Memory clips per item; clamped to the number of clips minus one.
        train_tag: Clips with this tag are targets (``None``: all).
        memory_tag: Memory comes only from clips with this tag (``None``: any clip but the
            target). The reference's split: targets' memory from the memory set only.
        exclude_tag: Clips with this tag are never anyone's memory.
        pool: Draw each item's ``k`` memory clips at random from its ``pool`` caption-nearest
            clips (``None``: always the ``k`` nearest). Widening the pool varies the memory a
            target sees, e.g. across clips whose captions tie.
        prompt_of: The prompt a target is conditioned on, from its record (default: the
            caption). Retrieval always uses the caption.
    """

    def __init__(
        self,
        bank: TrainingBank,
        k: int,
        train_tag: str | None = None,
        *,
        pool: int | None = None,
        prompt_of: Callable[[Any], str] | None = None,
        memory_tag: str | None = None,
        exclude_tag: str | None = None,
    ) -> None:
        ids, vectors = bank.caption_embeddings()
        if len(ids) < 2:
            raise ValueError("training needs a bank with at least two clips")
        position = {int(clip_id): i for i, clip_id in enumerate(ids)}

        def rows_tagged(tag: str) -> list[int]:
            return [position[r.clip_id] for r in bank.iter_clips(tag) if r.clip_id in position]

        if train_tag is None:
            target_ids = [int(i) for i in ids]
        else:
            target_ids = sorted(int(ids[row]) for row in rows_tagged(train_tag))
        if not target_ids:
            raise ValueError(f"no clip in the bank is tagged {train_tag!r}")
        rows = np.array([position[i] for i in target_ids])
        candidates = np.ones(len(ids), dtype=bool)
        if memory_tag is not None:
            candidates[:] = False
            candidates[rows_tagged(memory_tag)] = True
        if exclude_tag is not None:
            candidates[rows_tagged(exclude_tag)] = False
        # A target that may be memory is never its own: one candidate fewer for it.
        usable = int(candidates.sum()) - int(candidates[rows].any())
        if usable < 1:
            raise ValueError(f"no clip can be memory (memory tag {memory_tag!r}, excluded "
                             f"tag {exclude_tag!r})")  # fmt: skip
        self.k = min(k, usable)
        if self.k < k:
            logger.warning("k=%d clamped to %d: %d clips can be memory", k, self.k, usable)
        self.pool = max(self.k, min(pool or self.k, usable))
        self.clip_ids = [int(i) for i in ids]
        latents = []
        for clip_id in self.clip_ids:
            latent = bank.clip_latent(clip_id)
            if latent is None:
                raise ValueError(f"clip {clip_id} has no stored latent (bank keep_latents off)")
            latents.append(latent)
        self.latents = torch.stack(latents)  # (n, C, D, H, W) float32
        self.targets = rows
        self.neighbours = nearest_neighbours(
            vectors.astype(np.float32), rows, self.pool, candidates
        )
        records = {r.clip_id: r for r in bank.get_many(self.clip_ids)}
        self.captions = [records[i].caption for i in self.clip_ids]
        self.prompts = [
            prompt_of(records[i]) if prompt_of else records[i].caption for i in self.clip_ids
        ]
        self.target_ids = target_ids

    def __len__(self) -> int:
        return len(self.targets)

    def memory_ids(self, item: int) -> list[int]:
        """The item's candidate memory clips, nearest first (``pool`` of them)."""
        return [self.clip_ids[j] for j in self.neighbours[item]]

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor, str]:
        return self.sample(item, None)

    def sample(
        self, item: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """Target latent, ``(k, C, D, H, W)`` memory latents and prompt of one item.

        With a pool wider than ``k`` the memory clips are drawn with ``generator``.
        """
        row = self.targets[item]
        chosen = self.neighbours[item]
        if self.pool > self.k:
            pick = torch.randperm(self.pool, generator=generator)[: self.k].sort().values
            chosen = chosen[pick.numpy()]
        return self.latents[row], self.latents[chosen], self.prompts[row]


@torch.no_grad()
def encode_captions(pipe: Any, captions: list[str], max_length: int | None) -> torch.Tensor:
    """``(n, L, text_dim)`` float32 CPU text states of ``captions``, as the pipeline makes them."""
    if max_length is None:
        max_length = min(int(getattr(pipe.tokenizer, "model_max_length", 512)), 512)
    states = []
    for caption in captions:
        embeds, _ = pipe.encode_prompt(
            caption,
            do_classifier_free_guidance=False,
            max_sequence_length=max_length,
            device=pipe.text_encoder.device,
        )
        states.append(embeds.float().cpu())
    return torch.cat(states)


def encode_prompts(pipe: Any, prompts: list[str], max_length: int | None) -> torch.Tensor:
    """Text states of ``prompts`` in order, each distinct prompt encoded once."""
    unique = sorted(set(prompts))
    states = encode_captions(pipe, unique, max_length)
    return states[[unique.index(p) for p in prompts]]


# -- model pieces ----------------------------------------------------------------------------------


class _Encode(nn.Module):
    """``(B, N, C, D, H, W)`` latents -> compact memory tokens ``(B, M, F)``; a module so that
    distributed wrappers see the encoder's forward."""

    def __init__(self, encoder: MemoryEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode(latents).tokens


def freeze_backbone(transformer: nn.Module) -> None:
    """No gradients for the Wan transformer; eval mode (no dropout)."""
    transformer.requires_grad_(False)
    transformer.eval()


def check_backbone_gradients(transformer: nn.Module) -> None:
    leaked = [name for name, p in transformer.named_parameters() if p.grad is not None]
    if leaked:
        raise BackboneGradientError(
            f"{len(leaked)} transformer parameters received gradients (e.g. {leaked[:3]}); the "
            "Wan backbone must stay frozen while the memory encoder trains"
        )


def flow_matching_inputs(
    x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_t = (1 - t) x0 + t noise`` and the velocity target ``noise - x0``."""
    tt = t.view(-1, *([1] * (x0.ndim - 1)))
    return (1 - tt) * x0 + tt * noise, noise - x0


# -- checkpoints -----------------------------------------------------------------------------------


def latest_checkpoint(run_dir: Path) -> Path | None:
    folder = Path(run_dir) / "checkpoints"
    found = sorted(folder.glob(f"{CHECKPOINT_PREFIX}[0-9]*")) if folder.is_dir() else []
    return found[-1] if found else None


def _rng_state(generators: dict[str, torch.Generator]) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        **{name: g.get_state() for name, g in generators.items()},
    }


def _set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    for name, g in generators.items():
        g.set_state(state[name])


def _write_checkpoint(
    run_dir: Path, step: int, encoder: MemoryEncoder, state: dict[str, Any]
) -> Path:
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"
    with atomic_path(final) as tmp:
        save_memory_encoder(encoder, tmp / "encoder")
        torch.save(state, tmp / STATE_NAME)
    return final


# -- logs ------------------------------------------------------------------------------------------


def write_loss_csv(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "lr", "seconds"])
        writer.writeheader()
        writer.writerows(history)


def _write_plot(path: Path, history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (MSE)")
    axis.set_yscale("log")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# -- training --------------------------------------------------------------------------------------


def train_encoder(
    pipe: Any,
    bank: TrainingBank,
    config: TrainConfig,
    resume: bool = False,
    prompt_of: Callable[[Any], str] | None = None,
) -> TrainResult:
    """Train ``pipe.memory_encoder`` in place on ``bank``; the transformer stays frozen.

    Args:
        pipe: A ``MemoryWanPipeline`` (transformer, text encoder, tokenizer, memory encoder).
        bank: A ``MemoryBank`` whose clips kept their latents.
        config: Run settings.
        resume: Continue from the latest checkpoint in ``config.run_dir`` (exactly: weights,
            optimizer, scheduler, RNG states). Starts from scratch when there is none.
        prompt_of: The prompt each target is conditioned on, from its clip record (default:
            its caption); see :class:`MemoryTrainingSet`.

    Raises:
        BackboneGradientError: a transformer parameter received a gradient.
    """
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    run_dir = Path(config.run_dir)
    accelerator = Accelerator(
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        gradient_accumulation_steps=config.grad_accum,
        cpu=not torch.cuda.is_available(),
    )
    device = accelerator.device
    rank = accelerator.process_index
    logger.info("process %d of %d on %s", rank, accelerator.num_processes, accelerator.device)
    run_dir.mkdir(parents=True, exist_ok=True)

    data = MemoryTrainingSet(
        bank, config.k, config.train_tag, pool=config.memory_pool, prompt_of=prompt_of,
        memory_tag=config.memory_tag, exclude_tag=config.exclude_tag,
    )  # fmt: skip
    text_states = encode_prompts(pipe, data.prompts, config.max_sequence_length)

    transformer = pipe.transformer
    injector = pipe.memory_injector
    encoder: MemoryEncoder = pipe.memory_encoder
    saved_flags = {name: p.requires_grad for name, p in transformer.named_parameters()}
    was_training = transformer.training
    freeze_backbone(transformer)
    transformer.to(device)

    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    data_gen = torch.Generator().manual_seed(config.seed * 1000 + 2 * rank)
    noise_gen = torch.Generator().manual_seed(config.seed * 1000 + 2 * rank + 1)
    generators = {"data": data_gen, "noise": noise_gen}

    if encoder.dtype != torch.float32:
        encoder.to(dtype=torch.float32)
    encoder.to(device).train()
    for parameter in encoder.unused_parameters():
        parameter.requires_grad_(False)
    module = _Encode(encoder)
    optimizer = torch.optim.AdamW(
        [p for p in encoder.parameters() if p.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )
    warmup = config.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )

    start_step, history = 0, []
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_NAME, map_location="cpu", weights_only=False)
        weights = load_file(checkpoint / "encoder" / ENCODER_WEIGHTS_NAME)
        encoder.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, history = state["step"], state["history"]
        rng = state["rng"]
        _set_rng_state(rng[rank] if rank < len(rng) else rng[0], generators)
        logger.info("resumed from %s (step %d)", checkpoint, start_step)
    elif resume:
        logger.info("no checkpoint in %s: starting from scratch", run_dir)

    module, optimizer = accelerator.prepare(module, optimizer)
    counts = encoder.token_counts.repeat(data.k).repeat(2)
    started = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
    bar = tqdm(
        total=config.steps,
        initial=start_step,
        desc="train memory encoder",
        disable=not (config.progress and accelerator.is_local_main_process),
    )
    loss_csv, loss_png = run_dir / "loss.csv", run_dir / "loss.png"
    last_checkpoint = checkpoint

    def micro_batch() -> torch.Tensor:
        items = torch.randint(len(data), (config.batch_size,), generator=data_gen).tolist()
        targets, memories, texts = [], [], []
        for item in items:
            target, memory, _ = data.sample(item, data_gen)
            if config.shuffle_memory:
                memory = memory[torch.randperm(data.k, generator=data_gen)]
            targets.append(target)
            memories.append(memory)
            texts.append(text_states[data.targets[item]])
        x0 = torch.stack(targets)
        t = config.t_min + (config.t_max - config.t_min) * torch.rand(
            config.batch_size, generator=noise_gen
        )
        noise = torch.randn(x0.shape, generator=noise_gen)
        x_t, velocity = flow_matching_inputs(x0, t, noise)
        with accelerator.autocast():
            tokens = module(torch.stack(memories).to(device))
            memory_tokens = MemoryTokens(tokens.to(transformer.dtype), counts)
            with injector.use(memory_tokens):
                prediction = transformer(
                    hidden_states=x_t.to(device, transformer.dtype),
                    timestep=(t * 1000).to(device),
                    encoder_hidden_states=torch.stack(texts).to(device, transformer.dtype),
                    return_dict=False,
                )[0]
        return F.mse_loss(prediction.float(), velocity.to(device))

    try:
        for step in range(start_step, config.steps):
            step_loss = 0.0
            for _ in range(config.grad_accum):
                with accelerator.accumulate(module):
                    loss = micro_batch()
                    accelerator.backward(loss)
                    check_backbone_gradients(transformer)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / config.grad_accum
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            done = step + 1
            history.append(
                dict(step=done, loss=step_loss, lr=lr, seconds=time.perf_counter() - started)
            )
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if accelerator.is_main_process and (done % config.log_every == 0):
                write_loss_csv(loss_csv, history)
            if done % config.checkpoint_every == 0 or done == config.steps:
                rng = gather_object([_rng_state(generators)])
                if accelerator.is_main_process:
                    state = dict(
                        step=done,
                        history=history,
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        rng=rng,
                        config=config.model_dump(mode="json"),
                    )
                    last_checkpoint = _write_checkpoint(run_dir, done, encoder, state)
                accelerator.wait_for_everyone()
    finally:
        bar.close()
        encoder.eval()
        for name, p in transformer.named_parameters():
            p.requires_grad_(saved_flags[name])
        transformer.train(was_training)

    official_path, encoder_dir = run_dir / OFFICIAL_NAME, run_dir / "encoder"
    if accelerator.is_main_process:
        with atomic_path(official_path) as tmp:
            save_file(official_state_dict(encoder), tmp)
        save_memory_encoder(encoder, encoder_dir)
        write_loss_csv(loss_csv, history)
        _write_plot(loss_png, history)
    accelerator.wait_for_everyone()
    losses = [h["loss"] for h in history]
    return TrainResult(
        final_loss=losses[-1] if losses else float("nan"),
        losses=losses,
        run_dir=run_dir,
        official_path=official_path,
        encoder_dir=encoder_dir,
        loss_csv=loss_csv,
        loss_png=loss_png,
        last_checkpoint=last_checkpoint,
    )
