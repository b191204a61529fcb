"""The search API: ``GET /api/search`` (an indexed image by id, a region of it, or
words) and ``POST /api/search`` (an uploaded image, a region of it, or it with
words), and how their parameters are read.

The index is searched one query at a time (the backend, re-ranking's state hold
one lock). Embedding, most of a query's time, runs outside that lock: ONNX Runtime
sessions and torch modules in inference are thread-safe, so one client's model
run overlaps another's decode, search and HTTP exchange, at most one per core,
each on as many threads as it can use (:mod:`.embedding`). Uploads' decodes are
bounded by the decode budget.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, ImageError
from ..imageio.decode import DecodeBudget, decode_image
from ..imageio.region import Box
from ..models.protocol import embed_images
from ..paths import display_path
from ..search.filters import ResultFilter
from .api_errors import ApiError
from .files import read_checked
from .results import hit_json

if TYPE_CHECKING:
    from flask import Flask, Response

    from ..pipeline.indexed_files import IndexedFiles
    from ..search.searcher import Hit, Searcher
    from ..store.feature_store import Row
    from .embedding import EmbeddingSlots
    from .live import LiveSearcher

DEFAULT_K = 10
# The page shows a grid of thumbnails; more than this is a scraping job, not a search.
MAX_K = 100


def parse_k(raw: str | None) -> int:
    """The ``k`` parameter: default :data:`DEFAULT_K`, an integer in 1..:data:`MAX_K`."""
    if raw is None or raw.strip() == "":
        return DEFAULT_K
    try:
        k = int(raw)
    except ValueError:
        raise ApiError(f"k must be an integer (got {raw[:40]!r})", 400) from None
    if not 1 <= k <= MAX_K:
        raise ApiError(f"k must be between 1 and {MAX_K} (got {k})", 400)
    return k


def parse_id(raw: str | None) -> int:
    if raw is None or raw.strip() == "":
        raise ApiError("missing query parameter 'id' (or POST an image)", 400)
    try:
        return int(raw)
    except ValueError:
        raise ApiError(f"id must be an integer (got {raw[:40]!r})", 400) from None


def parse_narrowing(values: Any, searcher: Searcher) -> tuple[Box | None, ResultFilter]:
    """The optional ``box`` (x0,y0,x1,y1: fractions or pixels), ``under`` (a folder,
    absolute or relative to the indexed folder) and ``min_score`` fields."""
    raw = values.get("min_score") or None
    try:
        min_score = float(raw) if raw is not None else None
    except ValueError:
        raise ApiError(f"min_score must be a number (got {raw[:40]!r})", 400) from None
    box = Box.parse(values["box"]) if values.get("box") else None
    return box, ResultFilter.make(values.get("under") or None, min_score, base=searcher.folder)


def lookup(searcher: Searcher, image_id: int) -> Row:
    """The indexed row of ``image_id``; an id not in the index is a 404."""
    try:
        return searcher.row(image_id)
    except CbirError:
        raise ApiError(f"no image with id {image_id} in the index", 404) from None


def register_search_routes(app: Flask, live: LiveSearcher, files: IndexedFiles, budget: DecodeBudget,
                           embedding_slots: EmbeddingSlots) -> None:
    """Add ``GET`` and ``POST /api/search`` to ``app``."""
    from flask import jsonify, request

    search_lock = threading.Lock()

    def search_image(searcher: Searcher, image: Any, k: int, box: Box | None,
                     result_filter: ResultFilter) -> list[Hit]:
        region = box.crop(image) if box is not None else image
        with embedding_slots.slot(searcher.embedder) as model:
            vectors = embed_images(model, [region])
        with search_lock:
            return searcher.search_vectors(vectors, k, result_filter)[0]

    def results(searcher: Searcher, query: dict[str, Any], k: int, hits: list[Hit]) -> Response:
        return jsonify(query=query, k=k, count=searcher.count, generation=searcher.store.generation,
                       results=[hit_json(h) for h in hits])

    def word_search(values: Any, image: Any = None, image_id: int | None = None, name: str | None = None):
        """Search by words (``text``, ``not``: repeatable fields), with the image or
        indexed image given: one combined query (:mod:`cbir_cli.search.word_queries`)."""
        from ..search.word_queries import word_query_vector

        searcher = live.current()
        k = parse_k(values.get("k"))
        box, result_filter = parse_narrowing(values, searcher)
        if box is not None:
            raise ApiError("box cannot be combined with text/not: search by words with whole images", 400)
        texts, negatives = values.getlist("text"), values.getlist("not")
        # Words and images are embedded outside the search lock, as uploads are (on
        # the searcher's own model: the word tower is not split into sessions).
        with embedding_slots.slot(searcher.embedder):
            query = word_query_vector(searcher, [image] if image is not None else [],
                                      [image_id] if image_id is not None else [], texts, negatives)
        with search_lock:
            hits = searcher.search_vectors(query[None, :], k, result_filter=result_filter)[0]
        query = {"text": texts, "not": negatives, **({"id": image_id} if image_id is not None else {}),
                 **({"name": name} if name else {})}
        return results(searcher, query, k, hits)

    @app.get("/api/search")
    def search_by_id():
        searcher = live.current()
        if request.args.get("text") or request.args.get("not"):
            raw_id = request.args.get("id")
            return word_search(request.args, image_id=parse_id(raw_id) if raw_id else None)
        image_id = parse_id(request.args.get("id"))
        k = parse_k(request.args.get("k"))
        box, result_filter = parse_narrowing(request.args, searcher)
        row = lookup(searcher, image_id)
        image = None
        if box is not None:  # a region of the indexed file: decoded in full, within the budget
            try:
                with files.open(searcher, row) as fh:
                    image = decode_image(read_checked(fh), f"image {image_id}", budget=budget)
            except ImageError as exc:
                raise ApiError(f"image {image_id} is in the index but cannot be read: {exc.reason}", 404) from None
        if image is None:  # its stored vector: no model
            with search_lock:
                hits = searcher.search_ids([image_id], k, result_filter=result_filter)[0]
        else:
            hits = search_image(searcher, image, k, box, result_filter)
        return results(searcher, {"id": image_id, "name": os.path.basename(display_path(row.path)),
                                  **({"box": box.text} if box else {})}, k, hits)

    @app.post("/api/search")
    def search_by_upload():
        k = parse_k(request.form.get("k"))  # reading the form enforces MAX_CONTENT_LENGTH (413)
        upload = request.files.get("image")
        if upload is None:
            raise ApiError("missing multipart file field 'image'", 400)
        name = os.path.basename(upload.filename or "") or "upload"
        searcher = live.current()
        box, result_filter = parse_narrowing(request.form, searcher)
        try:
            # A region is cut from the full-size picture (a draft decode shifts pixels).
            image = decode_image(upload.read(), name, draft_size=None if box else searcher.embedder.config.draft_size,
                                 budget=budget)
        except ImageError as exc:
            raise ApiError(f"{name}: {exc.reason}", 400) from None
        if request.form.get("text") or request.form.get("not"):
            return word_search(request.form, image=image, name=name)
        hits = search_image(searcher, image, k, box, result_filter)
        return results(searcher, {"name": name, **({"box": box.text} if box else {})}, k, hits)

