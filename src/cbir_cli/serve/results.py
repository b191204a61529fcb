"""What the page and the API say about a search and about the index: a hit as JSON,
and the index described in a user's words (the details stay in ``/api/health``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..paths import display_path, json_path
from ..search.rerank import RerankingBackend
from ..search.scores import json_score

if TYPE_CHECKING:
    from ..search.searcher import Hit, Searcher


def hit_json(hit: Hit) -> dict[str, Any]:
    """One result: ``score`` follows the order, ``cosine`` is the plain one (both
    rounded, :mod:`cbir_cli.search.scores`); ``folder`` is where the file lies."""
    shown = display_path(hit.path)
    return {"rank": hit.rank, "score": json_score(hit.score), "cosine": json_score(hit.cosine), "id": hit.id,
            "name": os.path.basename(shown), "folder": os.path.dirname(shown), **json_path(hit.path),
            "image_url": f"/api/images/{hit.id}", "thumbnail_url": f"/api/thumbnails/{hit.id}"}


def search_kind(searcher: Searcher) -> str:
    """How results are found, as a user would say it: "exact search, re-ranked"."""
    backend = searcher.backend
    reranking = isinstance(backend, RerankingBackend) and not backend.plain_only and backend.settings.qe_depth + (
        backend.augmentation is not None) > 0
    inner = backend.inner if isinstance(backend, RerankingBackend) else backend
    exact = inner.index_type.lower().startswith("flat")  # Faiss "flat", Milvus "FLAT": every vector scored
    return f"{'exact' if exact else 'approximate'} search, {'re-ranked' if reranking else 'not re-ranked'}"


def index_summary(searcher: Searcher) -> str:
    """The page's header line: "160 images · mobilenet_v2 · exact search, re-ranked"."""
    return f"{searcher.count:,} images · {searcher.model_name} · {search_kind(searcher)}"
