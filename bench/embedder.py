"""The caption embedder: ONNX Runtime vs PyTorch, one prompt at a time, as a search embeds it.

Both backends embed the same 300 distinct prompts with all-MiniLM-L6-v2 (after 20 warm-up
prompts), once on the main thread and once on another thread (the API embeds in its request
threads), and the largest difference between their vectors is reported.

    python -m bench.embedder [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from memory_bank.embed import SentenceTransformerEmbedder, TextEmbedder, open_text_embedder

PROMPTS = [
    f"prompt {i}: a {['red', 'blue', 'green'][i % 3]} ball rolling {i % 7} metres to the left"
    for i in range(320)
]


def _latencies(embedder: TextEmbedder) -> dict[str, float]:
    for prompt in PROMPTS[:20]:
        embedder.embed([prompt])
    seconds = []
    for prompt in PROMPTS[20:]:
        started = time.perf_counter()
        embedder.embed([prompt])
        seconds.append(time.perf_counter() - started)
    seconds.sort()
    return {
        "p50_ms": 1e3 * statistics.median(seconds),
        "p99_ms": 1e3 * seconds[int(0.99 * len(seconds))],
    }


def _on_a_thread(embedder: TextEmbedder) -> dict[str, float]:
    result: dict[str, float] = {}
    thread = threading.Thread(target=lambda: result.update(_latencies(embedder)))
    thread.start()
    thread.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch_backend = SentenceTransformerEmbedder()
    onnx_backend = open_text_embedder(backend="onnx")
    report: dict = {
        name: {"main_thread": _latencies(backend), "other_thread": _on_a_thread(backend)}
        for name, backend in (("torch", torch_backend), ("onnx", onnx_backend))
    }
    difference = torch_backend.embed(PROMPTS) - onnx_backend.embed(PROMPTS)
    report["max_abs_difference"] = float(np.abs(difference).max())
    for backend in ("torch", "onnx"):
        for where, figures in report[backend].items():
            print(f"{backend:5} {where:12} p50 {figures['p50_ms']:.2f} ms  "
                  f"p99 {figures['p99_ms']:.2f} ms")  # fmt: skip
    print(f"largest difference between the vectors: {report['max_abs_difference']:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
