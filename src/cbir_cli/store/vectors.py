"""Row-addressable views of a store's live rows and vectors, built for large
stores: what search indexes are built from, what exact re-ranking reads and what
a :class:`~cbir_cli.search.searcher.Searcher` keeps in memory, without loading
every shard (or a Python object per row) at once."""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, overload

from ..errors import CorruptStoreError
from .feature_store import FeatureStore, Row
from .shard_format import item_size

if TYPE_CHECKING:
    import numpy as np


def verify_shard_file(store: FeatureStore, shard: dict[str, Any], block: int = 1 << 22) -> None:
    """Check a shard's vectors file against the manifest's sha256, reading it in
    blocks (a 1M-vector store's 8 GB never sit in memory at once)."""
    path, _ = store.shard_paths(shard)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while data := fh.read(block):
                digest.update(data)
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable shard ({exc.strerror or exc})") from None
    if digest.hexdigest() != shard["sha256"]:
        raise CorruptStoreError(f"{path}: unreadable shard (checksum mismatch, damaged or replaced)")


def live_rows_of(shard: dict[str, Any]) -> np.ndarray:
    """A shard's live row numbers (those not tombstoned), sorted."""
    import numpy as np

    keep = np.ones(shard["rows"], dtype=bool)
    keep[np.asarray(shard["removed"], dtype=np.int64)] = False
    return np.flatnonzero(keep)


class _MappedShard:
    """A read-only memory map of one shard's vectors for scattered row reads, that
    keeps nothing mapped in between: page cache folios are mapped whole on a fault
    (measured: reading 100 random rows of a 50k-row store added 200 MB of RSS, even
    with MADV_RANDOM), so after each read the mapping's pages are dropped again
    (MADV_DONTNEED; the page cache keeps them, the next read is as fast)."""

    def __init__(self, path: str, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> None:
        import mmap

        import numpy as np

        with open(path, "rb") as fh:
            self.mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        count = int(np.prod(shape))
        self.offset, self.row_bytes = offset, int(shape[1]) * item_size(dtype)
        self.array = np.frombuffer(self.mapped, dtype=dtype, count=count, offset=offset).reshape(shape)
        self._dontneed = getattr(mmap, "MADV_DONTNEED", None) if hasattr(self.mapped, "madvise") else None

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The rows as stored (the caller converts them)."""
        import mmap

        out = self.array[rows]
        if self._dontneed is not None:
            # Only the pages of the rows read (a whole-mapping call walks all of it).
            page = mmap.PAGESIZE
            for row in rows.tolist():
                start = (self.offset + row * self.row_bytes) // page * page
                end = self.offset + (row + 1) * self.row_bytes
                self.mapped.madvise(self._dontneed, start, end - start)
        return out


# Rows whose span in the file is at most this many times their count are read in
# one go; sparser ones one by one.
DENSE_SPAN = 4


class ShardVectors:
    """The store's live vectors, by position (the order of ``store.live_rows()``),
    read on demand from the shards: only the rows asked for are read.

    ``shard_vectors[positions]`` -> float32 (len(positions), dim), whatever the
    shards' dtype (:mod:`.shard_format`): only the rows read are converted.

    ``verified`` (building an index, which must never be made from damaged data):
    every shard's checksum is checked first, in blocks, and rows are then read
    with plain file reads, so memory stays bounded by what one call asks for.
    Otherwise (re-ranking a few rows per query) the shards are memory-mapped
    (:class:`_MappedShard`)."""

    def __init__(self, store: FeatureStore, verified: bool = False) -> None:
        import numpy as np

        self.dim = store.dim
        self.verified = verified
        self._store = store
        self._shards: list[dict[str, Any]] = list(store.manifest["shards"])
        # Opened on first use (a 1M-row store of 1,024-row shards has ~1,000 files;
        # a query touches a few): [offset, path, dtype, mapped (not verified)].
        self._opened: dict[int, tuple[int, str, np.dtype, _MappedShard | None]] = {}
        if verified:
            for shard in self._shards:
                verify_shard_file(store, shard)
        live_counts = [shard["rows"] - len(shard["removed"]) for shard in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(live_counts, dtype=np.int64)]).astype(np.int64)

    def _open(self, k: int) -> tuple[int, str, np.dtype, _MappedShard | None]:
        opened = self._opened.get(k)
        if opened is None:
            store, shard = self._store, self._shards[k]
            checked = store.read_shard(shard, mmap=True)  # shape and dtype checked against the manifest
            path = str(store.shard_paths(shard)[0])
            mapped = None if self.verified else _MappedShard(path, int(checked.offset), checked.shape, checked.dtype)
            opened = self._opened[k] = (int(checked.offset), path, checked.dtype, mapped)
        return opened

    def _live(self, k: int) -> np.ndarray:
        """Shard ``k``'s live row numbers."""
        return live_rows_of(self._shards[k])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def _read_rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """Rows (sorted shard row numbers) of one shard with plain file reads: one
        read of the span they cover when they are dense (adding rows in order),
        one per row when they are scattered (a training sample), so neither reads
        much more than it needs nor keeps any page of the file mapped. As stored."""
        import numpy as np

        first, last = int(rows.min()), int(rows.max())
        start, path, dtype, _ = self._open(shard)
        row_bytes = self.dim * item_size(dtype)
        with open(path, "rb") as fh:
            if last - first + 1 <= DENSE_SPAN * len(rows):
                data = os.pread(fh.fileno(), (last - first + 1) * row_bytes, start + first * row_bytes)
                return np.frombuffer(data, dtype=dtype).reshape(-1, self.dim)[rows - first]
            out = np.empty((len(rows), self.dim), dtype=dtype)
            for i, row in enumerate(rows.tolist()):
                out[i] = np.frombuffer(os.pread(fh.fileno(), row_bytes, start + row * row_bytes), dtype=dtype)
            return out

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions out of range 0..{len(self) - 1}")
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            rows = self._live(shard)[positions[sel] - self._starts[shard]]
            # Assigning into the float32 block converts float16 rows, these only.
            mapped = None if self.verified else self._open(shard)[3]
            out[sel] = self._read_rows(shard, rows) if mapped is None else mapped.rows(rows)
        return out


class _ShardRowData:
    """One shard's live rows as a few arrays (sizes, sha256 as uint8 (n, 32), the
    paths' bytes joined and where each ends), not one Python object per row."""

    def __init__(self, rows: Sequence[Row]) -> None:
        import numpy as np

        self.sizes = np.fromiter((r.size for r in rows), dtype=np.int64, count=len(rows))
        # uint8 (n, 32), not numpy's "S32": bytes scalars drop trailing NUL bytes.
        self.sha256 = np.frombuffer(bytes.fromhex("".join(r.sha256 for r in rows)), dtype=np.uint8).reshape(-1, 32)
        paths = [os.fsencode(r.path) for r in rows]
        self.paths = b"".join(paths)
        self.ends = np.cumsum([len(p) for p in paths], dtype=np.int64) if paths else np.zeros(0, dtype=np.int64)

    def row(self, j: int, row_id: int) -> Row:
        start = int(self.ends[j - 1]) if j else 0
        path = os.fsdecode(self.paths[start:int(self.ends[j])])
        return Row(row_id, path, self.sha256[j].tobytes().hex(), int(self.sizes[j]))


class RowTable(Sequence[Row]):
    """The store's live rows in live-row order, kept as a few arrays per shard
    instead of one Python object per row (a 1M-row store: ~70 MB instead of ~700
    MB with a dict by id). Indexing gives :class:`Row` objects, made on demand;
    ids increase with the position (new rows get higher ids), so :meth:`position`
    is a binary search.

    With ``first_ids`` (each shard's first row id, as a saved search index records
    them: a shard's rows have consecutive ids) the ids come from the manifest alone
    and a shard's rows file is read (checksum-verified) only when one of its rows
    is asked for: opening a 1M-row index reads no rows file. A rows file whose ids
    are not the recorded ones is refused."""

    def __init__(self, store: FeatureStore, ids: np.ndarray, data: dict[int, _ShardRowData]) -> None:
        import numpy as np

        self.ids = ids
        self._store = store
        self._shards: list[dict[str, Any]] = list(store.manifest["shards"])
        live_counts = [shard["rows"] - len(shard["removed"]) for shard in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(live_counts, dtype=np.int64)]).astype(np.int64)
        self._data = data

    @classmethod
    def from_store(cls, store: FeatureStore, first_ids: dict[str, int] | None = None) -> RowTable:
        import numpy as np

        shards = store.manifest["shards"]
        if first_ids is not None and all(shard["name"] in first_ids for shard in shards):
            parts = [first_ids[shard["name"]] + live_rows_of(shard) for shard in shards]
            return cls(store, np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64), {})
        ids: list[np.ndarray] = []
        data: dict[int, _ShardRowData] = {}
        for k, shard in enumerate(shards):
            rows = store.shard_rows(shard, cache=False)
            live = [rows[i] for i in live_rows_of(shard).tolist()]
            ids.append(np.fromiter((r.id for r in live), dtype=np.int64, count=len(live)))
            data[k] = _ShardRowData(live)
        return cls(store, np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64), data)

    def _shard_data(self, k: int) -> _ShardRowData:
        data = self._data.get(k)
        if data is None:
            store, shard = self._store, self._shards[k]
            rows = store.shard_rows(shard, cache=False)  # checksum-verified
            live = [rows[i] for i in live_rows_of(shard).tolist()]
            if [r.id for r in live] != self.ids[self._starts[k]:self._starts[k + 1]].tolist():
                path = store.shard_paths(shard)[1]
                raise CorruptStoreError(f"{path}: row ids are not the ones the search index recorded (damaged)")
            data = self._data[k] = _ShardRowData(live)
        return data

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, i: int) -> Row:
        import numpy as np

        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._shard_data(k).row(i - int(self._starts[k]), int(self.ids[i]))

    @overload
    def __getitem__(self, index: int) -> Row: ...

    @overload
    def __getitem__(self, index: slice) -> list[Row]: ...

    def __getitem__(self, index: int | slice) -> Row | list[Row]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"row {index} out of range")
        return self._row(index % len(self))

    def __iter__(self) -> Iterator[Row]:
        for k in range(len(self._shards)):
            start, stop = int(self._starts[k]), int(self._starts[k + 1])
            if stop > start:
                data = self._shard_data(k)
                for j in range(stop - start):
                    yield data.row(j, int(self.ids[start + j]))

    def position(self, row_id: int) -> int:
        """Where row ``row_id`` is; KeyError when it is not a live row."""
        import numpy as np

        i = int(np.searchsorted(self.ids, row_id))
        if i >= len(self.ids) or self.ids[i] != row_id:
            raise KeyError(row_id)
        return i


# The table is held weakly (it holds its store): shared while someone uses it.
_TABLES: weakref.WeakKeyDictionary[FeatureStore, tuple[dict[str, Any], weakref.ref[RowTable]]] = \
    weakref.WeakKeyDictionary()


def row_table(store: FeatureStore, first_ids: dict[str, int] | None = None) -> RowTable:
    """The :class:`RowTable` of ``store``'s live rows, read once per state of its
    manifest (every change replaces the manifest dict), so the search backend and
    the Searcher share one. ``first_ids``: see :class:`RowTable`."""
    cached = _TABLES.get(store)
    table = cached[1]() if cached is not None and cached[0] is store.manifest else None
    if table is None:
        table = RowTable.from_store(store, first_ids)
        _TABLES[store] = (store.manifest, weakref.ref(table))
    return table
