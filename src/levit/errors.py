"""Exceptions raised by levit for bad input (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["CheckpointError", "ImageError", "LeViTError"]


class LeViTError(Exception):
    """Base class: a problem with the user's input (file, flag, data), not a bug."""


class CheckpointError(LeViTError, ValueError):
    """A checkpoint file is missing, unreadable, not LeViT, or does not fit the model."""


class ImageError(LeViTError, ValueError):
    """An image that cannot be classified: unreadable, truncated, empty, not an image, or too large.

    ``reason`` says what is wrong in one line; ``source`` names the file (``None`` for bytes), and
    ``str(e)`` is ``"source: reason"``.
    """

    def __init__(self, reason: str, source: object = None) -> None:
        self.reason, self.source = reason, source
        super().__init__(f"{source}: {reason}" if source is not None else reason)

    def __reduce__(self) -> tuple:  # picklable across DataLoader workers and Ray actors
        return type(self), (self.reason, self.source)
