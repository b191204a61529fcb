"""Bootstrap confidence intervals over queries, as pure functions of per-query values.

Every retrieval metric of :mod:`.metrics` is the mean over queries of a per-query
value (:func:`~cbir_cli.evaluate.metrics.per_query_metrics`). Resampling the queries
with replacement ``resamples`` times and taking the ``(1 - confidence) / 2`` and
``(1 + confidence) / 2`` quantiles of the resampled means gives a percentile
bootstrap interval: how much the figure would move on another draw of as many
queries from the same population (not the uncertainty of the model's training).

All metrics of one evaluation share the same resamples (paired), and a fixed seed
makes the bounds reproducible: same values, same seed, same interval.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

# Upper bound on the elements of one (resamples, queries) block of resample counts.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Bootstrap:
    """How the intervals are drawn: ``resamples`` (0: no intervals), ``seed`` and
    the two-sided ``confidence``."""

    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95

    def __post_init__(self) -> None:
        from ..errors import CbirError

        if self.resamples < 0 or not 0.0 < self.confidence < 1.0:
            raise CbirError(f"bootstrap needs resamples >= 0 and 0 < confidence < 1 (got {self.resamples}, "
                            f"{self.confidence})")

    def describe(self, queries: int | None = None) -> str:
        """E.g. ``95% intervals: percentile bootstrap over the 1360 queries, 1000 resamples, seed 0``."""
        if not self.resamples:
            return "no intervals (bootstrap off)"
        over = f"the {queries} queries" if queries is not None else "queries"
        return (f"{self.confidence:.0%} intervals: percentile bootstrap over {over}, "
                f"{self.resamples} resamples, seed {self.seed}")

    def as_dict(self) -> dict[str, Any]:
        return {"method": "percentile bootstrap over queries", "resamples": self.resamples, "seed": self.seed,
                "confidence": self.confidence}


def resampled_means(values: Mapping[str, Any], resamples: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The mean of each per-query array over ``resamples`` resamples of the queries
    (drawn with replacement, the same draws for every array): ``{name: (resamples,)}``.

    Each resample is a row of counts (how often each query was drawn), so the means
    of all arrays are one matrix product per block of resamples."""
    import numpy as np

    names = list(values)
    arrays = [np.asarray(values[name], dtype=np.float64) for name in names]
    n = arrays[0].shape[0] if arrays and arrays[0].ndim == 1 else 0
    if any(a.shape != (n,) for a in arrays):
        raise ValueError("every per-query array must be 1-D and of the same length")
    matrix = np.stack(arrays) if arrays else np.zeros((0, 0))
    if n == 0 or resamples < 1:
        return {name: np.zeros(0) for name in names}
    rng = np.random.default_rng(seed)
    means = np.empty((resamples, len(names)))
    step = max(1, _BLOCK_ELEMENTS // n)  # depends on n only: same seed, same draws
    for start in range(0, resamples, step):
        rows = min(step, resamples - start)
        drawn = rng.integers(0, n, size=(rows, n))
        counts = np.bincount((drawn + n * np.arange(rows)[:, None]).ravel(), minlength=rows * n)
        means[start:start + rows] = counts.reshape(rows, n).astype(np.float64) @ matrix.T / n
    return {name: means[:, i] for i, name in enumerate(names)}


def percentile_interval(means: Any, confidence: float = 0.95) -> tuple[float, float] | None:
    """The central ``confidence`` range of resampled means (None when there are none)."""
    import numpy as np

    means = np.asarray(means, dtype=np.float64)
    if means.size == 0:
        return None
    low, high = np.quantile(means, [(1.0 - confidence) / 2, (1.0 + confidence) / 2])
    return float(low), float(high)


def bootstrap_intervals(values: Mapping[str, Any], bootstrap: Bootstrap | None = None
                        ) -> dict[str, tuple[float, float] | None]:
    """``{name: (low, high)}``: a percentile bootstrap interval of the mean of each
    per-query array in ``values``; None for an empty array or ``resamples == 0``."""
    bootstrap = bootstrap or Bootstrap()
    means = resampled_means(values, bootstrap.resamples, bootstrap.seed)
    return {name: percentile_interval(m, bootstrap.confidence) for name, m in means.items()}
