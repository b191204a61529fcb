"""``cbir evaluate``'s features: what computes each kind (a registry model or a
hand-crafted descriptor, both :class:`~cbir_cli.models.protocol.Embedder`), and
the per-kind feature cache -- a feature store keyed by file content, written
through the same write transaction and executor as ``cbir index``, so a re-run, or
a run on a smaller ``--limit``/another split, never re-embeds what is on disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ImageError
from ..fsutil import atomic_write_bytes
from ..imageio.decode import load_image
from ..models.bovw import BovwEncoder
from ..models.descriptors import HANDCRAFTED_DRAFT, descriptor_embedder
from ..models.loading import model_fingerprint
from ..models.quantize import sample_calibration
from ..paths import cache_root, normalise_path
from ..pipeline.executor import EmbedRequest
from ..pipeline.local import LocalExecutor
from ..pipeline.options import ExtractOptions, ExtractSummary
from ..pipeline.run_plan import RunPlan, plan_run
from ..pipeline.sync import sync_files
from ..resolve import ModelSettings
from ..store.transaction import write_transaction
from .datasets import LabelledCollection

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from ..models.registry import DescriptorSettings

NotifyCallback = Callable[[str], None]


def dataset_cache_key(collection: LabelledCollection) -> str:
    """``<layout>-<folder name>-<hash of the real root>``: readable and unique.
    Split and limit are not part of it: a store holds vectors per file, so every
    subset of a dataset shares the same stores. The real path (``..`` and links
    resolved): ``../shared/x`` and ``/work/shared/x`` are one dataset, not two caches
    embedded and calibrated twice."""
    digest = hashlib.sha256(os.fsencode(os.path.realpath(collection.root))).hexdigest()[:10]
    return f"{collection.kind}-{collection.root.name}-{digest}"


def default_features_root(collection: LabelledCollection) -> Path:
    """``<cache root>/evaluate/<dataset key>`` (``$CBIR_CACHE`` moves it, as it moves
    the ONNX exports)."""
    return cache_root() / "evaluate" / dataset_cache_key(collection)


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """Folder name of one feature store: the model/descriptor name and a hash of
    everything that defines its vectors (weights, preprocessing, vocabulary)."""
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return f"{fingerprint['model']}-{hashlib.sha256(blob).hexdigest()[:10]}"


@dataclass
class FeatureSource:
    """One kind of feature: its label, the fingerprint its store records, and what
    computes it (loaded only if something must be embedded)."""

    feature: str
    label: str
    fingerprint: dict[str, Any]
    request: EmbedRequest
    # How this run computes the vectors beyond the fingerprint (a deep model's
    # precision, runtime and device), for the JSON and the report.
    settings: dict[str, Any] = field(default_factory=dict)


def deep_source(model: str, weights: Path | None, options: ExtractOptions, paths: Sequence[str] = (),
                descriptor: DescriptorSettings | None = None, label: str | None = None,
                plan: RunPlan | None = None) -> FeatureSource:
    """A registry model with ``descriptor`` (default: the model's); with int8
    precision, calibrated on a seeded sample of ``paths``. Device, runtime and
    precision are the run plan's (:func:`~cbir_cli.pipeline.run_plan.plan_run`, as
    for ``cbir index``); ``plan``: one made already (``model`` and the rest are then
    its)."""
    if plan is None:
        plan = plan_run(cache_root() / "features", ModelSettings(model, weights, descriptor), options, existing=None)
    calibration = sample_calibration(paths, LocalExecutor(options).hash_files) if plan.precision == "int8" else None
    label = label or f"deep ({plan.model})"
    if calibration is not None:
        label = f"{label[:-1]}, int8)" if label.endswith(")") else f"{label} (int8)"
    settings = {"precision": plan.precision, "runtime": plan.runtime, "device": plan.device,
                "weights_file": str(plan.weights) if plan.weights is not None else None}
    return FeatureSource("deep", label, model_fingerprint(plan.model, plan.weights, plan.descriptor, calibration),
                         EmbedRequest(plan.model, plan.weights, plan.device, plan.runtime, descriptor=plan.descriptor,
                                      calibration=calibration), settings)


def descriptor_source(name: str) -> FeatureSource:
    """hsv or hog with the descriptor's default parameters."""
    embedder = descriptor_embedder(name)
    return FeatureSource(name, name, embedder.fingerprint(), EmbedRequest(name, embedder=embedder))


def _decoded_images(paths: Sequence[str]) -> Iterator[PILImage.Image]:
    """Decoded images of ``paths``, unreadable ones left out (they are reported
    when the features are extracted)."""

    for path in paths:
        try:
            yield load_image(path, draft_size=HANDCRAFTED_DRAFT)
        except ImageError:
            continue


def bovw_vocabulary(collection: LabelledCollection, cache_root: Path, vocab_size: int, fit_images: int,
                    on_notice: NotifyCallback | None = None) -> BovwEncoder:
    """A SIFT vocabulary fitted on a seeded sample of the collection's images (no
    labels used), cached as ``.npy`` keyed by the sample and the size, so the same
    collection gets the same vocabulary -- and hence the same feature store."""
    import numpy as np

    rng = np.random.default_rng(0)
    take = min(fit_images, len(collection))
    sample = sorted(collection.paths[i] for i in rng.choice(len(collection), size=take, replace=False))
    key = hashlib.sha256(json.dumps([vocab_size, sample]).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    vocab_file = cache_root / f"sift_bovw-vocab-{key}.npy"
    if vocab_file.is_file():
        return BovwEncoder.load(vocab_file)
    if on_notice:
        on_notice(f"fitting a {vocab_size}-word SIFT vocabulary on {take} images ...")
    encoder = BovwEncoder().fit(_decoded_images(sample), vocab_size=vocab_size)
    buffer = io.BytesIO()
    np.save(buffer, encoder.vocabulary, allow_pickle=False)
    cache_root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(vocab_file, buffer.getvalue())
    return encoder


def bovw_source(encoder: BovwEncoder) -> FeatureSource:
    embedder = descriptor_embedder("sift_bovw", encoder)
    return FeatureSource("sift_bovw", f"sift_bovw ({encoder.detector}, {encoder.vocab_size} words)",
                         embedder.fingerprint(), EmbedRequest("sift_bovw", embedder=embedder))


@dataclass
class CachedFeatures:
    vectors: np.ndarray  # (readable, dim), rows in collection order
    readable: np.ndarray  # bool (n,): which collection rows have a vector
    embedded: int  # computed by this run (the rest came from the cache)
    unreadable: list[tuple[str, str]]
    store_dir: Path
    seconds: float


def cache_features(paths: Sequence[str], store_dir: Path, source: FeatureSource,
                   options: ExtractOptions) -> CachedFeatures:
    """Vectors for ``paths`` from the store at ``store_dir``; files not stored yet
    (or changed since) are embedded first, committed shard by shard so an
    interrupted run keeps its work. Unlike ``cbir index`` nothing is ever removed:
    the store is a cache shared by every subset."""
    import numpy as np

    started = time.perf_counter()
    real_dirs: dict[str, str] = {}
    keys = [normalise_path(p, real_dirs) for p in paths]
    summary = ExtractSummary(files=len(paths))
    unreadable: list[tuple[str, str]] = []
    with write_transaction(store_dir, shard_size=options.shard_size, noun="vectors") as txn:
        store = txn.begin(source.fingerprint)
        # root=None: a path missing from this subset is not deleted from the cache.
        sync_files(txn, None, keys, source.request, LocalExecutor(options), summary,
                   lambda path, reason: unreadable.append((path, reason)))
        txn.commit()
        row_of = {r.path: i for i, r in enumerate(store.live_rows())}
        stored = store.load_vectors()
    positions = np.array([row_of.get(p, -1) for p in keys], dtype=np.int64)
    readable = positions >= 0
    return CachedFeatures(stored[positions[readable]], readable, summary.embedded, unreadable, store_dir,
                          time.perf_counter() - started)
