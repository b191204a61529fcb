"""The writing end of :class:`~.feature_store.FeatureStore`: changing its shard
list (tombstones, drops, repairs: each recorded in :class:`.commit_log.Changes`),
committing (a log entry of what changed, or a checkpoint: :mod:`.commit_log`) and
garbage collection."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fsutil import atomic_write_bytes, json_bytes
from .commit_log import (
    CHECKPOINT_EVERY,
    Changes,
    entry_path,
    leftover_entries,
    log_generations,
    prune,
    top_keys,
    write_entry,
)
from .garbage import collect_garbage, leftover_files
from .manifest import FORMAT_VERSION, MANIFEST, library_versions, remember_checked, write_identity

# A run's end always writes a checkpoint this small (~10 ms); see _checkpoint_worthwhile.
CHECKPOINT_SMALL_BYTES = 1 << 20

if TYPE_CHECKING:
    from .live_paths import LivePaths
    from .manifest import Row
    from .row_catalog import RowCatalog


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
    _live_paths: LivePaths | RowCatalog
    active_staging: Path | None
    _known: list[dict[str, Any]]
    _positions: dict[str, int] | None

    def shard_rows(self, shard: dict[str, Any], cache: bool = True) -> list[Row]:
        raise NotImplementedError

    @property
    def generation(self) -> int:
        return int(self.manifest["generation"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def positions(self) -> dict[str, int]:
        """Shard name -> its index in ``manifest["shards"]`` (kept in step by the
        methods that change the list)."""
        if self.manifest["shards"] is not self._known:
            self.set_shards(self.manifest["shards"])
        if self._positions is None:
            self._positions = {s["name"]: i for i, s in enumerate(self.manifest["shards"])}
        return self._positions

    def _set(self, shards: list[dict[str, Any]], **top: Any) -> None:
        self.manifest = {**self.manifest, "shards": shards, **top}
        self._known = shards

    def set_shards(self, shards: list[dict[str, Any]]) -> None:
        """Replace the shard list (repairs: dropping damaged shards, correcting
        entries): the entries that are not the same objects are recorded as changed,
        the names no longer there as dropped; ``count`` is recounted."""
        old = {s["name"]: s for s in self._known}
        for shard in shards:
            if old.pop(shard["name"], None) is not shard:
                self._changes.changed(shard["name"])
        for name in old:
            self._changes.drop(name)
        self._set(list(shards), count=sum(s["rows"] - len(s["removed"]) for s in shards))
        self._positions = None
        self._live_paths.invalidate()

    def _tombstone(self, hits: dict[str, set[int]]) -> int:
        """Tombstone rows (shard name -> row numbers); a shard left with no live row
        is dropped. Returns how many live rows that removed."""
        if not hits:
            return 0
        positions = self.positions()
        shards = list(self.manifest["shards"])
        removed, drop = 0, set()
        for name, rows in hits.items():
            shard = shards[positions[name]]
            gone = set(shard["removed"]) | rows
            removed += len(gone) - len(shard["removed"])
            if len(gone) >= shard["rows"]:
                drop.add(name)
                self._changes.drop(name)
            else:
                shards[positions[name]] = {**shard, "removed": sorted(gone)}
                self._changes.changed(name)
        if drop:
            shards = [s for s in shards if s["name"] not in drop]
            self._positions = None
        self._set(shards, count=self.count - removed)
        return removed

    def remove_paths(self, paths: Iterable[str]) -> int:
        """Tombstone the live rows of ``paths``; returns how many were removed."""
        targets = set(paths)
        if not targets:
            return 0
        self.positions()  # the shard list reconciled first (the index of live paths follows it)
        removed = self._tombstone(self._live_paths.rows_of(self.manifest["shards"], self.shard_rows, targets))
        self._live_paths.moved(targets)
        return removed

    def record_skipped(self, path: str, sha256: str, reason: str) -> None:
        """Remember a file that could not be embedded, so an unchanged copy is not
        decoded again on the next run (it is reported as skipped again)."""
        entry = {"sha256": sha256, "reason": reason}
        if self.manifest["skipped"].get(path) != entry:
            self.manifest["skipped"][path] = entry
            self._changes.skip(path, entry)

    def forget_skipped(self, paths: Iterable[str]) -> None:
        for p in paths:
            if self.manifest["skipped"].pop(p, None) is not None:
                self._changes.unskip(p)

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
        self._live_paths.committed(self.manifest)
        return True

    def checkpoint(self) -> bool:
        """Commit what changed, then (a writer does at the end of its run) make
        ``manifest.json`` hold the whole state where that is worth its cost
        (:meth:`_checkpoint_worthwhile`) and delete what the state does not name:
        the log entries the checkpoint holds and the store's leftovers. Returns
        whether anything was written."""
        wrote = self.commit()
        due = self.manifest["format"] != FORMAT_VERSION or (
            self.checkpoint_generation != self.generation and self._checkpoint_worthwhile())
        if self.committed and due:
            self._write_checkpoint()  # which collects the garbage
            return True
        # No listing of the shards folder otherwise: a writer's start collected a
        # killed run's leftovers already (O(shards): 20k names at 10M rows).
        return wrote

    def _checkpoint_worthwhile(self) -> bool:
        """Whether a run's end should write the checkpoint: always for a small
        manifest (:data:`CHECKPOINT_SMALL_BYTES`: a bounded cost), else once the log
        since the last one is as large as it -- so the bytes written for checkpoints
        are at most those written to the log, and a run costs what it changed
        (a 10M-row manifest is ~3 MB: rewriting it per run was O(collection))."""
        try:
            size = os.stat(self.root / MANIFEST).st_size
        except OSError:
            return True
        if size <= CHECKPOINT_SMALL_BYTES:
            return True
        logged = 0
        for generation in range(self.checkpoint_generation + 1, self.generation + 1):
            try:
                logged += os.stat(entry_path(self.root, generation)).st_size
            except OSError:
                return True
        return logged >= size

    def _write_checkpoint(self) -> None:
        self.manifest = {**self.manifest, "format": FORMAT_VERSION, "versions": library_versions()}
        self.root.mkdir(parents=True, exist_ok=True)
        data = json_bytes(self.manifest)
        atomic_write_bytes(self.root / MANIFEST, data)
        remember_checked(self.root, data)  # well-formed: made from a checked state
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
