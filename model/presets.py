"""Model presets: generation defaults, parameter bounds and the memory clip geometry.

A preset says *what* to run and how its components come to be; ``model.loading`` loads them:
seeded random components built in memory (``tiny``, from ``model.tiny``), or a diffusers pipeline
folder (``toy``: the shipped one; the real preset: the user's Wan2.1 folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from model.errors import InvalidRequest
from model.profiles import (
    REFERENCE_GUIDANCE_SCALE,
    REFERENCE_NEGATIVE_PROMPT,
    REFERENCE_STEPS,
    Profile,
)

TOY_WEIGHTS_DIR = Path(__file__).parent / "toy" / "weights"

WAN_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, "
    "images, static, overall gray, worst quality, low quality, JPEG compression residue, ugly, "
    "incomplete, extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, "
    "misshapen limbs, fused fingers, still picture, messy background, three legs, many people "
    "in the background, walking backwards"
)


@dataclass(frozen=True)
class Bounds:
    """Inclusive range of one request parameter."""

    low: float
    high: float

    def check(self, name: str, value: float) -> None:
        if not self.low <= value <= self.high:
            raise InvalidRequest(
                f"{name}={value} is outside [{self.low}, {self.high}] for this preset", field=name
            )


@dataclass(frozen=True)
class ReferenceDefaults:
    """What a request under the ``reference`` profile leaves unset takes from here.

    The 1.3B preset uses the reference scripts' values; the small presets keep a step count
    within their bounds.
    """

    steps: int = REFERENCE_STEPS
    guidance_scale: float = REFERENCE_GUIDANCE_SCALE
    negative_prompt: str = REFERENCE_NEGATIVE_PROMPT


@dataclass(frozen=True)
class Preset:
    """Generation defaults and limits of one model configuration.

    Attributes:
        memory_frames, memory_height, memory_width: Geometry every memory clip is resampled to
            before VAE encoding; it fixes the encoder's canonical latent shape.
        max_sequence_length: Prompt length in text-encoder tokens.
        spatial_multiple: Height and width must be multiples of this (VAE x patch size).
        frame_multiple: ``num_frames - 1`` must be a multiple of this (VAE temporal stride).
        display_scale: Written videos are enlarged this many times (nearest neighbour).
        memory_guidance: Default of the request field: memory only in the conditional branch
            of classifier-free guidance (see ``MemoryWanPipeline.__call__``).
        seeded_components: ``"module:function"`` that builds every pipeline component in memory
            from a seed (no files); ``None``: the components load from a pipeline folder.
        weights_dir: The pipeline folder loaded when the caller names none (``wan_path``);
            ``None``: the caller must name one.
        weights_hint: How to obtain that folder, for the error when it is missing or partial.
        gpu_dtypes: ``dtype`` names per pipeline component on a GPU (``"default"`` for the
            rest); on the CPU everything is float32. The memory encoder follows ``"default"``.
        profile: The sampling profile of a request that names none (``model.sampling``).
        reference: The defaults of a request under the ``reference`` profile.
    """

    name: str
    height: int
    width: int
    num_frames: int
    steps: int
    guidance_scale: float
    fps: int
    memory_frames: int
    memory_height: int
    memory_width: int
    flow_shift: float
    negative_prompt: str = ""
    max_sequence_length: int = 512
    spatial_multiple: int = 16
    frame_multiple: int = 4
    display_scale: int = 1
    memory_guidance: bool = False
    bounds: dict[str, Bounds] = field(default_factory=dict)
    seeded_components: str | None = None
    weights_dir: Path | None = None
    weights_hint: str = ""
    gpu_dtypes: dict[str, str] = field(default_factory=dict)
    profile: Profile = "default"
    reference: ReferenceDefaults = field(default_factory=ReferenceDefaults)

    def check(
        self, *, height: int, width: int, num_frames: int, steps: int, guidance_scale: float
    ) -> None:
        """Raise :class:`InvalidRequest` naming the first out-of-range parameter."""
        values = dict(
            height=height,
            width=width,
            num_frames=num_frames,
            steps=steps,
            guidance_scale=guidance_scale,
        )
        for name, value in values.items():
            self.bounds[name].check(name, value)
        for name in ("height", "width"):
            if values[name] % self.spatial_multiple:
                raise InvalidRequest(
                    f"{name}={values[name]} must be a multiple of {self.spatial_multiple}",
                    field=name,
                )
        if (num_frames - 1) % self.frame_multiple:
            raise InvalidRequest(
                f"num_frames={num_frames} must be {self.frame_multiple}*n+1 (e.g. 9, 17, 81)",
                field="num_frames",
            )


WAN21_T2V_1_3B = Preset(
    name="wan2.1-t2v-1.3b",
    height=480,
    width=832,
    num_frames=81,
    steps=50,
    guidance_scale=5.0,
    fps=16,
    memory_frames=81,
    memory_height=480,
    memory_width=832,
    flow_shift=3.0,
    negative_prompt=WAN_NEGATIVE_PROMPT,
    bounds={
        "height": Bounds(256, 720),
        "width": Bounds(256, 1280),
        "num_frames": Bounds(5, 81),
        "steps": Bounds(1, 100),
        "guidance_scale": Bounds(1.0, 20.0),
    },
    weights_hint=(
        "download it with `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers "
        "--local-dir <path>` and pass that path (DITMEM_WAN_PATH or --wan-path)"
    ),
    # The Wan VAE is numerically fragile in half precision; it runs once per video.
    gpu_dtypes={"transformer": "bfloat16", "text_encoder": "bfloat16", "vae": "float32"},
)

TINY = Preset(
    name="tiny",
    height=64,
    width=64,
    num_frames=9,
    steps=2,
    guidance_scale=5.0,
    fps=8,
    memory_frames=9,
    memory_height=64,
    memory_width=64,
    flow_shift=3.0,
    max_sequence_length=32,
    bounds={
        "height": Bounds(32, 128),
        "width": Bounds(32, 128),
        "num_frames": Bounds(5, 17),
        "steps": Bounds(1, 8),
        "guidance_scale": Bounds(1.0, 20.0),
    },
    seeded_components="model.tiny:build_tiny_components",
    # The shortest schedule the reference's fixture covers, within the preset's bounds.
    reference=ReferenceDefaults(steps=4),
)

# The toy world (model/toy): 8 frames of 16x16 pixels, denoised in pixel space (no VAE stride).
# Memory guidance is on: over 512 eval samples it lifts the memory's gain in motion accuracy
# from +28.9 to +42.2 points (docs/benchmarks.md).
TOY = Preset(
    name="toy",
    height=16,
    width=16,
    num_frames=8,
    steps=16,
    guidance_scale=3.0,
    fps=4,
    memory_frames=8,
    memory_height=16,
    memory_width=16,
    flow_shift=3.0,
    max_sequence_length=12,
    spatial_multiple=4,
    frame_multiple=1,
    display_scale=8,
    memory_guidance=True,
    bounds={
        "height": Bounds(16, 32),
        "width": Bounds(16, 32),
        # Every toy clip is 8 frames, and one transformer patch spans all of them: any other
        # count cannot be patched.
        "num_frames": Bounds(8, 8),
        "steps": Bounds(1, 50),
        "guidance_scale": Bounds(1.0, 20.0),
    },
    # The toy's trained step count; its tokenizer has no Chinese, so no negative prompt.
    reference=ReferenceDefaults(steps=16, negative_prompt=""),
    weights_dir=TOY_WEIGHTS_DIR,
    weights_hint="the toy weights ship with the package; recreate them with `ditmem toy train`",
)

PRESETS: dict[str, Preset] = {p.name: p for p in (WAN21_T2V_1_3B, TINY, TOY)}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidRequest(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
