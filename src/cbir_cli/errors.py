"""Domain errors. The CLI turns any :class:`CbirError` into a one-line message and a
non-zero exit; anything else is a bug and keeps its traceback.

Messages name concepts ("the index", "the model"), never command-line flags: the
library is also used from Python and from the web server. Where there is a standard
way out, the error carries it as a :attr:`CbirError.remedy` key; ``str(exc)``
appends the library's wording of it and the CLI its own (with the command to run).
"""

from __future__ import annotations

# Remedy keys and how the library words them; the CLI has its own wording with flags.
REMEDIES = {
    "rebuild": "rebuild the index from its images",
    "recover": "recover the manifest from the shards (a repair), or rebuild the index from its images",
    "build": "build an index first",
    "other-model": "use another index folder, the model and weights it was built with, or rebuild it",
    "weights-file": "or use a local state-dict file as the model's weights",
    "rebuild-backend": "re-populate the search backend from the index's stored vectors",
    "shard-dtype": "rebuild the index from its images to change it, or keep the index's shard dtype",
}


class CbirError(Exception):
    """An error the user can act on (bad input, missing index, missing weights...)."""

    exit_code = 1
    #: Key into :data:`REMEDIES`, or None.
    remedy: str | None = None

    def __init__(self, message: str, remedy: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if remedy is not None:
            self.remedy = remedy

    def __str__(self) -> str:
        if self.remedy in REMEDIES:
            return f"{self.message}; {REMEDIES[self.remedy]}"
        return self.message


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

    remedy = "other-model"


class IndexNotFoundError(CbirError):
    """No index/feature store at the given location."""

    remedy = "build"


class CorruptStoreError(CbirError):
    """Files of a store disagree with its manifest (damaged or half-written)."""

    remedy = "rebuild"


class WriteError(CbirError, OSError):
    """A file could not be written (disk full, read-only, no permission): one line
    naming it. Still an :class:`OSError`, for code that tolerates failed writes (a
    derived cache)."""


class Interrupted(CbirError):
    """Ctrl-C or SIGTERM stopped a write; what was done is committed (or, for a
    rebuild, nothing changed) and running the same command again resumes."""

    exit_code = 130
