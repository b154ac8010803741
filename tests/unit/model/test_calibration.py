"""BatchNorm calibration: exact statistics of the filters' inputs, saved with every buffer."""

from __future__ import annotations

from pathlib import Path

import torch

from model.calibration import calibrate_batchnorm, used_batchnorms
from model.encoder import MemoryEncoder
from model.loading import load_memory_encoder, save_memory_encoder
from model.tiny import TINY_ENCODER_CONFIG


def encoder() -> MemoryEncoder:
    torch.manual_seed(0)
    return MemoryEncoder(**TINY_ENCODER_CONFIG).eval()


def latents(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shape = (n, TINY_ENCODER_CONFIG["in_channels"], *TINY_ENCODER_CONFIG["latent_shape"])
    # Offset and scaled, so that correct statistics are far from the defaults (0, 1).
    return 0.7 + 2.5 * torch.randn(shape, generator=generator)


def test_statistics_are_the_exact_average_over_all_clips(tmp_path: Path) -> None:
    model = encoder()
    batches = [latents(3, 1), latents(2, 2)]
    # The first used BatchNorm's input is the first filter's residual sum; capture it.
    first = model.high_pass_module.conv_block1.fft_filter.norm
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    report = calibrate_batchnorm(model, lambda: batches)
    handle.remove()

    inputs = torch.cat(seen[: len(batches)])  # first pass: (5, C, D, H, W)
    channels = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
    torch.testing.assert_close(first.running_mean, channels.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first.running_var, channels.var(dim=1), rtol=1e-4, atol=1e-5)
    assert report.clips == 5
    assert {n.name for n in report.norms} == set(used_batchnorms(model))
    assert max(n.max_abs_mean for n in report.norms) > 0.1  # the defaults were off
    assert not model.training and not first.training


def test_deeper_filter_sees_inputs_normalised_with_calibrated_statistics() -> None:
    model = encoder()
    batches = [latents(4, 5)]
    calibrate_batchnorm(model, lambda: batches)
    second = model.low_pass_module.conv_block2.fft_filter.norm
    seen: list[torch.Tensor] = []
    handle = second.register_forward_pre_hook(lambda _, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model.resample(batches[0])
    handle.remove()
    channels = seen[0].transpose(0, 1).reshape(seen[0].shape[1], -1)
    torch.testing.assert_close(second.running_mean, channels.mean(dim=1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(second.running_var, channels.var(dim=1), rtol=1e-4, atol=1e-5)


def test_order_of_clips_does_not_matter() -> None:
    a, b = encoder(), encoder()
    calibrate_batchnorm(a, lambda: [latents(3, 1), latents(2, 2)])
    calibrate_batchnorm(b, lambda: [latents(2, 2), latents(3, 1)])
    for name, bn in used_batchnorms(a).items():
        other = used_batchnorms(b)[name]
        torch.testing.assert_close(bn.running_mean, other.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, other.running_var, rtol=1e-5, atol=1e-6)


def test_calibrated_encoder_round_trips_with_its_buffers(tmp_path: Path) -> None:
    model = encoder()
    before = model.fingerprint()
    calibrate_batchnorm(model, lambda: [latents(4, 3)])
    assert model.fingerprint() != before  # cached bank tokens become stale, as they must
    loaded = load_memory_encoder(save_memory_encoder(model, tmp_path / "calibrated"))
    assert loaded.fingerprint() == model.fingerprint()
    x = latents(2, 4)
    torch.testing.assert_close(loaded.resample(x).high, model.resample(x).high)
    # The unused `.bn` modules (kept for checkpoint compatibility) stay at their defaults.
    unused = model.high_pass_module.conv_block1.bn
    assert torch.equal(unused.running_mean, torch.zeros_like(unused.running_mean))
