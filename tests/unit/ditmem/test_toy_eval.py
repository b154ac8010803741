"""The product's central claim, asserted on the shipped toy weights: retrieved clips of a
motion steer the frozen generator to that motion, while the prompt keeps the colour."""

from __future__ import annotations

import pytest

from ditmem.toy import ToyEvalConfig, run_toy_eval
from model.pipeline import MemoryWanPipeline
from model.toy.components import build_toy_components, new_memory_encoder


def toy_pipe(**overrides) -> MemoryWanPipeline:
    pipe = MemoryWanPipeline(**(build_toy_components() | overrides))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def report():
    """The toy preset as served: memory guidance on."""
    return run_toy_eval(toy_pipe(), ToyEvalConfig(samples=128))


# The goal. The shipped weights measure +39.1 points on these 128 samples (+42.2 on 512;
# docs/benchmarks.md), a margin of 11 samples for floating-point differences between CPUs.
MIN_GAIN = 0.30
# Memory in both guidance branches (the reference behaviour, used by the real preset) measures
# +29.7 here and +28.9 on 512 samples; a lower bar for that path.
MIN_GAIN_REFERENCE_MODE = 0.20


def test_right_memory_lowers_the_denoising_loss_below_wrong_memory(report) -> None:
    assert report.losses["right"] < report.losses["wrong"]


def test_memory_raises_motion_accuracy(report) -> None:
    assert report.memory_gain >= MIN_GAIN, report.table()


def test_colour_comes_from_the_prompt_in_every_condition(report) -> None:
    for condition in report.conditions:
        assert condition.colour_accuracy >= 0.95, report.table()


def test_wrong_memory_is_followed_more_often_than_chance(report) -> None:
    assert report.condition("wrong").follows_memory > report.chance, report.table()


def test_memory_in_both_guidance_branches_still_steers_the_motion() -> None:
    reference = run_toy_eval(toy_pipe(), ToyEvalConfig(samples=128, memory_guidance=False))
    assert reference.memory_gain >= MIN_GAIN_REFERENCE_MODE, reference.table()
    assert reference.losses["right"] < reference.losses["wrong"]


def test_an_untrained_encoder_does_not_pass_the_bar() -> None:
    # The same eval with a freshly initialised encoder: memory tokens that carry nothing the
    # backbone can use give no gain, so the thresholds above really measure the encoder.
    untrained = run_toy_eval(
        toy_pipe(memory_encoder=new_memory_encoder(seed=1).eval()), ToyEvalConfig(samples=32)
    )
    assert untrained.memory_gain < MIN_GAIN, untrained.table()
