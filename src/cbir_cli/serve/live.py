"""A running server follows its index: when a writer commits (the committed
state's generation changes: a new log entry, or a new checkpoint,
:mod:`cbir_cli.store.commit_log`), the next request that notices opens the new state and swaps
it in with one assignment. Requests already running keep the searcher they
started with (rows, search index and vectors consistent with each other), so no
request fails or mixes two states during a swap; until the new state is open,
the previous one keeps serving. The new state is searched as the old one was
(the same re-ranking settings)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..search.dba import DBA_META
from ..search.faiss_backend import INDEX_META
from ..store.commit_log import LOG_DIR, read_state
from ..store.manifest import INDEX_DIR, MANIFEST

if TYPE_CHECKING:
    from ..search.searcher import Searcher

CHECK_INTERVAL = 0.5  # seconds between looks at the manifest and the log folder (two stats)
# A writer commits, then saves the new search index: wait this long for it before
# building one in memory from the shards.
SAVED_INDEX_GRACE = 10.0


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


def _stamp(root: Path) -> tuple[object, ...]:
    """What changes when a writer commits: the checkpoint is replaced, or an entry
    is linked into the log folder (which changes the folder's mtime)."""
    return _file_stamp(root / MANIFEST), _file_stamp(root / LOG_DIR)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


class LiveSearcher:
    """The current :class:`Searcher` of one index folder; see the module docstring."""

    def __init__(self, searcher: Searcher, device: str = "auto", runtime: str = "auto") -> None:
        self._current = searcher
        self.root = Path(searcher.store.root)
        self.device, self.runtime = device, runtime
        self._stamp = _stamp(self.root)
        self._next_check = 0.0
        self._pending_since: float | None = None
        self._reloading = threading.Lock()
        self.reloads = 0
        self.last_error: str | None = None

    @property
    def generation(self) -> int:
        return self._current.store.generation

    def current(self) -> Searcher:
        """The searcher to use for one whole request."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CHECK_INTERVAL
            stamp = _stamp(self.root)
            if stamp != self._stamp and self._reloading.acquire(blocking=False):
                try:
                    self._reload(stamp, now)
                finally:
                    self._reloading.release()
        return self._current

    def _reload(self, stamp: tuple[object, ...], now: float) -> None:
        from ..search.searcher import Searcher

        try:
            manifest = read_state(self.root)[0]
        except CbirError:
            return  # missing or mid-repair: keep serving, look again
        old = self._current
        if manifest["generation"] == old.store.generation and manifest.get("updated") == \
                old.store.manifest.get("updated"):
            self._stamp = stamp
            return
        # The writer saves the search index, then the DBA vectors re-ranking uses.
        metas = [INDEX_META] + ([DBA_META] if old.rerank is not None and old.rerank.use_dba else [])
        saved = all(isinstance(meta, dict) and meta.get("generation") == manifest["generation"]
                    for meta in (_read_json(self.root / INDEX_DIR / name) for name in metas))
        if not saved:
            self._pending_since = self._pending_since or now
            if now - self._pending_since < SAVED_INDEX_GRACE:
                return  # the writer is probably saving it right now
        try:
            same_model = manifest.get("fingerprint") == old.store.fingerprint
            new = Searcher.open(self.root, device=self.device, runtime=self.runtime,
                                embedder=old.embedder if same_model else None, rerank=old.rerank)
            if not same_model:
                new.embedder  # noqa: B018 - load the new model here, not in a user's request
        except CbirError as exc:
            self.last_error = str(exc)  # e.g. a writer mid-commit: the next look retries
            return
        self._current = new  # the swap: one assignment
        self._stamp, self._pending_since, self.last_error = stamp, None, None
        self.reloads += 1
