"""The toy world end to end: seeding a toy bank, training both stages, the memory-effect eval.

The pieces are the product's own: clips enter the bank through :class:`ClipIngestor` (decode,
canonicalise, encode, cache tokens), the encoder trains with :func:`model.training.train_encoder`
and evaluation fetches memory with :meth:`MemoryBank.clip_tokens`, the call behind the
``memory.clip_ids`` request field.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from memory_bank.bank import MemoryBank
from memory_bank.embed import TextEmbedder, open_text_embedder
from memory_bank.ingest import ClipIngestor
from model.caching import CacheSpec
from model.pipeline import MemoryWanPipeline
from model.presets import TOY
from model.toy.world import COLOURS, MOTIONS, ClipSpec, prompt_for, render_one, sample_spec
from model.video_io import write_video

logger = logging.getLogger(__name__)

Report = Callable[[str], None]


def motion_tag(motion: str) -> str:
    """``"moving left"`` -> ``"moving-left"``: tags are single words."""
    return motion.replace(" ", "-")


def bank_specs(per_combo: int, seed: int) -> list[ClipSpec]:
    """``per_combo`` random clips of every colour x motion, in shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    combos = [(c, m) for c in COLOURS for m in MOTIONS for _ in range(per_combo)]
    random.Random(seed).shuffle(combos)
    return [sample_spec(generator, colour, motion) for colour, motion in combos]


def write_toy_clip(spec: ClipSpec, path: Path) -> Path:
    """The clip as a lossless FFV1 ``.mkv``, so a bank's latents are the rendered pixels."""
    frames = (render_one(spec).permute(1, 2, 3, 0) + 1.0) / 2.0
    return write_video(frames, path, fps=TOY.fps, lossless=True)


@dataclass(frozen=True)
class SeededClip:
    clip_id: int
    spec: ClipSpec


def seed_toy_bank(
    ingestor: ClipIngestor,
    per_combo: int,
    *,
    seed: int = 0,
    colour_in_caption: bool = True,
    extra_tags: tuple[str, ...] = (),
    report: Report | None = None,
) -> list[SeededClip]:
    """Ingest ``per_combo`` random clips of every colour x motion, in shuffled order.

    Captions name the motion ("a blue ball falling", or "a ball falling" without
    ``colour_in_caption``); tags name colour and motion. Clips are written losslessly (FFV1)
    so the bank's latents are the rendered pixels.
    """
    specs = bank_specs(per_combo, seed)
    seeded = []
    with tempfile.TemporaryDirectory(prefix="ditmem-toy-") as scratch:
        for index, spec in enumerate(specs):
            path = write_toy_clip(spec, Path(scratch) / f"clip-{index:05d}.mkv")
            caption = prompt_for(spec.colour if colour_in_caption else None, spec.motion)
            outcome = ingestor.ingest(
                path, caption, [spec.colour, motion_tag(spec.motion), "toy", *extra_tags]
            )
            path.unlink()
            seeded.append(SeededClip(outcome.record.clip_id, spec))
            if report and (index + 1) % 64 == 0:
                report(f"seeded {index + 1}/{len(specs)} toy clips")
    return seeded


@contextmanager
def toy_bank(
    pipe: MemoryWanPipeline,
    root: Path | None = None,
    embedder: TextEmbedder | None = None,
) -> Iterator[tuple[MemoryBank, ClipIngestor]]:
    """A bank for the toy preset, in ``root`` or a temporary directory removed afterwards."""
    scratch = None if root is not None else tempfile.mkdtemp(prefix="ditmem-toy-bank-")
    bank = MemoryBank(Path(root or scratch), embedder or open_text_embedder())
    try:
        yield bank, ClipIngestor(bank, pipe, TOY)
    finally:
        bank.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# -- evaluation ------------------------------------------------------------------------------------


class ToyEvalConfig(BaseModel):
    samples: int = Field(128, ge=4, description="generated clips per condition")
    k: int = Field(3, ge=1, description="memory clips per sample")
    bank_per_combo: int = Field(6, ge=1, description="bank clips per colour x motion")
    steps: int = Field(TOY.steps, ge=1)
    guidance_scale: float = Field(TOY.guidance_scale, ge=1.0)
    memory_guidance: bool = TOY.memory_guidance
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    cache: CacheSpec = Field(default_factory=CacheSpec)


@dataclass
class ConditionResult:
    name: str
    motion_accuracy: float  # motion == the target motion
    colour_accuracy: float
    missing: float
    follows_memory: float | None = None  # wrong memory only: motion == the memory's motion
    passes_per_video: float = 0.0  # full transformer passes (both guidance branches)
    seconds: float = 0.0  # generating this condition's clips


@dataclass
class ToyEvalReport:
    config: dict
    conditions: list[ConditionResult]
    losses: dict[str, float]
    chance: float = 1.0 / len(MOTIONS)
    strips: list[str] = field(default_factory=list)

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.name == name)

    @property
    def memory_gain(self) -> float:
        """Motion accuracy with the right memory minus without memory."""
        return self.condition("right").motion_accuracy - self.condition("none").motion_accuracy

    @property
    def memory_gain_stderr(self) -> float:
        """Standard error of :attr:`memory_gain`, treating the two conditions as independent.

        The conditions share prompts and noise, which correlates them positively, so this
        overstates the error a little.
        """
        n = self.config["samples"]
        return math.sqrt(
            sum(
                p * (1 - p) / n
                for p in (self.condition(c).motion_accuracy for c in ("right", "none"))
            )
        )

    def table(self) -> str:
        lines = [
            "| condition | motion accuracy | colour accuracy | ball missing | follows memory "
            "| transformer passes / video |",
            "|---|---|---|---|---|---|",
        ]
        labels = {
            "none": "no memory",
            "right": "right-motion memory",
            "wrong": "wrong-motion memory",
        }
        for c in self.conditions:
            follows = "" if c.follows_memory is None else f"{c.follows_memory:.1%}"
            lines.append(
                f"| {labels[c.name]} | {c.motion_accuracy:.1%} | {c.colour_accuracy:.1%} "
                f"| {c.missing:.1%} | {follows} | {c.passes_per_video:.1f} |"
            )
        return "\n".join(lines)

    def to_json(self) -> str:
        summary = {"memory_gain": self.memory_gain, "memory_gain_stderr": self.memory_gain_stderr}
        return json.dumps(asdict(self) | summary, indent=2)


def _pick(ids_by_motion: dict[str, list[int]], motion: str, k: int, rng: random.Random) -> list:
    return rng.sample(ids_by_motion[motion], k)


def run_toy_eval(
    pipe: MemoryWanPipeline,
    config: ToyEvalConfig,
    *,
    strip_dir: Path | None = None,
    report: Report = logger.info,
) -> ToyEvalReport:
    """Generate ``samples`` clips per condition from motion-free prompts and judge them.

    Conditions, with the same prompts and the same initial noise: no memory; ``k`` bank clips
    of the target motion (any colour); ``k`` bank clips of one other motion.
    """
    from model.toy.evaluate import denoising_losses, judge, sample
    from model.toy.strips import frame_strip

    rng = random.Random(config.seed)
    colours = list(COLOURS)
    targets = [(colours[(i // 4) % 4], MOTIONS[i % 4]) for i in range(config.samples)]
    wrong = [rng.choice([m for m in MOTIONS if m != motion]) for _, motion in targets]
    prompts = [prompt_for(colour) for colour, _ in targets]
    seeds = [config.seed * 100_000 + i for i in range(config.samples)]

    with toy_bank(pipe) as (bank, ingestor):
        seeded = seed_toy_bank(ingestor, config.bank_per_combo, seed=config.seed + 1)
        ids_by_motion: dict[str, list[int]] = {m: [] for m in MOTIONS}
        for clip in seeded:  # identical renders are one bank clip
            if clip.clip_id not in ids_by_motion[clip.spec.motion]:
                ids_by_motion[clip.spec.motion].append(clip.clip_id)
        version = ingestor.encoder_version
        right_ids = [_pick(ids_by_motion, m, config.k, rng) for _, m in targets]
        wrong_ids = [_pick(ids_by_motion, m, config.k, rng) for m in wrong]
        right_memory = [bank.clip_tokens(ids, version) for ids in right_ids]
        wrong_memory = [bank.clip_tokens(ids, version) for ids in wrong_ids]
        first_ids = right_ids[: len(MOTIONS)]
        by_id = {clip.clip_id: clip.spec for clip in seeded}

    gen = torch.Generator().manual_seed(config.seed + 7)
    check = [sample_spec(gen, c, m) for c, m in targets]
    losses = denoising_losses(
        pipe,
        check,
        {"none": None, "right": right_memory, "wrong": wrong_memory},
        seed=config.seed,
    )
    report(
        "denoising loss at t in [0.6, 0.9]: "
        + ", ".join(f"{name} {value:.4f}" for name, value in losses.items())
    )

    motions = [m for _, m in targets]
    expected_colours = [c for c, _ in targets]
    conditions, videos = [], {}
    if config.cache.kind == "mag":  # its one-off ratio measurement is not counted against it
        sample(pipe, prompts[:1], None, seeds[:1], steps=config.steps,
               guidance_scale=config.guidance_scale, cache=config.cache)  # fmt: skip
    for name, memory in (("none", None), ("right", right_memory), ("wrong", wrong_memory)):
        passes: list[int] = []
        started = time.perf_counter()
        videos[name] = sample(
            pipe, prompts, memory, seeds,
            steps=config.steps, guidance_scale=config.guidance_scale,
            memory_guidance=config.memory_guidance, batch_size=config.batch_size,
            cache=config.cache, passes=passes,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        judged = judge(videos[name], motions, expected_colours)
        result = ConditionResult(
            name, judged.motion_accuracy, judged.colour_accuracy, judged.missing,
            passes_per_video=sum(passes) / len(passes), seconds=seconds,
        )  # fmt: skip
        if name == "wrong":
            followed = sum(m == w for m, w in zip(judged.motions, wrong, strict=True))
            result.follows_memory = followed / config.samples
        conditions.append(result)
        report(
            f"{name:>5}: motion {result.motion_accuracy:.1%} colour {result.colour_accuracy:.1%}"
            f" ({result.passes_per_video:.1f} transformer passes a video, {seconds:.1f} s)"
        )

    strips = []
    if strip_dir is not None:
        from model.toy.world import render_one as draw

        for i in range(len(MOTIONS)):
            rows = [(f"memory: {by_id[j].caption}", draw(by_id[j])) for j in first_ids[i]]
            rows += [
                (f"'{prompts[i]}' + memory", videos["right"][i]),
                (f"'{prompts[i]}' no memory", videos["none"][i]),
            ]
            name = f"toy-eval-{motion_tag(motions[i])}.png"
            strips.append(str(frame_strip(rows, Path(strip_dir) / name)))
    return ToyEvalReport(
        config=config.model_dump(), conditions=conditions, losses=losses, strips=strips
    )


# -- training --------------------------------------------------------------------------------------


class ToyTrainConfig(BaseModel):
    """Both stages of the toy models. Defaults are the ones the shipped weights were made with."""

    run_dir: Path
    seed: int = 0
    backbone_steps: int = Field(6000, ge=1)
    backbone_batch_size: int = Field(32, ge=1)
    backbone_lr: float = Field(5e-4, gt=0)
    encoder_steps: int = Field(2000, ge=1)
    encoder_batch_size: int = Field(32, ge=1)
    encoder_lr: float = Field(5e-4, gt=0)
    k: int = Field(3, ge=1)
    bank_per_combo: int = Field(
        24, ge=2, description="clips drawn per colour x motion (identical draws are one clip)"
    )
    t_min: float = Field(0.3, ge=0, le=1)
    t_max: float = Field(1.0, ge=0, le=1)
    progress: bool = True


def colour_prompt(record) -> str:
    """A training target's prompt: colour and object, never the motion ("a red ball")."""
    colour = next(tag for tag in record.tags if tag in COLOURS)
    return prompt_for(colour)


def train_toy(config: ToyTrainConfig, report: Report = logger.info) -> Path:
    """Train the toy backbone, then its memory encoder with the backbone frozen; resumable.

    Returns the pipeline folder the ``toy`` preset loads (``load_pipeline("toy", wan_path=...)``
    serves it as it is; ``model/toy/weights/README.md`` lists its files).
    """
    from model.loading import save_memory_encoder
    from model.toy.backbone import BackboneTrainConfig, train_backbone
    from model.toy.components import (
        ENCODER_DIR,
        TEXT_ENCODER_DIR,
        TRANSFORMER_DIR,
        build_toy_components,
        write_pipeline_files,
    )
    from model.training import TrainConfig, train_encoder

    run_dir = config.run_dir
    backbone_dir = run_dir / "backbone"
    report(f"stage 1: backbone, {config.backbone_steps} steps -> {backbone_dir}")
    train_backbone(
        BackboneTrainConfig(
            run_dir=backbone_dir,
            steps=config.backbone_steps,
            batch_size=config.backbone_batch_size,
            lr=config.backbone_lr,
            seed=config.seed,
            progress=config.progress,
        )
    )
    pipe = MemoryWanPipeline(**build_toy_components(backbone_dir, memory_encoder=False))
    pipe.set_progress_bar_config(disable=True)

    with toy_bank(pipe, run_dir / "bank") as (bank, ingestor):
        if len(bank) == 0:
            report(f"seeding the training bank: {config.bank_per_combo} draws per combination")
            # Captions without colour: every clip of a motion ties for retrieval, so a target's
            # memory pool spans all colours and the encoder learns to carry motion, not colour.
            seed_toy_bank(
                ingestor,
                config.bank_per_combo,
                seed=config.seed,
                colour_in_caption=False,
                extra_tags=("train",),
                report=report,
            )
        # Every clip of a motion ties for retrieval (same caption); the pool is all of them.
        per_motion = min(bank.count(motion_tag(m)) for m in MOTIONS)
        encoder_config = TrainConfig(
            run_dir=run_dir / "encoder",
            steps=config.encoder_steps,
            batch_size=config.encoder_batch_size,
            lr=config.encoder_lr,
            warmup_steps=100,
            k=config.k,
            t_min=config.t_min,
            t_max=config.t_max,
            seed=config.seed,
            checkpoint_every=250,
            memory_pool=per_motion - 1,
            max_sequence_length=pipe.tokenizer.model_max_length,
            progress=config.progress,
        )
        report(f"stage 2: memory encoder, {config.encoder_steps} steps -> {run_dir / 'encoder'}")
        train_encoder(pipe, bank, encoder_config, resume=True, prompt_of=colour_prompt)

    weights = run_dir / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for name in (TRANSFORMER_DIR, TEXT_ENCODER_DIR):  # the backbone's files, byte for byte
        shutil.copytree(
            backbone_dir / name,
            weights / name,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".*"),  # an interrupted write's hidden temporaries
        )
    save_memory_encoder(pipe.memory_encoder, weights / ENCODER_DIR)
    write_pipeline_files(pipe, weights)  # model_index.json, tokenizer/, scheduler/, vae/
    (weights / "training.json").write_text(config.model_dump_json(indent=2) + "\n")
    report(f"weights in {weights}")
    return weights
