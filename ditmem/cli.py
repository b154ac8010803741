"""The ``ditmem`` command line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from pydantic import ValidationError

from memory_bank.errors import BankError
from model.errors import ModelError
from runtime.settings import Settings

if TYPE_CHECKING:  # the CLI starts fast: torch and the bank load only in the commands that use them
    from memory_bank.bank import MemoryBank
    from model.caching import CacheSpec
    from model.pipeline import MemoryWanPipeline
    from runtime.batch import PlannedVideo
    from runtime.batch_outputs import BatchOptions, BatchSummary

app = typer.Typer(
    name="ditmem",
    help="Memory-augmented text-to-video generation (DiT-Mem on Wan2.1).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
memory_app = typer.Typer(help="Manage the memory bank of reference clips.", no_args_is_help=True)
index_app = typer.Typer(help="Maintain the memory bank's indexes.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
app.add_typer(index_app, name="index")

PresetOption = Annotated[str | None, typer.Option(help="tiny, toy or wan2.1-t2v-1.3b.")]
BankOption = Annotated[Path | None, typer.Option(help="Memory bank directory.")]
# Generation options of `generate` and `batch` (None: the preset's).
NegativePromptOption = Annotated[str | None, typer.Option()]
FramesOption = Annotated[int | None, typer.Option(help="Frame count (4n+1).")]
HeightOption = Annotated[int | None, typer.Option()]
WidthOption = Annotated[int | None, typer.Option()]
StepsOption = Annotated[int | None, typer.Option(help="Denoising steps.")]
GuidanceOption = Annotated[float | None, typer.Option()]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")]
CacheOption = Annotated[
    str | None,
    typer.Option(
        help="Step cache: none, first-block, mag or taylorseer (skip transformer work on steps "
        "that change little)."
    ),
]
CacheThresholdOption = Annotated[
    float | None,
    typer.Option(
        min=0, max=1, help="first-block and mag: the threshold (0.05, 0.06; 0 never skips)."
    ),
]
CacheIntervalOption = Annotated[
    int | None,
    typer.Option(min=1, max=50, help="taylorseer: one full step in this many (default 2)."),
]
OffloadOption = Annotated[
    str | None,
    typer.Option(
        help="Keep idle weights off the device: none, model or group (DITMEM_OFFLOAD; on a CPU "
        "they wait in files)."
    ),
]
GroupBlocksOption = Annotated[
    int | None, typer.Option(min=1, max=64, help="Group offload: transformer blocks per group.")
]
QuantizeOption = Annotated[
    str | None,
    typer.Option(help="Transformer block weights: none, int8 or fp8 (DITMEM_QUANTIZE; fp8: GPU)."),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        help="Sampling profile: default, or reference (the DiT-Mem reference's sampler, noise, "
        "steps, guidance and negative prompt; default: the preset's)."
    ),
]


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "WARNING",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def _describe(error: ValidationError) -> str:
    """One line per invalid setting: ``preset: Input should be 'tiny' or ...``."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors a user can fix into a one-line message and exit status 2."""
    try:
        yield
    except ValidationError as error:
        message = _describe(error)
    except (ModelError, BankError, ValueError) as error:
        message = str(error)
    else:
        return
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _cache_spec(
    kind: str | None, threshold: float | None, interval: int | None = None
) -> CacheSpec | None:
    """``--cache``/``--cache-threshold``/``--cache-interval`` as the request's ``cache``
    (validated there); a knob alone names its kind's default (threshold: first-block)."""
    from model.caching import CacheSpec

    if kind is None and threshold is None and interval is None:
        return None
    if kind is None:
        kind = "taylorseer" if interval is not None else "first-block"
    return CacheSpec.model_validate({"kind": kind, "threshold": threshold, "interval": interval})


def _settings(**overrides: object) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


@contextmanager
def _pipeline_and_bank(settings: Settings) -> Iterator[tuple[MemoryWanPipeline, MemoryBank]]:
    """The loaded pipeline and the open bank of a command that works on both."""
    from runtime.builders import load_pipeline_from, open_bank

    pipe = load_pipeline_from(settings)
    with open_bank(settings) as opened:
        yield pipe, opened


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="What the video shows.")],
    out: Annotated[Path, typer.Option(help="Where to write the mp4.")] = Path("outputs/video.mp4"),
    preset: PresetOption = None,
    memory: Annotated[
        list[Path] | None,
        typer.Option(help="Reference clip(s) whose memory steers the generation; repeatable."),
    ] = None,
    retrieve: Annotated[
        int,
        typer.Option(min=0, max=16, help="Also retrieve this many clips from the bank (0: none)."),
    ] = 0,
    bank: BankOption = None,
    negative_prompt: NegativePromptOption = None,
    frames: FramesOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    steps: StepsOption = None,
    guidance_scale: GuidanceOption = None,
    memory_guidance: Annotated[
        bool | None,
        typer.Option(
            "--memory-guidance/--no-memory-guidance",
            help="Memory in the conditional guidance branch only (default: the preset's).",
        ),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    profile: ProfileOption = None,
    cache: CacheOption = None,
    cache_threshold: CacheThresholdOption = None,
    cache_interval: CacheIntervalOption = None,
    offload: OffloadOption = None,
    offload_group_blocks: GroupBlocksOption = None,
    quantize: QuantizeOption = None,
    wan_path: Annotated[Path | None, typer.Option(help="Wan2.1-T2V-1.3B-Diffusers folder.")] = None,
    dit_mem_path: Annotated[Path | None, typer.Option(help="DiT-Mem-1.3B.safetensors.")] = None,
    device: DeviceOption = None,
) -> None:
    """Generate one video and print where it was written."""
    from model.presets import get_preset
    from runtime.builders import check_placement_of, load_pipeline_from, open_bank
    from runtime.generation import (
        GenerationRequest,
        MemoryOptions,
        resolve_generation,
        run_generation,
    )

    with user_errors():
        settings = _settings(
            preset=preset, wan_path=wan_path, dit_mem_path=dit_mem_path, device=device,
            bank_dir=bank, offload=offload, offload_group_blocks=offload_group_blocks,
            quantize=quantize,
        )  # fmt: skip
        check_placement_of(settings)
        chosen = get_preset(settings.preset)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_frames=frames, steps=steps, guidance_scale=guidance_scale, seed=seed,
            memory_guidance=memory_guidance, profile=profile, memory=MemoryOptions(k=retrieve),
            cache=_cache_spec(cache, cache_threshold, cache_interval),
        )  # fmt: skip
        with contextlib.ExitStack() as resources:
            opened: MemoryBank | None = None
            if retrieve:
                opened = resources.enter_context(open_bank(settings))
            spec = resolve_generation(request, chosen, opened)
            pipe = load_pipeline_from(settings)

            def report(step: int, total: int) -> None:
                typer.echo(f"step {step}/{total}", err=True)

            output = run_generation(
                pipe, chosen, spec, out, bank=opened, memory_files=memory or [],
                on_progress=report,
            )  # fmt: skip
    typer.echo(str(output.video.resolve()))


@app.command()
def batch(
    prompts: Annotated[
        Path, typer.Argument(help="A .txt, .csv, .json or .jsonl prompt file, or a folder of .txt.")
    ],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    layout: Annotated[
        str, typer.Option(help="plain, phygenbench or vbench (the evaluators' own layouts).")
    ] = "plain",
    samples: Annotated[
        int | None, typer.Option(min=1, help="Videos per prompt (vbench: 5, else 1).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="First seed (plain: 0; phygenbench and vbench: 42).")
    ] = None,
    retrieve: Annotated[
        int, typer.Option(min=0, max=16, help="Memory clips retrieved per prompt (0: none).")
    ] = 0,
    preset: PresetOption = None,
    bank: BankOption = None,
    negative_prompt: NegativePromptOption = None,
    frames: FramesOption = None,
    height: HeightOption = None,
    width: WidthOption = None,
    steps: StepsOption = None,
    guidance_scale: GuidanceOption = None,
    profile: ProfileOption = None,
    cache: CacheOption = None,
    cache_threshold: CacheThresholdOption = None,
    cache_interval: CacheIntervalOption = None,
    offload: OffloadOption = None,
    offload_group_blocks: GroupBlocksOption = None,
    quantize: QuantizeOption = None,
    device: DeviceOption = None,
    server: Annotated[
        str | None,
        typer.Option(
            help="A running ditmem service (http://host:port): every worker of its fleet makes "
            "videos of the batch at once. Without it the batch runs on this machine."
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DITMEM_API_KEY", help="The service's API key.")
    ] = None,
    in_flight: Annotated[
        int, typer.Option(min=1, max=256, help="Jobs kept queued or running on the service.")
    ] = 8,
) -> None:
    """Generate a video per prompt (and sample) into OUT; outputs that exist and decode are
    skipped, so running it again resumes. DIR/batch.jsonl records every video made."""
    from runtime.batch import Layout, plan, read_prompts
    from runtime.batch_outputs import BatchOptions

    if layout not in get_args(Layout):
        typer.secho(f"error: unknown layout {layout!r}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    with user_errors():
        planned = plan(read_prompts(prompts), layout, samples=samples, seed=seed)  # type: ignore[arg-type]
        options = BatchOptions(
            retrieve=retrieve, negative_prompt=negative_prompt, num_frames=frames,
            height=height, width=width, steps=steps, guidance_scale=guidance_scale,
            profile=profile, cache=_cache_spec(cache, cache_threshold, cache_interval),
        )  # fmt: skip
        if server is None:
            from runtime.batch_runner import run_batch
            from runtime.builders import check_placement_of

            settings = _settings(
                preset=preset, device=device, bank_dir=bank, offload=offload,
                offload_group_blocks=offload_group_blocks, quantize=quantize,
            )  # fmt: skip
            check_placement_of(settings)
            summary = run_batch(settings, planned, out, options)
        else:
            if offload or offload_group_blocks or quantize:
                raise ValueError(
                    "--offload and --quantize choose how this machine keeps its model; with "
                    "--server the service's workers keep theirs (DITMEM_OFFLOAD, DITMEM_QUANTIZE)"
                )
            summary = _batch_on_server(server, api_key, in_flight, preset, bank, device,
                                       planned, out, options)  # fmt: skip
    rate = (
        f", {summary.made / summary.making_s:.2f} videos/s over {summary.making_s:.1f} s"
        if summary.made and summary.making_s
        else ""
    )
    typer.echo(
        f"{summary.made} made, {summary.skipped} already there, {summary.failed} failed "
        f"({len(planned)} planned) in {out}{rate}"
    )
    for output, reason in summary.failures:
        typer.echo(f"failed {output}: {reason}", err=True)
    if summary.failed:
        raise typer.Exit(code=1)


def _batch_on_server(
    server: str,
    api_key: str | None,
    in_flight: int,
    preset: str | None,
    bank: Path | None,
    device: str | None,
    planned: list[PlannedVideo],
    out: Path,
    options: BatchOptions,
) -> BatchSummary:
    """``ditmem batch --server``: the service's preset, bank and devices make the videos."""
    from runtime.batch_remote import BatchOnServer, ServerError, ServerOptions

    for name, value in (("--bank", bank), ("--device", device)):
        if value is not None:
            raise ValueError(f"{name} applies to a batch on this machine, not with --server")
    runner = BatchOnServer(ServerOptions(url=server, api_key=api_key, in_flight=in_flight))
    try:
        served = runner.check()
        if preset is not None and preset != served:
            raise ValueError(f"the service at {server} runs preset {served!r}, not {preset!r}")
        return runner.run(planned, out, options)
    except ServerError as error:
        raise ValueError(str(error)) from None
    finally:
        runner.client.close()


# -- memory bank -----------------------------------------------------------------------------


@memory_app.command("add")
def memory_add(
    file: Annotated[Path, typer.Argument(help="Video file (mp4, webm, mov, mkv, gif, ...).")],
    caption: Annotated[str, typer.Option(help="What the clip shows.")],
    tag: Annotated[list[str] | None, typer.Option(help="Tag; repeatable.")] = None,
    bank: BankOption = None,
    preset: PresetOption = None,
) -> None:
    """Add one clip; prints its id (an identical file already in the bank keeps its id)."""
    from runtime.builders import build_ingestor

    with user_errors():
        settings = _settings(bank_dir=bank, preset=preset)
        with _pipeline_and_bank(settings) as (pipe, opened):
            result = build_ingestor(settings, opened, pipe).ingest(file, caption, tag or [])
    state = "added" if result.created else "already in the bank"
    typer.echo(f"{result.record.clip_id}\t{state}\t{result.record.caption}")


@memory_app.command("import")
def memory_import(
    folder: Annotated[Path, typer.Argument(help="Folder holding the videos.")],
    captions: Annotated[Path, typer.Option(help="CSV (header: video,caption) or JSONL file.")],
    tag: Annotated[list[str] | None, typer.Option(help="Tag added to every clip.")] = None,
    bank: BankOption = None,
    preset: PresetOption = None,
) -> None:
    """Import a folder of clips; re-running it skips what is already in the bank.

    With DITMEM_REDIS_URL the rows become ingest jobs that every worker of the fleet takes;
    without, this process ingests them itself.
    """
    with user_errors():
        if not captions.is_file():
            raise ValueError(f"captions file {captions} not found")
        settings = _settings(bank_dir=bank, preset=preset)
        extra_tags = tuple(tag or ())
        if settings.redis_url:
            summary = _import_on_the_fleet(settings, folder, captions, extra_tags)
        else:
            summary = _import_here(settings, folder, captions, extra_tags)
    for row, reason in summary.rejected:
        typer.echo(f"rejected line {row.line} ({row.video}): {reason}", err=True)
    for name, count in sorted(getattr(summary, "workers", {}).items()):
        typer.echo(f"ingested by {name}: {count}", err=True)
    typer.echo(
        f"imported {summary.imported}, already in the bank {summary.already_present}, "
        f"rejected {len(summary.rejected)}"
    )


def _import_here(settings: Settings, folder: Path, captions: Path, extra_tags: tuple[str, ...]):
    from memory_bank.bulk import import_folder
    from runtime.builders import build_ingestor

    with _pipeline_and_bank(settings) as (pipe, opened):
        ingestor = build_ingestor(settings, opened, pipe)
        return import_folder(ingestor, folder, captions, extra_tags=extra_tags)


def _import_on_the_fleet(
    settings: Settings, folder: Path, captions: Path, extra_tags: tuple[str, ...]
):
    from memory_bank.bulk import read_caption_rows
    from runtime.builders import open_bank, open_storages
    from runtime.bulk_import import fan_out_import
    from runtime.celery_app import make_celery
    from runtime.dispatch import CeleryDispatcher
    from runtime.jobs import RedisJobStore

    store = RedisJobStore(settings.redis_url)
    storages = open_storages(settings)
    celery = make_celery(settings)
    try:
        with open_bank(settings, storages) as opened:
            return fan_out_import(
                read_caption_rows(captions), folder, bank=opened, store=store,
                dispatcher=CeleryDispatcher(celery, store.redis), uploads=storages.uploads,
                owner="import", extra_tags=extra_tags,
            )  # fmt: skip
    finally:
        celery.close()


@memory_app.command("list")
def memory_list(
    tag: Annotated[str | None, typer.Option(help="Only clips with this tag.")] = None,
    before: Annotated[
        int | None, typer.Option(min=1, help="Only clips with smaller ids (the next page).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    bank: BankOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List clips, newest first, a page at a time."""
    from runtime.builders import open_bank

    with user_errors(), open_bank(_settings(bank_dir=bank)) as opened:
        page = opened.list(before=before, limit=limit, tag=tag)
        total = opened.count(tag)
    if as_json:
        typer.echo(page.model_dump_json(indent=2))
        return
    for record in page.items:
        tags = ",".join(record.tags)
        typer.echo(f"{record.clip_id}\t{record.duration_s:.1f}s\t{tags}\t{record.caption}")
    more = f"; next page: --before {page.next_cursor}" if page.next_cursor else ""
    typer.echo(f"{len(page.items)} of {total} clips{more}", err=True)


@memory_app.command("search")
def memory_search(
    query: Annotated[str, typer.Argument(help="A prompt.")],
    k: Annotated[int, typer.Option("-k", min=1, max=100)] = 5,
    min_score: Annotated[float | None, typer.Option()] = None,
    bank: BankOption = None,
) -> None:
    """Show the clips a prompt would retrieve, with their scores."""
    from runtime.builders import open_bank

    with user_errors(), open_bank(_settings(bank_dir=bank)) as opened:
        hits = opened.search(query, k, min_score=min_score)
    for hit in hits:
        typer.echo(f"{hit.clip_id}\t{hit.score:.4f}\t{hit.caption}")


@memory_app.command("rm")
def memory_rm(
    clip_id: Annotated[int, typer.Argument(help="Clip id.")],
    bank: BankOption = None,
) -> None:
    """Delete a clip: its row, files and index entries."""
    from runtime.builders import open_bank

    with user_errors(), open_bank(_settings(bank_dir=bank)) as opened:
        record = opened.delete(clip_id)
    typer.echo(f"deleted {record.clip_id}\t{record.caption}")


@memory_app.command("retoken")
def memory_retoken(bank: BankOption = None, preset: PresetOption = None) -> None:
    """Recompute cached memory tokens for the configured encoder (after an encoder change)."""
    from runtime.builders import build_ingestor

    with user_errors():
        settings = _settings(bank_dir=bank, preset=preset)
        with _pipeline_and_bank(settings) as (pipe, opened):
            outcome = build_ingestor(settings, opened, pipe).refresh_tokens()
    typer.echo(f"recomputed {len(outcome.updated)} clips")
    if outcome.unrecoverable:
        ids = ", ".join(map(str, outcome.unrecoverable))
        typer.echo(f"no latent or source kept, cannot recompute: {ids}", err=True)
        raise typer.Exit(code=1)


@index_app.command("rebuild")
def index_rebuild(bank: BankOption = None) -> None:
    """Rebuild every index of the bank from its manifest."""
    from runtime.builders import open_bank

    # Built once on open, never loaded from a snapshot first; saved here, whoever else writes
    # the bank's snapshots.
    with user_errors(), open_bank(_settings(bank_dir=bank), rebuild_index=True) as opened:
        opened.save_index()
        size = opened.index_size
    typer.echo(f"caption index rebuilt: {size} clips")


# -- serving ---------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (DITMEM_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (DITMEM_PORT).")] = None,
    preset: PresetOption = None,
    bank: BankOption = None,
) -> None:
    """Serve the HTTP API; without DITMEM_REDIS_URL jobs run in this process (embedded mode)."""
    from ditmem.compose import serve as serve_api

    with user_errors():
        settings = _settings(host=host, port=port, preset=preset, bank_dir=bank)
        if not settings.redis_url:  # the embedded worker loads the model in this process
            from runtime.builders import check_placement_of

            check_placement_of(settings)
    mode = "celery workers" if settings.redis_url else "embedded worker (no DITMEM_REDIS_URL)"
    typer.echo(f"ditmem API on http://{settings.host}:{settings.port} ({mode})", err=True)
    serve_api(settings)


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="Comma-separated queues to serve.")
    ] = "generate,ingest",
    preset: PresetOption = None,
    bank: BankOption = None,
) -> None:
    """Run a Celery worker: loads the model once in this process, then serves jobs one by one."""
    from ditmem.compose import run_worker

    with user_errors():
        settings = _settings(preset=preset, bank_dir=bank)
        if not settings.redis_url:
            raise ValueError("a worker needs DITMEM_REDIS_URL (the API runs jobs itself without)")
        from runtime.builders import check_placement_of

        check_placement_of(settings)  # before the model loads: a clear error, not a crash
    run_worker(settings, queues)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the videos and the strip.")] = Path(
        "outputs/demo"
    ),
    k: Annotated[int, typer.Option(min=1, max=8, help="Memory clips to retrieve.")] = 3,
    seed: Annotated[
        int, typer.Option(min=0, help="Seeds the bank's clips and the first of the 4 videos.")
    ] = 0,
) -> None:
    """Toy world: retrieve clips of a falling ball, generate "a red ball" with and without them."""
    import shutil

    from ditmem.demo import run_demo

    # A fresh bank each run: the demo seeds it and shows exactly what it seeded.
    shutil.rmtree(out / "bank", ignore_errors=True)
    with user_errors():
        # Always embedded, whatever DITMEM_REDIS_URL says: the demo is one process.
        settings = Settings(
            preset="toy", redis_url=None, bank_dir=out / "bank",
            results_dir=out / "results", uploads_dir=out / "uploads",
        )  # fmt: skip
        result = run_demo(
            settings, out, report=lambda line: typer.echo(line, err=True), k=k, seed=seed
        )
    for path in result.with_memory + result.without_memory:
        typer.echo(str(path.resolve()))
    typer.echo(f"frame strip: {result.strip.resolve()}")


@app.command()
def doctor(preset: PresetOption = None) -> None:
    """Check torch/CUDA, faiss, weights, Redis and storage for the current settings."""
    from ditmem.doctor import run_checks

    with user_errors():
        settings = _settings(preset=preset)
    checks = run_checks(settings)
    for check in checks:
        if check.ok:
            mark = typer.style("ok  ", fg=typer.colors.GREEN)
        elif check.fatal:
            mark = typer.style("FAIL", fg=typer.colors.RED)
        else:
            mark = typer.style("warn", fg=typer.colors.YELLOW)
        typer.echo(f"{mark} {check.name:<20} {check.detail}")
    raise typer.Exit(code=1 if any(c.fatal and not c.ok for c in checks) else 0)


@app.command()
def train(
    run_dir: Annotated[Path, typer.Option(help="Checkpoints, exported weights and loss log.")],
    steps: Annotated[int, typer.Option(min=1)] = 1000,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-5,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    grad_accum: Annotated[int, typer.Option(min=1)] = 1,
    k: Annotated[int, typer.Option(min=1, help="Memory clips per sample.")] = 5,
    tag: Annotated[str | None, typer.Option(help="Training targets: clips with this tag.")] = (
        "train"
    ),
    memory_tag: Annotated[
        str | None, typer.Option(help="Memory only from clips with this tag (the memory set).")
    ] = None,
    exclude_tag: Annotated[
        str | None, typer.Option(help="Clips with this tag are never memory (e.g. train).")
    ] = None,
    t_min: Annotated[
        float, typer.Option(min=0, max=1, help="Lowest training timestep (fraction).")
    ] = 0.0,
    t_max: Annotated[
        float, typer.Option(min=0, max=1, help="Highest training timestep (fraction).")
    ] = 1.0,
    checkpoint_every: Annotated[int, typer.Option(min=1)] = 500,
    resume: Annotated[bool, typer.Option(help="Continue from the latest checkpoint.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
    bank: BankOption = None,
    preset: PresetOption = None,
) -> None:
    """Train the memory encoder on the bank with the backbone frozen (accelerate-ready)."""
    from model.training import TrainConfig, train_encoder

    with user_errors():
        settings = _settings(bank_dir=bank, preset=preset)
        config = TrainConfig(
            run_dir=run_dir, steps=steps, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
            k=k, train_tag=tag, memory_tag=memory_tag, exclude_tag=exclude_tag, t_min=t_min,
            t_max=t_max, checkpoint_every=checkpoint_every, seed=seed,
        )  # fmt: skip
        with _pipeline_and_bank(settings) as (pipe, opened):
            result = train_encoder(pipe, opened, config, resume=resume)
    typer.echo(f"final loss {result.final_loss:.5f}")
    typer.echo(f"official checkpoint: {result.official_path}")
    typer.echo(f"encoder folder: {result.encoder_dir}  (serve it: DITMEM_DIT_MEM_PATH=<folder>)")


encoder_app = typer.Typer(help="Maintain the memory encoder.", no_args_is_help=True)
app.add_typer(encoder_app, name="encoder")


@encoder_app.command("calibrate")
def encoder_calibrate(
    out: Annotated[Path, typer.Option(help="Folder for the calibrated encoder (all buffers).")],
    batch_size: Annotated[int, typer.Option(min=1, help="Clip latents per forward.")] = 8,
    bank: BankOption = None,
    preset: PresetOption = None,
) -> None:
    """Recompute the encoder's BatchNorm statistics over the bank's latents and save it."""
    from model.calibration import calibrate_batchnorm
    from model.loading import save_memory_encoder

    with user_errors():
        settings = _settings(bank_dir=bank, preset=preset)
        with _pipeline_and_bank(settings) as (pipe, opened):
            encoder = pipe.memory_encoder
            report = calibrate_batchnorm(encoder, lambda: opened.latent_batches(batch_size))
        save_memory_encoder(encoder, out)
    typer.echo(f"calibrated on {report.clips} clip latents; statistics vs the defaults (0, 1):")
    typer.echo(report.table())
    typer.echo(f"encoder folder: {out}  (serve it: DITMEM_DIT_MEM_PATH={out})")
    typer.echo("cached bank tokens are recomputed for it when a worker starts")


toy_app = typer.Typer(help="The toy world: train its models, measure the memory effect.")
app.add_typer(toy_app, name="toy")


@toy_app.command("train")
def toy_train(
    run_dir: Annotated[Path, typer.Option(help="Checkpoints, training bank, exported weights.")],
    backbone_steps: Annotated[int, typer.Option(min=1)] = 6000,
    encoder_steps: Annotated[int, typer.Option(min=1)] = 2000,
    seed: int = 0,
) -> None:
    """Train the toy backbone, then its memory encoder (frozen backbone); resumes by itself."""
    from ditmem.toy import ToyTrainConfig, train_toy

    with user_errors():
        config = ToyTrainConfig(
            run_dir=run_dir, backbone_steps=backbone_steps, encoder_steps=encoder_steps, seed=seed
        )
        weights = train_toy(config, report=typer.echo)
    typer.echo(f"copy {weights}/* into model/toy/weights/ to ship them with the toy preset")


@toy_app.command("eval")
def toy_eval(
    samples: Annotated[int, typer.Option(min=4, help="Generated clips per condition.")] = 128,
    k: Annotated[int, typer.Option(min=1, help="Memory clips per sample.")] = 3,
    seed: int = 0,
    memory_guidance: Annotated[
        bool | None,
        typer.Option(
            "--memory-guidance/--no-memory-guidance",
            help="Memory in the conditional guidance branch only (default: the toy preset's).",
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Toy weights folder (default: the shipped one).")
    ] = None,
    strips: Annotated[Path | None, typer.Option(help="Write PNG frame strips here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    cache: CacheOption = None,
    cache_threshold: CacheThresholdOption = None,
    cache_interval: CacheIntervalOption = None,
) -> None:
    """Motion and colour accuracy without memory, with right- and with wrong-motion memory."""
    from ditmem.toy import ToyEvalConfig, run_toy_eval
    from model.pipeline import MemoryWanPipeline
    from model.toy.components import build_toy_components

    with user_errors():
        choices = {} if memory_guidance is None else {"memory_guidance": memory_guidance}
        spec = _cache_spec(cache, cache_threshold, cache_interval)
        if spec is not None:
            choices["cache"] = spec
        config = ToyEvalConfig(samples=samples, k=k, seed=seed, **choices)
        pipe = MemoryWanPipeline(**build_toy_components(weights))
        pipe.set_progress_bar_config(disable=True)
        report = run_toy_eval(pipe, config, strip_dir=strips, report=typer.echo)
    typer.echo(report.table())
    typer.echo(
        f"memory gain: {100 * report.memory_gain:+.1f} points of motion accuracy "
        f"(standard error {100 * report.memory_gain_stderr:.1f})"
    )
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(report.to_json() + "\n")


keys_app = typer.Typer(help="API keys for DITMEM_AUTH=keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("new")
def keys_new(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    write: Annotated[
        bool, typer.Option(help="Allow jobs and bank changes (deleting its own clips).")
    ] = False,
    admin: Annotated[
        bool, typer.Option(help="Also allow deleting anyone's clips (implies --write).")
    ] = False,
) -> None:
    """Print a new secret key and the DITMEM_API_KEYS entry that stores only its hash."""
    from runtime.keys import ApiKey, Scope, hash_key, new_key

    secret = new_key()
    scopes: set[Scope] = {"read"}
    if write or admin:
        scopes.add("write")
    if admin:
        scopes.add("admin")
    entry = ApiKey(name=name, sha256=hash_key(secret), scopes=scopes)
    typer.echo(f"key (give to {name}, shown once): {secret}")
    typer.echo(f"DITMEM_API_KEYS entry: {entry.model_dump_json()}")


if __name__ == "__main__":
    app()
