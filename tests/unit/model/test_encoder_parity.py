"""Parity of ``MemoryEncoder`` with the official DiT-Mem reference (``encoder_golden_small``).

The golden file holds a reduced-width reference encoder's weights, inputs, per-block
intermediates and outputs. ``main`` pools a single temporal step to 4 tokens per clip (so the
tokens of a clip are identical, like the official model); ``t3`` keeps three temporal steps,
so its 4 tokens per clip differ.

Besides parity, the sensitivity tests below break one thing at a time (filter, token order,
normalisation) and check that the parity comparison notices, so a passing parity test means
something.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.encoder import MemoryEncoder
from model.errors import LatentShapeError
from model.tokens import ClipTokens, MemoryTokens

# Recommended tolerance for float32 implementations (fixtures README).
ATOL = RTOL = 1e-4
# A deliberately wrong variant must miss the reference by far more than the tolerance.
WRONG_MIN_DIFF = 1e-3

BANDS = ("high", "low")
BAND_MODULES = {"high": "high_pass_module", "low": "low_pass_module"}


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=RTOL)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def encoder(make_golden_encoder) -> MemoryEncoder:
    """The main fixture model; tests must not modify it (use ``make_golden_encoder``)."""
    return make_golden_encoder("main")


@pytest.fixture(scope="module")
def t3_encoder(make_golden_encoder) -> MemoryEncoder:
    return make_golden_encoder("t3")


@pytest.fixture(scope="module")
def x_n3(encoder_golden) -> torch.Tensor:
    """``(1, 3, 16, 13, 33, 49)``: one request with three memory clips."""
    return encoder_golden["input.n3"]


def band_module(encoder: MemoryEncoder, band: str):
    return getattr(encoder, BAND_MODULES[band])


# -- final outputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["n3", "n1"])
def test_main_output_matches_reference(encoder, encoder_golden, case):
    x = encoder_golden[f"input.{case}"]
    expected = encoder_golden[f"output.{case}"]
    out = encoder(x)
    assert out.shape == expected.shape
    assert_matches(out, expected)


def test_batch_of_two_requests_matches_reference(encoder, encoder_golden):
    # The fixture stores only the two halves of this input (see encoder_golden_small.json).
    x = torch.cat([encoder_golden["input.n1"], encoder_golden["input.n3"][:, :1]], dim=0)
    assert_matches(encoder(x), encoder_golden["output.b2n1"])


def test_t3_output_matches_reference(t3_encoder, encoder_golden):
    assert_matches(t3_encoder(encoder_golden["t3.input.n2"]), encoder_golden["t3.output.n2"])


def test_output_matches_float64_reference(encoder, encoder_golden, x_n3):
    assert_matches(encoder(x_n3), encoder_golden["output.n3.fp64ref"])


# -- per-clip resampler outputs -------------------------------------------------------------------

RESAMPLER_CASES = [
    pytest.param("main", "input.n3", "n3", id="main-n3"),
    pytest.param("main", "input.n1", "n1", id="main-n1"),
    pytest.param("t3", "t3.input.n2", "t3.{band}.n2", id="t3-n2"),
]


def _resampler_expected(encoder_golden, key: str, band: str) -> torch.Tensor:
    name = key.format(band=band) if "{band}" in key else f"{band}.{key}"
    return encoder_golden[name][0]  # fixture is (B=1, N, S, F)


@pytest.mark.parametrize(("variant", "input_key", "output_key"), RESAMPLER_CASES)
def test_resampler_outputs_match_reference(
    make_golden_encoder, encoder_golden, variant, input_key, output_key
):
    enc = make_golden_encoder(variant)
    clips = enc.resample(encoder_golden[input_key][0])
    assert isinstance(clips, ClipTokens)
    high, low = clips.expand()
    assert_matches(high, _resampler_expected(encoder_golden, output_key, "high"))
    assert_matches(low, _resampler_expected(encoder_golden, output_key, "low"))


# -- per-block intermediates (input.n3, clips folded into the batch) ------------------------------


@pytest.mark.parametrize("band", BANDS)
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("stage", ["conv", "fft_filter", "out"])
def test_block_intermediates_match_reference(encoder, encoder_golden, x_n3, band, block, stage):
    # Each stage is fed the reference's own input, so a failure points at that stage.
    block_input = x_n3[0] if block == 1 else encoder_golden[f"{band}.block1.out.n3"]
    conv_block = getattr(band_module(encoder, band), f"conv_block{block}")
    if stage == "conv":
        actual = conv_block.conv(block_input)
    elif stage == "fft_filter":
        actual = conv_block.fft_filter(encoder_golden[f"{band}.block{block}.conv.n3"])
    else:
        actual = conv_block(block_input)
    assert_matches(actual, encoder_golden[f"{band}.block{block}.{stage}.n3"])


# -- the two-step split (resample per clip, mix per request) --------------------------------------


def test_mix_of_resample_equals_forward(encoder, encoder_golden, x_n3):
    memory = encoder.mix(encoder.resample(x_n3[0]))
    assert isinstance(memory, MemoryTokens)
    assert_matches(memory.expand(), encoder(x_n3), atol=1e-6)
    assert_matches(memory.expand(), encoder_golden["output.n3"])


def test_clips_resampled_one_at_a_time_reproduce_the_request(encoder, encoder_golden, x_n3):
    # What the memory bank does: resample each clip at ingest, stack the retrieved ones later.
    cached = [encoder.resample(x_n3[0, i : i + 1]) for i in range(x_n3.shape[1])]
    memory = encoder.mix(ClipTokens.stack(cached))
    assert_matches(memory.expand(), encoder_golden["output.n3"])


def test_mix_of_a_batch_of_requests_matches_reference(encoder, encoder_golden):
    requests = [encoder_golden["input.n1"][0], encoder_golden["input.n3"][0, :1]]
    memory = encoder.mix([encoder.resample(x) for x in requests])
    assert memory.tokens.shape[0] == 2
    assert_matches(memory.expand(), encoder_golden["output.b2n1"])


# -- distinct tokens and multiplicities -----------------------------------------------------------


def test_main_pools_one_distinct_token_per_clip(encoder, x_n3):
    num_tokens = encoder.config.num_tokens
    assert encoder.token_counts.tolist() == [num_tokens]
    clips = encoder.resample(x_n3[0])
    num_clips = x_n3.shape[1]
    assert clips.high.shape == (num_clips, 1, encoder.config.token_dim)
    assert clips.counts.tolist() == [num_tokens]
    memory = encoder.mix(clips)
    assert memory.tokens.shape == (1, 2 * num_clips, encoder.config.token_dim)
    assert memory.counts.tolist() == [num_tokens] * (2 * num_clips)
    assert memory.num_expanded == 2 * num_clips * num_tokens


def test_t3_pools_distinct_tokens(t3_encoder, encoder_golden):
    num_tokens = t3_encoder.config.num_tokens
    assert t3_encoder.token_counts.tolist() == [1] * num_tokens
    x = encoder_golden["t3.input.n2"]
    clips = t3_encoder.resample(x[0])
    assert clips.high.shape[1] == num_tokens
    assert t3_encoder.mix(clips).counts.tolist() == [1] * (2 * x.shape[1] * num_tokens)


@pytest.mark.parametrize(("variant", "input_key"), [("main", "input.n3"), ("t3", "t3.input.n2")])
def test_compact_attention_equals_expanded_attention(
    make_golden_encoder, encoder_golden, variant, input_key
):
    enc = make_golden_encoder(variant)
    clips = enc.resample(encoder_golden[input_key][0])
    distinct = clips.high.flatten(0, 1).unsqueeze(0)  # (1, N*U, F), clip-major
    counts = clips.counts.repeat(clips.num_clips)
    expanded = distinct.repeat_interleave(counts, dim=1)
    assert_matches(expanded[0], clips.expand()[0].flatten(0, 1), atol=0.0)

    dense = enc.self_attention(expanded)
    compact = enc.self_attention(distinct, counts.float().log())
    assert_matches(compact.repeat_interleave(counts, dim=1), dense, atol=1e-5)


def test_log_count_bias_matters_for_unequal_counts(encoder, x_n3):
    # With equal counts the bias is a constant shift and cancels in the softmax; with unequal
    # counts it must stand in for the duplicates exactly, and leaving it out must show.
    distinct = encoder.resample(x_n3[0]).high.flatten(0, 1).unsqueeze(0)  # 3 distinct tokens
    counts = torch.tensor([5, 1, 6])
    dense = encoder.self_attention(distinct.repeat_interleave(counts, dim=1))
    compact = encoder.self_attention(distinct, counts.float().log())
    assert_matches(compact.repeat_interleave(counts, dim=1), dense, atol=1e-5)
    unbiased = encoder.self_attention(distinct).repeat_interleave(counts, dim=1)
    assert max_abs_diff(unbiased, dense) > WRONG_MIN_DIFF


def pooled_multiplicities(length: int, num_outputs: int) -> list[int]:
    """Run lengths of equal rows of ``adaptive_avg_pool1d`` applied to a one-hot basis."""
    rows = F.adaptive_avg_pool1d(torch.eye(length).unsqueeze(0), num_outputs)[0].T
    counts = [1]
    for previous, row in zip(rows, rows[1:], strict=False):
        if torch.equal(previous, row):
            counts[-1] += 1
        else:
            counts.append(1)
    return counts


def expanded_reference_forward(enc: MemoryEncoder, x: torch.Tensor) -> torch.Tensor:
    """The reference's computation, duplicates included, from the encoder's own modules."""
    bands = []
    for band in BANDS:
        resampler = band_module(enc, band)
        tokens = resampler.feature_proj(resampler.features(x[0]))  # (N, num_tokens, F)
        bands.append(enc.self_attention(tokens.flatten(0, 1).unsqueeze(0)))
    return torch.cat(bands, dim=1)


GOLDEN_IO = {"main": ("input.n3", "output.n3"), "t3": ("t3.input.n2", "t3.output.n2")}


@pytest.mark.parametrize(
    ("variant", "num_tokens"),
    [
        pytest.param("main", 4, id="main"),
        pytest.param("t3", 4, id="t3"),
        # Three temporal steps pooled to 7 tokens: windows repeat unevenly, so the log-count
        # bias in the shared attention is not a constant shift that the softmax cancels.
        pytest.param("t3", 7, id="t3-uneven"),
    ],
)
def test_counts_follow_the_pooling_windows(
    request, golden_encoder_config, golden_encoder_state, encoder_golden, variant, num_tokens
):
    enc = MemoryEncoder(**{**golden_encoder_config(variant), "num_tokens": num_tokens}).eval()
    enc.load_state_dict(golden_encoder_state(variant))  # num_tokens changes no weight shape
    input_key, output_key = GOLDEN_IO[variant]
    x = encoder_golden[input_key]

    expected_counts = pooled_multiplicities(enc.high_pass_module.cnn_output_shape[0], num_tokens)
    if request.node.callspec.id == "t3-uneven":
        assert len(set(expected_counts)) > 1
    assert enc.token_counts.tolist() == expected_counts
    memory = enc.encode(x)
    assert memory.counts.tolist() == expected_counts * (2 * x.shape[1])
    assert_matches(memory.expand(), expanded_reference_forward(enc, x), atol=1e-5)
    if num_tokens == golden_encoder_config(variant)["num_tokens"]:
        assert_matches(memory.expand(), encoder_golden[output_key])


# -- sensitivity: a wrong encoder must fail the parity comparison ---------------------------------


def _filters(enc: MemoryEncoder, band: str):
    module = band_module(enc, band)
    return [module.conv_block1.fft_filter, module.conv_block2.fft_filter]


def _swap_band_filters(enc: MemoryEncoder) -> None:
    for high, low in zip(_filters(enc, "high"), _filters(enc, "low"), strict=True):
        swapped = low.complex_weight.clone()
        low.complex_weight.copy_(high.complex_weight)
        high.complex_weight.copy_(swapped)


def _high_filter_from_low_band(enc: MemoryEncoder) -> None:
    high, low = _filters(enc, "high")[0], _filters(enc, "low")[0]
    high.complex_weight.copy_(low.complex_weight)


def _drop_filter_imaginary_part(enc: MemoryEncoder) -> None:
    for band in BANDS:
        for fft_filter in _filters(enc, band):
            fft_filter.complex_weight[..., 1] = 0.0


@pytest.mark.parametrize(
    "perturb", [_swap_band_filters, _high_filter_from_low_band, _drop_filter_imaginary_part]
)
def test_perturbed_filter_breaks_parity(make_golden_encoder, encoder_golden, x_n3, perturb):
    enc = make_golden_encoder("main")
    assert_matches(enc(x_n3), encoder_golden["output.n3"])
    perturb(enc)
    assert max_abs_diff(enc(x_n3), encoder_golden["output.n3"]) > WRONG_MIN_DIFF


def _reversed_clips(enc: MemoryEncoder, x: torch.Tensor) -> torch.Tensor:
    return enc(x.flip(1))


def _clip_major_across_bands(enc: MemoryEncoder, x: torch.Tensor) -> torch.Tensor:
    # [clip0 high, clip0 low, clip1 high, ...] instead of [all high, then all low].
    memory = enc.encode(x)
    num_clips = x.shape[1]
    per_band = memory.tokens.shape[1] // 2
    order = torch.arange(2 * per_band).view(2, per_band).T.reshape(-1)
    assert per_band == num_clips  # one distinct token per clip and band
    return MemoryTokens(memory.tokens[:, order], memory.counts[order]).expand()


def _tiled_instead_of_repeated(enc: MemoryEncoder, x: torch.Tensor) -> torch.Tensor:
    # Duplicates laid out as t0 t1 t2 t0 t1 t2 ... instead of t0 t0 ... t1 t1 ...
    memory = enc.encode(x)
    return memory.tokens.repeat(1, int(memory.counts[0]), 1)


@pytest.mark.parametrize(
    "wrong_forward", [_reversed_clips, _clip_major_across_bands, _tiled_instead_of_repeated]
)
def test_wrong_token_order_breaks_parity(encoder, encoder_golden, x_n3, wrong_forward):
    expected = encoder_golden["output.n3"]
    wrong = wrong_forward(encoder, x_n3)
    assert wrong.shape == expected.shape
    # Same multiset of tokens, different order: only the layout is wrong.
    assert_matches(wrong.sort(dim=1).values, encoder(x_n3).sort(dim=1).values)
    assert max_abs_diff(wrong, expected) > WRONG_MIN_DIFF


def _unused_bn_instead_of_filter_norm(enc: MemoryEncoder) -> None:
    for band in BANDS:
        module = band_module(enc, band)
        for block in (module.conv_block1, module.conv_block2):
            block.fft_filter.norm.load_state_dict(block.bn.state_dict())


def _default_filter_norm_statistics(enc: MemoryEncoder) -> None:
    for band in BANDS:
        for fft_filter in _filters(enc, band):
            fft_filter.norm.reset_running_stats()


def _large_rms_norm_eps(enc: MemoryEncoder) -> None:
    enc.self_attention.norm_q.eps = 1.0
    enc.self_attention.norm_k.eps = 1.0


@pytest.mark.parametrize(
    "perturb",
    [_unused_bn_instead_of_filter_norm, _default_filter_norm_statistics, _large_rms_norm_eps],
)
def test_wrong_normalisation_breaks_parity(make_golden_encoder, encoder_golden, x_n3, perturb):
    enc = make_golden_encoder("main")
    perturb(enc)
    assert max_abs_diff(enc(x_n3), encoder_golden["output.n3"]) > WRONG_MIN_DIFF


# -- latent shape contract ------------------------------------------------------------------------


def _filter_buffers(enc: MemoryEncoder) -> dict[str, torch.Tensor]:
    return {
        name: buffer.clone()
        for name, buffer in enc.named_buffers()
        if name.endswith("complex_weight")
    }


@pytest.mark.parametrize("axis", [-3, -2, -1], ids=["depth", "height", "width"])
def test_other_latent_shape_is_rejected_and_filters_untouched(encoder, encoder_golden, x_n3, axis):
    bad = x_n3.narrow(axis, 0, x_n3.shape[axis] - 1)
    before = _filter_buffers(encoder)
    fingerprint = encoder.fingerprint()

    with pytest.raises(LatentShapeError) as excinfo:
        encoder(bad)
    message = str(excinfo.value)
    assert str(encoder.latent_shape) in message
    assert str(tuple(bad.shape[-4:])) in message

    with pytest.raises(LatentShapeError):
        encoder.resample(bad[0])

    after = _filter_buffers(encoder)
    assert before.keys() == after.keys() and len(before) == 4
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert encoder.fingerprint() == fingerprint
    assert_matches(encoder(x_n3), encoder_golden["output.n3"])


def test_frequency_filter_rejects_another_grid(encoder, encoder_golden):
    fft_filter = encoder.high_pass_module.conv_block1.fft_filter
    conv_out = encoder_golden["high.block1.conv.n3"]
    wrong = conv_out[..., :-1]
    with pytest.raises(LatentShapeError) as excinfo:
        fft_filter(wrong)
    assert str(tuple(conv_out.shape[2:])) in str(excinfo.value)
    assert str(tuple(wrong.shape[2:])) in str(excinfo.value)


def test_resample_requires_clip_axis(encoder, x_n3):
    with pytest.raises(LatentShapeError):
        encoder.resample(x_n3[0, 0])


# -- reduced precision ----------------------------------------------------------------------------


def test_bfloat16_encoder_is_close_to_float32(make_golden_encoder, encoder_golden, x_n3):
    enc = make_golden_encoder("main").to(torch.bfloat16)
    out = enc(x_n3.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    expected = encoder_golden["output.n3"]
    relative = (out.float() - expected).norm() / expected.norm()
    assert relative < 5e-2
    assert max_abs_diff(out, expected) < 5e-2 * expected.abs().max()

    clips = enc.resample(x_n3[0])
    assert clips.high.dtype == torch.bfloat16
    high, _ = clips.expand()
    assert max_abs_diff(high, encoder_golden["high.n3"][0]) < 5e-2 * high.float().abs().max()


def test_mix_moves_cached_tokens_to_the_encoder_device_and_dtype(
    make_golden_encoder, encoder_golden
):
    encoder = make_golden_encoder("main").to(torch.float64)
    clips = encoder.resample(encoder_golden["input.n3"][0].double())
    cpu_float = ClipTokens(clips.high.float(), clips.low.float(), clips.counts)
    mixed = encoder.mix([cpu_float, cpu_float])
    assert mixed.tokens.dtype == torch.float64
    assert mixed.tokens.device == encoder.device


def test_forward_rejects_a_single_clip_tensor_with_a_clear_message(
    make_golden_encoder, encoder_golden
):
    encoder = make_golden_encoder("main")
    with pytest.raises(LatentShapeError, match=r"\(B, N, C, D, H, W\)"):
        encoder(encoder_golden["input.n3"][0])


def test_memory_tokens_reject_non_positive_counts():
    with pytest.raises(ValueError, match="count"):
        MemoryTokens(torch.zeros(1, 2, 4), torch.tensor([1, 0]))
