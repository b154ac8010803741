"""Where the time of compact memory attention goes, at the 1.3B shape (GPU only).

Checks each log-sum-exp kernel against plain math, then times: SDPA as stock diffusers calls it,
the log-sum-exp kernel alone, and the full compact memory attention.

    python -m bench.gpu_attention
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

from model.attention import (
    _cuda_backend,
    attention_with_extra_keys,
    attention_with_lse,
    merge_extra_keys,
)


def _time(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1000


def main() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}

    # correctness on a small problem against float64 math
    q, k, v = (
        torch.randn(2, 4, 300, 64, device=device, dtype=dtype, generator=gen) for _ in range(3)
    )
    ek, ev = (
        torch.randn(1, 4, 10, 64, device=device, dtype=dtype, generator=gen) for _ in range(2)
    )
    bias = torch.log(torch.full((10,), 100.0, device=device))
    logits = (
        torch.cat(
            [
                q.double() @ k.double().transpose(-1, -2),
                q.double() @ ek.double().transpose(-1, -2).expand(2, -1, -1, -1),
            ],
            -1,
        )
        / 8
    )
    logits[..., 300:] += bias.double()
    exact = torch.softmax(logits, -1) @ torch.cat([v, ev.expand(2, -1, -1, -1)], 2).double()
    got = attention_with_extra_keys(q, k, v, ek, ev, bias)
    report["small_max_abs_err_vs_fp64"] = (got.double() - exact).abs().max().item()
    out, lse = attention_with_lse(q, k, v, 1 / 8)
    report["small_lse_max_abs_err"] = (
        (lse.double() - torch.logsumexp(logits[..., :300], -1)).abs().max().item()
    )
    report["small_backend"] = _cuda_backend(q, k, v, 1 / 8).name

    # the 1.3B shape: 832x480x81 -> 32760 tokens, 12 heads of 128
    q, k, v = (
        torch.randn(1, 12, 32760, 128, device=device, dtype=dtype, generator=gen) for _ in range(3)
    )
    ek, ev = (
        torch.randn(1, 12, 10, 128, device=device, dtype=dtype, generator=gen) for _ in range(2)
    )
    bias = torch.log(torch.full((10,), 100.0, device=device))
    report["backend"] = _cuda_backend(q, k, v, 128**-0.5).name
    sdpa = _time(lambda: F.scaled_dot_product_attention(q, k, v))
    with_lse = _time(lambda: attention_with_lse(q, k, v, 128**-0.5))
    compact = _time(lambda: attention_with_extra_keys(q, k, v, ek, ev, bias))
    kk, vv = (
        torch.cat([k, ek.repeat_interleave(100, 2)], 2),
        torch.cat([v, ev.repeat_interleave(100, 2)], 2),
    )
    expanded_kv = _time(lambda: F.scaled_dot_product_attention(q, kk, vv))
    out, lse = attention_with_lse(q, k, v, 128**-0.5)
    merge = _time(lambda: merge_extra_keys(out, lse, q, ek, ev, bias, 128**-0.5))
    try:
        compiled = torch.compile(merge_extra_keys, fullgraph=True)
        fused = compiled(out, lse, q, ek, ev, bias, 128**-0.5)
        report["compiled_merge_max_abs_diff"] = (
            (fused.float() - merge_extra_keys(out, lse, q, ek, ev, bias, 128**-0.5).float())
            .abs()
            .max()
            .item()
        )
        merge_compiled = _time(lambda: compiled(out, lse, q, ek, ev, bias, 128**-0.5))
    except Exception as error:  # noqa: BLE001 - report, don't fail the run
        report["compile_error"] = repr(error)[:300]
        merge_compiled = float("nan")
    mask = torch.cat([torch.zeros(32760, device=device), bias]).to(dtype).view(1, 1, 1, -1)
    kk10, vv10 = torch.cat([k, ek], 2), torch.cat([v, ev], 2)
    try:
        report["masked_backend"] = SDPBackend(
            torch._fused_sdp_choice(q, kk10, vv10, mask, 0.0, False, scale=128**-0.5)
        ).name
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        masked = _time(lambda: F.scaled_dot_product_attention(q, kk10, vv10, attn_mask=mask))
        report["masked_peak_extra_gb"] = (torch.cuda.max_memory_allocated() - before) / 1e9
    except Exception as error:  # noqa: BLE001
        report["masked_error"] = repr(error)[:300]
        masked = float("nan")
    report["ms"] = {
        "sdpa_10_keys_bias_mask": masked * 1e3,
        "merge_only": merge * 1e3,
        "merge_only_compiled": merge_compiled * 1e3,
        "sdpa_no_memory": sdpa * 1e3,
        "lse_kernel_no_memory": with_lse * 1e3,
        "compact_memory": compact * 1e3,
        "sdpa_1000_memory_kv_appended": expanded_kv * 1e3,
    }
    report["compact_overhead_vs_sdpa"] = compact / sdpa - 1
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
