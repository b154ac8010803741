"""The Triton merge kernel equals the eager merge (run by Triton's interpreter on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.kernels import triton_available

REPO_ROOT = Path(__file__).resolve().parents[3]

CHECK = """
import math, torch
from model.attention import attention_with_lse, merge_extra_keys
from model.kernels import triton_merge_extra_keys
torch.manual_seed(0)
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    for batch_k, num_extra in ((1, 10), (2, 3)):
        B, H, S, D = 2, 3, 100, 32
        q = torch.randn(B, S, H, D).to(dtype).transpose(1, 2)  # the processor's strided layout
        k, v = torch.randn(B, H, S, D).to(dtype), torch.randn(B, H, S, D).to(dtype)
        ek = torch.randn(batch_k, H, num_extra, D).to(dtype)
        ev = torch.randn(batch_k, H, num_extra, D).to(dtype)
        bias = torch.log(torch.randint(1, 100, (num_extra,)).float())
        out, lse = attention_with_lse(q, k, v, 1 / math.sqrt(D))
        expected = merge_extra_keys(out, lse, q, ek, ev, bias, 1 / math.sqrt(D))
        got = triton_merge_extra_keys(out, lse, q, ek, ev, bias, 1 / math.sqrt(D))
        error = (expected.float() - got.float()).abs().max().item()
        assert got.shape == expected.shape and got.dtype == dtype
        assert error < tol, (dtype, batch_k, num_extra, error)
        # a wrong bias must be visible, or the comparison proves nothing
        wrong = triton_merge_extra_keys(out, lse, q, ek, ev, bias * 0, 1 / math.sqrt(D))
        assert (expected.float() - wrong.float()).abs().max().item() > 10 * tol
print("ok")
"""


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_merge_matches_eager_merge_in_the_interpreter():
    completed = subprocess.run(
        [sys.executable, "-c", CHECK],
        cwd=REPO_ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().endswith("ok")
