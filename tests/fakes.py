"""Fakes for the four seams, in numpy only (no torch, no faiss): they let tests drive
the pipeline, the store's write transaction and the Searcher without a model or a
vector engine, and they are what every real implementation is compared with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir_cli.pipeline.executor import EmbedRequest, FailureCallback, VectorSink
from cbir_cli.pipeline.plan import HashResult, Item
from cbir_cli.search.protocol import BackendBase, BackendCheck


@dataclass(frozen=True)
class FakeConfig:
    name: str = "fake"
    dim: int = 48
    draft_size: int = 16


def _thumbnail(img: Image.Image) -> np.ndarray:
    """4x4 RGB thumbnail as 48 floats: enough to tell synthetic test images apart."""
    return np.asarray(img.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float32).reshape(-1) - 127.5


class FakeEmbedder:
    """An :class:`~cbir_cli.models.protocol.Embedder` in numpy: a 4x4 thumbnail."""

    def __init__(self) -> None:
        self.config = FakeConfig()
        self.preprocess = _thumbnail
        self.batches = 0

    def fingerprint(self) -> dict[str, Any]:
        return {"model": "fake", "weights": "none", "dim": self.config.dim, "preprocessing": {"thumbnail": 4}}

    def embed(self, batch: Any) -> np.ndarray:
        self.batches += 1
        x = np.asarray(batch, dtype=np.float32).reshape(len(batch), -1)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FakeBackend(BackendBase):
    """A :class:`~cbir_cli.search.protocol.SearchBackend`: exact search over numpy arrays."""

    name = "fake"

    def __init__(self) -> None:
        self.index_type = "none"
        self.ids = np.zeros(0, dtype=np.int64)
        self.matrix = np.zeros((0, 0), dtype=np.float32)

    @property
    def count(self) -> int:
        return len(self.ids)

    def build(self, store: Any, index_type: str, persist: bool = True) -> None:
        self.ids = np.array([r.id for r in store.live_rows()], dtype=np.int64)
        self.matrix = store.load_vectors()
        self.index_type = "exact (fake)"

    def refresh(self, store: Any, index_type: str | None = None) -> bool:
        self.build(store, index_type or "flat")
        return True

    def load(self, store: Any) -> bool:
        return False  # nothing is ever saved

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.matrix = np.concatenate([self.matrix, vectors]) if len(self.matrix) else vectors

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        self.ids, self.matrix = self.ids[keep], self.matrix[keep]

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        if not len(self.ids):
            return scores, ids
        all_scores = queries @ self.matrix.T
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        kk = order.shape[1]
        scores[:, :kk] = np.take_along_axis(all_scores, order, axis=1)
        ids[:, :kk] = self.ids[order]
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The oracle: every score of the full product, cut at the threshold."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        all_scores = queries @ self.matrix.T if len(self.ids) else np.zeros((len(queries), 0), np.float32)
        lims, scores, ids = [0], [], []
        for row in all_scores:
            hits = np.flatnonzero(row >= threshold)
            hits = hits[np.argsort(-row[hits], kind="stable")]
            scores.append(row[hits])
            ids.append(self.ids[hits])
            lims.append(lims[-1] + len(hits))
        return (np.asarray(lims, dtype=np.int64), np.concatenate([np.zeros(0, np.float32), *scores]),
                np.concatenate([np.zeros(0, np.int64), *ids]))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        position = {int(i): p for p, i in enumerate(self.ids)}
        return self.matrix[[position[int(i)] for i in ids]]

    def check(self, store: Any, live_vectors: np.ndarray) -> BackendCheck:
        return BackendCheck()

    def read_meta(self, store: Any) -> dict[str, Any] | None:
        return None  # nothing is ever saved


class CountingExecutor:
    """An :class:`~cbir_cli.pipeline.executor.Executor` wrapping another, recording
    what it was asked to do."""

    name = "counting"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hashed: list[str] = []
        self.embedded: list[str] = []

    @property
    def embeds_unhashed(self) -> bool:
        return bool(self.inner.embeds_unhashed)

    def list_images(self, root: Path) -> list[Path]:
        return self.inner.list_images(root)

    def hash_files(self, paths: Sequence[Path | str]) -> Iterable[HashResult]:
        self.hashed += [str(p) for p in paths]
        return self.inner.hash_files(paths)

    def embed(self, items: Sequence[Item], request: EmbedRequest, sink: VectorSink,
              on_failure: FailureCallback) -> int:
        self.embedded += [path for path, _, _ in items]
        return self.inner.embed(items, request, sink, on_failure)


class CrashingEmbedder(FakeEmbedder):
    """A :class:`FakeEmbedder` whose process dies (``os._exit``, as an OOM kill or a
    segfault would) on its ``crash_at``-th batch: a worker killed mid-run."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.crash_at = crash_at

    def embed(self, batch: Any) -> np.ndarray:
        if self.batches + 1 >= self.crash_at:
            import os

            os._exit(1)
        return super().embed(batch)


class PoisonEmbedder(FakeEmbedder):
    """A :class:`FakeEmbedder` whose vector is NaN for every image whose thumbnail
    starts dark: a model that sometimes produces what the store must refuse."""

    def embed(self, batch: Any) -> np.ndarray:
        out = super().embed(batch)
        out[np.asarray(batch, dtype=np.float32).reshape(len(batch), -1)[:, 0] < 0] = np.nan
        return out
