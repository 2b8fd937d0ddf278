"""The one error type of ``flexmoe.checkpoint``."""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or loaded as asked: missing, corrupt, tampered or mismatched.

    Raised before anything is written (save) or loaded (load), with a message naming the
    file, field or tensor at fault.
    """
