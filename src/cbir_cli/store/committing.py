"""The writing end of :class:`~.feature_store.FeatureStore`: commits (a log entry
of what changed, or a checkpoint: :mod:`.commit_log`) and garbage collection."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import atomic_write_bytes, json_bytes
from .commit_log import CHECKPOINT_EVERY, Changes, leftover_entries, log_generations, prune, top_keys, write_entry
from .garbage import collect_garbage, leftover_files
from .manifest import FORMAT_VERSION, MANIFEST, library_versions, write_identity

if TYPE_CHECKING:
    from .manifest import Row


class Committing:
    """Mixed into :class:`~.feature_store.FeatureStore` (which sets these attributes)."""

    root: Path
    manifest: dict[str, Any]
    checkpoint_generation: int
    last_commit_bytes: int
    _changes: Changes
    _top: dict[str, Any] | None
    _rewrite: bool
    _committed_count: int
    _rows_cache: dict[str, list[Row]]
    log_ignored: list[str] | None
    active_staging: Path | None

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def positions(self) -> dict[str, int]:
        raise NotImplementedError

    @property
    def committed(self) -> bool:
        """Whether a manifest of this store is on disk."""
        return self._top is not None

    @property
    def committed_count(self) -> int:
        """How many live rows the last commit left (0 if none)."""
        return self._committed_count if self.committed else 0

    def commit(self) -> bool:
        """Make everything changed so far durable: one log entry holding only the
        changes (:mod:`.commit_log`), or a whole checkpoint when one is due (the
        first commit of a store or of a rebuild, a format 1 store's first, every
        :data:`CHECKPOINT_EVERY` commits). Returns False (and writes nothing) when
        nothing changed since the last commit, or when a new store still holds no
        vectors (it would pin a model for nothing)."""
        if not self.committed and not self.manifest["shards"]:
            return False
        self.positions()  # a shard list assigned from outside: its changes recorded
        top = top_keys(self.manifest)
        if self.committed and not self._rewrite and not self._changes and top == self._top:
            return False
        self.manifest = {**self.manifest, "generation": self.generation + 1, "updated": time.time()}
        if (not self.committed or self._rewrite or self.manifest["format"] != FORMAT_VERSION
                or self.generation - self.checkpoint_generation >= CHECKPOINT_EVERY):
            self._write_checkpoint()
        else:
            assert self._top is not None
            if self.log_ignored is not None:
                # Entries above the state were never committed: one left at the next
                # generations would be replayed after this commit's as if it followed it.
                prune(p for g, p in log_generations(self.root).items() if g >= self.generation)
                self.log_ignored = None
            entry = self._changes.entry(self.manifest, self.positions(), self._top)
            self.last_commit_bytes = write_entry(self.root, entry)
            self._top = top
        self._changes = Changes()
        self._committed_count = self.count
        return True

    def checkpoint(self) -> bool:
        """Commit what changed, then make ``manifest.json`` hold the whole state (a
        writer does at the end of its run) and delete what the state does not name:
        the log entries the checkpoint holds and the store's leftovers. Returns
        whether anything was written."""
        wrote = self.commit()
        if self.committed and (self.checkpoint_generation != self.generation
                               or self.manifest["format"] != FORMAT_VERSION):
            self._write_checkpoint()
            return True
        if self.committed:
            self.collect_garbage()  # leftovers of a killed run go even if nothing changed
        return wrote

    def _write_checkpoint(self) -> None:
        self.manifest = {**self.manifest, "format": FORMAT_VERSION, "versions": library_versions()}
        self.root.mkdir(parents=True, exist_ok=True)
        data = json_bytes(self.manifest)
        atomic_write_bytes(self.root / MANIFEST, data)
        self.last_commit_bytes = len(data)
        write_identity(self.root, self.manifest)
        self.checkpoint_generation = self.generation
        self._top, self._rewrite = top_keys(self.manifest), False
        self.collect_garbage()

    def leftover_files(self) -> list[Path]:
        """Files the committed state does not name (:func:`.garbage.leftover_files`)."""
        return (leftover_files(self.root, self.positions(), self.active_staging)
                + leftover_entries(self.root, self.checkpoint_generation, self.generation))

    def collect_garbage(self) -> list[Path]:
        """Delete :meth:`leftover_files` (only writers, holding the lock, call this)."""
        deleted = collect_garbage(self.root, self.leftover_files(), self.active_staging)
        live = self.positions()
        for name in list(self._rows_cache):
            if name not in live:
                del self._rows_cache[name]
        return deleted
