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
official ``set_processor`` API. A forward pre-hook on each block hands the processor the block's
timestep embedding, which the attention module never receives. Without memory the processor
delegates to the processor it replaced, so outputs are bit-identical to stock diffusers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.models.transformers.transformer_wan import (
    WanAttention,
    WanTransformer3DModel,
    WanTransformerBlock,
)
from torch.utils.hooks import RemovableHandle

from model.attention import attention_with_extra_keys
from model.tokens import MemoryTokens


@dataclass
class _MemoryKV:
    """Keys/values of the memory tokens for one block at one timestep."""

    timestep: torch.Tensor
    key: torch.Tensor  # (B or 1, H, M, D)
    value: torch.Tensor  # (B or 1, H, M, D)


@dataclass
class MemoryContext:
    """What every processor of one transformer shares: the active memory and the current step."""

    memory: MemoryTokens | None = None
    # Memory guidance: the unconditional branch of classifier-free guidance runs without memory.
    conditional_only: bool = False
    # True while the current forward is the second of its denoising step (the unconditional
    # branch: WanPipeline runs the conditional forward first, then the unconditional one).
    unconditional: bool = False
    # The pipeline passes the same timestep tensor to the conditional and unconditional forward
    # of a step, so its identity tells the processors they may reuse the memory keys/values.
    timestep: torch.Tensor | None = None
    log_counts: torch.Tensor | None = None
    cache: dict[int, _MemoryKV] = field(default_factory=dict)

    def set_memory(self, memory: MemoryTokens | None, *, conditional_only: bool = False) -> None:
        self.memory = memory
        self.conditional_only = conditional_only and memory is not None
        self.unconditional = False
        self.log_counts = None if memory is None else memory.log_counts.to(memory.tokens.device)
        self.cache.clear()


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
        if (
            cached is not None
            and context.timestep is not None
            and cached.timestep is context.timestep
        ):
            return cached
        normed = self.modulated_memory(context.memory.tokens, like)
        key, value = _project_kv(attn, normed)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1)).transpose(1, 2)
        value = value.unflatten(2, (attn.heads, -1)).transpose(1, 2)
        kv = _MemoryKV(context.timestep, key, value)
        if context.timestep is not None:
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
        self._handles: list[RemovableHandle] = []
        self._processors: list[MemoryAttnProcessor] = []
        for index, block in enumerate(transformer.blocks):
            processor = processor_class(index, block, self.context, block.attn1.processor)
            block.attn1.set_processor(processor)
            self._processors.append(processor)
            self._handles.append(block.register_forward_pre_hook(self._block_hook(processor)))
        self._handles.append(
            transformer.register_forward_pre_hook(self._capture_timestep, with_kwargs=True)
        )
        transformer._memory_injector = self

    @staticmethod
    def _block_hook(processor: MemoryAttnProcessor):
        def hook(block: WanTransformerBlock, args: tuple) -> None:
            # WanTransformer3DModel calls blocks positionally: (hidden, text, temb, rotary).
            processor.capture_timestep_embedding(args[2])

        return hook

    def _capture_timestep(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        context = self.context
        # The same timestep tensor again means the same denoising step's second forward.
        context.unconditional = timestep is not None and timestep is context.timestep
        context.timestep = timestep

    @property
    def memory(self) -> MemoryTokens | None:
        return self.context.memory

    def set_memory(self, memory: MemoryTokens | None, *, conditional_only: bool = False) -> None:
        """Activate ``memory`` (``(B or 1, M, dim)`` tokens) for every following forward.

        With ``conditional_only`` (memory guidance), the second forward of each denoising step,
        the unconditional branch of classifier-free guidance, runs without memory.
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
            self.context.timestep = None

    def remove(self) -> None:
        """Restore the original processors and remove the hooks."""
        for handle in self._handles:
            handle.remove()
        for block, processor in zip(self.transformer.blocks, self._processors, strict=True):
            block.attn1.set_processor(processor.fallback)
        self.transformer._memory_injector = None
        self.set_memory(None)
