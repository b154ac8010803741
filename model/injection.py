"""Memory injection into every self-attention of diffusers' ``WanTransformer3DModel``.

DiT-Mem semantics (no weight of the backbone changes):

* memory tokens get the block's ``norm1`` and timestep ``shift_msa``/``scale_msa`` modulation,
  exactly like video tokens, then the shared ``to_k``/``to_v`` projections and ``norm_k``;
* they get no RoPE, are keys/values only (their query outputs are dropped by the reference, so we
  never compute them), and sit in one full softmax with the video keys;
* cross-attention and the FFN never see them; every block and both CFG branches get the same
  memory.

Memory guidance (our option, off by default) departs from the last point: only the conditional
branch sees the memory, so classifier-free guidance amplifies the memory's pull along with the
prompt's, as IP-Adapter does with its image tokens.

The maths lives in :class:`MemoryAttnProcessor`, installed on each block's ``attn1`` with the
official ``set_processor`` API. Without memory the processor delegates to the processor it
replaced, so outputs are bit-identical to stock diffusers.

Two diffusers hooks (``diffusers.hooks.HookRegistry``) feed it what the attention module never
receives:

* a stateful hook on the transformer reads the ``CacheContext`` that diffusers pipelines open
  around every forward (``transformer.cache_context("cond"|"uncond", step_index=i, ...)``): the
  CFG branch (for memory guidance) and the denoising step (which keys the per-step cache of memory
  keys/values). A forward outside any cache context is the conditional branch and caches nothing;
  ``MemoryInjector.branch`` overrides the branch explicitly;
* a hook on each block hands the block's timestep embedding to its processor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
    WanTransformerBlock,
)

from model.attention import attention_with_extra_keys, sdpa_kernel_for_backend
from model.tokens import MemoryTokens

Branch = Literal["cond", "uncond"]
"""A classifier-free-guidance branch, named as diffusers' pipelines name their cache contexts."""

_BRANCH_HOOK = "ditmem_memory_branch"
_TEMB_HOOK = "ditmem_memory_temb"

# What identifies a denoising step in a CacheContext: its index, plus the sigma and step count so
# that two denoising loops inside one ``MemoryInjector.use`` never share memory keys/values.
_StepKey = tuple[int, float | None, int | None]


@dataclass
class _MemoryKV:
    """Keys/values of the memory tokens for one block at one denoising step."""

    step: _StepKey | None
    key: torch.Tensor  # (B or 1, H, M, D)
    value: torch.Tensor  # (B or 1, H, M, D)


@dataclass
class MemoryContext:
    """What every processor of one transformer shares: the active memory and the current forward."""

    memory: MemoryTokens | None = None
    # Memory guidance: the unconditional branch of classifier-free guidance runs without memory.
    conditional_only: bool = False
    log_counts: torch.Tensor | None = None
    # Set by ``MemoryInjector.branch``; wins over the cache context's name.
    branch_override: Branch | None = None
    # Set at the start of every transformer forward by the branch hook.
    unconditional: bool = False
    step: _StepKey | None = None
    cache: dict[int, _MemoryKV] = field(default_factory=dict)

    def set_memory(self, memory: MemoryTokens | None, *, conditional_only: bool = False) -> None:
        self.memory = memory
        self.conditional_only = conditional_only and memory is not None
        self.log_counts = None if memory is None else memory.log_counts.to(memory.tokens.device)
        self.cache.clear()

    def begin_forward(self, cache_context: CacheContext | None) -> None:
        """Record which branch and step the transformer forward now starting belongs to."""
        name = self.branch_override or (cache_context.name if cache_context else "cond")
        self.unconditional = name == "uncond"
        # Without a step index nothing tells two forwards of one step apart from two steps, so
        # nothing is cached (the memory keys/values are ~10 tokens: recomputing them is cheap).
        if cache_context is None or cache_context.step_index is None:
            self.step = None
        else:
            self.step = (
                cache_context.step_index,
                cache_context.sigma,
                cache_context.num_inference_steps,
            )


class _NoState(BaseState):
    """The branch hook's per-context state: none (it only reads the context itself)."""

    def reset(self, *args: Any, **kwargs: Any) -> None:
        pass


class _BranchHook(ModelHook):
    """Tells the processors which CFG branch and denoising step each transformer forward is.

    diffusers' ``cache_context`` pushes its ``CacheContext`` into every ``StateManager``
    attribute of every stateful hook registered on the transformer, so this hook holds one.
    """

    _is_stateful = True

    def __init__(self, context: MemoryContext) -> None:
        super().__init__()
        self.state = StateManager(_NoState)
        self.context = context

    def pre_forward(
        self, module: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        try:
            cache_context = self.state.context
        except ValueError:  # no cache_context around this forward: a direct call
            cache_context = None
        self.context.begin_forward(cache_context)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.state.reset()
        return module


class _TimestepEmbeddingHook(ModelHook):
    """Hands a block's timestep embedding, which its ``attn1`` never receives, to the processor."""

    def __init__(self, processor: MemoryAttnProcessor) -> None:
        super().__init__()
        self.processor = processor

    def pre_forward(
        self, module: torch.nn.Module, *args: Any, **kwargs: Any
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        # WanTransformer3DModel calls blocks positionally: (hidden, text, temb, rotary).
        self.processor.capture_timestep_embedding(args[2] if len(args) > 2 else kwargs["temb"])
        return args, kwargs


def transformer_width(transformer: WanTransformer3DModel) -> int:
    """Hidden size of the DiT: the width memory tokens must have."""
    return transformer.config.num_attention_heads * transformer.config.attention_head_dim


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on ``(B, S, H, D)``, the same formula as diffusers' processor."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _project_kv(attn: WanAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if attn.fused_projections:
        _, key, value = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        key, value = attn.to_k(x), attn.to_v(x)
    return key, value


class MemoryAttnProcessor:
    """Self-attention processor for a Wan block that appends memory keys/values.

    Args:
        block_index: Position of the block, the key of its cached memory keys/values.
        block: The block whose ``attn1`` this processor serves (for ``norm1`` and its
            ``scale_shift_table``).
        context: Shared memory state of the transformer.
        fallback: The processor this one replaces; used verbatim when no memory is active.
    """

    def __init__(
        self,
        block_index: int,
        block: WanTransformerBlock,
        context: MemoryContext,
        fallback: object,
    ) -> None:
        self.block_index = block_index
        self.block = block
        self.context = context
        self.fallback = fallback
        self._temb: torch.Tensor | None = None
        self._backend: AttentionBackendName | str | None = getattr(
            fallback, "_attention_backend", None
        )
        self._parallel: object | None = getattr(fallback, "_parallel_config", None)

    # diffusers' set_attention_backend / enable_parallelism set these on the installed processor
    # only; the stock processor we delegate to without memory must get them too, so that without
    # memory the transformer runs exactly as diffusers would.
    @property
    def _attention_backend(self) -> AttentionBackendName | str | None:
        return self._backend

    @_attention_backend.setter
    def _attention_backend(self, backend: AttentionBackendName | str | None) -> None:
        self._backend = backend
        if hasattr(self.fallback, "_attention_backend"):
            self.fallback._attention_backend = backend

    @property
    def _parallel_config(self) -> object | None:  # diffusers' ParallelConfig
        return self._parallel

    @_parallel_config.setter
    def _parallel_config(self, config: object | None) -> None:
        self._parallel = config
        if hasattr(self.fallback, "_parallel_config"):
            self.fallback._parallel_config = config

    def capture_timestep_embedding(self, temb: torch.Tensor) -> None:
        self._temb = temb

    def modulated_memory(self, tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``(B or 1, M, dim)`` tokens after the block's ``norm1`` and timestep modulation."""
        temb = self._temb
        if temb is None or temb.ndim != 3:
            raise RuntimeError(
                "memory injection needs the block's (B, 6, dim) timestep embedding; per-token "
                "timesteps (Wan2.2 TI2V) are not supported"
            )
        shift, scale = (self.block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
        tokens = tokens.to(device=like.device)
        # Same pre-attention treatment as the video tokens in WanTransformerBlock.forward.
        return (self.block.norm1(tokens.float()) * (1 + scale) + shift).type_as(like)

    def memory_kv(self, attn: WanAttention, like: torch.Tensor) -> _MemoryKV:
        """Memory keys/values ``(B or 1, H, M, D)`` for this block, once per denoising step."""
        context = self.context
        cached = context.cache.get(self.block_index)
        if cached is not None and context.step is not None and cached.step == context.step:
            return cached
        normed = self.modulated_memory(context.memory.tokens, like)
        key, value = _project_kv(attn, normed)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        kv = _MemoryKV(context.step, key, value)
        if context.step is not None:
            context.cache[self.block_index] = kv
        return kv

    def __call__(
        self,
        attn: WanAttention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        context = self.context
        skip = context.memory is None or (context.conditional_only and context.unconditional)
        if skip or encoder_hidden_states is not None:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        if attention_mask is not None:
            raise ValueError("memory injection does not support an attention mask")
        if self._parallel is not None:
            raise ValueError("memory injection does not support context parallelism")
        # Checked before any work, so an unusable backend fails here and names itself.
        backend = self._backend
        if backend is None:
            # As dispatch_attention_fn: the process-wide active backend (DIFFUSERS_ATTN_BACKEND,
            # attention_backend(...)), which diffusers keeps only in its registry.
            backend = _AttentionBackendRegistry.get_active_backend()[0]
        kernel = sdpa_kernel_for_backend(backend, hidden_states.device)

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)

        memory = self.memory_kv(attn, hidden_states)
        out = attention_with_extra_keys(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            memory.key,
            memory.value,
            self.context.log_counts,
            kernel=kernel,
        )
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class MemoryInjector:
    """Installs memory injection on a ``WanTransformer3DModel`` and switches memory on and off.

    Example:
        >>> injector = MemoryInjector(transformer)
        >>> with injector.use(memory_tokens):
        ...     noise_pred = transformer(latents, timestep, text_states, return_dict=False)[0]
    """

    def __init__(
        self,
        transformer: WanTransformer3DModel,
        processor_class: type[MemoryAttnProcessor] = MemoryAttnProcessor,
    ) -> None:
        if getattr(transformer, "_memory_injector", None) is not None:
            raise RuntimeError("memory injection is already installed on this transformer")
        self.transformer = transformer
        self.context = MemoryContext()
        self._processors: list[MemoryAttnProcessor] = []
        for index, block in enumerate(transformer.blocks):
            processor = processor_class(index, block, self.context, block.attn1.processor)
            block.attn1.set_processor(processor)
            self._processors.append(processor)
            block_hooks = HookRegistry.check_if_exists_or_initialize(block)
            block_hooks.register_hook(_TimestepEmbeddingHook(processor), _TEMB_HOOK)
        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        registry.register_hook(_BranchHook(self.context), _BRANCH_HOOK)
        # The transformer's registry caches the list of its children's registries; new block
        # registries would stay invisible to it otherwise.
        registry.invalidate_child_registries_cache()
        transformer._memory_injector = self

    @property
    def memory(self) -> MemoryTokens | None:
        return self.context.memory

    def set_memory(self, memory: MemoryTokens | None, *, conditional_only: bool = False) -> None:
        """Activate ``memory`` (``(B or 1, M, dim)`` tokens) for every following forward.

        With ``conditional_only`` (memory guidance), forwards of the unconditional branch of
        classifier-free guidance run without memory: those inside diffusers'
        ``transformer.cache_context("uncond")`` (what its pipelines open) or inside
        ``branch("uncond")``.
        """
        if memory is not None:
            width = transformer_width(self.transformer)
            if memory.tokens.shape[-1] != width:
                raise ValueError(
                    f"memory tokens have width {memory.tokens.shape[-1]}, the transformer {width}"
                )
        self.context.set_memory(memory, conditional_only=conditional_only)

    @contextmanager
    def use(self, memory: MemoryTokens | None, *, conditional_only: bool = False) -> Iterator[None]:
        """Activate ``memory`` inside the block and always switch it off afterwards."""
        self.set_memory(memory, conditional_only=conditional_only)
        try:
            yield
        finally:
            self.set_memory(None)

    @contextmanager
    def branch(self, name: Branch) -> Iterator[None]:
        """Count every forward inside the block as CFG branch ``name``.

        For direct transformer calls, which have no cache context (outside one, and without this
        override, a forward is the conditional branch). Inside a cache context it wins over the
        context's name.
        """
        if name not in get_args(Branch):
            raise ValueError(f"branch must be one of {get_args(Branch)}, not {name!r}")
        previous = self.context.branch_override
        self.context.branch_override = name
        try:
            yield
        finally:
            self.context.branch_override = previous

    def remove(self) -> None:
        """Restore the original processors and remove the hooks."""
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.remove_hook(_BRANCH_HOOK, recurse=False)
        registry.remove_hook(_TEMB_HOOK, recurse=True)  # the blocks' hooks
        registry.invalidate_child_registries_cache()
        for block, processor in zip(self.transformer.blocks, self._processors, strict=True):
            block.attn1.set_processor(processor.fallback)
        self.transformer._memory_injector = None
        self.set_memory(None)
