"""What ``cbir evaluate`` found on a labelled dataset, and how it is shown: one
:class:`FeatureResult` per column, the :class:`Evaluation` around them, and the rows
the terminal table, ``--compare`` and the HTML report share (one name per metric,
each with its bootstrap interval)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .datasets import LabelledCollection, relevance_label
from .intervals import Bootstrap

if TYPE_CHECKING:
    import numpy as np


class MetricOptions(Protocol):
    """What the rows need of :class:`cbir_cli.evaluate.run.EvaluationOptions`."""

    recall_ks: tuple[int, ...]
    k: int
    bootstrap: Bootstrap

# Said once wherever R@K is shown: the two names papers use are one metric.
RECALL_IS_TOP_K = ("R@K is Top-K accuracy (one metric, two names): the share of queries with a relevant image "
                   "among their first K results")


def recall_ks_shown(options: MetricOptions) -> list[int]:
    """The K of every R@K row: the requested ones and the K of P@K (Top-K accuracy)."""
    return sorted({*options.recall_ks, options.k})


def metric_rows(options: MetricOptions) -> list[tuple[str, str]]:
    """(key in the metrics dict, label on screen), one per metric. Keys are stable
    for --json users."""
    k = options.k
    rows = [(f"recall@{kk}", f"R@{kk} (Top-{kk} acc)" if kk in (1, k) else f"R@{kk}")
            for kk in recall_ks_shown(options)]
    rows += [("map@r", "MAP@R"), ("map", "mAP"), (f"precision@{k}", f"P@{k}"), (f"ir_recall@{k}", f"IR-Recall@{k}"),
             ("ns_score", "N-S score (0-4)")]
    return rows


def cell(value: Any, interval: Any = None, sep: str = " ") -> str:
    """A value for a table, with its interval when there is one."""
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" + (f"{sep}[{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


@dataclass
class FeatureResult:
    feature: str
    label: str
    metrics: dict[str, Any]  # also "intervals": {key: [low, high] or None}
    store_dir: Path
    embedded: int
    cached: int
    unreadable: list[tuple[str, str]]
    seconds: dict[str, float]
    collection: LabelledCollection  # the evaluated images (unreadable ones dropped)
    neighbours: np.ndarray  # (n, neighbours_kept) indices into `collection`, -1 pad
    ranking: str = ""  # the descriptor and re-ranking, in words
    settings: dict[str, Any] = field(default_factory=dict)  # see provenance.column_settings

    def metric_cell(self, key: str, sep: str = " ") -> str:
        return cell(self.metrics.get(key), self.metrics.get("intervals", {}).get(key), sep)

    @property
    def query_ms(self) -> float | None:
        """All-vs-all search time per query (re-ranking included), ms."""
        queries = self.metrics.get("queries") or 0
        return 1000 * self.seconds["search"] / queries if queries else None

    def as_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "label": self.label, "ranking": self.ranking, "settings": self.settings,
                "metrics": self.metrics, "store": str(self.store_dir), "embedded": self.embedded,
                "cached": self.cached, "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "query_ms": None if self.query_ms is None else round(self.query_ms, 4)}


@dataclass
class Evaluation:
    dataset: str
    relevance: str
    options: MetricOptions
    results: list[FeatureResult]
    seconds: float
    peak_rss_mb: float
    peak_rss_children_mb: float
    kind: str = "sop"  # the dataset layout (what "relevant" means depends on it)
    environment: dict[str, str | None] = field(default_factory=dict)  # see provenance.environment

    @property
    def relevance_label(self) -> str:
        return relevance_label(self.kind, self.relevance)

    @property
    def interval_label(self) -> str:
        queries = {r.metrics.get("queries") for r in self.results}
        return self.options.bootstrap.describe(queries.pop() if len(queries) == 1 else None)

    def table_rows(self) -> list[tuple[str, list[str]]]:
        """(label, one cell per feature) rows shared by the terminal table and the
        HTML report."""
        rows = [(label, [r.metric_cell(key) for r in self.results]) for key, label in metric_rows(self.options)]
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

    def compare_rows(self) -> tuple[list[str], list[list[str]]]:
        """One row per result (a comparison): the headline metrics with their
        intervals, then the search time per query, so what re-ranking costs in
        R@10 / Top-K and in time shows beside what it gains in mAP."""
        k = self.options.k
        keys = dict.fromkeys([("recall@1", "R@1"), (f"recall@{k}", f"R@{k} (Top-{k})"), ("recall@10", "R@10"),
                              ("map", "mAP"), ("map@r", "MAP@R"), (f"precision@{k}", f"P@{k}"), ("ns_score", "N-S")])
        keys = [(key, label) for key, label in keys if any(r.metrics.get(key) is not None for r in self.results)]
        rows = [[r.label, *(r.metric_cell(key, "\n") for key, _ in keys),
                 "-" if r.query_ms is None else f"{r.query_ms:.3f}", f"{r.seconds['features']:.1f}"]
                for r in self.results]
        return ["variant", *(label for _, label in keys), "query ms", "features s"], rows

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "relevance": self.relevance if self.kind == "sop" else "class",
                "relevance_label": self.relevance_label, "environment": self.environment,
                "intervals": self.options.bootstrap.as_dict(), "metric_notes": [RECALL_IS_TOP_K],
                "results": [r.as_dict() for r in self.results], "seconds": round(self.seconds, 3),
                "peak_rss_mb": round(self.peak_rss_mb, 1), "peak_rss_children_mb": round(self.peak_rss_children_mb, 1)}
