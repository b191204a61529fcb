"""Search by words: ``cbir query --text "a yellow flower"``, alone, with images
(``beach.jpg --text "at night"``) and away from words (``--not "people"``).

Every term becomes one unit vector in the model's space (a text by its text
tower, an image file by its image tower, an indexed image by its stored vector);
the query is their weighted sum, positives added and ``--not`` terms subtracted,
renormalised to unit length -- as rclip combines its ``--add``/``--subtract``
terms::

    q = normalise( sum_i w_i * positive_i  -  sum_j w_j * negative_j )

Every weight is 1 unless a text starts with one and a colon (``"2:at night"``
counts twice, ``"0.5:people"`` half). All the terms of one run make ONE query
(one list of results), ranked by cosine to ``q`` (then re-ranked as image
queries are, unless ``--no-rerank``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.decode import load_image
from ..models.family import model_config, text_models
from ..models.protocol import embed_images
from ..paths import display_path

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

    from ..models.protocol import TextEmbedder
    from .filters import ResultFilter
    from .searcher import Hit, Searcher

# rclip's form: a number, a colon, the words.
_WEIGHTED = re.compile(r"^(?P<weight>\d+(?:\.\d*)?|\.\d+):(?P<text>.+)$")


def parse_term(term: str) -> tuple[float, str]:
    """``"2:at night"`` -> (2.0, "at night"); ``"at night"`` -> (1.0, "at night")."""
    found = _WEIGHTED.match(term.strip())
    if found:
        return float(found["weight"]), found["text"].strip()
    return 1.0, term.strip()


def combine_query(positives: np.ndarray, positive_weights: Sequence[float], negatives: np.ndarray,
                  negative_weights: Sequence[float]) -> np.ndarray:
    """The unit query vector (dim,) of unit term vectors (rows), as the module docstring says."""
    import numpy as np

    dim = positives.shape[1] if len(positives) else negatives.shape[1]
    query = np.zeros(dim, dtype=np.float64)
    if len(positives):
        query += np.asarray(positive_weights, dtype=np.float64) @ positives
    if len(negatives):
        query -= np.asarray(negative_weights, dtype=np.float64) @ negatives
    norm = float(np.linalg.norm(query))
    if norm < 1e-6:
        raise CbirError("the query's terms cancel out (their weighted sum is zero); change a weight or a term")
    return (query / norm).astype(np.float32)


def has_text_tower(model_name: str) -> bool:
    """Whether the index's model can embed words (a hand-crafted descriptor cannot)."""
    try:
        return model_config(model_name).has_text
    except CbirError:
        return False


def text_embedder(searcher: Searcher) -> TextEmbedder:
    """The store's model when it has a text tower; else one line naming the models that do."""
    name = searcher.model_name
    if not has_text_tower(name):
        raise CbirError(f"{searcher.store.root}: its model {name} has no text tower, so words cannot search it; "
                        f"index with one that has: {', '.join(text_models())}")
    return searcher.embedder  # type: ignore[return-value]  # has_text: the family's embedders embed words


def word_query_label(files: Sequence[str], indexed: Sequence[str], texts: Sequence[str],
                     negatives: Sequence[str]) -> str:
    parts = [display_path(f) for f in files] + list(indexed) + [f'"{t}"' for t in texts]
    return " + ".join(parts) + "".join(f' - "{t}"' for t in negatives)


def word_query_vector(searcher: Searcher, images: Sequence[PILImage.Image], indexed_ids: Sequence[int],
                      texts: Sequence[str], negatives: Sequence[str]) -> np.ndarray:
    """The combined query of decoded images, indexed images, texts and ``--not`` texts."""
    import numpy as np

    if not (images or indexed_ids or texts):
        raise CbirError("--not needs something to search for: words (--text) or images to steer away from")
    embedder = text_embedder(searcher)
    weighted = [parse_term(t) for t in texts]
    weighted_not = [parse_term(t) for t in negatives]
    if any(not t for _, t in weighted + weighted_not):
        raise CbirError("an empty --text or --not term: give some words")
    parts, weights = [], []
    if images:
        parts.append(embed_images(embedder, images))
        weights += [1.0] * len(images)
    if indexed_ids:
        parts.append(searcher.backend.vectors(np.asarray(indexed_ids, dtype=np.int64)))
        weights += [1.0] * len(indexed_ids)
    if weighted:
        parts.append(embedder.embed_text([t for _, t in weighted]))
        weights += [w for w, _ in weighted]
    dim = int(embedder.config.dim)
    negative = (embedder.embed_text([t for _, t in weighted_not]) if weighted_not
                else np.zeros((0, dim), dtype=np.float32))
    positive = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, dim), dtype=np.float32)
    return combine_query(positive, weights, negative, [w for w, _ in weighted_not])


def load_query_images(searcher: Searcher, files: Sequence[str]) -> list[PILImage.Image]:
    """Image files decoded for a word query (the model checked for a text tower first)."""
    draft = text_embedder(searcher).config.draft_size
    return [load_image(p, draft_size=draft) for p in files]


def search_words(searcher: Searcher, texts: Sequence[str], negatives: Sequence[str], k: int,
                 result_filter: ResultFilter | None = None, images: Sequence[PILImage.Image] = (),
                 indexed_ids: Sequence[int] = ()) -> list[Hit]:
    """The hits of one combined query (see the module docstring)."""
    query = word_query_vector(searcher, images, indexed_ids, texts, negatives)
    return searcher.search_vectors(query[None, :], k, result_filter=result_filter)[0]
