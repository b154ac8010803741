"""Attention over video keys plus a few biased extra keys, merged exactly via log-sum-exp.

Memory adds ~10 distinct keys, each standing for ``m`` identical copies. A logit bias of
``log(m)`` reproduces the copies exactly, but an additive mask would push PyTorch's SDPA off its
flash kernel for the whole (long) video sequence. Instead we run the video attention unchanged on
the fastest kernel that also returns its log-sum-exp, attend to the extra keys separately (a tiny
``S x M`` problem), and combine the two partial softmaxes:

    out = out_video * sigmoid(lse_video - lse_extra) + out_extra * sigmoid(lse_extra - lse_video)

which equals one softmax over the concatenated keys. Where gradients must flow through the video
attention (training), one masked SDPA over the concatenated keys is used instead.

diffusers' attention backends (``transformer.set_attention_backend``) are honoured where they name
one of PyTorch's own SDPA kernels (``sdpa_kernel_for_backend``): we call that kernel ourselves for
its log-sum-exp, because diffusers' ``dispatch_attention_fn`` does not give it on one device
without context parallelism: ``native``, ``_native_math``, ``_native_efficient``, xformers, NPU and
XLA refuse ``return_lse``, ``_native_cudnn``/``_native_flash`` return it only under context
parallelism, and flex's wrapper breaks on it. flash-attn, FA3 and Sage do return it, in their own
kernels' layouts, but need packages (and a GPU) we do not install, so they are refused rather than
run untested. A refused backend raises ``UnsupportedAttentionBackend`` at the first memory forward.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

logger = logging.getLogger(__name__)


class UnsupportedAttentionBackend(ValueError):
    """A diffusers attention backend that memory injection cannot run; the message names it."""


# The diffusers backends we can honour: each names a PyTorch SDPA kernel (None: SDPA's own choice,
# which is what diffusers' "native" runs).
_KERNEL_OF_BACKEND: dict[str, SDPBackend | None] = {
    "native": None,
    "_native_flash": SDPBackend.FLASH_ATTENTION,
    "_native_cudnn": SDPBackend.CUDNN_ATTENTION,
    "_native_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "_native_math": SDPBackend.MATH,
}
# PyTorch has no cuDNN or memory-efficient kernel off CUDA.
_NON_CUDA_KERNELS = (None, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


def sdpa_kernel_for_backend(backend: str, device: torch.device) -> SDPBackend | None:
    """The SDPA kernel that runs the video attention under diffusers backend ``backend``.

    Raises:
        UnsupportedAttentionBackend: ``backend`` cannot give us the video attention's
            log-sum-exp, or names a kernel ``device`` does not have.
    """
    name = str(getattr(backend, "value", backend))  # AttentionBackendName or its string
    if name not in _KERNEL_OF_BACKEND:
        raise UnsupportedAttentionBackend(
            f"attention backend {name!r} is not supported with memory: merging the memory keys "
            "needs the video attention's log-sum-exp, which memory injection takes only from "
            f"PyTorch's own kernels. Use one of {sorted(_KERNEL_OF_BACKEND)} "
            "(transformer.set_attention_backend) or generate without memory."
        )
    kernel = _KERNEL_OF_BACKEND[name]
    if device.type != "cuda" and kernel not in _NON_CUDA_KERNELS:
        raise UnsupportedAttentionBackend(
            f"attention backend {name!r} needs a CUDA device, the memory forward runs on "
            f"{device.type}"
        )
    return kernel


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


def _cuda_backend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, kernel: SDPBackend | None
) -> SDPBackend:
    """The kernel PyTorch's SDPA would pick for this call (cuDNN on Hopper, else flash, ...).

    Restricted to ``kernel``, SDPA's choice is that kernel or an error saying why it cannot serve
    these inputs, the error diffusers' own ``_native_*`` backend would give.
    """
    with nullcontext() if kernel is None else sdpa_kernel(kernel):
        return SDPBackend(torch._fused_sdp_choice(q, k, v, None, 0.0, False, scale=scale))


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    kernel: SDPBackend | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused softmax attention that also returns the log-sum-exp of its logits.

    Uses the same kernel that ``F.scaled_dot_product_attention`` would choose, so the video
    attention costs what it costs without memory.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.
        kernel: Force this fused kernel on CUDA (flash, cuDNN or memory-efficient); ``None``
            lets SDPA choose. Off CUDA, PyTorch's one kernel with a log-sum-exp is flash.

    Returns:
        ``out (B, H, S, D)`` in q's dtype and ``lse (B, H, S)`` float32.
    """
    batch, heads, length = q.shape[:3]
    if not q.is_cuda:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None, scale=scale
        )
    backend = _cuda_backend(q, k, v, scale, kernel)
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
    kernel: SDPBackend | None = None,
) -> torch.Tensor:
    """``softmax([q k^T, q extra_k^T + extra_bias] * scale) @ [v; extra_v]``.

    Args:
        q: ``(B, H, S, D)``; k, v: ``(B, H, L, D)``.
        extra_k, extra_v: ``(B or 1, H, M, D)`` additional keys/values.
        extra_bias: ``(M,)`` float logit bias added to the extra keys (after scaling).
        kernel: The SDPA kernel for the video attention (see ``sdpa_kernel_for_backend``);
            ``None`` lets SDPA choose.

    Returns:
        ``(B, H, S, D)`` in q's dtype.
    """
    math_kernel = kernel == SDPBackend.MATH
    if math_kernel or not _lse_kernel_available(q, k, v):
        # Differentiable path (training) and dtypes without a fused LSE kernel: one masked
        # attention over the concatenated keys; the mask is a broadcast (1, 1, 1, L+M) row.
        batch = q.shape[0]
        keys = torch.cat([k, extra_k.expand(batch, -1, -1, -1)], dim=2)
        values = torch.cat([v, extra_v.expand(batch, -1, -1, -1)], dim=2)
        bias = torch.cat([extra_bias.new_zeros(k.shape[2]), extra_bias])
        # SDPA wants the mask in q's dtype: in bf16, log(100) rounds by ~0.01 (memory weighted
        # ~1% off); float32 training is exact.
        # The math kernel has no log-sum-exp, so it runs here (exact). The fused kernels are
        # not forced on this path: flash takes no mask, and the others' limits on mask layouts
        # would make training fail over what is only a speed preference.
        with sdpa_kernel(SDPBackend.MATH) if math_kernel else nullcontext():
            return reference_attention(q, keys, values, bias)

    scale = 1.0 / math.sqrt(q.shape[-1])
    out_main, lse_main = attention_with_lse(q, k, v, scale, kernel)
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
