"""Exceptions raised by levit for bad input (the CLI prints them as one line)."""

from __future__ import annotations

__all__ = ["CheckpointError", "LeViTError"]


class LeViTError(Exception):
    """Base class: a problem with the user's input (file, flag, data), not a bug."""


class CheckpointError(LeViTError, ValueError):
    """A checkpoint file is missing, unreadable, not LeViT, or does not fit the model."""
