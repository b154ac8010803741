"""``MemoryWanPipeline``: diffusers' Wan text-to-video pipeline steered by DiT-Mem memory.

The pipeline extends :class:`diffusers.WanPipeline` instead of re-writing its denoising loop, so
schedulers, CFG, offloading and VAE tiling behave exactly as users of Wan expect. Memory enters
through the attention processors installed by :class:`model.injection.MemoryInjector`; it is
active only for the duration of one call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
from diffusers.models.modeling_utils import ModelMixin
from diffusers.schedulers import SchedulerMixin
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from model.caching import CacheSpec, MagRatioRecorder, step_cache
from model.encoder import MemoryEncoder
from model.errors import GenerationCancelled, InvalidRequest
from model.injection import MemoryInjector, transformer_width
from model.profiles import PROFILES, Profile
from model.sampling import ReferenceFlowMatchScheduler
from model.tokens import ClipTokens, MemoryTokens

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]
LatentsCallback = Callable[[int, torch.Tensor], None]


class MemoryWanPipeline(WanPipeline):
    """Text-to-video with memory tokens injected into every DiT self-attention.

    Args:
        tokenizer, text_encoder, vae, scheduler, transformer: Wan2.1 components.
        memory_encoder: The DiT-Mem encoder whose ``token_dim`` equals the transformer width.
    """

    # The encoder only mixes a handful of cached tokens per request; moving it on and off the
    # GPU would cost more than running it where it is.
    _exclude_from_cpu_offload = ["memory_encoder"]

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        text_encoder: UMT5EncoderModel,
        # Or a stand-in with its interface (the toy preset's pixel-space PixelSpaceVAE): the
        # annotation is what diffusers' from_pretrained checks loaded components against.
        vae: AutoencoderKLWan | ModelMixin,
        scheduler: SchedulerMixin,
        transformer: WanTransformer3DModel,
        memory_encoder: MemoryEncoder,
        transformer_2: WanTransformer3DModel | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ) -> None:
        # The Wan2.2 options exist in the signature only because WanPipeline registers them.
        if transformer_2 is not None or boundary_ratio is not None or expand_timesteps:
            raise ValueError("DiT-Mem memory injection supports the single-transformer Wan2.1")
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=transformer,
        )
        self.register_modules(memory_encoder=memory_encoder)
        width = transformer_width(transformer)
        if memory_encoder.config.token_dim != width:
            raise ValueError(
                f"memory encoder token_dim {memory_encoder.config.token_dim} != DiT width {width}"
            )
        self.memory_injector = MemoryInjector(transformer)
        # Set for the duration of a reference-profile call (see ``prepare_latents``).
        self._noise_dtype: torch.dtype | None = None
        # MagCache's per-step ratios, measured once per run shape (see ``mag_ratios``).
        self._mag_ratios: dict[tuple[object, ...], list[float]] = {}

    # -- memory ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_clip_latents(self, videos: torch.Tensor) -> torch.Tensor:
        """Canonical memory latents of preprocessed clips.

        Args:
            videos: ``(N, 3, F, H, W)`` float in [-1, 1] (see ``model.preprocess.load_clip``).

        Returns:
            ``(N, z_dim, F', H', W')`` float32: the VAE posterior mode, normalised with the VAE's
            latent mean/std like the latents the DiT denoises.
        """
        device = self.vae.device
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(device)
        inv_std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1, 1).to(device)
        latents = []
        for video in videos:  # one clip at a time: VAE activations dominate memory
            clip = video.unsqueeze(0).to(device=device, dtype=self.vae.dtype)
            posterior = self.vae.encode(clip).latent_dist
            latents.append(((posterior.mode().float() - mean) * inv_std).cpu())
        return torch.cat(latents)

    @torch.no_grad()
    def resample_clips(self, videos: torch.Tensor) -> ClipTokens:
        """Per-clip memory tokens of preprocessed clips (what the memory bank caches)."""
        latents = self.encode_clip_latents(videos)
        return self.memory_encoder.resample(latents.to(self.memory_encoder.device))

    @torch.no_grad()
    def encode_memory(
        self, memory: ClipTokens | Sequence[ClipTokens] | MemoryTokens | None
    ) -> MemoryTokens | None:
        """Request-time mixing: cached clip tokens -> memory tokens on the DiT's device/dtype."""
        if memory is None:
            return None
        if not isinstance(memory, MemoryTokens):
            if isinstance(memory, ClipTokens):
                memory = ClipTokens(
                    *(t.to(self.memory_encoder.device) for t in (memory.high, memory.low)),
                    memory.counts,
                )
            memory = self.memory_encoder.mix(memory)
        return memory.to(device=self._execution_device, dtype=self.transformer.dtype)

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        memory: ClipTokens | Sequence[ClipTokens] | MemoryTokens | None = None,
        memory_guidance: bool = False,
        profile: Profile = "default",
        on_progress: ProgressCallback | None = None,
        should_cancel: CancelCheck | None = None,
        on_latents: LatentsCallback | None = None,
        latents_every: int = 0,
        cache: CacheSpec | None = None,
        **kwargs: Any,
    ):
        """Generate videos; every argument of ``WanPipeline.__call__`` is accepted.

        Args:
            memory: Cached tokens of the retrieved clips (``ClipTokens``), one group per prompt,
                or already mixed ``MemoryTokens``. ``None`` generates without memory.
            memory_guidance: Give the memory to the conditional branch of classifier-free
                guidance only, so ``guidance_scale`` amplifies the memory's effect as it does the
                prompt's. ``False`` (the reference behaviour) gives both branches the memory.
                Has no effect without guidance (``guidance_scale <= 1``).
            profile: ``"reference"`` samples as the DiT-Mem reference does (``model.sampling``):
                its flow-matching Euler schedule and bf16 timesteps, and noise drawn in float32
                from a CPU ``generator`` and cast to the transformer's dtype.
            on_progress: Called as ``on_progress(step, total)`` after each denoising step.
            should_cancel: Polled before the first and after every step; returning True stops
                the run with :class:`GenerationCancelled` (the VAE decode is skipped too).
            on_latents: Called as ``on_latents(step, latents)`` after every ``latents_every``-th
                step (before ``on_progress``) with the latents being denoised (live previews).
            cache: A step cache for this call only (``model.caching``); its state never
                outlives the call, cancelled or not. Not with the ``reference`` profile, whose
                point is to compute exactly what the reference computes.
        """
        if prompt is not None and any(not p.strip() for p in _as_list(prompt)):
            raise InvalidRequest("prompt must not be empty")
        if profile not in PROFILES:
            raise InvalidRequest(f"unknown profile {profile!r}; choose one of {PROFILES}")
        if cache is not None:
            cache.check_profile(profile)
        if should_cancel is not None and should_cancel():
            raise GenerationCancelled("cancelled before the first step")
        memory_tokens = self.encode_memory(memory)
        total = kwargs.get("num_inference_steps", 50)
        user_callback = kwargs.pop("callback_on_step_end", None)

        def on_step_end(pipe: WanPipeline, step: int, timestep: torch.Tensor, tensors: dict):
            outputs = user_callback(pipe, step, timestep, tensors) if user_callback else {}
            if on_latents is not None and latents_every and (step + 1) % latents_every == 0:
                on_latents(step + 1, tensors["latents"])
            if on_progress is not None:
                on_progress(step + 1, total)
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after step {step + 1} of {total}")
            return outputs

        quiet = contextlib.nullcontext()
        if self.vae_scale_factor_temporal == 1:
            # WanPipeline rounds num_frames to stride*n + 1, which for a VAE without temporal
            # compression (the toy preset's pixel space) adds a frame; ask for one fewer and
            # drop the rounding warning that this request triggers on purpose.
            kwargs["num_frames"] = kwargs.get("num_frames", 81) - 1
            quiet = _without_frame_rounding_warning()
        with quiet:  # MagCache's measurement run asks for the same frame count
            mag_ratios = None
            if cache is not None and cache.kind == "mag":
                mag_ratios = self.mag_ratios(total, kwargs)
            injected = self.memory_injector.use(memory_tokens, conditional_only=memory_guidance)
            reference = profile == "reference"
            sampling = self._reference_sampling() if reference else contextlib.nullcontext()
            cached = step_cache(self.transformer, cache, steps=total, mag_ratios=mag_ratios)
            with injected, sampling, cached:
                return super().__call__(
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    callback_on_step_end=on_step_end,
                    **kwargs,
                )

    def mag_ratios(self, steps: int, shape: dict[str, Any]) -> list[float]:
        """MagCache's per-step residual magnitude ratios for ``steps`` steps at the size in
        ``shape`` (height, width, num_frames), measured on first use with one run of a fixed
        prompt, seed and no memory or guidance, so they are the same whoever asks first."""
        names = ("height", "width", "num_frames")
        geometry = {name: shape[name] for name in names if name in shape}
        key = (steps, *sorted(geometry.items()))
        if key not in self._mag_ratios:
            recorder = MagRatioRecorder()
            with recorder.recording(self.transformer):
                super().__call__(
                    prompt="a calibration scene",
                    num_inference_steps=steps,
                    guidance_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(0),
                    output_type="latent",
                    max_sequence_length=shape.get("max_sequence_length", 512),
                    **geometry,
                )
            self._mag_ratios[key] = recorder.ratios
        return self._mag_ratios[key]

    def prepare_latents(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """diffusers' initial latents; under the reference profile rounded to the DiT's dtype.

        The values are diffusers' own (float32 from the call's generator, the reference's
        rule too); the reference then casts them to its pipeline dtype before the first step.
        """
        latents = super().prepare_latents(*args, **kwargs)
        if self._noise_dtype is None:
            return latents
        return latents.to(self._noise_dtype).to(latents.dtype)

    @contextlib.contextmanager
    def _reference_sampling(self) -> Iterator[None]:
        """The reference's scheduler and noise for one call; the folder's scheduler after."""
        own = self.scheduler
        self.scheduler = ReferenceFlowMatchScheduler(
            num_train_timesteps=own.config.num_train_timesteps
        )
        self._noise_dtype = self.transformer.dtype
        try:
            yield
        finally:
            self.scheduler = own
            self._noise_dtype = None


@contextlib.contextmanager
def _without_frame_rounding_warning() -> Iterator[None]:
    wan_logger = logging.getLogger(WanPipeline.__module__)

    def keep(record: logging.LogRecord) -> bool:
        return "has to be divisible by" not in record.getMessage()

    wan_logger.addFilter(keep)
    try:
        yield
    finally:
        wan_logger.removeFilter(keep)


def _as_list(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)
