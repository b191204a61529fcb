"""Where each live path's row is: the index that makes replacing or removing paths
cost O(paths), not a scan of every stored row.

Every new shard tombstones the live rows of its paths (a changed file replaces its
old row). Finding them by scanning all shards' rows made each shard cost O(rows in
the store): at 300k rows in 1,024-row shards, 40 ms per shard on the 2-core CI box,
quadratic over a million-image run (bench/store_scaling.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .manifest import Row

Shard = dict[str, Any]


class LivePaths:
    """path -> (shard name, row number) of every live row, built from the rows
    files at first use and then kept in step by :meth:`moved`. Should the shard
    list change any other way (a repair dropping shards), the store calls
    :meth:`invalidate` and the next lookup builds the index again. (No check of
    the shard list per lookup: that alone was O(shards) per commit.)"""

    def __init__(self) -> None:
        self._where: dict[str, tuple[str, int]] | None = None

    def rows_of(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
                paths: Iterable[str]) -> dict[str, set[int]]:
        """Shard name -> the live row numbers holding any of ``paths``."""
        if self._where is None:
            self._build(shards, shard_rows)
        assert self._where is not None
        hits: dict[str, set[int]] = {}
        for path in paths:
            found = self._where.get(path)
            if found is not None:
                hits.setdefault(found[0], set()).add(found[1])
        return hits

    def locate(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
               paths: Iterable[str]) -> dict[str, tuple[str, int]]:
        """path -> (shard name, row number) of the live rows of ``paths``."""
        if self._where is None:
            self._build(shards, shard_rows)
        assert self._where is not None
        return {p: self._where[p] for p in paths if p in self._where}

    def rows_by_sha(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]],
                    shas: Iterable[str]) -> dict[str, Row]:
        """sha256 -> a live row of that content (a scan of every live row)."""
        wanted = set(shas)
        out: dict[str, Row] = {}
        for shard in shards:
            removed = set(shard["removed"])
            out.update((r.sha256, r) for i, r in enumerate(shard_rows(shard))
                       if r.sha256 in wanted and i not in removed)
        return out

    def committed(self, manifest: dict[str, Any]) -> None:
        """(The on-disk :class:`~.row_catalog.RowCatalog` commits here; nothing to do.)"""

    def close(self) -> None:
        """(Idem.)"""

    def moved(self, gone: Iterable[str], added: tuple[str, list[Row]] | None = None) -> None:
        """Record a change just made to the store: ``gone`` paths lost their live
        row, ``added`` = (shard name, its rows) are new."""
        if self._where is None:
            return  # not built yet: the first lookup builds it from the manifest
        for path in gone:
            self._where.pop(path, None)
        if added is not None:
            name, rows = added
            self._where.update((row.path, (name, i)) for i, row in enumerate(rows))

    def invalidate(self) -> None:
        self._where = None

    def _build(self, shards: Sequence[Shard], shard_rows: Callable[[Shard], list[Row]]) -> None:
        where: dict[str, tuple[str, int]] = {}
        for shard in shards:
            removed = set(shard["removed"])
            name = shard["name"]
            where.update((row.path, (name, i)) for i, row in enumerate(shard_rows(shard)) if i not in removed)
        self._where = where
