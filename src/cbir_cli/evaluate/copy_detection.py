"""``cbir evaluate --dataset copies``: the copy-detection protocol of :mod:`.copies`
run end to end on any folder of images.

1. gallery: every image below the folder, embedded through the same per-file
   feature cache as the other evaluations (:mod:`.features`);
2. queries: the distorted copies, made in memory and embedded with the same model;
   their vectors are cached too (keyed by the protocol, the originals' content and
   the model's fingerprint), so a re-run embeds nothing;
3. ranking: each copy searches the gallery through a search backend (exact, and
   re-ranked as the options say), whole gallery up to
   :data:`~.run.FULL_RANKING_MAX` images;
4. verification (default): each copy's first :data:`VERIFY_CANDIDATES` results
   (and, for a grey copy, the 5 most alike in grey levels) are checked with local features and geometry
   (:mod:`cbir_cli.search.verify`); those verified as the same picture move first;
5. scores: top-1 and mAP per distortion (:func:`.copies.score_copies`).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_write_bytes
from ..imageio.decode import load_image
from ..imageio.files import list_images
from ..imageio.local_features import DEFAULT_DETECTOR
from ..models.protocol import embed_images
from .compare import model_descriptor, rank, ranking_backend
from .copies import (
    DEFAULT_COUNT,
    DEFAULT_SEED,
    DISTORTIONS,
    PROTOCOL_VERSION,
    CopyQuery,
    CopyScores,
    check_distortions,
    copy_queries,
    original_ranks,
    render_copy,
    score_copies,
    twin_sets,
)
from .datasets import LabelledCollection
from .features import (
    CachedFeatures,
    FeatureSource,
    NotifyCallback,
    cache_features,
    default_features_root,
    fingerprint_key,
)
from .run import FULL_RANKING_MAX, EvaluationOptions, feature_source, peak_rss_mb

if TYPE_CHECKING:
    import numpy as np

    from ..models.protocol import Embedder
    from ..pipeline.options import ExtractOptions
    from ..search.protocol import SearchBackend

# Candidates verified per copy: measured on 40 Oxford-17 originals, a quarter-area
# crop's original is within the global descriptor's top 5 for 75 % of copies and
# its top 20 for 92.5 % (top-1 after verification 0.725 at 5, 0.90 at 20).
VERIFY_CANDIDATES = 20
# Beyond FULL_RANKING_MAX gallery images each copy keeps this many results; an
# original ranked lower counts as a miss (1/rank ~ 0).
COPY_DEPTH = 1000
COPY_BATCH = 32


@dataclass(frozen=True)
class CopyProtocol:
    """How many originals, which seed, which distortions; ``verify``: candidates per
    copy checked by geometric verification (0: the global ranking alone)."""

    count: int = DEFAULT_COUNT
    seed: int = DEFAULT_SEED
    distortions: tuple[str, ...] = DISTORTIONS
    verify: int = VERIFY_CANDIDATES

    def __post_init__(self) -> None:
        if self.count < 1:
            raise CbirError(f"the number of originals must be >= 1 (got {self.count})")
        check_distortions(self.distortions)
        if self.verify < 0:
            raise CbirError(f"the number of candidates to verify must be >= 0 (got {self.verify})")


@dataclass
class CopyResult:
    feature: str
    label: str
    ranking: str  # the descriptor and re-ranking, in words
    scores: CopyScores
    embedded: int  # gallery images embedded by this run
    copies_embedded: int
    seconds: dict[str, float]
    verification: dict[str, Any] | None = None  # detector, candidates, pairs verified as copies

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "label": self.label, "ranking": self.ranking, **self.scores.as_dict(),
                "embedded": self.embedded,
                "copies_embedded": self.copies_embedded, "verification": self.verification,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


@dataclass
class CopyEvaluation:
    dataset: str
    protocol: CopyProtocol
    originals_with_twins: int
    results: list[CopyResult]
    unreadable: list[tuple[str, str]]
    seconds: float
    peak_rss_mb: float
    notes: list[str] = field(default_factory=list)

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """(label, one "top-1 / mAP" cell per feature, each with its interval where
        drawn) per distortion, then the means."""
        def cell(scores: CopyScores, kind: str | None) -> str:
            top1 = scores.top1[kind] if kind else scores.mean_top1
            mean_ap = scores.map[kind] if kind else scores.mean_map
            return f"{_figure(top1, scores.interval('top1', kind))} / {_figure(mean_ap, scores.interval('map', kind))}"

        rows = [(kind, [cell(r.scores, kind) for r in self.results]) for kind in self.protocol.distortions]
        rows.append(("mean", [cell(r.scores, None) for r in self.results]))
        return rows

    def compare_rows(self) -> tuple[list[str], list[list[str]]]:
        """One row per result: mean top-1 and mAP, then the hardest distortions' top-1."""
        hard = [k for k in ("crop_side50", "gray", "rot90", "text") if k in self.protocol.distortions]
        rows = [[r.label, f"{r.scores.mean_top1:.3f}", f"{r.scores.mean_map:.3f}",
                 *(f"{r.scores.top1[k]:.3f}" for k in hard)] for r in self.results]
        return ["variant", "mean top-1", "mean mAP", *(f"{k} top-1" for k in hard)], rows

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "originals": self.protocol.count, "seed": self.protocol.seed,
                "distortions": list(self.protocol.distortions), "originals_with_twins": self.originals_with_twins,
                "results": [r.as_dict() for r in self.results],
                "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "notes": self.notes, "seconds": round(self.seconds, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}


def _figure(value: float, interval: tuple[float, float] | None) -> str:
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def copy_collection(root: str | Path) -> LabelledCollection:
    """Every image below ``root`` as an (unlabelled) gallery. Its features share the
    per-file cache of ``--dataset folder`` on the same folder."""
    import numpy as np

    paths = [str(p) for p in list_images(root)]
    return LabelledCollection(kind="folder", root=Path(root).expanduser().absolute(), split="all", paths=paths,
                              labels=np.zeros(len(paths), dtype=np.int64))


def rank_queries(gallery: np.ndarray, queries: np.ndarray, depth: int,
                 backend: SearchBackend | None = None) -> np.ndarray:
    """(queries, depth) gallery indices, best first, -1 padded. ``backend``: an empty
    search backend (default: exact search on Faiss; a re-ranking one re-ranks)."""
    import numpy as np

    from ..search.faiss_backend import FaissBackend

    backend = backend if backend is not None else FaissBackend()
    backend.add(np.arange(len(gallery), dtype=np.int64), gallery)
    return rank(backend, queries, depth)


def verify_copy_ranking(ranked: np.ndarray, queries: Sequence[CopyQuery], gallery_paths: Sequence[str],
                        candidates: int) -> tuple[np.ndarray, int]:
    """:func:`~cbir_cli.search.verify.verify_ranked` of the copies' rankings, with
    the colour-blind second look (:mod:`cbir_cli.search.colour_blind`) for grey
    copies. Each copy is made again (in memory) for its local features; the
    gallery's are extracted once per run, for the candidates only."""
    from ..imageio.grey_signature import grey_signature
    from ..imageio.local_features import extract, extract_file
    from ..search.colour_blind import GreySignatures
    from ..search.verify import FeatureCache, verify_ranked

    signatures = GreySignatures(gallery_paths)
    second_look: dict[int, list[int]] = {}

    def copy_features(q: int):
        copy = render_copy(queries[q], lambda i: load_image(gallery_paths[i]))
        signature, grey = grey_signature(copy)
        if grey:
            second_look[q] = signatures.nearest(signature)
        return extract(copy)

    gallery = FeatureCache(lambda i: extract_file(gallery_paths[i]))
    return verify_ranked(ranked, copy_features, gallery, candidates, more=lambda q: second_look.get(q, ()))


def _copies_key(protocol: CopyProtocol, queries: Sequence[CopyQuery], paths: Sequence[str],
                fingerprint: dict[str, Any]) -> str:
    """Cache key of the copies' vectors: protocol, model, and the originals' content."""
    originals = sorted({q.original for q in queries})
    digest = hashlib.sha256()
    for i in originals:
        digest.update(hashlib.sha256(Path(paths[i]).read_bytes()).digest())
    ident = {"protocol": PROTOCOL_VERSION, "count": protocol.count, "seed": protocol.seed,
             "distortions": list(protocol.distortions), "originals": digest.hexdigest(),
             "fingerprint": fingerprint}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def embed_copies(queries: Sequence[CopyQuery], paths: Sequence[str], embedder: Embedder,
                 on_progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Vectors of every copy, rows in ``queries`` order. Each original is decoded
    once (full size) and all its copies are made from it."""
    import numpy as np

    by_original: dict[int, list[int]] = {}
    for row, query in enumerate(queries):
        by_original.setdefault(query.original, []).append(row)
    out = np.zeros((len(queries), int(embedder.config.dim)), dtype=np.float32)
    pending_rows: list[int] = []
    pending_images: list[Any] = []

    def flush() -> None:
        out[pending_rows] = embed_images(embedder, pending_images)
        if on_progress:
            on_progress(len(pending_rows))
        pending_rows.clear()
        pending_images.clear()

    for original, rows in by_original.items():
        image = load_image(paths[original])
        for row in rows:
            pending_rows.append(row)
            pending_images.append(render_copy(queries[row], lambda _i, image=image: image))
            if len(pending_rows) >= COPY_BATCH:
                flush()
    if pending_rows:
        flush()
    return out


def cached_copy_vectors(cache_file: Path, queries: Sequence[CopyQuery], paths: Sequence[str],
                        load_embedder: Callable[[], Embedder], progress: bool) -> tuple[np.ndarray, int]:
    """The copies' vectors from ``cache_file``, else embedded and saved there."""
    import numpy as np

    if cache_file.is_file():
        vectors = np.load(cache_file)
        if vectors.shape[0] == len(queries):
            return vectors, 0
    embedder = load_embedder()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(queries), desc=f"embedding copies ({embedder.config.name})", unit="img")
    try:
        vectors = embed_copies(queries, paths, embedder, bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_file, buffer.getvalue())
    return vectors, len(queries)


@dataclass
class CopyVectors:
    """One feature's vectors for the protocol: the readable gallery (rows in
    ``gallery_paths`` order) and every copy (rows in ``queries`` order)."""

    gallery_paths: list[str]
    gallery: CachedFeatures
    queries: list[CopyQuery]
    copies: np.ndarray
    copies_embedded: int


def copy_vectors(collection: LabelledCollection, source: FeatureSource, cache_root: Path, protocol: CopyProtocol,
                 extract: ExtractOptions) -> CopyVectors:
    """The gallery's and the copies' vectors of one feature kind, from the caches
    below ``cache_root`` where they are (embedded and cached where not). Also what
    other measurements build on (``bench/dedup_threshold.py``)."""
    cached = cache_features(collection.paths, cache_root / fingerprint_key(source.fingerprint), source, extract)
    gallery_paths = [p for p, ok in zip(collection.paths, cached.readable) if ok]
    queries = copy_queries(len(gallery_paths), protocol.count, protocol.seed, protocol.distortions)
    cache_file = cache_root / "copies" / f"{fingerprint_key(source.fingerprint)}-" \
        f"{_copies_key(protocol, queries, gallery_paths, source.fingerprint)}.npy"
    vectors, embedded = cached_copy_vectors(cache_file, queries, gallery_paths, source.request.load, extract.progress)
    return CopyVectors(gallery_paths, cached, queries, vectors, embedded)


def evaluate_copies(root: str | Path, options: EvaluationOptions, protocol: CopyProtocol | None = None,
                    on_notice: NotifyCallback | None = None) -> CopyEvaluation:
    """Run the copy-detection protocol on the images below ``root`` for every
    feature kind in ``options.features``."""
    started = time.perf_counter()
    protocol = protocol or CopyProtocol()
    collection = copy_collection(root)
    cache_root = Path(options.features_dir).expanduser() if options.features_dir else default_features_root(collection)
    results: list[CopyResult] = []
    unreadable: list[tuple[str, str]] = []
    notes: list[str] = []
    twins: dict[int, Any] | None = None
    for variant in options.variants():
        source = feature_source(variant.feature, collection, cache_root, options, on_notice, variant)
        feature_started = time.perf_counter()
        data = copy_vectors(collection, source, cache_root, protocol, options.extract)
        unreadable = data.gallery.unreadable
        gallery_paths, queries = data.gallery_paths, data.queries
        if twins is None:
            twins = twin_sets(gallery_paths, sorted({q.original for q in queries}))
        embedded_at = time.perf_counter()
        depth = len(gallery_paths) if len(gallery_paths) <= FULL_RANKING_MAX else COPY_DEPTH
        ranked = rank_queries(data.gallery.vectors, data.copies, depth, ranking_backend(variant))
        searched_at = time.perf_counter()
        verification = None
        ranking = variant.describe(model_descriptor(options.model, options.weights))
        if protocol.verify:
            ranked, verified = verify_copy_ranking(ranked, queries, gallery_paths, protocol.verify)
            verification = {"detector": DEFAULT_DETECTOR, "candidates": protocol.verify, "verified_pairs": verified}
            ranking += f", top {protocol.verify} verified ({DEFAULT_DETECTOR} + similarity RANSAC)"
        ranks = original_ranks(ranked, [q.original for q in queries], twins)
        scores = score_copies(ranks, [q.kind for q in queries], [q.original for q in queries], options.bootstrap)
        results.append(CopyResult(variant.feature, source.label, ranking, scores, data.gallery.embedded,
                                  data.copies_embedded,
                                  {"features": embedded_at - feature_started, "search": searched_at - embedded_at,
                                   "verify": time.perf_counter() - searched_at}, verification))
        if depth < len(gallery_paths):
            notes.append(f"each copy ranks the top {depth} of {len(gallery_paths)} images; an original ranked "
                         "lower counts as a miss")
    bootstrap = options.bootstrap
    if bootstrap.resamples and twins:
        notes.append(f"{bootstrap.confidence:.0%} intervals: percentile bootstrap over the {len(twins)} originals "
                     f"(each with all its copies), {bootstrap.resamples} resamples, seed {bootstrap.seed}")
    own, _ = peak_rss_mb()
    description = f"copies of {protocol.count} seeded images of {collection.root} ({len(collection)} images)"
    with_twins = sum(len(t) > 1 for t in (twins or {}).values())
    if with_twins:
        notes.append(f"{with_twins} originals have pixel-identical twins in the collection; ranking a twin "
                     "first counts as finding the original")
    return CopyEvaluation(description, protocol, with_twins, results, unreadable, time.perf_counter() - started,
                          own, sorted(set(notes)))
