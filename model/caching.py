"""Step caches: skip transformer work on denoising steps where it would change little.

diffusers ships the caches as hooks on the transformer (``enable_cache``); ditmem turns them on
for one generation at a time, so the cached state never outlives the call that made it:

* ``first-block``: every step runs the first block; when its residual moved less than
  ``threshold`` (relative mean absolute change) since the last full step, the other blocks are
  skipped and their last residual reused (First Block Cache).
* ``mag``: skips the blocks while the error accumulated from the per-step magnitude ratios of
  the transformer's residual stays under ``threshold`` (MagCache). The ratios belong to the
  model and the schedule: the pipeline measures them once per step count, on a fixed prompt
  without memory (:class:`MagRatioRecorder`), so no request's content decides another's skips.
* ``taylorseer``: runs every block in full on one step of ``interval`` (and on the first
  ``TAYLORSEER_WARMUP_STEPS``) and predicts each block's output on the others from a first-order
  Taylor expansion of its past outputs (TaylorSeer).

The memory is injected inside every block's self-attention, which is exactly what a cache skips,
so the cache must never reuse a residual computed with other memory: each classifier-free
guidance branch keeps its own state (the pipeline names its branches' cache contexts, and with
memory guidance only the conditional one has memory), and the state is cleared before and after
every call, also one cancelled mid-way, so no request sees another's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model.errors import InvalidRequest

if TYPE_CHECKING:  # request schemas import this module: torch loads only where caches run
    import torch
    from diffusers.models.modeling_utils import ModelMixin

CacheKind = Literal["none", "first-block", "mag", "taylorseer"]
CACHE_KINDS: tuple[CacheKind, ...] = ("none", "first-block", "mag", "taylorseer")
THRESHOLD_KINDS: tuple[CacheKind, ...] = ("first-block", "mag")
DEFAULT_THRESHOLDS: dict[str, float] = {"first-block": 0.05, "mag": 0.06}
DEFAULT_TAYLORSEER_INTERVAL = 2
TAYLORSEER_WARMUP_STEPS = 3  # full steps before the first prediction: two to difference
MAG_RETENTION = 0.2  # the first fifth of the steps always runs in full (they shape the layout)
MAG_MAX_SKIPS = 3  # never more consecutive skipped steps than this


class CacheSpec(BaseModel):
    """Which step cache a generation uses, and how eagerly it skips."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: CacheKind = "none"
    threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="first-block and mag: skip while the change stays under this (0: never)",
    )
    interval: int | None = Field(
        None, ge=1, le=50, description="taylorseer: one full step in this many (1: never skip)"
    )

    @model_validator(mode="after")
    def _knobs_of_the_kind(self) -> CacheSpec:
        if self.threshold is not None and self.kind not in THRESHOLD_KINDS:
            raise ValueError(f"cache {self.kind!r} takes no threshold (taylorseer: interval)")
        if self.interval is not None and self.kind != "taylorseer":
            raise ValueError(f"cache {self.kind!r} takes no interval (only taylorseer does)")
        return self

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def check_profile(self, profile: str) -> None:
        """Raise :class:`InvalidRequest` for a skipping cache under the ``reference`` profile,
        whose point is to compute exactly what the reference computes."""
        if profile == "reference" and self.active:
            raise InvalidRequest(
                "the reference profile samples exactly as the reference does; a step cache "
                "would skip part of that computation (use the default profile)",
                field="cache",
            )

    def resolved(self) -> CacheSpec:
        """The kind's knob filled in with its default."""
        if self.kind == "none":
            return CacheSpec()
        if self.kind == "taylorseer":
            if self.interval is None:
                return CacheSpec(kind=self.kind, interval=DEFAULT_TAYLORSEER_INTERVAL)
            return self
        if self.threshold is None:
            return CacheSpec(kind=self.kind, threshold=DEFAULT_THRESHOLDS[self.kind])
        return self

    def config(
        self,
        *,
        steps: int,
        dtype: torch.dtype | None = None,
        mag_ratios: Sequence[float] | None = None,
    ) -> Any:
        """The diffusers cache configuration of this spec for a run of ``steps`` steps.

        ``mag_ratios`` (``mag`` only) are the model's per-step residual magnitude ratios;
        ``dtype`` is the one TaylorSeer keeps its expansion in (the transformer's).
        """
        from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

        spec = self.resolved()
        if spec.kind == "first-block":
            return FirstBlockCacheConfig(threshold=spec.threshold)
        if spec.kind == "mag":
            if mag_ratios is None:
                raise ValueError("the mag cache needs the model's magnitude ratios")
            return MagCacheConfig(
                # MagCache skips while the accumulated error is <= threshold, so an error of
                # exactly 0 would still skip at 0; below zero nothing ever does.
                threshold=spec.threshold if spec.threshold > 0 else -1.0,
                max_skip_steps=MAG_MAX_SKIPS,
                retention_ratio=MAG_RETENTION,
                num_inference_steps=steps,
                mag_ratios=list(mag_ratios),
            )
        if spec.kind == "taylorseer":
            return TaylorSeerCacheConfig(
                cache_interval=spec.interval,
                disable_cache_before_step=TAYLORSEER_WARMUP_STEPS,
                max_order=1,
                taylor_factors_dtype=dtype,
                # Whole blocks: diffusers' default patterns name attention modules "…attn",
                # which Wan's attn1/attn2 do not match, and a block is the unit the memory
                # enters (its self-attention) and the other caches skip.
                cache_identifiers=[r"blocks\.\d+"],
            )
        raise InvalidRequest(f"cache {self.kind!r} has no configuration", field="cache")


class PassCounter:
    """How many times the transformer ran all its blocks (a pass a cache skipped runs only the
    first, or none): ``passes`` counts the last block's self-attention calls."""

    def __init__(self) -> None:
        self.passes = 0

    def _hook(self, *_: object) -> None:
        self.passes += 1


@contextlib.contextmanager
def counting_passes(transformer: ModelMixin) -> Iterator[PassCounter]:
    counter = PassCounter()
    handle = transformer.blocks[-1].attn1.register_forward_hook(counter._hook)
    try:
        yield counter
    finally:
        handle.remove()


class MagRatioRecorder:
    """Measures MagCache's ratios on one run: for each transformer forward, the mean over
    tokens of ``|residual_t| / |residual_{t-1}|``, the residual being what all the blocks add
    to the first block's input (1.0 for the first forward). Record a run without classifier-free
    guidance, so that every forward is one denoising step."""

    def __init__(self) -> None:
        self.ratios: list[float] = []
        self._input: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def _before_blocks(self, _module: object, args: tuple, kwargs: dict) -> None:
        self._input = kwargs.get("hidden_states", args[0] if args else None)

    def _after_blocks(self, _module: object, _args: tuple, _kwargs: dict, output: Any) -> None:
        import torch

        hidden = output[0] if isinstance(output, tuple) else output
        residual = (hidden - self._input).float()
        if self._previous is None:
            self.ratios.append(1.0)
        else:
            norms = torch.linalg.vector_norm(residual, dim=-1)
            previous = torch.linalg.vector_norm(self._previous, dim=-1)
            self.ratios.append(float((norms / (previous + 1e-8)).mean()))
        self._previous = residual

    @contextlib.contextmanager
    def recording(self, transformer: ModelMixin) -> Iterator[MagRatioRecorder]:
        first, last = transformer.blocks[0], transformer.blocks[-1]
        handles = [
            first.register_forward_pre_hook(self._before_blocks, with_kwargs=True),
            last.register_forward_hook(self._after_blocks, with_kwargs=True),
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def step_cache(
    transformer: ModelMixin,
    spec: CacheSpec | None,
    *,
    steps: int,
    mag_ratios: Sequence[float] | None = None,
) -> Iterator[None]:
    """The cache of ``spec`` on ``transformer`` for the duration of one ``steps``-step run."""
    if spec is None or not spec.active:
        yield
        return
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError("the transformer already has a cache: one generation at a time")
    transformer.enable_cache(
        spec.config(steps=steps, dtype=transformer.dtype, mag_ratios=mag_ratios)
    )
    try:
        transformer._reset_stateful_cache()  # a fresh state, whatever ran before
        yield
    finally:
        transformer._reset_stateful_cache()
        transformer.disable_cache()
