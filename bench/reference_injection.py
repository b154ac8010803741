"""Memory injection as the reference runs it, for benchmarks and cross-checks only.

The reference concatenates all ``N*2*num_tokens`` memory tokens (duplicates included) to the
video sequence of every block, so they are queries, keys and values, and then drops their
outputs. Same result as :class:`model.injection.MemoryAttnProcessor`, more work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.injection import MemoryAttnProcessor, _apply_rotary


class ExpandedMemoryAttnProcessor(MemoryAttnProcessor):
    """Memory tokens (expanded) join the sequence as queries, keys and values."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        if self.context.memory is None or encoder_hidden_states is not None:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        length = hidden_states.shape[1]
        memory = self.modulated_memory(self.context.memory.expand(), hidden_states)
        memory = memory.expand(hidden_states.shape[0], -1, -1)
        x = torch.cat([hidden_states, memory], dim=1)
        query = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(x).unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:  # RoPE on the video positions only
            query = torch.cat([_apply_rotary(query[:, :length], *rotary_emb), query[:, length:]], 1)
            key = torch.cat([_apply_rotary(key[:, :length], *rotary_emb), key[:, length:]], 1)
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        )
        # The reference projects every output, memory included, then keeps the video rows.
        out = attn.to_out[0](out.transpose(1, 2).flatten(2, 3).type_as(query))
        return attn.to_out[1](out[:, :length])
