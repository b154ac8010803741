"""``model.attention``: softmax over video keys plus biased extra keys, merged by log-sum-exp.

Every result is compared with plain attention over the concatenated keys
(``reference_attention``) or with explicit ``logsumexp``/``softmax`` maths: without gradients
(the fused log-sum-exp path) and with gradients, where values and gradients must both match.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_dispatch import AttentionBackendName
from torch.nn.attention import SDPBackend

from model.attention import (
    UnsupportedAttentionBackend,
    attention_with_extra_keys,
    attention_with_lse,
    reference_attention,
    sdpa_kernel_for_backend,
)

# (batch, heads, queries, video keys, extra keys, head dim)
SHAPES = [
    pytest.param((2, 3, 7, 5, 3, 8), id="small"),
    pytest.param((1, 4, 48, 48, 12, 24), id="fixture-dit"),
    pytest.param((2, 2, 9, 16, 1, 5), id="odd-head-dim"),
]


def make_inputs(shape, *, extra_batch: int | None = None, seed: int = 0):
    batch, heads, queries, keys, extra, dim = shape
    generator = torch.Generator().manual_seed(seed)

    def randn(*size):
        return torch.randn(size, generator=generator)

    extra_batch = batch if extra_batch is None else extra_batch
    return dict(
        q=randn(batch, heads, queries, dim),
        k=randn(batch, heads, keys, dim),
        v=randn(batch, heads, keys, dim),
        extra_k=randn(extra_batch, heads, extra, dim),
        extra_v=randn(extra_batch, heads, extra, dim),
        extra_bias=randn(extra),
    )


def concatenated_reference(q, k, v, extra_k, extra_v, extra_bias):
    """One plain softmax over ``[k; extra_k]`` with ``extra_bias`` on the extra keys only."""
    extra_k = extra_k.expand(q.shape[0], -1, -1, -1)
    extra_v = extra_v.expand(q.shape[0], -1, -1, -1)
    bias = torch.cat([torch.zeros(k.shape[2]), extra_bias])
    return reference_attention(
        q, torch.cat([k, extra_k], dim=2), torch.cat([v, extra_v], dim=2), bias
    )


def explicit_logits(q, k):
    return torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])


# -- attention_with_extra_keys --------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared_extra", [False, True], ids=["per-batch-extra", "shared-extra"])
def test_extra_keys_equal_concatenated_attention_no_grad(shape, shared_extra):
    inputs = make_inputs(shape, extra_batch=1 if shared_extra else None)
    with torch.no_grad():
        out = attention_with_extra_keys(**inputs)
        expected = concatenated_reference(**inputs)
    assert out.shape == inputs["q"].shape
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# Which inputs need gradients: everything (the video q/k/v too, as in a DiT block after a block
# that saw memory) or only the memory keys/values (a frozen DiT in front of a trained encoder).
GRAD_CASES = {
    "all": ("q", "k", "v", "extra_k", "extra_v"),
    "extra-only": ("extra_k", "extra_v"),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_extra_keys_with_grad_match_values_and_gradients(shape, case):
    trainable = GRAD_CASES[case]
    inputs = make_inputs(shape, extra_batch=1)
    ours = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    theirs = {name: t.clone().requires_grad_(name in trainable) for name, t in inputs.items()}
    weights = torch.randn(inputs["q"].shape, generator=torch.Generator().manual_seed(1))

    with torch.enable_grad():
        out = attention_with_extra_keys(**ours)
        expected = concatenated_reference(**theirs)
        assert out.requires_grad
        (out * weights).sum().backward()
        (expected * weights).sum().backward()

    torch.testing.assert_close(out.detach(), expected.detach(), atol=1e-5, rtol=1e-5)
    for name in trainable:
        grad = ours[name].grad
        assert grad is not None, f"no gradient reached {name}"
        assert grad.abs().max() > 0, f"zero gradient for {name}"
        torch.testing.assert_close(grad, theirs[name].grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["none", *sorted(GRAD_CASES)])
def test_log_count_bias_equals_repeated_keys(case):
    trainable = GRAD_CASES.get(case, ())
    inputs = make_inputs((2, 3, 11, 6, 3, 8))
    inputs = {name: t.requires_grad_(name in trainable) for name, t in inputs.items()}
    counts = torch.tensor([3, 1, 2])
    repeated = dict(
        inputs,
        extra_k=inputs["extra_k"].repeat_interleave(counts, dim=2),
        extra_v=inputs["extra_v"].repeat_interleave(counts, dim=2),
        extra_bias=torch.zeros(int(counts.sum())),
    )
    with torch.set_grad_enabled(bool(trainable)):
        compact = attention_with_extra_keys(**dict(inputs, extra_bias=counts.float().log()))
        explicit = attention_with_extra_keys(**repeated)
        expected = concatenated_reference(**repeated)
    torch.testing.assert_close(compact, explicit, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(compact, expected, atol=1e-5, rtol=1e-5)
    # The duplicates change the result, so the equality above is not vacuous.
    with torch.no_grad():
        once = attention_with_extra_keys(**dict(inputs, extra_bias=torch.zeros(3)))
    assert (once - expected).abs().max() > 1e-3


@pytest.mark.parametrize("bias", [40.0, -40.0])
def test_extreme_bias_is_numerically_stable(bias):
    inputs = make_inputs((1, 2, 6, 5, 2, 8))
    inputs["extra_bias"] = torch.full((2,), bias)
    with torch.no_grad():
        out = attention_with_extra_keys(**inputs)
        expected = concatenated_reference(**inputs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_bfloat16_is_close_to_float32():
    inputs = make_inputs((2, 3, 16, 12, 3, 32))
    with torch.no_grad():
        expected = concatenated_reference(**inputs)
        low = {k: (v if k == "extra_bias" else v.bfloat16()) for k, v in inputs.items()}
        out = attention_with_extra_keys(**low)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


# -- attention_with_lse ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_lse_equals_logsumexp_of_logits(shape):
    inputs = make_inputs(shape)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scale = 1.0 / math.sqrt(q.shape[-1])
    with torch.no_grad():
        out, lse = attention_with_lse(q, k, v, scale)
    logits = explicit_logits(q, k)
    assert lse.shape == q.shape[:3]
    assert lse.dtype == torch.float32
    assert out.dtype == q.dtype
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ v, atol=1e-5, rtol=1e-5)


def test_lse_bfloat16_returns_float32_lse():
    inputs = make_inputs((1, 2, 16, 16, 1, 32))
    q, k, v = (inputs[name].bfloat16() for name in ("q", "k", "v"))
    with torch.no_grad():
        out, lse = attention_with_lse(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    assert out.dtype == torch.bfloat16
    assert lse.dtype == torch.float32
    logits = explicit_logits(q, k)
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=-1), atol=2e-2, rtol=2e-2)


# -- diffusers attention backends ----------------------------------------------------------------

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("backend", "kernel"),
    [
        ("native", None),
        (AttentionBackendName.NATIVE, None),
        ("_native_flash", SDPBackend.FLASH_ATTENTION),
        ("_native_math", SDPBackend.MATH),
    ],
)
def test_pytorch_backends_map_to_their_sdpa_kernel(backend, kernel):
    assert sdpa_kernel_for_backend(backend, CPU) == kernel


@pytest.mark.parametrize("backend", ["flex", "flash", "sage", "xformers", "_native_npu"])
def test_backends_without_a_usable_log_sum_exp_are_refused_by_name(backend):
    with pytest.raises(UnsupportedAttentionBackend, match=f"'{backend}'"):
        sdpa_kernel_for_backend(backend, CPU)


@pytest.mark.parametrize("backend", ["_native_cudnn", "_native_efficient"])
def test_cuda_only_kernels_are_refused_off_cuda(backend):
    with pytest.raises(UnsupportedAttentionBackend, match="CUDA"):
        sdpa_kernel_for_backend(backend, CPU)
    assert sdpa_kernel_for_backend(backend, torch.device("cuda")) is not None


@pytest.mark.parametrize("shape", SHAPES)
def test_forced_kernels_equal_the_default_on_cpu(shape):
    inputs = make_inputs(shape)
    with torch.no_grad():
        default = attention_with_extra_keys(**inputs)
        flash = attention_with_extra_keys(**inputs, kernel=SDPBackend.FLASH_ATTENTION)
        math_kernel = attention_with_extra_keys(**inputs, kernel=SDPBackend.MATH)
    assert torch.equal(flash, default)  # the CPU kernel with a log-sum-exp is flash anyway
    torch.testing.assert_close(math_kernel, concatenated_reference(**inputs), atol=1e-5, rtol=1e-5)
