"""The store's write transaction: the one way anything writes vectors.

``with write_transaction(root) as txn:`` takes the writer lock, treats SIGTERM like
Ctrl-C, opens the store (:meth:`WriteTransaction.begin` with the fingerprint of the
vectors to come), buffers vectors until at least ``shard_size`` rows are waiting
(whole batches: the buffer becomes one shard) and commits each shard as it is
written (a log entry of that shard: :mod:`.commit_log`), so an interrupted run loses
at most one shard of work. On a normal exit everything is committed and checkpointed
(``manifest.json`` then holds the whole state); on Ctrl-C or SIGTERM what is done is committed
and :class:`~cbir_cli.errors.Interrupted` says how to resume. A rebuild writes a
successor store whose manifest is committed once, at the end: until then readers
keep the previous index, and an interrupted rebuild changes nothing.

``cbir index``, ``cbir extract`` and ``cbir evaluate``'s feature cache all write
through here.
"""

from __future__ import annotations

import shutil
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptStoreError, Interrupted, WriteError
from .adoption import adopt_part, staging_run
from .commit_log import LOG_DIR
from .feature_store import FeatureStore
from .locking import writer_lock
from .manifest import IDENTITY, INDEX_DIR, MANIFEST, SHARDS_DIR, lost_manifest
from .repair import drop_damaged_shards
from .row_catalog import CATALOG
from .shard_format import DEFAULT_SHARD_DTYPE, SHARD_DTYPES, check_requested_dtype
from .validity import INVALID_VECTOR, invalid_rows

if TYPE_CHECKING:
    import numpy as np

DEFAULT_SHARD_SIZE = 1024
Item = tuple[str, str, int]  # (path, sha256, size) of one image


class WriteTransaction:
    """A writer's session on one store; see the module docstring. Implements the
    pipeline's vector sink (:meth:`add`; :meth:`staging` + :meth:`adopt` for shards
    that distributed workers write themselves)."""

    def __init__(self, root: Path, rebuild: bool, shard_size: int, shard_dtype: str | None = None) -> None:
        if shard_size < 1:
            raise ValueError(f"shard size must be >= 1 (got {shard_size})")
        if shard_dtype is not None and shard_dtype not in SHARD_DTYPES:
            raise ValueError(f"shard dtype must be one of {', '.join(SHARD_DTYPES)} (got {shard_dtype!r})")
        self.root = root
        self.rebuild = rebuild
        self.shard_size = shard_size
        self.requested_dtype = shard_dtype  # None: the store's own (float32 for a new one)
        self._store: FeatureStore | None = None
        self._existing: FeatureStore | None = None
        self._opened = False
        self._vectors: list[np.ndarray] = []
        self._items: list[Item] = []
        self.written = 0  # rows written to shards by this transaction
        self.repairs: list[str] = []  # one line per repair made by begin()
        # (path, reason) of files whose vectors were refused (see add()).
        self.rejected: list[tuple[str, str]] = []

    # -- opening -------------------------------------------------------------

    @property
    def existing(self) -> FeatureStore | None:
        """The committed store at ``root`` before this transaction, or None when
        there is none (or, for a rebuild, when it is too damaged to open)."""
        if not self._opened:
            self._opened = True
            lost = lost_manifest(self.root)
            if lost and not self.rebuild:
                # Never start a new store over shards whose manifest was lost: that
                # would delete them. They can be recovered (or rebuilt on purpose).
                raise CorruptStoreError(lost, remedy="recover")
            if FeatureStore.exists(self.root):
                try:
                    # Files are checked (and damaged shards dropped) by begin().
                    self._existing = FeatureStore.open(self.root, check_files=self.rebuild)
                except CorruptStoreError:
                    if not self.rebuild:
                        raise
        return self._existing

    def begin(self, fingerprint: dict[str, Any]) -> FeatureStore:
        """The store this transaction writes, for vectors of ``fingerprint``: the
        existing one (refused when it holds another model's vectors, or was asked for
        shards of another dtype: see :mod:`.shard_format`), a successor for a
        rebuild (in the requested shard dtype, else the existing store's), or a new one."""
        existing = self.existing
        new_dtype = self.requested_dtype or DEFAULT_SHARD_DTYPE
        if self.rebuild:
            if existing is not None:
                self._store = existing.successor(fingerprint, self.requested_dtype)
            else:
                if FeatureStore.exists(self.root) or lost_manifest(self.root):
                    _remove_damaged(self.root)
                self._store = FeatureStore.create(self.root, fingerprint, shard_dtype=new_dtype)
        elif existing is not None:
            self._store = existing.for_fingerprint(fingerprint)
            check_requested_dtype(self._store.shard_dtype, self.requested_dtype, self.root)
            if self._store is existing:
                existing.attach_catalog()  # rows found without reading every rows file
                existing.collect_garbage()  # a killed run's leftovers (and uncommitted log entries)
                # Verify what this run builds on; what is damaged is dropped and its
                # images embedded again (the shards are the index's only source).
                self.repairs = drop_damaged_shards(self._store)
            # Before any id is given out: never reuse one (see .ids).
            lowered = self._store.ensure_next_id()
            if lowered:
                self.repairs.append(lowered)
        else:
            self._store = FeatureStore.create(self.root, fingerprint, shard_dtype=new_dtype)
        return self._store

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            raise RuntimeError("begin() the transaction first")
        return self._store

    @property
    def shard_dtype(self) -> str:
        """The dtype shards of this store are written in (workers writing parts
        for :meth:`adopt` write them so)."""
        return self.store.shard_dtype

    # -- writing -------------------------------------------------------------

    def add(self, vectors: np.ndarray, items: Sequence[Item]) -> None:
        """Buffer vectors (rows aligned with ``items``); a full shard is written and
        (unless rebuilding) committed. A row that is not a valid vector (see
        :mod:`.validity`) is not stored: its file is recorded as skipped, with the
        reason, in :attr:`rejected`."""
        import numpy as np

        vectors = np.asarray(vectors, dtype=np.float32)
        bad = invalid_rows(vectors) if len(vectors) == len(items) else np.zeros(len(vectors), dtype=bool)
        if bad.any():
            for (path, sha, _), refused in zip(items, bad):
                if refused:
                    self.store.record_skipped(path, sha, INVALID_VECTOR)
                    self.store.remove_paths([path])  # its old vector describes other content
                    self.rejected.append((path, INVALID_VECTOR))
            items = [item for item, refused in zip(items, bad) if not refused]
            vectors = vectors[~bad]
        self._vectors.append(vectors)
        self._items.extend(items)
        if len(self._items) >= self.shard_size:
            self.flush()

    def record_skipped(self, path: str, sha256: str, reason: str) -> None:
        self.store.record_skipped(path, sha256, reason)

    def remove_paths(self, paths: Sequence[str]) -> int:
        return self.store.remove_paths(paths)

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A run folder inside the store for workers to write parts into (see
        :mod:`.staging`); removed when the block ends."""
        with staging_run(self.store) as folder:
            yield folder

    def adopt(self, folder: Path, name: str) -> int:
        """Make a part that a worker wrote into ``folder`` a shard of the store and
        (unless rebuilding) commit; returns its rows."""
        rows = adopt_part(self.store, folder, name)
        self.written += len(rows)
        if not self.rebuild:
            self.store.commit()
        return len(rows)

    def flush(self) -> None:
        """Write what is buffered as a shard and, unless rebuilding, commit."""
        import numpy as np

        if self._items:
            self.store.add_shard(np.concatenate(self._vectors, axis=0), self._items)
            self.written += len(self._items)
            self._vectors, self._items = [], []
        if not self.rebuild:
            self.store.commit()

    def commit(self) -> bool:
        """Write what is buffered and commit (also a rebuild's single commit), then
        checkpoint: the end of a run leaves ``manifest.json`` complete."""
        self.flush()
        return self.store.checkpoint()

    def what_is_kept(self, noun: str) -> str:
        """After a failed write: what the index still holds, and how to go on."""
        if self.rebuild:
            return "the previous index is unchanged; run the same command again to rebuild"
        count = self._store.committed_count if self._store is not None else 0
        return f"the index keeps the {count} {noun} committed before; run the same command again to resume"

    def interrupted(self, noun: str) -> Interrupted:
        """Commit what is done (not for a rebuild: it keeps the previous index) and
        the error that says so."""
        if self.rebuild or self._store is None:
            if self.rebuild:
                return Interrupted(f"interrupted: the rebuild of {self.root} did not finish and the previous "
                                   "index is unchanged; run the same command again to rebuild")
            return Interrupted(f"interrupted: nothing was written to {self.root}")
        # Every row written so far is complete. A second Ctrl-C during this flush
        # still leaves the last committed state intact.
        self.flush()
        self.store.checkpoint()
        return Interrupted(f"interrupted: {self.written} {noun} committed to {self.root}; "
                           "run the same command again to resume")


@contextmanager
def write_transaction(root: str | Path, rebuild: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
                      noun: str = "images", shard_dtype: str | None = None) -> Iterator[WriteTransaction]:
    """See the module docstring. ``noun`` names the rows in the interrupt message.
    ``shard_dtype``: float32 or float16 shards for a new store or a rebuild; None
    keeps the store's own (float32 for a new one). An existing store asked for
    another dtype without a rebuild is refused (:mod:`.shard_format`)."""
    root = Path(root).expanduser()
    with writer_lock(root), terminate_as_interrupt():
        txn = WriteTransaction(root, rebuild, shard_size, shard_dtype)
        try:
            yield txn
            if txn._store is not None:
                txn.commit()
        except KeyboardInterrupt:
            raise txn.interrupted(noun) from None
        except WriteError as exc:
            raise WriteError(f"{exc.message}; {txn.what_is_kept(noun)}") from None
        finally:
            if txn._store is not None:
                txn._store.release()


def _remove_damaged(root: Path) -> None:
    """Delete a store too damaged to open, before a rebuild replaces it."""
    for name in (MANIFEST, IDENTITY, SHARDS_DIR, INDEX_DIR, LOG_DIR, CATALOG, f"{CATALOG}-wal", f"{CATALOG}-shm"):
        target = root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``kill PID``, a service manager stopping us) like Ctrl-C while
    writing: commit what is done and say how to resume, instead of dying mid-way.
    Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
