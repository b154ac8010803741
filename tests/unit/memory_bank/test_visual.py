"""Visual retrieval: a tiny random-init open_clip model loaded offline from a local checkpoint."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import av
import numpy as np
import open_clip
import pytest
import torch

from memory_bank.visual import ClipVisualEmbedder, fuse_scores, read_keyframes
from model.errors import InvalidClip
from model.preprocess import sample_frame_indices
from tests.media import moving_square, write_clip

TINY = "ditmem-test-tiny-clip"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _forbid_network(mp: pytest.MonkeyPatch) -> None:
    """Make any hub access or socket connection fail loudly instead of silently downloading."""
    mp.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(open_clip.factory, "download_pretrained", refuse)
    mp.setattr(open_clip.factory, "download_pretrained_from_hf", refuse)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_network(monkeypatch)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A random-init tiny CLIP registered with open_clip, and its state dict saved to a .pt."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY).eval()
    checkpoint = folder / "tiny_weights.pt"
    torch.save(model.state_dict(), checkpoint)
    return model, checkpoint


@pytest.fixture(scope="module")
def embedder(tiny_model) -> ClipVisualEmbedder:
    with pytest.MonkeyPatch.context() as mp:
        _forbid_network(mp)
        return ClipVisualEmbedder(TINY, tiny_model[1])


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "red.mp4", moving_square("red", 1))


def _decode_all(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ----------------------------------------------------------------------------- loading


def test_loads_checkpoint_offline_with_bundled_tokenizer(embedder, tiny_model) -> None:
    assert embedder.name == f"open_clip:{TINY}:tiny_weights"
    assert embedder.dim == 32
    assert isinstance(embedder._tokenizer, open_clip.SimpleTokenizer)
    assert not embedder._model.training


def test_uses_the_checkpoint_weights_not_a_fresh_init(embedder, tiny_model) -> None:
    model, _ = tiny_model
    tokens = open_clip.get_tokenizer(TINY)(["a red square"])
    with torch.no_grad():
        expected = model.encode_text(tokens, normalize=True).numpy()
    np.testing.assert_allclose(embedder.embed_texts(["a red square"]), expected, atol=1e-6)


def test_checkpoint_named_like_a_release_tag_is_read_as_a_file(
    tiny_model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative "openai" would be looked up as a release tag (a download) before as a file.
    monkeypatch.setitem(
        open_clip.pretrained._PRETRAINED, TINY, {"openai": {"url": "https://invalid/x.pt"}}
    )
    (tmp_path / "openai").write_bytes(tiny_model[1].read_bytes())
    monkeypatch.chdir(tmp_path)
    assert ClipVisualEmbedder(TINY, "openai").name == f"open_clip:{TINY}:openai"


def test_missing_checkpoint_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ClipVisualEmbedder(TINY, tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError):
        ClipVisualEmbedder(TINY, tmp_path)  # a folder is not a checkpoint


@pytest.mark.parametrize("name", ["no-such-arch", "hf-hub:org/repo", "ViT-B-16-SigLIP"])
def test_unknown_or_hub_only_architectures_are_refused(tiny_model, name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown|Hugging Face"):
        ClipVisualEmbedder(name, tiny_model[1])


def test_checkpoint_of_another_architecture_fails_strictly(tiny_model) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        ClipVisualEmbedder("ViT-S-32", tiny_model[1])


# ----------------------------------------------------------------------------- embeddings


def test_image_embeddings_are_unit_float32(embedder) -> None:
    frames = np.random.default_rng(0).integers(0, 256, (5, 40, 56, 3), dtype=np.uint8)
    vectors = embedder.embed_images(frames)
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])  # different images, different vectors
    assert embedder.embed_images(frames[:0]).shape == (0, 32)


def test_image_batches_do_not_change_results(embedder) -> None:
    frames = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    together = embedder.embed_images(frames)  # crosses the 32-frame batch boundary
    one_by_one = np.concatenate([embedder.embed_images(frames[i : i + 1]) for i in range(40)])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


@pytest.mark.parametrize(
    "frames",
    [
        np.zeros((2, 8, 8, 3), dtype=np.float32),
        np.zeros((8, 8, 3), dtype=np.uint8),
        np.zeros((2, 8, 8, 4), dtype=np.uint8),
    ],
)
def test_image_input_is_validated(embedder, frames: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        embedder.embed_images(frames)


def test_text_embeddings_are_unit_float32(embedder) -> None:
    vectors = embedder.embed_texts(["a red square moving right", "a blue square", "x " * 200])
    assert vectors.shape == (3, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    assert embedder.embed_texts([]).shape == (0, 32)


def test_embeddings_are_deterministic(embedder, tiny_model, clip_path: Path) -> None:
    again = ClipVisualEmbedder(TINY, tiny_model[1])
    frames = np.random.default_rng(2).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    np.testing.assert_array_equal(embedder.embed_images(frames), again.embed_images(frames))
    np.testing.assert_array_equal(embedder.embed_texts(["red"]), again.embed_texts(["red"]))
    np.testing.assert_array_equal(embedder.embed_clip(clip_path), embedder.embed_clip(clip_path))


# ----------------------------------------------------------------------------- clips


def test_read_keyframes_returns_the_exact_uniformly_spread_frames(clip_path: Path) -> None:
    decoded = _decode_all(clip_path)
    keyframes = read_keyframes(clip_path, 3)
    assert keyframes.dtype == np.uint8 and keyframes.shape == (3, 48, 48, 3)
    np.testing.assert_array_equal(keyframes, decoded[sample_frame_indices(len(decoded), 3)])
    with pytest.raises(ValueError):
        read_keyframes(clip_path, 0)


def test_embed_clip_is_the_normalised_mean_of_its_keyframes(embedder, clip_path: Path) -> None:
    decoded = _decode_all(clip_path)
    for count in (1, 3, 5):
        vector = embedder.embed_clip(clip_path, num_keyframes=count)
        assert vector.shape == (32,) and vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
        mean = embedder.embed_images(decoded[sample_frame_indices(len(decoded), count)]).mean(0)
        np.testing.assert_allclose(vector, mean / np.linalg.norm(mean), atol=1e-5)


def test_embed_clip_rejects_a_file_that_is_not_a_video(embedder, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.mp4"
    bogus.write_bytes(b"not a video")
    with pytest.raises(InvalidClip):
        embedder.embed_clip(bogus)


# ----------------------------------------------------------------------------- fusion


def _ids(ranking: list[tuple[int, float]]) -> list[int]:
    return [clip_id for clip_id, _ in ranking]


def test_strong_in_both_beats_strong_in_one() -> None:
    text = {1: 0.9, 2: 0.8, 3: 0.2}
    visual = {1: 0.1, 2: 0.8, 3: 0.9}
    ranking = fuse_scores(text, visual, 0.5)
    assert _ids(ranking) == [2, 3, 1]
    assert ranking[0][1] == pytest.approx(0.8)


def test_weight_zero_and_one_reproduce_each_ranking_exactly() -> None:
    text = {1: 0.3, 2: 0.9, 3: 0.6, 4: 0.1}
    visual = {1: 0.8, 2: 0.2, 3: 0.5, 4: 0.4}
    assert fuse_scores(text, visual, 0.0) == sorted(text.items(), key=lambda kv: -kv[1])
    assert fuse_scores(text, visual, 1.0) == sorted(visual.items(), key=lambda kv: -kv[1])


def test_missing_candidate_gets_the_lists_minimum_so_absence_never_beats_presence() -> None:
    text = {1: 0.5, 2: 0.5}
    visual = {2: 0.3, 3: 0.1}
    ranking = fuse_scores(text, visual, 0.5)
    # 1: visual filled with 0.1; 3: text filled with 0.5; 1 and 3 tie, broken by id.
    assert _ids(ranking) == [2, 1, 3]
    assert [score for _, score in ranking] == pytest.approx([0.4, 0.3, 0.3])
    # At w=0 a visual-only candidate ties the worst text one (1 vs 6 below); the text list's
    # ranking is kept as a prefix because a measured score wins a tie against a filled-in one
    # (and at w=1 the visual one: 5 is measured there, 6 filled in).
    assert _ids(fuse_scores({5: 0.9, 6: 0.7}, {1: 0.99, 5: 0.1}, 0.0)) == [5, 6, 1]
    assert _ids(fuse_scores({5: 0.9, 6: 0.7}, {1: 0.99, 5: 0.1}, 1.0)) == [1, 5, 6]


def test_an_empty_list_leaves_the_other_ranking_unchanged() -> None:
    text = {4: 0.2, 7: 0.6, 9: 0.4}
    assert _ids(fuse_scores(text, {}, 0.7)) == [7, 9, 4]
    assert _ids(fuse_scores({}, text, 0.3)) == [7, 9, 4]
    assert fuse_scores({}, {}, 0.5) == []


def test_ties_are_ordered_by_id() -> None:
    assert _ids(fuse_scores({9: 0.5, 3: 0.5, 5: 0.5}, {}, 0.0)) == [3, 5, 9]


@pytest.mark.parametrize("weight", [-0.01, 1.01, math.nan, math.inf])
def test_invalid_weight_raises(weight: float) -> None:
    with pytest.raises(ValueError, match="visual_weight"):
        fuse_scores({1: 0.5}, {1: 0.5}, weight)
