"""The optional visual index: kept in step with the manifest and fused into search."""

from __future__ import annotations

import numpy as np

from memory_bank.bank import BankOptions, MemoryBank
from memory_bank.ingest import ClipIngestor
from memory_bank.visual import read_keyframes
from model.presets import TINY

WORDS = {"red": 0, "green": 1, "blue": 2, "yellow": (0, 1)}


class ColourEmbedder:
    """Keyframes -> their mean colour; prompts -> the colour words they name (same space)."""

    name, dim = "colour-space", 3

    def embed_clip(self, path) -> np.ndarray:
        frames = read_keyframes(path, 3).astype(np.float32)
        lit = frames.reshape(-1, 3)
        lit = lit[lit.sum(axis=1) > 60]  # the square, not the black background
        return self._unit(lit.mean(axis=0))

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            vector = np.full(3, 0.05, dtype=np.float32)
            for word, axes in WORDS.items():
                if word in text:
                    vector[list(np.atleast_1d(axes))] += 1
            rows.append(self._unit(vector))
        return np.stack(rows)

    @staticmethod
    def _unit(vector: np.ndarray) -> np.ndarray:
        return (vector / np.linalg.norm(vector)).astype(np.float32)


def test_visual_index_breaks_caption_ties_and_follows_deletes(tmp_path, embedder, tiny_pipe, clips):
    options = BankOptions(visual_weight=0.5)
    with MemoryBank(tmp_path / "bank", embedder, options, visual=ColourEmbedder()) as bank:
        ingest = ClipIngestor(bank, tiny_pipe, TINY)
        ids = {
            name: ingest.ingest(clips[name], "a small square on black").record.clip_id
            for name in ("red_right", "blue_left", "green_right")
        }
        for colour in ("red", "blue", "green"):
            hits = bank.search(f"a {colour} thing", k=3)
            assert hits[0].clip_id == next(v for k, v in ids.items() if k.startswith(colour))
            assert hits[0].visual_score > hits[1].visual_score
            assert hits[0].text_score is not None

        # Without the visual index the captions cannot tell the clips apart.
        plain = MemoryBank(tmp_path / "bank", embedder, options)
        scores = {round(h.score, 5) for h in plain.search("a red thing", k=3)}
        assert len(scores) == 1
        plain.close()

        bank.delete(ids["red_right"])
        assert ids["red_right"] not in [h.clip_id for h in bank.search("a red thing", k=3)]
        before = [(h.clip_id, round(h.score, 5)) for h in bank.search("a blue thing", k=3)]
        bank.rebuild_index()
        assert [(h.clip_id, round(h.score, 5)) for h in bank.search("a blue thing", k=3)] == before

    with MemoryBank(tmp_path / "bank", embedder, options, visual=ColourEmbedder()) as reopened:
        assert reopened.search("a green thing", k=1)[0].clip_id == ids["green_right"]
