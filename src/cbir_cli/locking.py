"""One writer per store: a lock file next to the manifest."""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from .errors import CbirError

LOCK_NAME = ".lock"


@contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """Hold the store's writer lock, or fail at once with a clear message. The OS
    releases it if the process dies (fcntl lock), so a SIGKILL never leaves it stuck."""
    from filelock import FileLock, Timeout

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
