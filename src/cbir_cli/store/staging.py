"""Shards written elsewhere -- by the workers of a distributed executor -- and
adopted into the store's next commit by the one writer that holds the lock
(:mod:`.adoption`; this module is what workers and the garbage collector need).

A run gets its own folder ``staging/run-<uuid>/`` inside the store (so on the
same filesystem as ``shards/``, which every worker must reach). A worker writes a
*part* there with :func:`write_part`: ``part-<uuid>.npy`` (the vectors, exactly
the bytes :meth:`FeatureStore.add_shard` would write), then ``part-<uuid>.items.json``
(the rows' path, sha256 and size, plus the vectors file's size and sha256), each
written atomically; an items file therefore always describes a complete vectors
file. The writer then :func:`adopt_part`: checks the size and the ``.npy`` header
(the content was hashed by the worker that wrote it; a driver re-reading every
vector would be the bottleneck this design avoids), moves the vectors under
``shards/`` with the next shard name, and registers it, ids assigned here (never by
workers), replacing live rows of the same paths like ``add_shard``.

Crash safety is the store's usual one: nothing is visible before the manifest
commit names it. A part moved but not committed is a leftover shard file; the
folder of a killed run (parts never adopted, half-written temporaries) is a
leftover too, while :attr:`FeatureStore.active_staging` protects the live run's:
the next commit deletes them all.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_bytes, atomic_write_json, bytes_sha256, npy_bytes
from .manifest import STAGING_DIR
from .shard_format import DEFAULT_SHARD_DTYPE, encode
from .validity import invalid_rows

if TYPE_CHECKING:
    import numpy as np

Item = tuple[str, str, int]  # (path, sha256, size) of one image
ITEMS_SUFFIX = ".items.json"


@dataclass(frozen=True)
class StagedPart:
    """What a worker's items file says about its vectors file."""

    name: str
    items: list[Item]
    sha256: str
    nbytes: int


def write_part(folder: str | os.PathLike[str], vectors: np.ndarray, items: Sequence[Item],
               shard_dtype: str = DEFAULT_SHARD_DTYPE) -> str:
    """(Worker side.) Write ``vectors`` (rows aligned with ``items``) as a part in the
    run folder ``folder``, in the store's ``shard_dtype``; returns its name for
    :func:`adopt_part`."""
    vectors = encode(vectors, shard_dtype)
    if vectors.ndim != 2 or len(vectors) != len(items):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(items)} rows")
    if invalid_rows(vectors).any():  # the rule FeatureStore.add_shard enforces (see .validity)
        raise ValueError(f"refusing to store {int(invalid_rows(vectors).sum())} invalid vector(s)")
    name = f"part-{uuid.uuid4().hex}"
    data = npy_bytes(vectors, shard_dtype)
    folder = Path(folder)
    atomic_write_bytes(folder / f"{name}.npy", data)
    atomic_write_json(folder / f"{name}{ITEMS_SUFFIX}", {
        "items": [list(item) for item in items], "sha256": bytes_sha256(data), "bytes": len(data)})
    return name


def read_part(folder: Path, name: str) -> StagedPart:
    path = folder / f"{name}{ITEMS_SUFFIX}"
    try:
        record = json.loads(path.read_bytes().decode("ascii"))
        items = [(str(p), str(s), int(n)) for p, s, n in record["items"]]
        return StagedPart(name, items, str(record["sha256"]), int(record["bytes"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptStoreError(f"{path}: unreadable staged part ({exc})") from None


def _finished_runs(root: Path, active: Path | None) -> list[Path]:
    staging = root / STAGING_DIR
    return [p for p in staging.iterdir() if p != active] if staging.is_dir() else []


def staged_leftovers(root: Path, active: Path | None) -> list[Path]:
    """The files in run folders other than the ``active`` one (a killed run's)."""
    return [path for run in _finished_runs(root, active) for path in (run.iterdir() if run.is_dir() else [run])]


def remove_empty_runs(root: Path, active: Path | None) -> None:
    """After garbage collection: remove emptied run folders, and ``staging/`` once empty."""
    for folder in [*_finished_runs(root, active), root / STAGING_DIR]:
        try:
            folder.rmdir()
        except OSError:  # not empty (or gone)
            pass
