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
        self._offsets: list[int] = []  # where each shard's rows start in its file
        self._mapped: list[_MappedShard] = []  # not verified: for scattered reads
        self._live: list[np.ndarray] = []  # per shard: its live row numbers
        self._paths: list[str] = []
        self._dtypes: list[np.dtype] = []  # per shard: as stored (checked against the manifest)
        starts = [0]
        for shard in store.manifest["shards"]:
            if verified:
                verify_shard_file(store, shard)
            checked = store.read_shard(shard, mmap=True)  # shape and dtype checked against the manifest
            path = str(store.shard_paths(shard)[0])
            self._offsets.append(int(checked.offset))
            if not verified:
                self._mapped.append(_MappedShard(path, int(checked.offset), checked.shape, checked.dtype))
            self._paths.append(path)
            self._dtypes.append(checked.dtype)
            live = np.setdiff1d(np.arange(shard["rows"]), np.asarray(shard["removed"], dtype=np.int64))
            self._live.append(live)
            starts.append(starts[-1] + len(live))
        self._starts = np.asarray(starts, dtype=np.int64)

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
        dtype = self._dtypes[shard]
        row_bytes = self.dim * item_size(dtype)
        start = self._offsets[shard]
        with open(self._paths[shard], "rb") as fh:
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
            rows = self._live[shard][positions[sel] - self._starts[shard]]
            # Assigning into the float32 block converts float16 rows, these only.
            out[sel] = self._read_rows(shard, rows) if self.verified else self._mapped[shard].rows(rows)
        return out


class RowTable(Sequence[Row]):
    """The store's live rows in live-row order, kept as a few arrays instead of one
    Python object per row (a 1M-row store: ~70 MB instead of ~700 MB with a dict by
    id). Indexing gives :class:`Row` objects, made on demand; ids increase with the
    position (new rows get higher ids), so :meth:`position` is a binary search."""

    def __init__(self, ids: np.ndarray, sizes: np.ndarray, sha256: np.ndarray, paths: bytes,
                 path_ends: np.ndarray) -> None:
        self.ids, self.sizes, self.sha256 = ids, sizes, sha256
        self._paths, self._path_ends = paths, path_ends

    @classmethod
    def from_store(cls, store: FeatureStore) -> RowTable:
        import numpy as np

        ids: list[int] = []
        sizes: list[int] = []
        shas: list[str] = []
        paths: list[bytes] = []
        for shard in store.manifest["shards"]:
            removed = set(shard["removed"])
            for i, row in enumerate(store.shard_rows(shard, cache=False)):
                if i not in removed:
                    ids.append(row.id)
                    sizes.append(row.size)
                    shas.append(row.sha256)
                    paths.append(os.fsencode(row.path))
        ends = np.cumsum([len(p) for p in paths], dtype=np.int64) if paths else np.zeros(0, dtype=np.int64)
        # uint8 (n, 32), not numpy's "S32": bytes scalars drop trailing NUL bytes.
        sha = np.frombuffer(bytes.fromhex("".join(shas)), dtype=np.uint8).reshape(-1, 32)
        return cls(np.asarray(ids, dtype=np.int64), np.asarray(sizes, dtype=np.int64), sha, b"".join(paths), ends)

    def __len__(self) -> int:
        return len(self.ids)

    def _row(self, i: int) -> Row:
        start = int(self._path_ends[i - 1]) if i else 0
        path = os.fsdecode(self._paths[start:int(self._path_ends[i])])
        return Row(int(self.ids[i]), path, self.sha256[i].tobytes().hex(), int(self.sizes[i]))

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
        return (self._row(i) for i in range(len(self)))

    def position(self, row_id: int) -> int:
        """Where row ``row_id`` is; KeyError when it is not a live row."""
        import numpy as np

        i = int(np.searchsorted(self.ids, row_id))
        if i >= len(self.ids) or self.ids[i] != row_id:
            raise KeyError(row_id)
        return i


_TABLES: weakref.WeakKeyDictionary[FeatureStore, tuple[dict[str, Any], RowTable]] = weakref.WeakKeyDictionary()


def row_table(store: FeatureStore) -> RowTable:
    """The :class:`RowTable` of ``store``'s live rows, read once per state of its
    manifest (every change replaces the manifest dict), so the search backend and
    the Searcher share one."""
    cached = _TABLES.get(store)
    if cached is not None and cached[0] is store.manifest:
        return cached[1]
    table = RowTable.from_store(store)
    _TABLES[store] = (store.manifest, table)
    return table
