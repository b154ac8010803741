"""The ``ditmem`` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from model.errors import ModelError
from service.settings import Settings

app = typer.Typer(
    name="ditmem",
    help="Memory-augmented text-to-video generation (DiT-Mem on Wan2.1).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "WARNING",
) -> None:
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)


def _describe(error: ValidationError) -> str:
    """One line per invalid setting: ``preset: Input should be 'tiny' or ...``."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        location = ".".join(str(part) for part in item["loc"])
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


@app.command()
def generate(
    prompt: Annotated[str, typer.Option(help="What the video shows.")],
    out: Annotated[Path, typer.Option(help="Where to write the mp4.")] = Path("outputs/video.mp4"),
    preset: Annotated[str | None, typer.Option(help="tiny or wan2.1-t2v-1.3b.")] = None,
    memory: Annotated[
        list[Path] | None,
        typer.Option(help="Reference clip(s) whose memory steers the generation; repeatable."),
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option()] = None,
    frames: Annotated[int | None, typer.Option(help="Frame count (4n+1).")] = None,
    height: Annotated[int | None, typer.Option()] = None,
    width: Annotated[int | None, typer.Option()] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance_scale: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int, typer.Option()] = 0,
    wan_path: Annotated[Path | None, typer.Option(help="Wan2.1-T2V-1.3B-Diffusers folder.")] = None,
    dit_mem_path: Annotated[Path | None, typer.Option(help="DiT-Mem-1.3B.safetensors.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
) -> None:
    """Generate one video and print where it was written."""
    from model.generation import GenerationParams, clip_tokens_from_files, generate
    from model.loading import load_pipeline
    from model.presets import get_preset
    from model.video_io import write_video

    overrides = {
        key: value
        for key, value in dict(
            preset=preset, wan_path=wan_path, dit_mem_path=dit_mem_path, device=device
        ).items()
        if value is not None
    }
    try:
        settings = Settings(**overrides)
        chosen = get_preset(settings.preset)
        params = GenerationParams.resolve(
            chosen,
            prompt,
            negative_prompt=negative_prompt,
            height=height,
            width=width,
            num_frames=frames,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )
        pipe = load_pipeline(
            chosen.name,
            wan_path=settings.wan_path,
            dit_mem_path=settings.dit_mem_path,
            device=settings.device,
            cpu_offload=settings.cpu_offload,
            vae_tiling=settings.vae_tiling,
            seed=settings.seed,
        )
        pipe.set_progress_bar_config(disable=True)
        clips = clip_tokens_from_files(pipe, chosen, memory) if memory else None

        def report(step: int, total: int) -> None:
            typer.echo(f"step {step}/{total}", err=True)

        result = generate(pipe, chosen, params, clips, on_progress=report)
    except ModelError as error:
        raise _fail(str(error)) from None
    except ValidationError as error:
        raise _fail(_describe(error)) from None
    path = write_video(result.frames, out, fps=chosen.fps)
    record_path = path.with_suffix(".json")
    record_path.write_text(json.dumps(result.record(), indent=2))
    typer.echo(str(path.resolve()))


if __name__ == "__main__":
    app()
