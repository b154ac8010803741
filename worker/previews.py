"""Live previews of a running generation, made and stored off the denoising loop.

On the denoising thread a preview costs a clock check, and when one is due (at most every
``MIN_INTERVAL_S``: a viewer gains nothing from more, and each costs the loop a moment of the
GIL) a copy of one latent frame. A thread of its own projects it (``model.previews``), encodes
and stores it, keeping only the newest when it falls behind, so a slow bucket never slows a
step. Each progress report then names the step of the latest stored preview.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from memory_bank.storage import ObjectStorage
from model.previews import LatentPreviewer, png_bytes

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5


class PreviewPublisher:
    """Stores the newest preview of one run; use as a context manager around the run."""

    def __init__(self, previewer: LatentPreviewer, storage: ObjectStorage, key: str) -> None:
        self.previewer = previewer
        self.storage = storage
        self.key = key
        self.stored_step: int | None = None  # read by the progress reports
        self._pending: tuple[int, torch.Tensor] | None = None
        self._next_due = 0.0
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._store_loop, name="ditmem-previews",
                                        daemon=True)  # fmt: skip

    def __enter__(self) -> PreviewPublisher:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=10)
        self.storage.delete(self.key)  # the video replaces it; a failed run leaves none

    def offer(self, step: int, latents: torch.Tensor) -> None:
        """On the denoising thread: a clock check, and when a preview is due a frame's copy
        (on the DiT's device: no wait for the GPU)."""
        now = time.monotonic()
        if now < self._next_due:
            return
        self._next_due = now + MIN_INTERVAL_S
        frame = latents[:1, :, latents.shape[2] // 2 : latents.shape[2] // 2 + 1].detach().clone()
        with self._ready:
            self._pending = (step, frame)  # an older one not yet stored is dropped
            self._ready.notify()

    def _store_loop(self) -> None:
        while True:
            with self._ready:
                while self._pending is None and not self._closed:
                    self._ready.wait()
                if self._pending is None:
                    return
                step, frame = self._pending
                self._pending = None
            try:
                image = self.previewer.image(frame)
                self.storage.put_bytes(self.key, png_bytes(image))
                self.stored_step = step
            except Exception as error:  # a preview is a nicety: the video goes on
                logger.warning("preview of step %d not stored: %s", step, error)
