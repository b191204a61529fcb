"""The score shown for a ranked list: one that never rises down the list.

Re-ranking (:mod:`.rerank`) orders results by what an image's neighbours agree
on, so their cosines to the query need not decrease (rank 2 0.9176, rank 3
0.9320). The re-ranker's own similarity is no better to show: it compares an
expanded query with neighbour-averaged vectors (it runs higher than any cosine,
so it is not on the scale ``--min-score`` and dedup thresholds use), and the
pinned raw top-1 has none. The rank score is therefore the running minimum of the
cosines: "every result down to this rank has at least this cosine to the query".
It is the cosine itself wherever the cosines already decrease (always with
``--no-rerank``), and the plain cosine is kept beside it (``Hit.cosine``).
"""

from __future__ import annotations

from collections.abc import Iterable

JSON_DECIMALS = 4  # the model's float32 cosines are not meaningful beyond this


def rank_scores(cosines: Iterable[float]) -> list[float]:
    """The running minimum of ``cosines`` (in rank order): non-increasing."""
    out: list[float] = []
    for cosine in cosines:
        out.append(cosine if not out else min(out[-1], cosine))
    return out


def json_score(value: float) -> float:
    """A score as JSON shows it: rounded (``1.0000004768371582`` -> ``1.0``)."""
    return round(float(value), JSON_DECIMALS)
