"""Row-addressable views of a store's live vectors: what search indexes are built
from and what exact re-ranking reads, without loading every shard into memory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .feature_store import FeatureStore

if TYPE_CHECKING:
    import numpy as np


class ShardVectors:
    """The store's live vectors, by position (the order of ``store.live_rows()``),
    read on demand from memory-mapped shards: only the rows asked for are paged in.

    ``shard_vectors[positions]`` -> float32 (len(positions), dim).

    ``verified``: read every shard in full and check its checksum (used to build an
    index, which must never be made from damaged data) instead of memory-mapping."""

    def __init__(self, store: FeatureStore, verified: bool = False) -> None:
        import numpy as np

        self.dim = store.dim
        self._arrays: list[np.ndarray] = []
        self._live: list[np.ndarray] = []  # per shard: its live row numbers
        starts = [0]
        for shard in store.manifest["shards"]:
            self._arrays.append(store.read_shard(shard, mmap=not verified))
            live = np.setdiff1d(np.arange(shard["rows"]), np.asarray(shard["removed"], dtype=np.int64))
            self._live.append(live)
            starts.append(starts[-1] + len(live))
        self._starts = np.asarray(starts, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.dim

    def __getitem__(self, positions: np.ndarray) -> np.ndarray:
        import numpy as np

        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"row positions out of range 0..{len(self) - 1}")
        out = np.empty((len(positions), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, positions, side="right") - 1
        for shard in np.unique(shard_of):
            sel = shard_of == shard
            out[sel] = self._arrays[shard][self._live[shard][positions[sel] - self._starts[shard]]]
        return out
