"""``cbir evaluate``: embed a labelled collection, search it all-vs-all, score it.

Pipeline, the same for every kind of feature (deep model or hand-crafted):

1. features: each image's vector is cached in a :class:`~cbir_cli.store.FeatureStore`
   (one store per feature kind, keyed by content hash like ``cbir index``), so a
   re-run, or a run on a smaller ``--limit``/another split, never re-embeds what is
   on disk. Default location: ``<user cache dir>/cbir/evaluate/<dataset>/<feature>``.
2. search: exact inner-product search of every image against all others
   (:func:`cbir_cli.index.exact_search`, chunked), ``depth + 1`` results per query,
   then the query's own hit is removed *by index* (so duplicate images with equal
   scores cannot push the wrong row out).
3. metrics: :func:`cbir_cli.metrics.retrieval_metrics` over the ranked labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .datasets import LabelledCollection
from .errors import CbirError
from .extract import ExtractOptions

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image as PILImage

    from .handcrafted import BovwEncoder

FEATURE_KINDS = ("deep", "hsv", "hog", "sift_bovw")
RELEVANCE_KINDS = ("product", "superclass")
# Rank the whole gallery (exact mAP) when it is at most this big; beyond, keep the
# (queries x depth) result arrays bounded and report mAP over the top `depth`.
FULL_RANKING_MAX = 5000
DEPTH_FOR_MAP_AT_R_MAX = 2000
# Hand-crafted descriptors look at <= 320 px (BoVW's max_side); JPEG draft decoding
# at that size is several times faster than a full decode of a large photo.
HANDCRAFTED_DRAFT = 320
HANDCRAFTED_VERSION = 1
NotifyCallback = Callable[[str], None]


@dataclass
class EvaluationOptions:
    """What to evaluate and how (the ``cbir evaluate`` options, grouped)."""

    features: tuple[str, ...] = ("deep",)
    model: str | None = None  # None: the default model (ResNet-50, else installed MobileNetV2)
    weights: Path | None = None
    relevance: str = "product"
    recall_ks: tuple[int, ...] = (1, 10, 100, 1000)  # SOP-convention Recall@K
    k: int = 5  # the paper's P@K, IR-Recall@K and Top-K accuracy
    depth: int | None = None  # results per query; None: see default_depth()
    features_dir: Path | None = None
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    bovw_vocab_size: int = 256
    bovw_fit_images: int = 500
    neighbours_kept: int = 10  # per query, for the report

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURE_KINDS]
        if unknown or not self.features:
            raise CbirError(f"unknown --features {', '.join(unknown) or '(none)'}; "
                            f"choose from: {', '.join(FEATURE_KINDS)}, all")
        if self.relevance not in RELEVANCE_KINDS:
            raise CbirError(f"unknown --relevance {self.relevance!r}; choose one of: {', '.join(RELEVANCE_KINDS)}")
        if self.k < 1 or any(k < 1 for k in self.recall_ks) or not self.recall_ks:
            raise CbirError("-k and --recall-at values must be integers >= 1")
        if self.depth is not None and self.depth < 1:
            raise CbirError(f"--depth must be >= 1 (got {self.depth})")
        if self.bovw_vocab_size < 2 or self.bovw_fit_images < 1:
            raise CbirError("the BoVW vocabulary needs >= 2 words and >= 1 fit image")


# ---------------------------------------------------------------------------
# Where cached features live.


def dataset_cache_key(collection: LabelledCollection) -> str:
    """``<layout>-<folder name>-<hash of the absolute root>``: readable and unique.
    Split and limit are not part of it: a store holds vectors per file, so every
    subset of a dataset shares the same stores."""
    digest = hashlib.sha256(os.fsencode(collection.root)).hexdigest()[:10]
    return f"{collection.kind}-{collection.root.name}-{digest}"


def default_features_root(collection: LabelledCollection) -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cbir", appauthor=False)) / "evaluate" / dataset_cache_key(collection)


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    """Folder name of one feature store: the model/descriptor name and a hash of
    everything that defines its vectors (weights, preprocessing, vocabulary)."""
    blob = json.dumps(fingerprint, sort_keys=True).encode()
    return f"{fingerprint['model']}-{hashlib.sha256(blob).hexdigest()[:10]}"


# ---------------------------------------------------------------------------
# Feature sources: anything that turns a decoded image into a vector.


def _describe_to_tensor(describe: Callable[[PILImage.Image], np.ndarray], img: PILImage.Image) -> torch.Tensor:
    import torch

    return torch.from_numpy(describe(img))


@dataclass(frozen=True)
class _DraftOnly:
    resize_size: int


class DescriptorEmbedder:
    """A hand-crafted descriptor dressed as an :class:`~cbir_cli.models.Embedder`
    for :func:`cbir_cli.extract.iter_batches`: the descriptor runs in the decoding
    workers (as the model's preprocessing would), so the batch that comes back
    already holds the vectors."""

    on_cuda = False

    def __init__(self, name: str, describe: Callable[[PILImage.Image], np.ndarray], draft_size: int) -> None:
        self.name = name
        self.config = _DraftOnly(draft_size)
        self.preprocess = partial(_describe_to_tensor, describe)

    def embed_tensors(self, batch: torch.Tensor) -> np.ndarray:
        return batch.numpy().astype("float32", copy=False)


@dataclass
class FeatureSource:
    """One kind of feature: its label, the fingerprint its store records, and what
    computes it: a ready ``embedder`` (hand-crafted descriptors), or None for a
    registry ``model`` that is loaded only if something must be embedded."""

    feature: str
    label: str
    fingerprint: dict[str, Any]
    model: str
    weights: Path | None = None
    embedder: Any = None


def deep_source(model: str, weights: Path | None) -> FeatureSource:
    from .models import model_fingerprint

    return FeatureSource("deep", f"deep ({model})", model_fingerprint(model, weights), model, weights)


def descriptor_source(name: str) -> FeatureSource:
    """hsv or hog with the descriptor's default parameters."""
    from .handcrafted import DESCRIPTORS, descriptor_dim

    fingerprint = {"model": name, "weights": f"handcrafted-v{HANDCRAFTED_VERSION}", "dim": descriptor_dim(name),
                   "preprocessing": {"draft_size": HANDCRAFTED_DRAFT}}
    return FeatureSource(name, name, fingerprint, name,
                         embedder=DescriptorEmbedder(name, DESCRIPTORS[name], HANDCRAFTED_DRAFT))


def _decoded_images(paths: Sequence[str]):
    """Decoded images of ``paths``, unreadable ones left out (they are reported
    when the features are extracted)."""
    from .errors import ImageError
    from .images import load_image

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

    from .handcrafted import BovwEncoder
    from .store import atomic_write_bytes

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
    import io

    buffer = io.BytesIO()
    np.save(buffer, encoder.vocabulary, allow_pickle=False)
    cache_root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(vocab_file, buffer.getvalue())
    return encoder


def bovw_source(encoder: BovwEncoder) -> FeatureSource:
    vocab_sha = hashlib.sha256(encoder.vocabulary.tobytes()).hexdigest()[:16]
    fingerprint = {"model": "sift_bovw", "weights": f"vocab-sha256:{vocab_sha}", "dim": encoder.vocab_size,
                   "preprocessing": {"draft_size": HANDCRAFTED_DRAFT, "detector": encoder.detector,
                                     "max_side": encoder.max_side, "max_keypoints": encoder.max_keypoints,
                                     "power": encoder.power}}
    return FeatureSource("sift_bovw", f"sift_bovw ({encoder.detector}, {encoder.vocab_size} words)", fingerprint,
                         "sift_bovw", embedder=DescriptorEmbedder("sift_bovw", encoder.transform, HANDCRAFTED_DRAFT))


# ---------------------------------------------------------------------------
# Stage 1: cached features for an explicit list of files.


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
    (or changed since) are embedded first by the same machinery as ``cbir index``
    (:func:`cbir_cli.extract.embed_plan`), committed shard by shard so an
    interrupted run keeps its work. Unlike :func:`cbir_cli.extract.sync_folder`
    nothing is ever removed: the store is a cache shared by every subset."""
    import numpy as np

    from .extract import EmbedRequest, ExtractSummary, Interrupted, ShardWriter, embed_plan, plan_sync
    from .locking import writer_lock
    from .store import FeatureStore

    started = time.perf_counter()
    summary = ExtractSummary(files=len(paths))
    unreadable: list[tuple[str, str]] = []
    with writer_lock(store_dir):
        store = FeatureStore.open_or_create(store_dir, source.fingerprint)
        writer = ShardWriter(store, options.shard_size)
        try:
            # root=None: a path missing from this subset is not deleted from the cache.
            plan = plan_sync(store, None, [Path(p) for p in paths], progress=options.progress)
            unreadable += plan.unreadable + plan.known_bad
            embed_plan(plan, store, writer, source.embedder, EmbedRequest(source.model, source.weights, options),
                       summary, lambda path, reason: unreadable.append((path, reason)))
            writer.flush()
        except KeyboardInterrupt:
            writer.flush()
            raise Interrupted(f"interrupted: {writer.committed} vectors cached in {store_dir}; "
                              "run the same command again to resume") from None
        row_of = {r.path: i for i, r in enumerate(store.live_rows())}
        stored = store.load_vectors()
    positions = np.array([row_of.get(p, -1) for p in paths], dtype=np.int64)
    readable = positions >= 0
    return CachedFeatures(stored[positions[readable]], readable, summary.embedded, unreadable, store_dir,
                          time.perf_counter() - started)


# ---------------------------------------------------------------------------
# Stage 2: all-vs-all search without the query itself.


def drop_self_hits(indices: np.ndarray) -> np.ndarray:
    """(n, k+1) neighbour indices of n self-queries -> (n, k) without the query.

    The query's own row is removed wherever it is; when it is not among the k+1
    (exact duplicates or all-zero vectors tie with it and may rank first) the last
    column goes instead, so every row keeps k results and never contains itself."""
    import numpy as np

    n, width = indices.shape
    own = indices == np.arange(n)[:, None]
    own[~own.any(axis=1), width - 1] = True
    return indices[~own].reshape(n, width - 1)


def rank_all_vs_all(vectors: np.ndarray, depth: int) -> np.ndarray:
    """Indices (n, depth) of each row's nearest other rows by inner product, best
    first; -1 pads where the gallery has fewer than ``depth`` others."""
    from .index import exact_search

    _, indices = exact_search(vectors, vectors, depth + 1)
    return drop_self_hits(indices)


def default_depth(num_images: int, num_relevant_max: int, options: EvaluationOptions) -> int:
    """Results per query: the whole gallery when small (exact mAP), else enough for
    the largest requested K and, if affordable, for MAP@R."""
    gallery = max(1, num_images - 1)
    if options.depth is not None:
        return min(options.depth, gallery)
    if gallery <= FULL_RANKING_MAX:
        return gallery
    wanted = max(*options.recall_ks, options.k, num_relevant_max if num_relevant_max <= DEPTH_FOR_MAP_AT_R_MAX else 1)
    return min(wanted, gallery)


# ---------------------------------------------------------------------------
# Stage 3: metrics.

# (key in the metrics dict, label on screen). Keys are stable for --json users.
def metric_rows(options: EvaluationOptions) -> list[tuple[str, str]]:
    k = options.k
    rows = [(f"recall@{kk}", f"R@{kk}") for kk in options.recall_ks]
    rows += [("map@r", "MAP@R"), ("map", "mAP"), (f"precision@{k}", f"P@{k}"),
             (f"ir_recall@{k}", f"IR-Recall@{k}"), ("top1_accuracy", "Top-1 acc"),
             (f"top{k}_accuracy", f"Top-{k} acc"), ("ns_score", "N-S score (0-4)")]
    return list(dict.fromkeys(rows))


def score_rankings(labels: np.ndarray, ranked: np.ndarray, options: EvaluationOptions) -> dict[str, Any]:
    """Metrics of all-vs-all rankings (``ranked``: indices into ``labels``, the
    query itself excluded). Values the setting cannot support are None with a note:
    Recall@K beyond the ranking depth, MAP@R when depth < R, N-S unless every class
    has exactly 4 images."""
    import numpy as np

    from .metrics import PAD_LABEL, num_relevant_from_labels, retrieval_metrics

    retrieved = np.where(ranked >= 0, labels[np.maximum(ranked, 0)], PAD_LABEL)
    num_relevant = num_relevant_from_labels(labels, labels, query_in_gallery=True)
    depth = ranked.shape[1]
    groups_of_four = bool(np.all(np.unique(labels, return_counts=True)[1] == 4))
    wanted = ["recall", "precision", "ir_recall", "map"]
    notes = []
    max_r = int(num_relevant.max()) if num_relevant.size else 0
    if depth >= max_r:
        wanted.append("map_at_r")
    else:
        notes.append(f"MAP@R not computed: needs --depth >= the largest class size - 1 ({max_r}), depth is {depth}")
    if groups_of_four:
        wanted.append("ns")
    ks = sorted({1, options.k, *(kk for kk in options.recall_ks if kk <= depth)})
    raw = retrieval_metrics(labels, retrieved, num_relevant, ks=ks, p_ks=(options.k,), metrics=wanted,
                            ns_include_self=True)
    out: dict[str, Any] = {key: None for key, _ in metric_rows(options)}
    for kk in options.recall_ks:
        out[f"recall@{kk}"] = raw.get(f"recall@{kk}")
    skipped_ks = [kk for kk in options.recall_ks if kk > depth]
    if skipped_ks:
        notes.append(f"R@{skipped_ks} not computed: only {depth} other images per query")
    out["map@r"] = raw.get("map@r")
    out["map"] = raw["map"]
    out[f"precision@{options.k}"] = raw[f"precision@{options.k}"]
    out[f"ir_recall@{options.k}"] = raw[f"ir_recall@{options.k}"]
    out["top1_accuracy"] = raw["recall@1"]
    out[f"top{options.k}_accuracy"] = raw[f"recall@{options.k}"]
    out["ns_score"] = raw.get("ns_score")
    if depth < len(labels) - 1:
        notes.append(f"mAP over the top {depth} results (relevant images ranked lower count as misses)")
    out.update(queries=raw["queries"], queries_without_positive=raw["queries_without_positive"],
               gallery=len(labels) - 1, depth=depth, notes=notes + raw["notes"])
    return out


# ---------------------------------------------------------------------------
# Orchestration.


@dataclass
class FeatureResult:
    feature: str
    label: str
    metrics: dict[str, Any]
    store_dir: Path
    embedded: int
    cached: int
    unreadable: list[tuple[str, str]]
    seconds: dict[str, float]
    collection: LabelledCollection  # the evaluated images (unreadable ones dropped)
    neighbours: np.ndarray  # (n, neighbours_kept) indices into `collection`, -1 pad

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "label": self.label, "metrics": self.metrics,
                "store": str(self.store_dir), "embedded": self.embedded, "cached": self.cached,
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


@dataclass
class Evaluation:
    dataset: str
    relevance: str
    options: EvaluationOptions
    results: list[FeatureResult]
    seconds: float
    peak_rss_mb: float
    peak_rss_children_mb: float

    @property
    def relevance_label(self) -> str:
        return ("superclass (same super_class_id counts as relevant)" if self.relevance == "superclass"
                else "product (same class counts as relevant)")

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """(label, one cell per feature) rows shared by the terminal table and the
        HTML report."""
        def cell(value: Any) -> str:
            if value is None:
                return "-"
            return f"{value:.4f}" if isinstance(value, float) else str(value)

        rows = [(label, [cell(r.metrics.get(key)) for r in self.results]) for key, label in metric_rows(self.options)]
        rows = [row for row in rows if any(c != "-" for c in row[1])]
        rows += [
            ("queries", [cell(r.metrics["queries"]) for r in self.results]),
            ("queries without positive", [cell(r.metrics["queries_without_positive"]) for r in self.results]),
            ("gallery size", [cell(r.metrics["gallery"]) for r in self.results]),
            ("unreadable images", [cell(len(r.unreadable)) for r in self.results]),
            ("embedded / cached", [f"{r.embedded} / {r.cached}" for r in self.results]),
            ("features s", [f"{r.seconds['features']:.1f}" for r in self.results]),
            ("search s", [f"{r.seconds['search']:.2f}" for r in self.results]),
        ]
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "relevance": self.relevance, "relevance_label": self.relevance_label,
                "results": [r.as_dict() for r in self.results], "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_rss_children_mb": round(self.peak_rss_children_mb, 1)}


def peak_rss_mb() -> tuple[float, float]:
    """Peak resident memory so far (MB) of this process and of its largest child
    (the decoding workers). Linux reports ru_maxrss in KiB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def relevance_labels(collection: LabelledCollection, relevance: str) -> np.ndarray:
    if relevance == "product":
        return collection.labels
    if collection.super_labels is None:
        raise CbirError("--relevance superclass needs super-class labels: use --dataset sop")
    return collection.super_labels


def feature_source(feature: str, collection: LabelledCollection, cache_root: Path, options: EvaluationOptions,
                   on_notice: NotifyCallback | None) -> FeatureSource:
    if feature == "deep":
        from .models import choose_default_model

        model = options.model
        if model is None:
            model, notice = choose_default_model()
            if notice and on_notice:
                on_notice(notice)
        return deep_source(model, options.weights)
    if feature == "sift_bovw":
        encoder = bovw_vocabulary(collection, cache_root, options.bovw_vocab_size, options.bovw_fit_images, on_notice)
        return bovw_source(encoder)
    return descriptor_source(feature)


def evaluate_feature(collection: LabelledCollection, source: FeatureSource, cache_root: Path,
                     options: EvaluationOptions) -> FeatureResult:
    import numpy as np

    store_dir = cache_root / fingerprint_key(source.fingerprint)
    cached = cache_features(collection.paths, store_dir, source, options.extract)
    evaluated = collection.subset(cached.readable)
    if len(evaluated) < 2:
        raise CbirError(f"{collection.describe()}: fewer than 2 readable images, nothing to evaluate")
    labels = relevance_labels(evaluated, options.relevance)
    num_relevant_max = int(np.unique(labels, return_counts=True)[1].max()) - 1
    depth = default_depth(len(evaluated), num_relevant_max, options)
    started = time.perf_counter()
    ranked = rank_all_vs_all(cached.vectors, depth)
    searched = time.perf_counter()
    metrics = score_rankings(labels, ranked, options)
    scored = time.perf_counter()
    return FeatureResult(
        feature=source.feature, label=source.label, metrics=metrics, store_dir=store_dir,
        embedded=cached.embedded, cached=int(cached.readable.sum()) - cached.embedded,
        unreadable=cached.unreadable,
        seconds={"features": cached.seconds, "search": searched - started, "metrics": scored - searched},
        collection=evaluated, neighbours=np.ascontiguousarray(ranked[:, : options.neighbours_kept]),
    )


def evaluate(collection: LabelledCollection, options: EvaluationOptions,
             on_notice: NotifyCallback | None = None) -> Evaluation:
    """Evaluate every feature kind in ``options.features`` on ``collection``."""
    started = time.perf_counter()
    relevance_labels(collection, options.relevance)  # fail before any embedding
    cache_root = Path(options.features_dir).expanduser() if options.features_dir else default_features_root(collection)
    results = []
    for feature in options.features:
        preparing = time.perf_counter()
        source = feature_source(feature, collection, cache_root, options, on_notice)
        prepared = time.perf_counter() - preparing
        result = evaluate_feature(collection, source, cache_root, options)
        result.seconds["features"] += prepared  # e.g. fitting the BoVW vocabulary
        results.append(result)
    own, children = peak_rss_mb()
    return Evaluation(collection.describe(), options.relevance, options, results,
                      time.perf_counter() - started, own, children)


def parse_features(text: str) -> tuple[str, ...]:
    """``--features``: one kind, a comma list, or ``all`` (every kind, deep first)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return FEATURE_KINDS
    unknown = [n for n in names if n not in FEATURE_KINDS]
    if unknown or not names:
        raise CbirError(f"unknown --features {text!r}; choose from: {', '.join(FEATURE_KINDS)}, all "
                        "(or a comma-separated list)")
    return tuple(dict.fromkeys(names))


def parse_ks(text: str, option: str) -> tuple[int, ...]:
    """A comma-separated list of integers >= 1, e.g. ``1,10,100,1000``."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CbirError(f"{option} wants comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CbirError(f"{option} values must be integers >= 1, got {text!r}")
    return tuple(dict.fromkeys(values))
