"""Search: the backend seam (:mod:`.protocol`), its Faiss implementation, exact
search (the oracle), the :class:`~.searcher.Searcher` and ``cbir check``."""
