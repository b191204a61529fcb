"""Retrieval metrics as pure, vectorised functions over label arrays.

Conventions (shared by every function here)
-------------------------------------------
``query_labels``
    int array, shape ``(q,)``; real labels are ``>= 0``.
``retrieved_labels``
    int array, shape ``(q, K)``: the labels of the ranked results of each query,
    best first, **with the query itself already removed** by the caller. Rows with
    fewer than ``K`` results are padded with :data:`PAD_LABEL` (``-1``), a value that
    never equals a real label and therefore never counts as relevant.
``num_relevant``
    int array, shape ``(q,)``: how many gallery items share the query's label,
    **not counting the query itself** (see :func:`num_relevant_from_labels`).
``rel``
    bool array, shape ``(q, K)``: ``rel[i, j]`` is True when the ``j``-th result of
    query ``i`` is relevant (see :func:`relevance_matrix`).

The per-metric functions are strict: queries with ``num_relevant == 0`` make the
metrics that divide by it raise ``ValueError``; :func:`retrieval_metrics` drops them
and reports how many. Every metric is a mean over queries of a per-query value
(:func:`per_query_metrics`), which is what the bootstrap intervals resample.

All functions work on whole arrays (no Python loop over queries); ``(q, K)`` float
temporaries are made in row blocks, so ``q = 60_000`` and ``K = 1_000`` is fine.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_METRICS",
    "METRIC_NAMES",
    "PAD_LABEL",
    "average_precision",
    "ir_recall_at_k",
    "map_at_r",
    "mean_average_precision",
    "ns_score",
    "num_relevant_from_labels",
    "per_query_metrics",
    "precision_at_k",
    "recall_at_k",
    "relevance_matrix",
    "retrieval_metrics",
    "top_k_accuracy",
]

PAD_LABEL: int = -1
"""Label used to pad ``retrieved_labels`` rows with fewer than ``K`` results.
It never matches a query label (real labels are ``>= 0``)."""

METRIC_NAMES: tuple[str, ...] = ("recall", "precision", "ir_recall", "map", "map_at_r", "ns")
"""Metric groups accepted by :func:`retrieval_metrics` (``metrics=``)."""

DEFAULT_METRICS: tuple[str, ...] = ("recall", "precision", "map", "map_at_r")
"""What :func:`retrieval_metrics` computes when ``metrics`` is None."""

# Upper bound on the number of elements of a (rows, K) float temporary.
_BLOCK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- helpers


def _row_blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(1, n_cols))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def _as_int_array(x: Any, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array, got shape {arr.shape}")
    if arr.size == 0 and not np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.int64)  # empty lists come in as float64
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr


def _check_rel(rel: Any) -> np.ndarray:
    arr = np.asarray(rel)
    if arr.ndim != 2:
        raise ValueError(f"rel must be a 2-D (queries, K) array, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError("rel must be boolean (or 0/1)")
        arr = arr.astype(bool)
    return arr


def _check_num_relevant(num_relevant: Any, rel: np.ndarray) -> np.ndarray:
    nr = _as_int_array(num_relevant, "num_relevant", 1)
    if nr.shape[0] != rel.shape[0]:
        raise ValueError(
            f"num_relevant has {nr.shape[0]} entries but there are {rel.shape[0]} queries"
        )
    if nr.size and nr.min() < 1:
        bad = int(np.count_nonzero(nr < 1))
        raise ValueError(
            f"{bad} queries have num_relevant < 1; drop queries without a positive first "
            "(retrieval_metrics() does this and reports them)"
        )
    found = rel.sum(axis=1)
    if np.any(found > nr):
        i = int(np.argmax(found > nr))
        raise ValueError(
            f"query {i} retrieved {int(found[i])} relevant items but num_relevant is "
            f"{int(nr[i])}; was the query itself left in its results, or num_relevant "
            "computed without excluding it?"
        )
    return nr


def _check_ks(ks: int | Iterable[int], name: str = "k") -> list[int]:
    items = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    out: list[int] = []
    for k in items:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} values must be integers >= 1, got {k!r}")
        if int(k) not in out:
            out.append(int(k))
    return out


def _mean(values: np.ndarray) -> float:
    """Mean that returns NaN (without a RuntimeWarning) for zero queries."""
    return float(values.mean()) if values.size else float("nan")


# --------------------------------------------------------------------------- building blocks


def relevance_matrix(query_labels: Any, retrieved_labels: Any) -> np.ndarray:
    """Boolean ``(q, K)`` matrix: ``retrieved_labels[i, j] == query_labels[i]``.

    Padding (:data:`PAD_LABEL`) is never relevant. Raises ``ValueError`` on
    mismatched shapes, negative query labels, or retrieved labels below ``-1``.
    """
    ql = _as_int_array(query_labels, "query_labels", 1)
    rl = _as_int_array(retrieved_labels, "retrieved_labels", 2)
    if rl.shape[0] != ql.shape[0]:
        raise ValueError(
            f"retrieved_labels has {rl.shape[0]} rows but query_labels has {ql.shape[0]} entries"
        )
    if ql.size and ql.min() < 0:
        raise ValueError(
            f"query_labels must be >= 0 (got {int(ql.min())}); {PAD_LABEL} is reserved for padding"
        )
    if rl.size and rl.min() < PAD_LABEL:
        raise ValueError(
            f"retrieved_labels must be >= 0 or PAD_LABEL ({PAD_LABEL}), got {int(rl.min())}"
        )
    return rl == ql[:, None]


def num_relevant_from_labels(
    gallery_labels: Any, query_labels: Any, query_in_gallery: bool
) -> np.ndarray:
    """Number of gallery items with each query's label, shape ``(q,)`` int64.

    When ``query_in_gallery`` is True every query is itself one of the gallery items
    (leave-one-out evaluation), so 1 is subtracted; a query whose label does not occur
    in the gallery at all then raises ``ValueError`` (inconsistent input).
    """
    gl = _as_int_array(gallery_labels, "gallery_labels", 1)
    ql = _as_int_array(query_labels, "query_labels", 1)
    uniq, counts = np.unique(gl, return_counts=True)
    if uniq.size:
        pos = np.clip(np.searchsorted(uniq, ql), 0, uniq.size - 1)
        hit = uniq[pos] == ql
        n = np.where(hit, counts[pos], 0).astype(np.int64)
    else:
        n = np.zeros(ql.shape[0], dtype=np.int64)
    if query_in_gallery:
        if np.any(n == 0):
            i = int(np.argmax(n == 0))
            raise ValueError(
                f"query_in_gallery=True but the label {int(ql[i])} of query {i} is not in the gallery"
            )
        n -= 1
    return n


# --------------------------------------------------------------------------- metrics


def recall_at_k(rel: Any, ks: int | Iterable[int]) -> dict[int, float]:
    """Recall@k in the metric-learning (SOP / CUB / Cars) sense.

    The fraction of queries that have **at least one** relevant item among their
    first ``k`` results. When ``k`` exceeds the ``K`` columns available, all ``K``
    columns are used (the missing results are treated as not relevant). Returns
    ``{k: value}`` in the order given; NaN when there are no queries.
    """
    return {k: _mean(hit) for k, hit in _recall_rows(_check_rel(rel), _check_ks(ks)).items()}


def _recall_rows(r: np.ndarray, ks: list[int]) -> dict[int, np.ndarray]:
    K = r.shape[1]
    first = np.where(r.any(axis=1), r.argmax(axis=1), K)  # rank (0-based) of first hit; K = none
    return {k: (first < min(k, K)).astype(np.float64) for k in ks}


def top_k_accuracy(rel: Any, k: int) -> float:
    """Top-k accuracy as reported in CBIR papers ("Top-1", "Top-5").

    Identical to :func:`recall_at_k` for a single ``k``: the fraction of queries whose
    first ``k`` results contain at least one item of the query's class.
    """
    (kk,) = _check_ks(k)
    return recall_at_k(rel, [kk])[kk]


def precision_at_k(rel: Any, k: int) -> float:
    """Precision@k: mean over queries of ``(#relevant in the first k) / k``.

    The denominator is always ``k``: when fewer than ``k`` results exist (``K < k`` or
    padding) the missing ones count as non-relevant, as in trec_eval. NaN when there
    are no queries.
    """
    (kk,) = _check_ks(k)
    return _mean(_found(_check_rel(rel), kk) / kk)


def _found(r: np.ndarray, k: int) -> np.ndarray:
    """Relevant items among each query's first ``k`` results, float64 ``(q,)``."""
    return r[:, :k].sum(axis=1).astype(np.float64)


def ir_recall_at_k(rel: Any, num_relevant: Any, k: int) -> float:
    """Information-retrieval recall@k.

    Mean over queries of ``(#relevant in the first k) / num_relevant`` (the share of
    all relevant gallery items that were found). Every query needs
    ``num_relevant >= 1``. NaN when there are no queries.
    """
    (kk,) = _check_ks(k)
    r = _check_rel(rel)
    return _mean(_found(r, kk) / _check_num_relevant(num_relevant, r))


def average_precision(rel: Any, num_relevant: Any) -> np.ndarray:
    """Per-query average precision, shape ``(q,)`` float64.

    ``AP = (1 / num_relevant) * sum over relevant ranks i of precision@i``.
    The denominator is ``num_relevant`` (not the number of relevant items retrieved),
    so relevant items missing from the ``K`` results count as misses with precision 0:
    truncated lists give a lower bound, and ranking the whole gallery gives exact AP.
    """
    r = _check_rel(rel)
    nr = _check_num_relevant(num_relevant, r)
    q, K = r.shape
    out = np.zeros(q, dtype=np.float64)
    if K == 0:
        return out
    inv_rank = 1.0 / np.arange(1, K + 1, dtype=np.float64)
    for sl in _row_blocks(q, K):
        block = r[sl]
        hits = np.cumsum(block, axis=1, dtype=np.int32)
        out[sl] = np.where(block, hits * inv_rank, 0.0).sum(axis=1)
    return out / nr


def mean_average_precision(rel: Any, num_relevant: Any) -> float:
    """mAP: the mean of :func:`average_precision` over queries (NaN for no queries)."""
    return _mean(average_precision(rel, num_relevant))


def map_at_r(rel: Any, num_relevant: Any) -> float:
    """MAP@R (Musgrave, Belongie & Lim, "A Metric Learning Reality Check", 2020).

    For each query let ``R = num_relevant``;
    ``MAP@R = (1/R) * sum_{i=1..R} P(i) * rel(i)`` with ``P(i)`` the precision at
    rank ``i``; the result is the mean over queries. Needs at least ``max(R)``
    results per query: raises ``ValueError`` if ``K < max(num_relevant)``.
    """
    r = _check_rel(rel)
    return _mean(_map_at_r_rows(r, _check_num_relevant(num_relevant, r)))


def _map_at_r_rows(r: np.ndarray, nr: np.ndarray) -> np.ndarray:
    q, K = r.shape
    if q == 0:
        return np.zeros(0, dtype=np.float64)
    max_r = int(nr.max())
    if K < max_r:
        raise ValueError(
            f"MAP@R needs at least R = num_relevant results per query: the largest R is "
            f"{max_r} but only K = {K} results were retrieved; retrieve k >= {max_r}"
        )
    r = r[:, :max_r]
    inv_rank = 1.0 / np.arange(1, max_r + 1, dtype=np.float64)
    ranks = np.arange(max_r)
    total = np.zeros(q, dtype=np.float64)
    for sl in _row_blocks(q, max_r):
        block = r[sl] & (ranks[None, :] < nr[sl, None])
        hits = np.cumsum(block, axis=1, dtype=np.int32)
        total[sl] = np.where(block, hits * inv_rank, 0.0).sum(axis=1)
    return total / nr


def ns_score(rel: Any, include_self: bool = False) -> float:
    """UKBench Nistér–Stewénius score: mean number of relevant images in the top 4.

    UKBench has groups of 4 images and its conventional score (0..4) counts the query
    itself, which the engine returns first. Here the query is already excluded from
    ``rel``, so:

    * ``include_self=False``: mean number of relevant items in the first 4 results
      (query excluded). For groups of 4 the maximum is 3.0.
    * ``include_self=True``: the conventional 0..4 scale, computed as
      ``1 + #relevant in the first 3 results`` -- the query occupies rank 1 of the
      conventional top 4, so only 3 slots remain for the other results. This assumes
      the query would be ranked first among its own results (true for an exact
      search: its distance to itself is 0).

    NaN when there are no queries.
    """
    return _mean(_ns_rows(_check_rel(rel), include_self))


def _ns_rows(r: np.ndarray, include_self: bool) -> np.ndarray:
    return 1.0 + _found(r, 3) if include_self else _found(r, 4)


# --------------------------------------------------------------------------- all at once


def per_query_metrics(
    rel: Any,
    num_relevant: Any,
    ks: Sequence[int] = (1,),
    p_ks: Sequence[int] = (5,),
    metrics: Iterable[str] = DEFAULT_METRICS,
    ns_include_self: bool = True,
) -> dict[str, np.ndarray]:
    """Each metric's value for each query, float64 ``(q,)`` arrays keyed as in
    :func:`retrieval_metrics` (``recall@1``, ``map``...): every metric here is the
    mean of its array, so resampling queries (:mod:`.intervals`) resamples the
    metric. Strict like the per-metric functions (``num_relevant >= 1``)."""
    r = _check_rel(rel)
    nr = _check_num_relevant(num_relevant, r)
    chosen = set(metrics)
    out: dict[str, np.ndarray] = {}
    for m in METRIC_NAMES:  # fixed, readable key order
        if m not in chosen:
            continue
        if m == "recall":
            out.update({f"recall@{k}": hit for k, hit in _recall_rows(r, _check_ks(ks, "ks")).items()})
        elif m == "precision":
            out.update({f"precision@{k}": _found(r, k) / k for k in _check_ks(p_ks, "p_ks")})
        elif m == "ir_recall":
            out.update({f"ir_recall@{k}": _found(r, k) / nr for k in _check_ks(ks, "ks")})
        elif m == "map":
            out["map"] = average_precision(r, nr)
        elif m == "map_at_r":
            out["map@r"] = _map_at_r_rows(r, nr)
        elif m == "ns":
            out["ns_score"] = _ns_rows(r, ns_include_self)
    return out



def retrieval_metrics(
    query_labels: Any,
    retrieved_labels: Any,
    num_relevant: Any,
    ks: Sequence[int] = (1, 10, 100, 1000),
    p_ks: Sequence[int] = (5,),
    metrics: Iterable[str] | None = None,
    ns_include_self: bool = True,
    per_query: bool = False,
) -> dict[str, Any]:
    """Compute a set of retrieval metrics in one go.

    Queries with ``num_relevant == 0`` have nothing to find; they are dropped before
    any metric is computed and counted in ``"queries_without_positive"``.

    ``metrics`` picks groups from :data:`METRIC_NAMES` (default
    :data:`DEFAULT_METRICS`):

    ``"recall"``     ``recall@{k}`` for ``k`` in ``ks`` (:func:`recall_at_k`; equals
                     Top-k accuracy)
    ``"precision"``  ``precision@{k}`` for ``k`` in ``p_ks`` (:func:`precision_at_k`)
    ``"ir_recall"``  ``ir_recall@{k}`` for ``k`` in ``ks`` (:func:`ir_recall_at_k`)
    ``"map"``        ``map`` (:func:`mean_average_precision` over the K results)
    ``"map_at_r"``   ``map@r`` (:func:`map_at_r`). When requested explicitly and
                     ``K < max R`` this raises ``ValueError``; under the default set
                     it is reported as None with an explanation in ``"notes"``.
    ``"ns"``         ``ns_score`` (:func:`ns_score`, ``include_self=ns_include_self``)

    Always present: ``"queries"`` (evaluated), ``"queries_without_positive"``
    (dropped), ``"k"`` (columns of ``retrieved_labels``) and ``"notes"`` (list of
    strings, e.g. when a requested ``k`` exceeds ``K``). Metric values are Python
    floats (NaN if no query is left). With ``per_query``, ``"per_query"`` holds
    :func:`per_query_metrics` of the kept queries (each metric is their mean).
    """
    if metrics is None:
        chosen, explicit = list(DEFAULT_METRICS), False
    else:
        chosen = [metrics] if isinstance(metrics, str) else list(metrics)
        unknown = [m for m in chosen if m not in METRIC_NAMES]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(map(repr, unknown))}; "
                             f"valid choices: {', '.join(METRIC_NAMES)}")
        explicit = True
    ks_ = _check_ks(ks, "ks")
    p_ks_ = _check_ks(p_ks, "p_ks")

    rel_all = relevance_matrix(query_labels, retrieved_labels)
    nr_all = _as_int_array(num_relevant, "num_relevant", 1)
    if nr_all.shape[0] != rel_all.shape[0]:
        raise ValueError(f"num_relevant has {nr_all.shape[0]} entries but there are {rel_all.shape[0]} queries")
    if nr_all.size and nr_all.min() < 0:
        raise ValueError("num_relevant must be >= 0")
    keep = nr_all > 0
    if np.any(rel_all[~keep]):
        raise ValueError("a query with num_relevant == 0 has a relevant item among its results")
    rel, nr = rel_all[keep], nr_all[keep]
    K = rel.shape[1]

    out: dict[str, Any] = {
        "queries": int(keep.sum()),
        "queries_without_positive": int((~keep).sum()),
        "k": int(K),
    }
    notes: list[str] = []
    too_big = sorted({k for k in ks_ + p_ks_ if k > K})
    if too_big:
        notes.append(f"k={too_big} exceed the {K} results per query: recall uses all {K} columns, "
                     "precision still divides by k")

    if "map_at_r" in chosen and not explicit and nr.size and K < int(nr.max()):
        chosen.remove("map_at_r")
        out["map@r"] = None
        notes.append(f"map@r skipped: needs k >= max R = {int(nr.max())}, got {K}")
    rows = per_query_metrics(rel, nr, ks_, p_ks_, chosen, ns_include_self)
    out.update({name: _mean(values) for name, values in rows.items()})
    if per_query:
        out["per_query"] = rows
    out["notes"] = notes
    return out
