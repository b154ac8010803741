"""Optional visual retrieval: CLIP keyframe embeddings of clips scored against the prompt.

Caption retrieval only sees what a caption says. When the user configures local open_clip weights,
each clip also gets an image embedding (the mean of a few keyframe embeddings) that can be scored
against the prompt's CLIP text embedding, and the two scores are merged with :func:`fuse_scores`.

Everything here is offline: weights come from a local file, and only architectures whose text
side is open_clip's own transformer with its bundled BPE vocabulary are accepted, so neither model
creation nor tokenisation can reach for a model hub.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from model.preprocess import load_clip, probe_clip

__all__ = ["ClipVisualEmbedder", "fuse_scores", "read_keyframes"]

PathLike = str | os.PathLike[str]

# Frames per forward pass: bounds activation memory for long frame lists at a negligible cost in
# throughput (ViT-B/32 at 224 px is ~4.4 GFLOPs per image).
_BATCH = 32


def read_keyframes(path: PathLike, num_keyframes: int) -> np.ndarray:
    """Decode ``num_keyframes`` frames spread uniformly over a clip, at its native size.

    Decoding goes through :func:`model.preprocess.load_clip`, the project's single clip decoder,
    so keyframes are chosen by :func:`~model.preprocess.sample_frame_indices` exactly as for the
    DiT-Mem encoder. ``load_clip`` returns ``uint8 / 127.5 - 1`` in float32; that map is inverted
    here, which is exact because its float32 rounding error is far below half a grey level.

    Args:
        path: Path to a video file in any format PyAV can decode.
        num_keyframes: Number of frames wanted, at least 1.

    Returns:
        ``(num_keyframes, height, width, 3)`` uint8 RGB frames, in clip order.

    Raises:
        InvalidClip: The file is missing or cannot be decoded.
        ValueError: ``num_keyframes`` is smaller than 1.
    """
    if num_keyframes < 1:
        raise ValueError(f"num_keyframes must be >= 1, got {num_keyframes}")
    info = probe_clip(path)
    video = load_clip(path, num_keyframes, info.height, info.width)  # (3, F, H, W) in [-1, 1]
    pixels = ((video + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return np.ascontiguousarray(pixels.permute(1, 2, 3, 0).numpy())


class ClipVisualEmbedder:
    """An open_clip model loaded from a local checkpoint, embedding images, texts and clips.

    Image and text vectors share one space (inner product = cosine similarity), so a clip's
    :meth:`embed_clip` vector can be scored directly against a prompt's :meth:`embed_texts` one.

    ``model_name`` must match the checkpoint's architecture exactly: OpenAI's released CLIP
    weights, for instance, need the ``-quickgelu`` variants (``"ViT-B-32-quickgelu"``), otherwise
    they load without error but embed poorly.

    Attributes:
        name: ``"open_clip:<model_name>:<checkpoint file stem>"``, to record which model made
            stored clip vectors (a checkpoint replaced under the same file name keeps the name).
        dim: Embedding dimension.
    """

    def __init__(self, model_name: str, checkpoint: PathLike, device: str = "cpu") -> None:
        """Build the model and load the checkpoint.

        Args:
            model_name: An open_clip architecture name (see ``open_clip.list_models()``), e.g.
                ``"ViT-B-32"``. Schema names (``"hf-hub:..."``, ``"local-dir:..."``) are refused.
            checkpoint: Local ``.pt`` / ``.bin`` / ``.pth`` / ``.safetensors`` file holding an
                open_clip or OpenAI-style state dict for ``model_name``.
            device: Torch device to run on.

        Raises:
            FileNotFoundError: ``checkpoint`` does not exist or is not a file.
            ValueError: ``model_name`` is unknown or needs a tokenizer or text model from the
                Hugging Face hub, or the checkpoint does not fit it (loading is strict).
        """
        import open_clip

        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"open_clip checkpoint {path} does not exist; visual retrieval needs a local "
                "weights file (nothing is downloaded)"
            )
        config = _offline_config(open_clip, model_name)
        # open_clip tries `pretrained` as a release tag ("openai", "laion2b_s34b_b79k", ...) before
        # as a file, and a tag means a download. Tags never contain a path separator, so an
        # absolute path always takes the file branch. Loading is strict and weights_only.
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=str(path.resolve()), device=device
            )
        except (RuntimeError, AssertionError) as exc:  # open_clip asserts on some shape mismatches
            raise ValueError(
                f"checkpoint {path} does not fit open_clip architecture {model_name!r}: {exc}"
            ) from exc
        self._model = model.eval()
        self._preprocess = preprocess  # the eval transform: resize, centre crop, normalise
        self._tokenizer = open_clip.get_tokenizer(model_name)
        self._device = torch.device(device)
        self.name = f"open_clip:{model_name}:{path.stem}"
        self.dim = int(config["embed_dim"])

    @torch.no_grad()
    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        """Embed RGB images.

        Args:
            frames: ``(n, height, width, 3)`` uint8 RGB; any size, the model's own transform
                resizes and crops.

        Returns:
            ``(n, dim)`` float32, unit norm.

        Raises:
            ValueError: ``frames`` is not a uint8 ``(n, height, width, 3)`` array.
        """
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(
                f"frames must be uint8 (n, height, width, 3), got {frames.dtype} {frames.shape}"
            )
        out = np.empty((len(frames), self.dim), dtype=np.float32)
        for start in range(0, len(frames), _BATCH):
            batch = torch.stack(
                [self._preprocess(Image.fromarray(f)) for f in frames[start : start + _BATCH]]
            )
            features = self._model.encode_image(batch.to(self._device))
            out[start : start + len(batch)] = _unit(features)
        return out

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts (truncated to the model's context length, 77 tokens for CLIP).

        Args:
            texts: Strings to embed.

        Returns:
            ``(len(texts), dim)`` float32, unit norm.
        """
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), _BATCH):
            tokens = self._tokenizer(list(texts[start : start + _BATCH]))
            out[start : start + len(tokens)] = _unit(
                self._model.encode_text(tokens.to(self._device))
            )
        return out

    def embed_clip(self, path: PathLike, num_keyframes: int = 3) -> np.ndarray:
        """Embed a clip as the re-normalised mean of its keyframe embeddings.

        Averaging unit vectors gives the direction closest (in summed cosine) to every
        keyframe, so a prompt matching any large part of the clip scores well.

        Args:
            path: Path to a video file in any format PyAV can decode.
            num_keyframes: Frames to embed, spread uniformly over the clip (see
                :func:`read_keyframes`), at least 1.

        Returns:
            ``(dim,)`` float32, unit norm.

        Raises:
            InvalidClip: The file is missing or cannot be decoded.
            ValueError: ``num_keyframes`` is smaller than 1.
        """
        vectors = self.embed_images(read_keyframes(path, num_keyframes))
        return _unit(torch.from_numpy(vectors.mean(axis=0)))


def fuse_scores(
    text: Mapping[int, float], visual: Mapping[int, float], visual_weight: float
) -> list[tuple[int, float]]:
    """Merge caption and visual retrieval scores into one ranking.

    Each candidate in the union of both lists gets
    ``(1 - visual_weight) * text_score + visual_weight * visual_score``.

    Both inputs are top-k lists, so a candidate missing from one list scored at most that list's
    lowest returned score there. It is given exactly that minimum: the tightest value consistent
    with the truncation, and one that never lets absence beat presence. A list that is empty gives
    every candidate the same filler (0.0), which leaves the other list's ranking unchanged.

    Scores are used as given (both are cosine similarities); they are not rescaled. Note that
    CLIP image-text cosines spread over a narrower range than caption-caption ones, so the visual
    side needs a fairly large weight to move the ranking much.

    Args:
        text: Caption-similarity scores by clip id.
        visual: Visual-similarity scores by clip id.
        visual_weight: Weight of the visual score, in ``[0, 1]``; 0 reproduces the text ranking
            and 1 the visual ranking (both exactly, scores included, for candidates in that list).

    Returns:
        ``(clip_id, fused_score)`` pairs, best first. Equal scores go first to the candidate
        whose score has less filled-in weight, then by ascending id.

    Raises:
        ValueError: ``visual_weight`` is not within ``[0, 1]`` (NaN included).
    """
    if not 0.0 <= visual_weight <= 1.0:
        raise ValueError(f"visual_weight must be within [0, 1], got {visual_weight}")
    text_fill = min(text.values(), default=0.0)
    visual_fill = min(visual.values(), default=0.0)
    keyed = []
    for clip_id in set(text) | set(visual):
        score = (1.0 - visual_weight) * text.get(clip_id, text_fill) + visual_weight * visual.get(
            clip_id, visual_fill
        )
        # A filled-in score is only an upper bound, so on a tie the candidate whose score rests
        # less on filled-in values goes first; this keeps w=0 (w=1) exactly the text (visual)
        # ranking for the candidates that list returned.
        filled = (1.0 - visual_weight) * (clip_id not in text) + visual_weight * (
            clip_id not in visual
        )
        keyed.append((-score, filled, clip_id))
    keyed.sort()
    return [(clip_id, -negated) for negated, _, clip_id in keyed]


def _offline_config(open_clip: Any, model_name: str) -> dict[str, Any]:
    """``model_name``'s config, refusing architectures that would fetch from the hub.

    open_clip builds Hugging Face text towers (``hf_model_name``) and tokenizers
    (``hf_tokenizer_name``, SigLIP's) from the hub; only its own text transformer with the BPE
    vocabulary bundled in the package is guaranteed to work without a network.
    """
    config = open_clip.get_model_config(model_name) if ":" not in model_name else None
    if config is None:
        raise ValueError(
            f"unknown open_clip architecture {model_name!r}; expected one of "
            "open_clip.list_models(), e.g. 'ViT-B-32'"
        )
    text_cfg = config.get("text_cfg", {})
    if (
        "hf_model_name" in text_cfg
        or "hf_tokenizer_name" in text_cfg
        or "siglip" in (model_name.lower())
    ):
        raise ValueError(
            f"open_clip architecture {model_name!r} needs a Hugging Face text model or tokenizer, "
            "which cannot be loaded offline; use a CLIP architecture with the bundled tokenizer"
        )
    return config


def _unit(features: torch.Tensor) -> np.ndarray:
    """L2-normalise along the last axis in float32, as a numpy array on the CPU."""
    return F.normalize(features.float(), dim=-1).cpu().numpy()
