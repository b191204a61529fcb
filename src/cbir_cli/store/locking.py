"""One writer per store: a lock file next to the manifest."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CbirError
from .manifest import LOCK_NAME, SHARDS_DIR


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's writer lock, or fail at once with a clear message. The OS
    releases it if the process dies (fcntl lock), so a SIGKILL never leaves it stuck.

    A folder this call had to create is removed again if nothing but the lock (and
    an empty shards folder) is in it at the end: a failed first run leaves no trace."""
    from filelock import FileLock, Timeout

    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise CbirError(
            f"{root}: another cbir process is writing this index (lock {root / LOCK_NAME} is held); "
            "wait for it to finish"
        ) from None
    try:
        yield
    finally:
        lock.release()
        if created:
            _remove_if_unused(root)


def _remove_if_unused(root: Path) -> None:
    try:
        names = set(os.listdir(root))
        if not names <= {LOCK_NAME, SHARDS_DIR} or (SHARDS_DIR in names and os.listdir(root / SHARDS_DIR)):
            return
        if SHARDS_DIR in names:
            (root / SHARDS_DIR).rmdir()
        (root / LOCK_NAME).unlink(missing_ok=True)
        root.rmdir()
    except OSError:  # someone else started using it meanwhile: leave it
        pass
