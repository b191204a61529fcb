"""Planning a sync: which files are new, changed, unchanged, moved or gone, by
content hash (sha256), never by modification time."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import ImageError
from ..imageio.decode import open_image_file, oserror_reason
from ..paths import normalise_path
from ..store.feature_store import FeatureStore

Item = tuple[str, str, int]  # (path, sha256, size) of one image


def hash_file(path: Path | str) -> tuple[str, int]:
    """sha256 of the content and its size. Opened like every image (regular files
    only, size-capped, non-blocking: a named pipe called ``x.jpg`` is refused instead
    of hanging the run); :class:`ImageError` says why not."""
    fh, _ = open_image_file(path)
    with fh:
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
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plan_sync(store: FeatureStore, root: Path | None, hashed: Iterable[HashResult]) -> Plan:
    """Compare the ``hashed`` files (normalised paths, see
    :func:`cbir_cli.paths.normalise_path`) with the store. Stored paths below
    ``root`` that were not listed are planned for removal; ``root=None`` removes
    nothing (a cache over an explicit list of files, as ``cbir evaluate`` keeps).
    Rows stored by older versions under unnormalised paths are matched through
    their normalised form, so they migrate instead of being stored twice."""
    stored = store.rows_by_path()
    real_dirs: dict[str, str] = {}
    normalised = {p: normalise_path(p, real_dirs) for p in stored}
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
                              if p not in present and _under(normalise_path(p, real_dirs), root_s)])
    return plan
