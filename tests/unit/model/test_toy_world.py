"""The toy world and its judge: clips are what they claim, and the classifier reads them back."""

from __future__ import annotations

import torch

from model.toy.classify import colour_of, motion_of, read, track
from model.toy.world import (
    COLOURS,
    FRAMES,
    MARGIN,
    MOTIONS,
    SIZE,
    render,
    render_one,
    sample_spec,
)


def specs(n: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [sample_spec(generator) for _ in range(n)]


def test_clips_have_the_documented_shape_range_and_stay_in_frame() -> None:
    clips = specs(200, 0)
    videos = render(clips)
    assert videos.shape == (200, 3, FRAMES, SIZE, SIZE)
    assert videos.min() >= -1.0 and videos.max() <= 1.0
    for spec in clips:
        for x, y in spec.centres:
            assert MARGIN - 1e-6 <= x <= SIZE - 1 - MARGIN + 1e-6
            assert MARGIN - 1e-6 <= y <= SIZE - 1 - MARGIN + 1e-6
    # Background is black: most pixels are exactly -1.
    assert (videos == -1.0).float().mean() > 0.8


def test_a_seed_fixes_a_clip_and_captions_name_the_motion_prompts_do_not() -> None:
    a, b = specs(5, 3), specs(5, 3)
    assert a == b
    spec = a[0]
    assert spec.caption == f"a {spec.colour} ball {spec.motion}"
    assert spec.prompt == f"a {spec.colour} ball"
    assert spec.motion not in spec.prompt


def test_classifier_reads_ground_truth_at_least_99_percent() -> None:
    clips = specs(2000, 1)
    readings = [read(v) for v in render(clips)]
    motion = sum(r.motion == s.motion for r, s in zip(readings, clips, strict=True)) / len(clips)
    colour = sum(r.colour == s.colour for r, s in zip(readings, clips, strict=True)) / len(clips)
    assert motion >= 0.99, motion
    assert colour >= 0.99, colour
    # Every motion and colour occurs, so a classifier stuck on one answer cannot pass.
    assert {s.motion for s in clips} == set(MOTIONS)
    assert {s.colour for s in clips} == set(COLOURS)


def test_tracked_centres_match_the_rendered_centres() -> None:
    for spec in specs(50, 2):
        centres = track(render_one(spec))
        assert centres is not None
        for (x, y), (tx, ty) in zip(centres, spec.centres, strict=True):
            assert abs(x - tx) < 0.25 and abs(y - ty) < 0.25


def test_a_vanishing_ball_is_wrong_not_a_guess() -> None:
    generator = torch.Generator().manual_seed(4)
    video = render_one(sample_spec(generator, "red", "falling"))
    video[:, 5] = -1.0  # the ball disappears in frame 5
    reading = read(video)
    assert reading.motion is None and reading.colour is None


def test_incoherent_or_still_balls_have_no_motion() -> None:
    assert motion_of([(8.0, 8.0)] * FRAMES) is None  # still
    jumping = [(4.0, 4.0), (11.0, 11.0)] * (FRAMES // 2)
    assert motion_of(jumping) is None
    diagonal = [(3.0 + f, 3.0 + f) for f in range(FRAMES)]
    assert motion_of(diagonal) is None


def test_colour_of_blank_clip_is_none() -> None:
    assert colour_of(torch.full((3, FRAMES, SIZE, SIZE), -1.0)) is None
