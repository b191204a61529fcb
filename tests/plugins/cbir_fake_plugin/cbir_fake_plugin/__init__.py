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
from cbir_cli.search.backends import BackendSpec
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
    """A :class:`~cbir_cli.search.protocol.SearchBackend`: the live vectors in one
    numpy matrix, searched exactly; nothing is saved (readers build it again)."""

    name = "fakebackend"

    def __init__(self) -> None:
        self.index_type = "exact (numpy)"
        self.ids = np.zeros(0, dtype=np.int64)
        self.matrix = np.zeros((0, 0), dtype=np.float32)

    @property
    def count(self) -> int:
        return len(self.ids)

    def build(self, store: Any, index_type: str, persist: bool = True) -> None:
        self.ids = np.array([r.id for r in store.live_rows()], dtype=np.int64)
        self.matrix = np.asarray(store.load_vectors(), dtype=np.float32)

    def refresh(self, store: Any, index_type: str | None = None) -> bool:
        return False  # nothing saved to bring up to date

    def load(self, store: Any) -> bool:
        return False

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.matrix = np.concatenate([self.matrix, vectors]) if len(self.matrix) else vectors

    def remove(self, ids: np.ndarray) -> None:
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        self.ids, self.matrix = self.ids[keep], self.matrix[keep]

    def _scores(self, queries: np.ndarray) -> np.ndarray:
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        return queries @ self.matrix.T if len(self.ids) else np.zeros((len(queries), 0), np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        all_scores = self._scores(queries)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        scores = np.full((len(all_scores), k), -np.inf, dtype=np.float32)
        ids = np.full((len(all_scores), k), -1, dtype=np.int64)
        scores[:, :order.shape[1]] = np.take_along_axis(all_scores, order, axis=1)
        ids[:, :order.shape[1]] = self.ids[order]
        return scores, ids

    def range_search(self, queries: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return pack_ranges([(row[row >= threshold], self.ids[row >= threshold]) for row in self._scores(queries)])

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        position = {int(i): p for p, i in enumerate(self.ids)}
        return self.matrix[[position[int(i)] for i in ids]]

    def check(self, store: Any, live_vectors: np.ndarray) -> BackendCheck:
        return BackendCheck(state="current", notes=["fakebackend keeps nothing on disk"])

    def read_meta(self, store: Any) -> dict[str, Any] | None:
        return {"index_type": "exact"}


class ExactBackendType:
    """The ``fakebackend`` :class:`~cbir_cli.search.backends.BackendType`."""

    name = "fakebackend"
    description = "exact numpy search, nothing saved (test plugin)"

    def choose(self, requested: BackendSpec, recorded: BackendSpec | None, index_type: str | None,
               store: Any) -> BackendSpec:
        if requested.uri or requested.collection:
            raise CbirError("fakebackend keeps nothing outside the index folder")
        return BackendSpec("fakebackend")

    def open(self, spec: BackendSpec, root: Path) -> ExactBackend:
        return ExactBackend()


FAMILY = FakeFamily()
BACKEND_TYPE = ExactBackendType()
