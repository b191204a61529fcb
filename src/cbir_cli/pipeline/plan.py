"""Planning a sync: which files are new, changed, unchanged, moved or gone, by
content hash (sha256), never by modification time."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NamedTuple

from ..errors import ImageError
from ..imageio.decode import open_image_file, oserror_reason
from ..imageio.sources import is_object_uri
from ..paths import normalise_path
from ..store.feature_store import FeatureStore

Item = tuple[str, str, int]  # (path, sha256, size) of one image


def hash_file(path: Path | str) -> tuple[str, int]:
    """sha256 of the content and its size. Opened like every image (regular files
    only, size-capped, non-blocking: a named pipe called ``x.jpg`` is refused instead
    of hanging the run); :class:`ImageError` says why not."""
    fh, _ = open_image_file(path)
    with fh:
        return hash_open_file(fh)


def hash_open_file(fh: BinaryIO) -> tuple[str, int]:
    """sha256 and size of what is left to read in an open file (read in 1 MB blocks)."""
    digest = hashlib.sha256()
    size = 0
    while block := fh.read(1 << 20):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size


class HashResult(NamedTuple):
    """One listed file: its content hash and size, or why it could not be read."""

    path: str
    sha256: str | None
    size: int
    error: str | None = None


def hash_one(path: Path | str) -> HashResult:
    try:
        sha, size = hash_file(path)
        return HashResult(str(path), sha, size)
    except ImageError as exc:
        return HashResult(str(path), None, 0, exc.reason)
    except OSError as exc:  # a read error after a successful open
        return HashResult(str(path), None, 0, oserror_reason(exc, path))


@dataclass
class Plan:
    todo: list[Item]  # to embed, or to reuse a stored vector of the same content
    replaced: set[str]  # paths in todo whose stored version changed
    removed: list[str]
    unchanged: int
    known_bad: list[tuple[str, str]]
    unreadable: list[tuple[str, str]]
    # Rows stored under an older, unnormalised spelling of a listed path, same
    # content: (stored path, item under the normalised path). Counted as unchanged.
    renamed: list[tuple[str, Item]] = field(default_factory=list)


def _under(path: str, root: str) -> bool:
    sep = "/" if is_object_uri(root) else os.sep
    return path == root or path.startswith(root.rstrip(sep) + sep)


def _normalised(path: str, real_dirs: dict[str, str]) -> str:
    """A stored key in its current form: a local path normalised, a URI as it is."""
    return path if is_object_uri(path) else normalise_path(path, real_dirs)


def plan_sync(store: FeatureStore, root: Path | str | None, hashed: Iterable[HashResult]) -> Plan:
    """Compare the ``hashed`` files (normalised paths, see
    :func:`cbir_cli.paths.normalise_path`) with the store. Stored paths below
    ``root`` (a folder, or a URI prefix) that were not listed are planned for removal; ``root=None`` removes
    nothing (a cache over an explicit list of files, as ``cbir evaluate`` keeps).
    Rows stored by older versions under unnormalised paths are matched through
    their normalised form, so they migrate instead of being stored twice."""
    stored = store.rows_by_path()
    real_dirs: dict[str, str] = {}
    normalised = {p: _normalised(p, real_dirs) for p in stored}
    legacy = {normalised[p]: row for p, row in stored.items() if normalised[p] != p}
    skipped = store.manifest["skipped"]
    plan = Plan([], set(), [], 0, [], [])
    present: set[str] = set()
    for path, sha, size, error in hashed:
        present.add(path)
        if error is not None or sha is None:
            plan.unreadable.append((path, error or "unreadable"))
            continue
        row = stored.get(path)
        if row is not None and row.sha256 == sha:
            plan.unchanged += 1
            continue
        old = legacy.get(path)
        if row is None and old is not None and old.sha256 == sha:
            plan.renamed.append((old.path, (path, sha, size)))
            plan.unchanged += 1
            continue
        bad = skipped.get(path)
        if row is None and bad is not None and bad["sha256"] == sha:
            plan.known_bad.append((path, bad["reason"]))
            continue
        plan.todo.append((path, sha, size))
        if row is not None:
            plan.replaced.add(path)
    if root is not None:
        root_s = str(root)
        renamed = {old for old, _ in plan.renamed}
        plan.removed = [p for p in stored if p not in present and p not in renamed and _under(normalised[p], root_s)]
        store.forget_skipped([p for p in list(skipped)
                              if p not in present and _under(_normalised(p, real_dirs), root_s)])
    return plan


def holds_nothing(store: FeatureStore) -> bool:
    """A new store (or a rebuild's successor): no rows, no remembered bad files."""
    return not store.manifest["shards"] and not store.manifest["skipped"]


class HashesInBackground:
    """Content hashes computed by a background thread while the files are embedded.

    For a store that holds nothing yet, every listed file is embedded whatever its
    hash (nothing can be unchanged, reused or known bad), so hashing need not
    finish before the first image is decoded: a hash is needed only when its row is
    written. On a GPU that indexes thousands of images a second, hashing every file
    first was a serial phase in front of the pipeline (issue 14)."""

    def __init__(self, results: Iterable[HashResult]) -> None:
        self._results: dict[str, HashResult] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._finished = False
        # A daemon: an interrupted run must not wait for the rest of the folder.
        threading.Thread(target=self._consume, args=(results,), name="cbir-hash", daemon=True).start()

    def _consume(self, results: Iterable[HashResult]) -> None:
        try:
            for result in results:
                with self._changed:
                    self._results[result.path] = result
                    self._changed.notify_all()
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that waits
            self._error = exc
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def get(self, path: str) -> HashResult:
        """The hash of ``path``, waiting for it if need be."""
        with self._changed:
            while path not in self._results:
                if self._error is not None:
                    raise self._error
                if self._finished:
                    raise KeyError(path)
                self._changed.wait()
            return self._results[path]

    def wait(self) -> None:
        """Until every file is hashed (the stat cache is then complete)."""
        with self._changed:
            while not self._finished:
                self._changed.wait()
        if self._error is not None:
            raise self._error


def plan_fresh(files: Sequence[Path | str], hashed: Iterable[HashResult]) -> tuple[Plan, HashesInBackground]:
    """The plan for a store that :func:`holds_nothing`: embed every regular file (and
    every listed object), hashing in the background. Anything else (a pipe named
    like an image, a file that cannot be stat'ed) is refused now, before any reader
    could block on it."""
    import stat

    todo: list[Item] = []
    unreadable = []
    for path in map(str, files):
        try:
            regular = is_object_uri(path) or stat.S_ISREG(os.stat(path).st_mode)
        except OSError:
            regular = False
        if regular:
            todo.append((path, "", 0))  # hash and size: from the background hashes
        else:
            result = hash_one(path)
            unreadable.append((path, result.error or "not a regular file"))
    return Plan(todo, set(), [], 0, [], unreadable), HashesInBackground(hashed)
