"""Caption embedders: the ONNX Runtime backend gives PyTorch's vectors, cached per model."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from memory_bank import embed_onnx
from memory_bank.embed import (
    DEFAULT_NAME,
    SentenceTransformerEmbedder,
    default_model_path,
    open_text_embedder,
)
from memory_bank.embed_onnx import OnnxSentenceEmbedder, model_fingerprint

TEXTS = [
    "a red ball",
    "a blue square sliding slowly to the left across a white table",
    "",  # padding-only rows and an empty text pool like PyTorch's
    "waves " * 400,  # past max_seq_length: truncated the same way
]


@pytest.fixture(scope="module")
def torch_embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


def test_onnx_vectors_equal_pytorch_vectors(torch_embedder, tmp_path):
    onnx = open_text_embedder(cache_dir=tmp_path)
    assert isinstance(onnx, OnnxSentenceEmbedder)
    assert (onnx.name, onnx.dim) == (torch_embedder.name, torch_embedder.dim) == (DEFAULT_NAME, 384)
    together = onnx.embed(TEXTS)  # one padded batch
    np.testing.assert_allclose(together, torch_embedder.embed(TEXTS), atol=2e-5)
    one_by_one = np.concatenate([onnx.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(together, one_by_one, atol=2e-5)
    assert together.dtype == np.float32 and np.allclose(np.linalg.norm(together, axis=1), 1)


def test_the_export_is_cached_under_the_models_fingerprint(tmp_path, monkeypatch):
    first = open_text_embedder(cache_dir=tmp_path)
    exported = list(tmp_path.glob("*.onnx"))
    assert [p.name for p in exported] == [
        f"{default_model_path().name}-{model_fingerprint(default_model_path())}.onnx"
    ]

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(embed_onnx, "export_to_onnx", no_export)
    again = open_text_embedder(cache_dir=tmp_path)
    np.testing.assert_array_equal(again.embed(TEXTS), first.embed(TEXTS))


def test_an_unwritable_cache_exports_in_memory(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING):
        embedder = open_text_embedder(cache_dir=blocker / "cache")
    assert isinstance(embedder, OnnxSentenceEmbedder) and "in memory" in caplog.text
    assert embedder.embed(["x"]).shape == (1, 384)


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory) -> Path:
    """The default model with CLS pooling instead of mean pooling."""
    folder = tmp_path_factory.mktemp("models") / "minilm-cls"
    shutil.copytree(default_model_path(), folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    pooling.write_text(json.dumps(config))
    return folder


def test_cls_pooling_matches_pytorch_and_differs_from_mean(cls_model, torch_embedder, tmp_path):
    onnx = open_text_embedder(cls_model, cache_dir=tmp_path)
    assert isinstance(onnx, OnnxSentenceEmbedder) and onnx.name == "minilm-cls"
    np.testing.assert_allclose(
        onnx.embed(TEXTS), SentenceTransformerEmbedder(cls_model).embed(TEXTS), atol=2e-5
    )
    cosine = (onnx.embed(TEXTS) * torch_embedder.embed(TEXTS)).sum(axis=1)
    assert (cosine < 0.99).all()  # a different vector for every text
    assert model_fingerprint(cls_model) != model_fingerprint(default_model_path())


def test_a_pipeline_onnx_cannot_reproduce_falls_back_to_pytorch(cls_model, tmp_path, caplog):
    folder = tmp_path / "minilm-max"
    shutil.copytree(cls_model, folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_cls_token=False, pooling_mode_max_tokens=True)
    pooling.write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING):
        embedder = open_text_embedder(folder, cache_dir=tmp_path / "cache")
    assert isinstance(embedder, SentenceTransformerEmbedder) and "max_tokens" in caplog.text
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A BERT-style model written here, offline: a plain transformers folder, no pooling config."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("models") / "tiny-bert"
    folder.mkdir()
    words = ["a", "red", "blue", "green", "ball", "square", "falls", "rolls", "left", "right",
             "slowly", "on", "the", "table"]  # fmt: skip
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=5 + len(words),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).eval().save_pretrained(folder)  # fmt: skip
    return folder


def _reference_vectors(folder: Path, texts: list[str], pooling: str) -> np.ndarray:
    """CLS or masked-mean pooling computed directly from the transformer, L2-normalised."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    if pooling == "cls":
        vectors = states[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).float()
        vectors = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(vectors, dim=-1).numpy()


def test_cls_and_mean_pooling_of_a_bert_model_are_what_they_say(tiny_bert, tmp_path, caplog):
    from memory_bank.embed import EmbedderOptions

    texts = ["a red ball falls", "a blue square rolls slowly left on the table"]
    made = {}
    for pooling in ("cls", "mean"):
        options = EmbedderOptions(pooling=pooling, max_length=32)
        for backend in ("torch", "onnx"):
            embedder = open_text_embedder(tiny_bert, backend, tmp_path, options)
            assert embedder.name == f"tiny-bert[pooling={pooling},max_length=32]"
            made[pooling, backend] = embedder.embed(texts)
        expected = _reference_vectors(tiny_bert, texts, pooling)
        np.testing.assert_allclose(made[pooling, "torch"], expected, atol=1e-5)
        np.testing.assert_allclose(made[pooling, "onnx"], expected, atol=1e-5)
    plain = open_text_embedder(tiny_bert, "onnx", tmp_path, EmbedderOptions(pooling="cls"))
    assert isinstance(plain, OnnxSentenceEmbedder)  # a plain transformers folder exports too
    cosine = (made["cls", "torch"] * made["mean", "torch"]).sum(axis=1)
    assert (cosine < 0.99).all()  # different poolings, different vectors

    with caplog.at_level(logging.WARNING):
        open_text_embedder(
            tiny_bert, "torch", tmp_path, EmbedderOptions(pooling="cls", trust_remote_code=True)
        )
    assert "trust_remote_code" in caplog.text  # fmt: skip


def test_max_length_truncates_the_caption(tiny_bert, tmp_path):
    from memory_bank.embed import EmbedderOptions

    options = EmbedderOptions(pooling="mean", max_length=4)  # [CLS] two words [SEP]
    for backend in ("torch", "onnx"):
        embedder = open_text_embedder(tiny_bert, backend, tmp_path, options)
        long, short = embedder.embed(["a red ball falls on the table", "a red"])
        np.testing.assert_allclose(long, short, atol=1e-5)
