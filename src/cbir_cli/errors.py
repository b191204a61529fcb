"""Domain errors. The CLI turns any :class:`CbirError` into a one-line message and a
non-zero exit; anything else is a bug and keeps its traceback.

Messages name concepts ("the index", "the model"), never command-line flags: the
library is also used from Python and from the web server. Where there is a standard
way out, the error carries it as a :attr:`CbirError.remedy` key into
:data:`REMEDIES`, the one table that words each remedy twice: ``str(exc)`` appends
the library's wording, the CLI its own (with the command to run). One row per key,
both wordings required, so the two can no longer drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Remedy:
    """One standard way out of an error, worded twice: ``library`` names concepts
    (for Python callers and the web server), ``cli`` names the command to run."""

    library: str
    cli: str


# The one remedy table: key -> both wordings (a CbirError carries the key).
REMEDIES: dict[str, Remedy] = {
    "rebuild": Remedy(
        "rebuild the index from its images",
        "repair with `cbir check --repair`, then `cbir index FOLDER` embeds again what was lost "
        "(or start over with `cbir index FOLDER --rebuild`)"),
    "recover": Remedy(
        "recover the manifest from the shards (a repair), or rebuild the index from its images",
        "recover it with `cbir check --repair` (same --index), or start over with `cbir index FOLDER --rebuild`"),
    "build": Remedy(
        "build an index first",
        "build one with `cbir index FOLDER`, or name an existing one with --index DIR"),
    "other-model": Remedy(
        "use another index folder, the model and weights it was built with, or rebuild it",
        "use another --index/--out folder, the same --model/--weights as before, or --rebuild"),
    "weights-file": Remedy(
        "or use a local state-dict file as the model's weights",
        "or pass a local state dict with --weights FILE"),
    "rebuild-backend": Remedy(
        "re-populate the search backend from the index's stored vectors",
        "repair with `cbir index --rebuild-backend` (no re-embedding)"),
    "shard-dtype": Remedy(
        "rebuild the index from its images to change it, or keep the index's shard dtype",
        "leave out --shard-dtype to keep the index's, or change it with `cbir index FOLDER --rebuild "
        "--shard-dtype ...` (embeds everything again)"),
}


def remedy_text(key: str | None, cli: bool = False) -> str | None:
    """How to word the remedy ``key`` (None: no remedy): the library's words, or
    with ``cli`` the command line's."""
    remedy = REMEDIES.get(key or "")
    if remedy is None:
        return None
    return remedy.cli if cli else remedy.library


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
        remedy = remedy_text(self.remedy)
        return f"{self.message}; {remedy}" if remedy else self.message


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
