"""Attention over video keys plus a few biased extra keys, merged exactly via log-sum-exp.

Memory adds ~10 distinct keys, each standing for ``m`` identical copies. A logit bias of
``log(m)`` reproduces the copies exactly, but an additive mask would push PyTorch's SDPA off its
flash kernel for the whole (long) video sequence. Instead we run the video attention unchanged on
the fastest kernel that also returns its log-sum-exp, attend to the extra keys separately (a tiny
``S x M`` problem), and combine the two partial softmaxes:

    out = out_video * sigmoid(lse_video - lse_extra) + out_extra * sigmoid(lse_extra - lse_video)

which equals one softmax over the concatenated keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _flash_supported(q: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns the log-sum-exp of its logits.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.

    Returns:
        ``out (B, H, S, D)`` in q's dtype and ``lse (B, H, S)`` float32.
    """
    if _flash_supported(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
        return out, lse[..., : q.shape[2]]
    if q.device.type == "cpu" and not torch.is_grad_enabled():
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
        return out, lse
    # Differentiable fallback (training on CPU, or kernels unavailable for this dtype/shape).
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse.unsqueeze(-1)), v.float())
    return out.to(q.dtype), lse


def attention_with_extra_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_bias: torch.Tensor,
) -> torch.Tensor:
    """``softmax([q k^T, q extra_k^T + extra_bias] * scale) @ [v; extra_v]`` without a mask.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.
        extra_k, extra_v: ``(B or 1, H, M, D)`` additional keys/values.
        extra_bias: ``(M,)`` float logit bias added to the extra keys (after scaling).

    Returns:
        ``(B, H, S, D)`` in q's dtype.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    out_main, lse_main = attention_with_lse(q, k, v, scale)
    extra_logits = torch.matmul(q, extra_k.transpose(-1, -2)).float() * scale + extra_bias
    lse_extra = torch.logsumexp(extra_logits, dim=-1)
    weights = torch.exp(extra_logits - lse_extra.unsqueeze(-1)).to(extra_v.dtype)
    out_extra = torch.matmul(weights, extra_v)
    # Share of the total softmax mass that falls on the extra keys, per query.
    extra_share = torch.sigmoid(lse_extra - lse_main).unsqueeze(-1)
    # In the activation dtype: a float32 copy of the (B, H, S, D) output would cost more memory
    # traffic than the whole memory branch.
    dtype = out_main.dtype
    return torch.lerp(out_main, out_extra.to(dtype), extra_share.to(dtype))


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Plain SDPA with an optional per-key bias ``(L,)``; the readable baseline for tests."""
    mask = None if bias is None else bias.to(q.dtype).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
