"""``cbir evaluate``: embed a labelled collection, search it all-vs-all, score it.

Pipeline, the same for every kind of feature (deep model or hand-crafted):

1. features: each image's vector is cached in a feature store (one per feature kind,
   keyed by content hash like ``cbir index``; see :mod:`.features`), so a re-run, or
   a run on a smaller ``--limit``/another split, never re-embeds what is on disk.
   Default location: ``<cache root>/evaluate/<dataset>/<feature>``.
2. search: exact inner-product search of every image against all others through a
   search backend, ``depth + 1`` results per query, then the query's own hit is
   removed *by index* (so duplicate images with equal scores cannot push the wrong
   row out); with re-ranking (:mod:`cbir_cli.search.rerank`, on by default) the
   query is kept out of its own expansion and ranking instead.
3. metrics: :func:`.metrics.retrieval_metrics` over the ranked labels, each with a
   bootstrap interval over the queries (:mod:`.intervals`).

Hand-crafted baselines (hsv, hog, sift_bovw) rank without re-ranking unless
``--rerank`` asks for it: they are the plain-search reference the deep model's
figures are read against.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..pipeline.options import ExtractOptions
from ..pipeline.run_plan import plan_run
from ..resolve import ModelSettings
from ..search.dba import DbaSettings
from ..search.rerank import NO_RERANKING, RerankSettings
from .compare import NO_DBA, Variant, compare_variants, model_descriptor, rank, ranking_backend
from .datasets import RELEVANCE_KINDS, LabelledCollection
from .features import (
    FeatureSource,
    NotifyCallback,
    bovw_source,
    bovw_vocabulary,
    cache_features,
    deep_source,
    default_features_root,
    descriptor_source,
    fingerprint_key,
)
from .intervals import Bootstrap
from .provenance import column_settings, environment
from .results import Evaluation, FeatureResult, metric_rows, recall_ks_shown

if TYPE_CHECKING:
    import numpy as np

    from ..models.registry import DescriptorSettings
    from ..search.protocol import SearchBackend

FEATURE_KINDS = ("deep", "hsv", "hog", "sift_bovw")
# Rank the whole gallery (exact mAP) when it is at most this big; beyond, keep the
# (queries x depth) result arrays bounded and report mAP over the top `depth`.
FULL_RANKING_MAX = 5000
DEPTH_FOR_MAP_AT_R_MAX = 2000


@dataclass
class EvaluationOptions:
    """What to evaluate and how (the ``cbir evaluate`` options, grouped)."""

    features: tuple[str, ...] = ("deep",)
    model: str | None = None  # None: the default model (ResNet-50, else installed MobileNetV2)
    weights: Path | None = None
    descriptor: DescriptorSettings | None = None  # None: the model's default
    relevance: str = "product"
    recall_ks: tuple[int, ...] = (1, 10, 100, 1000)  # SOP-convention Recall@K
    k: int = 5  # the paper's P@K, IR-Recall@K and Top-K accuracy
    depth: int | None = None  # results per query; None: see default_depth()
    features_dir: Path | None = None
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    bovw_vocab_size: int = 256
    bovw_fit_images: int = 500
    neighbours_kept: int = 10  # per query, for the report
    rerank: RerankSettings = field(default_factory=RerankSettings)  # query time
    dba: DbaSettings = field(default_factory=DbaSettings)  # index time (depth 0: none)
    compare: bool = False  # every descriptor / re-ranking variant of compare_variants()
    rerank_baselines: bool = False  # re-rank the hand-crafted features too (--rerank given)
    bootstrap: Bootstrap = field(default_factory=Bootstrap)  # the intervals over queries

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in FEATURE_KINDS]
        if unknown or not self.features:
            raise CbirError(f"unknown feature kind(s) {', '.join(unknown) or '(none)'}; "
                            f"choose from: {', '.join(FEATURE_KINDS)}, all")
        if self.relevance not in RELEVANCE_KINDS:
            raise CbirError(f"unknown relevance {self.relevance!r}; choose one of: {', '.join(RELEVANCE_KINDS)}")
        if self.k < 1 or any(k < 1 for k in self.recall_ks) or not self.recall_ks:
            raise CbirError("K values (of P@K and R@K) must be integers >= 1")
        if self.depth is not None and self.depth < 1:
            raise CbirError(f"the ranking depth must be >= 1 (got {self.depth})")
        if self.bovw_vocab_size < 2 or self.bovw_fit_images < 1:
            raise CbirError("the BoVW vocabulary needs >= 2 words and >= 1 fit image")
        if self.compare and self.features != ("deep",):
            raise CbirError("the comparison covers the deep model's variants; evaluate other features on their own")

    def variants(self) -> list[Variant]:
        """The columns to evaluate: every feature with these options, or the comparison."""
        if self.compare:
            return compare_variants()
        return [Variant(f, self.descriptor, self.rerank, self.dba) if f == "deep" or self.rerank_baselines
                else Variant(f, None, NO_RERANKING, NO_DBA) for f in self.features]


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


def rank_all_vs_all(vectors: np.ndarray, depth: int, backend: SearchBackend | None = None) -> np.ndarray:
    """Indices (n, depth) of each row's nearest other rows by inner product, best
    first; -1 pads where the gallery has fewer than ``depth`` others. ``backend``: an
    empty search backend to rank with (default: exact search on Faiss, the oracle);
    a re-ranking one keeps each query out of its own expansion and ranking."""
    import numpy as np

    from ..search.faiss_backend import FaissBackend
    from ..search.rerank import RerankingBackend

    backend = backend if backend is not None else FaissBackend()
    ids = np.arange(len(vectors), dtype=np.int64)
    backend.add(ids, vectors)
    if isinstance(backend, RerankingBackend):
        return rank(backend, vectors, depth, exclude=ids)
    _, indices = backend.search(vectors, depth + 1)
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

def score_rankings(labels: np.ndarray, ranked: np.ndarray, options: EvaluationOptions) -> dict[str, Any]:
    """Metrics of all-vs-all rankings (``ranked``: indices into ``labels``, the
    query itself excluded). Values the setting cannot support are None with a note:
    Recall@K beyond the ranking depth, MAP@R when depth < R, N-S unless every class
    has exactly 4 images. ``"intervals"`` holds each metric's bootstrap interval
    over the queries (``options.bootstrap``), None where the metric is."""
    import numpy as np

    from .intervals import bootstrap_intervals
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
        notes.append(f"MAP@R not computed: needs a ranking depth >= the largest class size - 1 ({max_r}), "
                     f"depth is {depth}")
    if groups_of_four:
        wanted.append("ns")
    ks = sorted({1, options.k, *(kk for kk in options.recall_ks if kk <= depth)})
    raw = retrieval_metrics(labels, retrieved, num_relevant, ks=ks, p_ks=(options.k,), metrics=wanted,
                            ns_include_self=True, per_query=True)
    out: dict[str, Any] = {key: raw.get(key) for key, _ in metric_rows(options)}
    skipped_ks = [kk for kk in recall_ks_shown(options) if f"recall@{kk}" not in raw]
    if skipped_ks:
        notes.append(f"R@{skipped_ks} not computed: only {depth} other images per query")
    shown = {key: values for key, values in raw["per_query"].items() if key in out}
    intervals = bootstrap_intervals(shown, options.bootstrap)
    if depth < len(labels) - 1:
        notes.append(f"mAP over the top {depth} results (relevant images ranked lower count as misses)")
    if not raw["queries"]:
        notes.append("no image has another image of its class: every metric is undefined (each class needs "
                     "at least 2 images)")
    # Undefined metrics are None (JSON null), never NaN: bare NaN is not JSON.
    out = {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in out.items()}
    out["intervals"] = {key: None if intervals.get(key) is None or out[key] is None else list(intervals[key])
                        for key in out}
    out.update(queries=raw["queries"], queries_without_positive=raw["queries_without_positive"],
               gallery=len(labels) - 1, depth=depth, notes=notes + raw["notes"])
    return out


# ---------------------------------------------------------------------------
# Orchestration.


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
        raise CbirError("superclass relevance needs super-class labels (the sop layout has them)")
    return collection.super_labels


def feature_source(feature: str, collection: LabelledCollection, cache_root: Path, options: EvaluationOptions,
                   on_notice: NotifyCallback | None, variant: Variant | None = None) -> FeatureSource:
    """What computes ``feature`` (for deep: ``variant``'s descriptor, else the options')."""
    if feature == "deep":
        descriptor = variant.descriptor if variant is not None else options.descriptor
        plan = plan_run(cache_root, ModelSettings(options.model, options.weights, descriptor), options.extract,
                        existing=None)  # the same choices as `cbir index` makes
        for line in plan.notices:
            if on_notice:
                on_notice(line)
        label = variant.name if variant is not None and variant.name else None
        return deep_source(plan.model, plan.weights, options.extract, collection.paths, plan.descriptor, label, plan)
    if feature == "sift_bovw":
        encoder = bovw_vocabulary(collection, cache_root, options.bovw_vocab_size, options.bovw_fit_images, on_notice)
        return bovw_source(encoder)
    return descriptor_source(feature)


def evaluate_feature(collection: LabelledCollection, source: FeatureSource, cache_root: Path,
                     options: EvaluationOptions, variant: Variant | None = None) -> FeatureResult:
    import numpy as np

    store_dir = cache_root / fingerprint_key(source.fingerprint)
    cached = cache_features(collection.paths, store_dir, source, options.extract)
    evaluated = collection.subset(cached.readable)
    if len(evaluated) < 2:
        raise CbirError(f"{collection.describe()}: fewer than 2 readable images, nothing to evaluate")
    labels = relevance_labels(evaluated, options.relevance)
    num_relevant_max = int(np.unique(labels, return_counts=True)[1].max()) - 1
    depth = default_depth(len(evaluated), num_relevant_max, options)
    import faiss  # noqa: F401 -- loaded before the clock starts: its import is not search time

    backend = ranking_backend(variant or Variant(source.feature))
    started = time.perf_counter()
    ranked = rank_all_vs_all(cached.vectors, depth, backend)
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
    notified = False
    for variant in options.variants():
        preparing = time.perf_counter()
        source = feature_source(variant.feature, collection, cache_root, options,
                                None if notified else on_notice, variant)
        notified = notified or variant.feature == "deep"
        prepared = time.perf_counter() - preparing
        result = evaluate_feature(collection, source, cache_root, options, variant)
        result.ranking = variant.describe(model_descriptor(options.model, options.weights))
        result.settings = column_settings(source, variant)
        result.seconds["features"] += prepared  # e.g. fitting the BoVW vocabulary
        results.append(result)
    own, children = peak_rss_mb()
    return Evaluation(collection.describe(), options.relevance, options, results,
                      time.perf_counter() - started, own, children, collection.kind, environment())


def parse_features(text: str) -> tuple[str, ...]:
    """``--features``: one kind, a comma list, or ``all`` (every kind, deep first)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return FEATURE_KINDS
    unknown = [n for n in names if n not in FEATURE_KINDS]
    if unknown or not names:
        raise CbirError(f"unknown feature kind(s) {text!r}; choose from: {', '.join(FEATURE_KINDS)}, all "
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
