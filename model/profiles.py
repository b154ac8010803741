"""The names and defaults of the sampling profiles (``model.sampling`` implements them).

Kept free of torch and diffusers: request schemas, presets and the batch client import it.
"""

from __future__ import annotations

from typing import Literal

Profile = Literal["default", "reference"]
PROFILES: tuple[Profile, ...] = ("default", "reference")

REFERENCE_SHIFT = 5.0
REFERENCE_STEPS = 40
REFERENCE_GUIDANCE_SCALE = 5.0
REFERENCE_SEED = 42
# The reference's inference and evaluation scripts pass Wan's own negative prompt, in Chinese;
# the model was trained with it, so a translation is not the same prompt.
REFERENCE_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，"
    "画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
    "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
