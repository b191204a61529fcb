"""Domain errors. The CLI turns any :class:`CbirError` into a one-line message and a
non-zero exit; anything else is a bug and keeps its traceback."""

from __future__ import annotations


class CbirError(Exception):
    """An error the user can act on (bad input, missing index, missing weights...)."""

    exit_code = 1


class ImageError(CbirError):
    """One image could not be read. Batch jobs skip it and count it."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WeightsUnavailableError(CbirError):
    """Pretrained weights are neither cached nor downloadable."""


class StoreMismatchError(CbirError):
    """Vectors on disk were made by a different model or preprocessing."""


class IndexNotFoundError(CbirError):
    """No index/feature store at the given location."""


class CorruptStoreError(CbirError):
    """Files of a store disagree with its manifest (damaged or half-written)."""
