"""Shards written elsewhere -- by the workers of a distributed executor -- and
adopted into the store's next commit by the one writer that holds the lock.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptStoreError
from ..fsutil import atomic_write_bytes, atomic_write_json, bytes_sha256, fsync_dir, npy_bytes
from .feature_store import FeatureStore, Row
from .manifest import STAGING_DIR

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


def write_part(folder: str | os.PathLike[str], vectors: np.ndarray, items: Sequence[Item]) -> str:
    """(Worker side.) Write ``vectors`` (rows aligned with ``items``) as a part in the
    run folder ``folder``; returns its name for :func:`adopt_part`."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(items):
        raise ValueError(f"vectors shape {vectors.shape} does not match {len(items)} rows")
    name = f"part-{uuid.uuid4().hex}"
    data = npy_bytes(vectors)
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


def adopt_part(store: FeatureStore, folder: Path, name: str) -> list[Row]:
    """(Writer side, holding the lock.) Make the part ``name`` of run folder ``folder``
    the store's next shard; durable at the next :meth:`FeatureStore.commit`."""
    import numpy as np

    part = read_part(folder, name)
    source = folder / f"{name}.npy"
    try:
        size = source.stat().st_size
        header = np.load(source, mmap_mode="r", allow_pickle=False)
        shape, dtype = header.shape, header.dtype
        del header
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"{source}: unreadable staged part ({exc})") from None
    if size != part.nbytes or dtype != np.float32 or shape != (len(part.items), store.dim):
        raise CorruptStoreError(f"{source}: staged part is {size} bytes of {shape} {dtype}, its items file says "
                                f"{part.nbytes} bytes of ({len(part.items)}, {store.dim}) float32")
    shard = store.next_shard_name()
    store.shards_dir.mkdir(parents=True, exist_ok=True)
    os.replace(source, store.shards_dir / f"{shard}.npy")
    fsync_dir(store.shards_dir)
    rows = store.register_shard(shard, part.items, part.sha256, part.nbytes)
    (folder / f"{name}{ITEMS_SUFFIX}").unlink(missing_ok=True)
    return rows


@contextmanager
def staging_run(store: FeatureStore) -> Iterator[Path]:
    """A fresh run folder for workers to write parts into, protected from garbage
    collection while it lasts and removed (with whatever was not adopted) at the end.
    A killed run's folder stays behind as a leftover for the next commit."""
    folder = store.root / STAGING_DIR / f"run-{uuid.uuid4().hex[:12]}"
    folder.mkdir(parents=True)
    store.active_staging = folder
    try:
        yield folder
    finally:
        store.active_staging = None
        for path in folder.iterdir():
            path.unlink(missing_ok=True)
        folder.rmdir()
        try:
            folder.parent.rmdir()
        except OSError:  # other (leftover) runs are still there; the next commit collects them
            pass
