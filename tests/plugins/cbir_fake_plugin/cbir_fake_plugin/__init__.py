"""A cbir-cli plugin: the ``fake`` model family (``--model fake:tiny``, a fixed
random projection of a colour thumbnail, in numpy) and the ``fakebackend`` search
backend (exact numpy search, built from the store's vectors in memory). It uses
only cbir-cli's public seams: the protocols, :class:`ModelConfig`, CbirError."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cbir_cli.errors import CbirError
from cbir_cli.models.protocol import EmbedderBase, model_fingerprint_of
from cbir_cli.models.registry import ModelConfig
from cbir_cli.search.backends import BackendSpec, InFolderBackendType
from cbir_cli.search.protocol import BackendBase, BackendCheck
from cbir_cli.search.range import pack_ranges

THUMB = 4  # a THUMB x THUMB colour thumbnail: 48 numbers
MODELS = {"tiny": 16, "small": 32}  # model -> dim


def thumbnail(img: Image.Image) -> np.ndarray:
    """uint8 (3, THUMB, THUMB) pixels (runs in the decoding workers: module level, picklable)."""
    return np.asarray(img.convert("RGB").resize((THUMB, THUMB), Image.BILINEAR), dtype=np.uint8).transpose(2, 0, 1)


class FakeEmbedder(EmbedderBase):
    """Centred thumbnail pixels through a fixed (seeded) random projection."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.preprocess = thumbnail
        self.projection = np.random.default_rng(7).standard_normal((3 * THUMB * THUMB, config.dim)).astype(np.float32)

    def fingerprint(self) -> dict[str, Any]:
        return model_fingerprint_of(self.config, "seed-7", family="fake")

    def embed(self, batch: Any) -> np.ndarray:
        x = np.stack([np.asarray(b, dtype=np.float32).reshape(-1) for b in batch]) - 127.5
        y = x @ self.projection
        return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class FakeFamily:
    """The ``fake`` :class:`~cbir_cli.models.family.ModelFamily`."""

    name = "fake"
    description = "numpy random projections of a 4x4 thumbnail (test plugin)"

    def model_names(self) -> Sequence[str]:
        return tuple(MODELS)

    def config(self, model: str) -> ModelConfig:
        if model not in MODELS:
            raise CbirError(f"unknown model fake:{model}; choose one of: {', '.join('fake:' + m for m in MODELS)}")
        return ModelConfig(name=f"fake:{model}", description=f"fake {MODELS[model]}-d projection (test plugin)",
                           dim=MODELS[model], input_size=THUMB, resize_size=THUMB, tags=("test",))

    def weights_status(self, model: str) -> str:
        return "built-in"

    def load(self, model: str, weights: Any, device: str, runtime: str, descriptor: Any,
             calibration: Any) -> FakeEmbedder:
        if calibration is not None:
            raise CbirError("the fake models have no int8 form; use fp32 precision")
        return FakeEmbedder(self.config(model))

    def fingerprint(self, model: str, weights: Any, descriptor: Any, calibration: Any) -> dict[str, Any]:
        return model_fingerprint_of(self.config(model), "seed-7", family="fake")

    def fingerprint_problems(self, fp: dict[str, Any], weights_path: str | None, where: Any) -> list[str]:
        model = str(fp.get("model")).partition(":")[2]
        if model not in MODELS:
            return [f"{where}: unknown model {fp.get('model')!r}"]
        return [] if fp == self.fingerprint(model, None, None, None) else [f"{where}: fake model changed"]


class ExactBackend(BackendBase):
    """A :class:`~cbir_cli.search.protocol.SearchBackend`: the live vectors by row
    id, searched exactly in numpy; nothing is saved (readers build it again)."""

    name = "fakebackend"
    index_type = "exact (numpy)"

    def __init__(self) -> None:
        self.rows: dict[int, np.ndarray] = {}

    @property
    def count(self) -> int:
        return len(self.rows)

    def build(self, store: Any, index_type: str, persist: bool = True) -> None:
        self.rows = {}
        self.add(np.array([r.id for r in store.live_rows()], dtype=np.int64), store.load_vectors())

    def refresh(self, store: Any, index_type: str | None = None) -> bool:
        return False  # nothing saved to bring up to date

    def load(self, store: Any) -> bool:
        return False

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.rows.update(zip((int(i) for i in ids), np.asarray(vectors, dtype=np.float32)))

    def remove(self, ids: np.ndarray) -> None:
        for i in ids:
            self.rows.pop(int(i), None)

    def _scored(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row ids, scores (nq, n)), each query's columns best first."""
        ids = np.fromiter(self.rows, dtype=np.int64, count=len(self.rows))
        matrix = np.stack(list(self.rows.values())) if self.rows else np.zeros((0, 1), np.float32)
        scores = np.atleast_2d(np.asarray(queries, dtype=np.float32)) @ matrix.T
        order = np.argsort(-scores, axis=1, kind="stable")
        return ids[order], np.take_along_axis(scores, order, axis=1)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self._scored(queries)
        pad = max(0, k - ids.shape[1])
        return (np.pad(scores[:, :k], ((0, 0), (0, pad)), constant_values=-np.inf),
                np.pad(ids[:, :k], ((0, 0), (0, pad)), constant_values=-1))

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids, scores = self._scored(queries)
        return pack_ranges([(s[s >= threshold], i[s >= threshold]) for s, i in zip(scores, ids)])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return np.stack([self.rows[int(i)] for i in ids])

    def check(self, store: Any, live_vectors: np.ndarray) -> BackendCheck:
        return BackendCheck(state="current", notes=["fakebackend keeps nothing on disk"])

    def read_meta(self, store: Any) -> dict[str, Any] | None:
        return {"index_type": "exact"}


class ExactBackendType(InFolderBackendType):
    """The ``fakebackend`` :class:`~cbir_cli.search.backends.BackendType`."""

    name = "fakebackend"
    description = "exact numpy search, nothing saved (test plugin)"

    def open(self, spec: BackendSpec, root: Path) -> ExactBackend:
        return ExactBackend()


FAMILY = FakeFamily()
BACKEND_TYPE = ExactBackendType()
