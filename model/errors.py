"""Typed errors raised by the model core; the service maps them to HTTP statuses."""

from __future__ import annotations


class ModelError(Exception):
    """Base class for every error the model core raises on purpose."""


class CheckpointError(ModelError):
    """A checkpoint is missing keys, carries unknown keys, or has tensors of the wrong shape."""


class LatentShapeError(ModelError):
    """A latent does not have the shape the memory encoder's frequency filters were built for."""


class InvalidClip(ModelError):
    """A reference clip cannot be decoded or has no usable video stream."""


class StillImage(InvalidClip):
    """The file is a still image (PNG, JPEG, WebP, ...), not a video: the bank holds motion."""


class ClipTooLarge(InvalidClip):
    """The stream declares a frame size over the limit (found before any frame is decoded)."""


class InvalidRequest(ModelError):
    """Generation parameters are out of range for the preset.

    Attributes:
        field: The offending request field, when there is one.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class WeightsNotFound(ModelError):
    """A local weights path given by the user does not hold the expected files."""


class GenerationCancelled(ModelError):
    """The caller asked to stop; raised between denoising steps."""
