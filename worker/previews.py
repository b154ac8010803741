"""Live previews of a running generation, stored off the denoising loop.

The loop only projects the latents to a small image (``model.previews``); a thread of its own
encodes and stores it, keeping the latest one when it falls behind, so a slow bucket never
slows a step. Each progress report then names the step of the latest stored preview.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from memory_bank.storage import ObjectStorage
from model.previews import LatentPreviewer, png_bytes

logger = logging.getLogger(__name__)


class PreviewPublisher:
    """Stores the newest preview of one run; use as a context manager around the run."""

    def __init__(self, previewer: LatentPreviewer, storage: ObjectStorage, key: str) -> None:
        self.previewer = previewer
        self.storage = storage
        self.key = key
        self.stored_step: int | None = None  # read by the progress reports
        self._pending: tuple[int, np.ndarray] | None = None
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
        """On the denoising thread: the projection only (microseconds), then hand it over."""
        image = self.previewer.image(latents)
        with self._ready:
            self._pending = (step, image)  # an older one not yet stored is dropped
            self._ready.notify()

    def _store_loop(self) -> None:
        while True:
            with self._ready:
                while self._pending is None and not self._closed:
                    self._ready.wait()
                if self._pending is None:
                    return
                step, image = self._pending
                self._pending = None
            try:
                self.storage.put_bytes(self.key, png_bytes(image))
                self.stored_step = step
            except Exception as error:  # a preview is a nicety: the video goes on
                logger.warning("preview of step %d not stored: %s", step, error)
