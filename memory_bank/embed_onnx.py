"""A sentence-transformers model run by ONNX Runtime: the same vectors, a fraction of the time.

Embedding the prompt is most of a search (``docs/benchmarks.md``, "The bank at scale"). The
PyTorch forward of all-MiniLM-L6-v2 took 6.5 ms for one prompt on 2 cores when called from the
main thread and 12.8 ms from a request thread of the API; ONNX Runtime, with its own thread
pool, 1.9 ms from either, for vectors within 2e-7 of PyTorch's.

The model is exported from the sentence-transformers folder once (``torch.onnx``, about a
second) and kept in a cache folder under a name derived from the model's files, so a changed
model is exported again and never mixed up with an older one. Folders whose pipeline is not
transformer -> mean or CLS pooling -> optional normalisation are refused: use the PyTorch
backend for those.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from memory_bank.embed import EmbedderOptions
from model.atomic import atomic_path

logger = logging.getLogger(__name__)

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class UnsupportedForOnnx(ValueError):
    """The sentence-transformers folder is not a pipeline this backend reproduces."""


def _pipeline(folder: Path, options: EmbedderOptions) -> tuple[str, bool, int]:
    """``(pooling "mean" | "cls", normalised, max_seq_length)`` of a model folder, with the
    options' overrides; a plain transformers folder (no ``modules.json``) needs a pooling."""
    if not (folder / "modules.json").exists():
        if options.pooling is None:
            raise UnsupportedForOnnx(f"{folder.name}: no modules.json; set a pooling")
        return options.pooling, True, options.max_length or 512
    pooling, normalised, max_length = _folder_pipeline(folder)
    if options.pooling is not None:
        pooling, normalised = options.pooling, True  # overrides are always unit vectors
    return pooling, normalised, options.max_length or max_length


def _folder_pipeline(folder: Path) -> tuple[str, bool, int]:
    modules = json.loads((folder / "modules.json").read_text())
    kinds = [module["type"] for module in modules]
    if kinds[:2] != [TRANSFORMER, POOLING] or kinds[2:] not in ([], [NORMALIZE]):
        raise UnsupportedForOnnx(f"{folder.name}: modules {kinds} are not transformer+pooling")
    if modules[0]["path"] not in ("", "."):
        raise UnsupportedForOnnx(f"{folder.name}: the transformer is not at the folder's root")
    pooling = json.loads((folder / modules[1]["path"] / "config.json").read_text())
    modes = [name for name, on in pooling.items() if name.startswith("pooling_mode") and on]
    by_mode = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in by_mode:
        raise UnsupportedForOnnx(f"{folder.name}: pooling {modes} (only mean or CLS)")
    config_path = folder / "sentence_bert_config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    return by_mode[modes[0]], kinds[2:] == [NORMALIZE], int(config.get("max_seq_length", 512))


def model_fingerprint(folder: Path) -> str:
    """A digest of the files that decide the vectors (weights, configs, tokenizer)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix in (".json", ".safetensors", ".bin", ".txt", ".model"):
            digest.update(str(path.relative_to(folder)).encode())
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def export_to_onnx(folder: Path, target: Path, trust_remote_code: bool = False) -> None:
    """Write the folder's transformer as an ONNX graph ``(ids, mask, types) -> token states``."""
    from transformers import AutoModel, AutoTokenizer

    loading = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    model = AutoModel.from_pretrained(folder, **loading).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, **loading)

    class TokenStates(torch.nn.Module):
        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids, attention_mask, token_type_ids):
            output = self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            )
            return output.last_hidden_state

    sample = tokenizer(["an example prompt", "a second one"], return_tensors="pt", padding=True)
    if "token_type_ids" not in sample:
        sample["token_type_ids"] = torch.zeros_like(sample["input_ids"])
    axes = {name: {0: "batch", 1: "tokens"} for name in (*INPUTS, "states")}
    with atomic_path(target) as temporary, torch.no_grad(), warnings.catch_warnings():
        # The tracer's notes on shapes it fixes (no padding inside a mask, opset choices) hold
        # for every input here: the mask is always given and covers every token position.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            TokenStates(model),
            tuple(sample[name] for name in INPUTS),
            str(temporary),
            input_names=list(INPUTS),
            output_names=["states"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )


class OnnxSentenceEmbedder:
    """A sentence-transformers folder embedded with ONNX Runtime (see the module docstring).

    Args:
        folder: The sentence-transformers model folder.
        name: The embedder's name recorded with every vector (the PyTorch backend's name for
            the same folder: the vectors are the same).
        cache_dir: Where exported graphs are kept; ``None`` keeps the export in memory only.
        options: Pooling and length overrides, and whether the folder's code may run.
        threads: ONNX Runtime's threads per call (default: torch's thread count).
    """

    def __init__(
        self,
        folder: str | Path,
        name: str,
        cache_dir: Path | None = None,
        options: EmbedderOptions | None = None,
        threads: int | None = None,
    ) -> None:
        import onnxruntime
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.options = options or EmbedderOptions()
        self.pooling, self.normalised, self.max_length = _pipeline(self.folder, self.options)
        self._tokenizer = AutoTokenizer.from_pretrained(
            self.folder, local_files_only=True, trust_remote_code=self.options.trust_remote_code
        )
        try:
            graph = self._graph(cache_dir)
        except (OSError, RuntimeError, ValueError, TypeError) as error:  # not exportable
            raise UnsupportedForOnnx(f"{self.folder.name}: ONNX export failed ({error})") from error
        options = onnxruntime.SessionOptions()
        # The process's torch thread count (OMP_NUM_THREADS, or the cores it may use): ONNX
        # Runtime keeps a pool of its own, which would otherwise ignore that limit.
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            graph, options, providers=["CPUExecutionProvider"]
        )
        self.name = name
        self.dim = int(self.embed(["dimension probe"]).shape[1])

    def _graph(self, cache_dir: Path | None) -> str | bytes:
        """The exported graph's path in the cache (exported first if missing), or its bytes."""
        if cache_dir is not None:
            target = cache_dir / f"{self.folder.name}-{model_fingerprint(self.folder)}.onnx"
            try:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    logger.info("exporting %s to ONNX at %s", self.folder.name, target)
                    export_to_onnx(self.folder, target, self.options.trust_remote_code)
                return str(target)
            except OSError as error:  # a read-only cache: export into memory instead
                logger.warning(
                    "ONNX cache %s not writable (%s); exporting in memory", target, error
                )
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / "model.onnx"
            export_to_onnx(self.folder, path, self.options.trust_remote_code)
            return path.read_bytes()

    def embed(self, texts: list[str]) -> np.ndarray:
        """``(len(texts), dim)`` float32, unit norm when the folder normalises."""
        batch = self._tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="np",
        )
        mask = batch["attention_mask"].astype(np.int64)
        feeds = {
            "input_ids": batch["input_ids"].astype(np.int64),
            "attention_mask": mask,
            "token_type_ids": batch.get("token_type_ids", np.zeros_like(mask)).astype(np.int64),
        }
        states = self._session.run(None, feeds)[0]
        if self.pooling == "cls":
            vectors = states[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)
            vectors = (states * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        if self.normalised:
            vectors = vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
        return np.ascontiguousarray(vectors, dtype=np.float32)
