"""The writer's side of :mod:`.staging`: a run folder for workers, and adopting
the parts they wrote into the store's next commit (see :mod:`.staging`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CorruptStoreError
from ..fsutil import fsync_dir
from .feature_store import FeatureStore, Row
from .manifest import STAGING_DIR
from .staging import ITEMS_SUFFIX, read_part


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
    if size != part.nbytes or dtype != np.dtype(store.shard_dtype) or shape != (len(part.items), store.dim):
        raise CorruptStoreError(f"{source}: staged part is {size} bytes of {shape} {dtype}, its items file says "
                                f"{part.nbytes} bytes of ({len(part.items)}, {store.dim}) {store.shard_dtype}")
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
