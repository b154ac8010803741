"""Attention over video keys plus a few biased extra keys, merged exactly via log-sum-exp.

Memory adds ~10 distinct keys, each standing for ``m`` identical copies. A logit bias of
``log(m)`` reproduces the copies exactly, but an additive mask would push PyTorch's SDPA off its
flash kernel for the whole (long) video sequence. Instead we run the video attention unchanged on
the fastest kernel that also returns its log-sum-exp, attend to the extra keys separately (a tiny
``S x M`` problem), and combine the two partial softmaxes:

    out = out_video * sigmoid(lse_video - lse_extra) + out_extra * sigmoid(lse_extra - lse_video)

which equals one softmax over the concatenated keys. Where gradients must flow through the video
attention (training), one masked SDPA over the concatenated keys is used instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

logger = logging.getLogger(__name__)


def _lse_kernel_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether a fused kernel returning the log-sum-exp can serve this call.

    The kernels' log-sum-exp output is not differentiable, so a call whose video q/k/v need
    gradients (training) takes the masked path instead.
    """
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.is_cuda:
        return (
            q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] % 8 == 0
            and q.shape[-1] <= 256
        )
    return q.device.type == "cpu"


def _cuda_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> SDPBackend:
    """The kernel PyTorch's SDPA would pick for this call (cuDNN on Hopper, else flash, ...)."""
    return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax attention that also returns the log-sum-exp of its logits.

    Uses the same kernel that ``F.scaled_dot_product_attention`` would choose, so the video
    attention costs what it costs without memory.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.

    Returns:
        ``out (B, H, S, D)`` in q's dtype and ``lse (B, H, S)`` float32.
    """
    batch, heads, length = q.shape[:3]
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
    backend = _cuda_backend(q, k, v, scale)
    if backend == SDPBackend.CUDNN_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale
        )[:2]
    elif backend == SDPBackend.EFFICIENT_ATTENTION:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, 0.0, False, scale=scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, False, False, scale=scale
        )[:2]
    # Kernels pad or add a trailing axis to the log-sum-exp differently.
    return out, lse.reshape(batch, heads, -1)[..., :length].float()


def attention_with_extra_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_bias: torch.Tensor,
) -> torch.Tensor:
    """``softmax([q k^T, q extra_k^T + extra_bias] * scale) @ [v; extra_v]``.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.
        extra_k, extra_v: ``(B or 1, H, M, D)`` additional keys/values.
        extra_bias: ``(M,)`` float logit bias added to the extra keys (after scaling).

    Returns:
        ``(B, H, S, D)`` in q's dtype.
    """
    if not _lse_kernel_available(q, k, v):
        # Differentiable path (training) and dtypes without a fused LSE kernel: one masked
        # attention over the concatenated keys; the mask is a broadcast (1, 1, 1, L+M) row.
        batch = q.shape[0]
        keys = torch.cat([k, extra_k.expand(batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, extra_v.expand(batch, -1, -1, -1)], dim=2)
        bias = torch.cat([extra_bias.new_zeros(k.shape[2]), extra_bias])
        # SDPA wants the mask in q's dtype: in bf16, log(100) rounds by ~0.01 (memory weighted
        # ~1% off); float32 training is exact.
        return reference_attention(q, keys, values, bias)

    scale = 1.0 / math.sqrt(q.shape[-1])
    out_main, lse_main = attention_with_lse(q, k, v, scale)
    merge = _fused_merge() if q.is_cuda else merge_extra_keys
    return merge(out_main, lse_main, q, extra_k, extra_v, extra_bias, scale)


def merge_extra_keys(
    out_main: torch.Tensor,
    lse_main: torch.Tensor,
    q: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Fold the extra keys into an attention result given as ``(out, log-sum-exp)``.

    Float32 inside, result in ``out_main``'s dtype. Written as plain tensor maths so that
    ``torch.compile`` can fuse it into one pass over ``q`` and ``out_main`` (see ``fused_merge``).
    """
    extra_logits = torch.matmul(q, extra_k.transpose(-1, -2)).float() * scale + extra_bias
    lse_extra = torch.logsumexp(extra_logits, dim=-1, keepdim=True)
    out_extra = torch.matmul(torch.exp(extra_logits - lse_extra), extra_v.float())
    # Share of the total softmax mass that falls on the extra keys, per query.
    extra_share = torch.sigmoid(lse_extra - lse_main.unsqueeze(-1))
    merged = torch.lerp(out_main.float(), out_extra, extra_share)
    return merged.to(out_main.dtype)


_compiled_merge: Callable | None = None
_fuse_on_gpu = True


def set_fused_merge(enabled: bool) -> None:
    """Turn the compiled (one-kernel) merge on GPU on or off; off runs ``merge_extra_keys``."""
    global _fuse_on_gpu
    _fuse_on_gpu = enabled


def _fused_merge() -> Callable:
    """``merge_extra_keys`` compiled into one pass over ``(B, H, S, D)``, or eager.

    Eager, the merge makes several passes over the video-sized tensors; fused, its cost
    approaches one read of ``q`` and ``out_main`` and one write, which is what keeps memory
    nearly free next to the video attention. Compiled once per process; any compiler failure
    falls back to eager for good.
    """
    global _compiled_merge
    if not _fuse_on_gpu:
        return merge_extra_keys
    if _compiled_merge is None:
        compiled = torch.compile(merge_extra_keys, fullgraph=True, dynamic=False)

        def guarded(*args: torch.Tensor | float) -> torch.Tensor:
            global _fuse_on_gpu
            try:
                return compiled(*args)
            except Exception as error:  # noqa: BLE001 - any compiler failure: stay correct
                logger.warning("compiled memory merge unavailable, using eager: %s", error)
                _fuse_on_gpu = False
                return merge_extra_keys(*args)

        _compiled_merge = guarded
    return _compiled_merge


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SDPA with an optional per-key logit bias ``(L,)`` broadcast over batch, heads, queries."""
    mask = None if bias is None else bias.to(q.dtype).view(1, 1, 1, -1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
