"""Triton kernel for the memory merge on GPU: one pass over the video-sized tensors.

``merge_extra_keys`` (``model.attention``) in eager PyTorch makes several passes over the
``(B, H, S, D)`` attention output; this kernel reads ``q`` and the output once and writes the
result once, which is the floor for this step. Used automatically on CUDA when Triton is present;
``TRITON_INTERPRET=1`` runs it on the CPU for tests.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _merge_kernel(
        out_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, bias_ptr, result_ptr,
        seq_len, num_heads, num_extra, scale,
        o_sb, o_sh, o_ss, o_sd,
        l_sb, l_sh, l_ss,
        q_sb, q_sh, q_ss, q_sd,
        k_sb, k_sh, k_sm, k_sd,
        v_sb, v_sh, v_sm, v_sd,
        r_sb, r_sh, r_ss, r_sd,
        HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    ):  # fmt: skip
        block = tl.program_id(0)
        batch_head = tl.program_id(1)
        b = batch_head // num_heads
        h = batch_head % num_heads
        rows = block * BLOCK_S + tl.arange(0, BLOCK_S)
        dims = tl.arange(0, HEAD_DIM)
        extra = tl.arange(0, BLOCK_M)
        row_ok = rows < seq_len
        extra_ok = extra < num_extra

        q = tl.load(
            q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_ss + dims[None, :] * q_sd,
            mask=row_ok[:, None], other=0.0,
        )  # fmt: skip
        k = tl.load(
            k_ptr + b * k_sb + h * k_sh + extra[:, None] * k_sm + dims[None, :] * k_sd,
            mask=extra_ok[:, None], other=0.0,
        )  # fmt: skip
        bias = tl.load(bias_ptr + extra, mask=extra_ok, other=0.0)
        # float32 dots: the kernel is bound by memory traffic, not by these tiny products.
        logits = (
            tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            + bias[None, :]
        )
        logits = tl.where(extra_ok[None, :], logits, float("-inf"))
        peak = tl.max(logits, axis=1)
        weights = tl.exp(logits - peak[:, None])
        total = tl.sum(weights, axis=1)
        lse_extra = peak + tl.log(total)

        v = tl.load(
            v_ptr + b * v_sb + h * v_sh + extra[:, None] * v_sm + dims[None, :] * v_sd,
            mask=extra_ok[:, None], other=0.0,
        )  # fmt: skip
        out_extra = tl.dot(weights, v.to(tl.float32), input_precision="ieee") / total[:, None]

        out = tl.load(
            out_ptr + b * o_sb + h * o_sh + rows[:, None] * o_ss + dims[None, :] * o_sd,
            mask=row_ok[:, None], other=0.0,
        ).to(tl.float32)  # fmt: skip
        lse_main = tl.load(lse_ptr + b * l_sb + h * l_sh + rows * l_ss, mask=row_ok, other=0.0)
        share = tl.sigmoid(lse_extra - lse_main)
        merged = out + share[:, None] * (out_extra - out)
        tl.store(
            result_ptr + b * r_sb + h * r_sh + rows[:, None] * r_ss + dims[None, :] * r_sd,
            merged.to(result_ptr.dtype.element_ty), mask=row_ok[:, None],
        )  # fmt: skip


def kernel_supports(q: torch.Tensor, extra_k: torch.Tensor) -> bool:
    """Head dims that are powers of two from 16 to 256 and at most 64 extra keys."""
    head_dim = q.shape[-1]
    return (
        triton is not None
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
        and extra_k.shape[2] <= 64
    )


def triton_merge_extra_keys(
    out_main: torch.Tensor,
    lse_main: torch.Tensor,
    q: torch.Tensor,
    extra_k: torch.Tensor,
    extra_v: torch.Tensor,
    extra_bias: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Same contract as ``model.attention.merge_extra_keys``; see ``kernel_supports``."""
    batch, heads, length, head_dim = q.shape
    num_extra = extra_k.shape[2]
    extra_k = extra_k.expand(batch, -1, -1, -1)
    extra_v = extra_v.expand(batch, -1, -1, -1)
    # (B, S, H, D) storage: the caller's transpose+flatten back to (B, S, H*D) is then free.
    result = torch.empty(batch, length, heads, head_dim, dtype=out_main.dtype, device=q.device)
    result = result.transpose(1, 2)
    block_s = 64 if head_dim <= 128 else 32
    block_m = max(16, triton.next_power_of_2(num_extra))
    grid = (triton.cdiv(length, block_s), batch * heads)
    _merge_kernel[grid](
        out_main, lse_main, q, extra_k, extra_v, extra_bias.float().contiguous(), result,
        length, heads, num_extra, scale,
        *out_main.stride(), *lse_main.stride(), *q.stride(), *extra_k.stride(),
        *extra_v.stride(), *result.stride(),
        HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_M=block_m,
    )  # fmt: skip
    return result
