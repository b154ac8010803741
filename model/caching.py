"""Step caches: skip transformer work on denoising steps where it would change little.

diffusers ships the caches as hooks on the transformer (``enable_cache``); ditmem turns them on
for one generation at a time, so the cached state never outlives the call that made it:

* ``first-block``: every step runs the first block; when its residual moved less than
  ``threshold`` (relative mean absolute change) since the last full step, the other blocks are
  skipped and their last residual reused (First Block Cache).

The memory is injected inside every block's self-attention, which is exactly what a cache skips,
so the cache must never reuse a residual computed with other memory: each classifier-free
guidance branch keeps its own state (the pipeline names its branches' cache contexts, and with
memory guidance only the conditional one has memory), and the state is cleared before and after
every call, also one cancelled mid-way, so no request sees another's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model.errors import InvalidRequest

if TYPE_CHECKING:  # request schemas import this module: diffusers loads only where caches run
    from diffusers.models.modeling_utils import ModelMixin

CacheKind = Literal["none", "first-block"]
CACHE_KINDS: tuple[CacheKind, ...] = ("none", "first-block")
DEFAULT_THRESHOLDS: dict[str, float] = {"first-block": 0.05}


class CacheSpec(BaseModel):
    """Which step cache a generation uses, and how eagerly it skips."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: CacheKind = "none"
    threshold: float | None = Field(
        None, ge=0, le=1, description="skip when the first block's residual moved less (0: never)"
    )

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def resolved(self) -> CacheSpec:
        """The threshold filled in with the kind's default."""
        if self.kind == "none":
            return CacheSpec()
        if self.threshold is None:
            return CacheSpec(kind=self.kind, threshold=DEFAULT_THRESHOLDS[self.kind])
        return self

    def config(self) -> Any:
        """The diffusers cache configuration of this spec."""
        from diffusers import FirstBlockCacheConfig

        spec = self.resolved()
        if spec.kind == "first-block":
            return FirstBlockCacheConfig(threshold=spec.threshold)
        raise InvalidRequest(f"cache {self.kind!r} has no configuration", field="cache")


class PassCounter:
    """How many times the transformer ran all its blocks (a pass a cache skipped runs only the
    first): ``passes`` counts the last block's self-attention calls."""

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


@contextlib.contextmanager
def step_cache(transformer: ModelMixin, spec: CacheSpec | None) -> Iterator[None]:
    """The cache of ``spec`` on ``transformer`` for the duration of one generation."""
    if spec is None or not spec.active:
        yield
        return
    if getattr(transformer, "is_cache_enabled", False):
        raise RuntimeError("the transformer already has a cache: one generation at a time")
    transformer.enable_cache(spec.config())
    try:
        transformer._reset_stateful_cache()  # a fresh state, whatever ran before
        yield
    finally:
        transformer._reset_stateful_cache()
        transformer.disable_cache()
