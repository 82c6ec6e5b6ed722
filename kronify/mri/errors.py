"""The error kronify.mri raises for bad data files or selections (a ValueError that names the file or value)."""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """A problem with the data files or the selection; the message names the file or the value."""
