"""``cbir serve``: the upload-and-search web page and its JSON API (Flask), served
by waitress (:mod:`.http`).

The app is made by :func:`create_app`, which opens the index and loads the model
once, so every request reuses them; a new generation committed by ``cbir index``
is picked up while serving (:mod:`.live`). Files are only ever reached through an
integer id looked up in the index (``Searcher.row``): no request can name a path,
so there is nothing to traverse and nothing to list; and a file is only sent,
thumbnailed or decoded while it is still the image that was indexed
(:mod:`cbir_cli.pipeline.indexed_files`). Every error, including Flask's own
404/405/413, an OPTIONS request and an unexpected 500, is answered as JSON
``{"error": message}``. Decoding (uploads, thumbnails) shares one memory budget
(:class:`~cbir_cli.imageio.decode.DecodeBudget`).

Flask is imported inside functions so that importing this module (and ``cbir
--help``) stays cheap.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError, ImageError
from ..imageio.decode import DecodeBudget, DecodeBusy, decode_image
from ..imageio.region import Box
from ..models.protocol import embed_images
from ..paths import display_path
from ..pipeline.indexed_files import IndexedFiles, NotTheIndexedFile
from ..search.filters import ResultFilter
from .api_errors import ApiError
from .embedding import EmbeddingSlots
from .files import ThumbnailCache, read_checked, register_file_routes
from .http import HttpServer
from .live import LiveSearcher
from .results import hit_json, index_summary

if TYPE_CHECKING:
    from flask import Flask, Response

    from ..search.rerank import RerankSettings
    from ..search.searcher import Hit, Searcher

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_K = 10
# The page shows a grid of thumbnails; more than this is a scraping job, not a search.
MAX_K = 100
DEFAULT_MAX_UPLOAD_MB = 20.0
# The search form has at most 5 fields; Werkzeug's own limits, named in the 413s.
MAX_FORM_PARTS = 1000
MAX_FORM_FIELD_BYTES = 500_000
# Decoded rasters of all concurrent uploads and thumbnails together: one image at
# the per-image cap (imageio.decode.MAX_DECODE_BYTES) fits, so anything legal is
# decoded, one huge image at a time. bench/serve_uploads.py: 8 concurrent 9400x9400
# 16-bit PNG uploads keep the server's peak RSS below 1.5 GB with this.
DECODE_BUDGET_BYTES = 400 * 1024 * 1024
DECODE_WAIT_SECONDS = 60.0  # then 503: a request never waits for decodes forever
log = logging.getLogger(__name__)
__all__ = ["ApiError", "ThumbnailCache", "create_app", "make_http_server", "server_url"]


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


def too_large_reason(exc: Exception, content_length: int | None, max_upload_mb: float) -> str:
    """Why Werkzeug refused a request body (its 413 carries no reason): the whole
    body over the upload limit, or one of its form limits, told by where it was raised."""
    from werkzeug.sansio.multipart import MultipartDecoder

    if content_length is not None and content_length > max_upload_mb * 1024 * 1024:
        return f"upload too large (limit {max_upload_mb:g} MB)"
    import traceback

    raised_in = {frame.f_code for frame, _ in traceback.walk_tb(exc.__traceback__)}
    if MultipartDecoder.next_event.__code__ in raised_in:
        return f"too many parts in the multipart form (limit {MAX_FORM_PARTS})"
    if content_length is not None:
        return f"a form field other than the image is too large (limit {MAX_FORM_FIELD_BYTES // 1000} KB)"
    return f"upload too large (limit {max_upload_mb:g} MB)"


def create_app(searcher: Searcher | None = None, index_dir: str | os.PathLike[str] | None = None,
               device: str = "auto", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, runtime: str = "auto",
               rerank: RerankSettings | None = None) -> Flask:
    """The web app over one index. Opens the index (unless ``searcher`` is given) and
    loads its model now, so a missing index or missing weights fail at start-up with
    a :class:`CbirError`, not on the first request. ``rerank``: how an opened index
    is searched (default: re-ranked, :mod:`cbir_cli.search.rerank`)."""
    from flask import Flask, jsonify, request, send_from_directory
    from werkzeug.exceptions import HTTPException, MethodNotAllowed

    if searcher is None:
        from ..search.rerank import RerankSettings
        from ..search.searcher import Searcher

        searcher = Searcher.open(index_dir, device=device, runtime=runtime,
                                 rerank=rerank if rerank is not None else RerankSettings())
    embedder = searcher.embedder  # load the model now (see docstring)
    # One throw-away inference: the first forward pass pays seconds of one-off set-up
    # (lazy imports, allocator, kernel selection) that should not land on a user.
    from PIL import Image

    def warm_up(model: Any) -> None:
        embed_images(model, [Image.new("RGB", (embedder.config.input_size,) * 2)])

    warm_up(embedder)
    if max_upload_mb <= 0:
        raise CbirError(f"upload limit must be > 0 MB (got {max_upload_mb})")
    live = LiveSearcher(searcher, device, runtime)
    budget = DecodeBudget(DECODE_BUDGET_BYTES, DECODE_WAIT_SECONDS)

    app = Flask(__name__, static_folder=str(STATIC_DIR), static_url_path="/static")
    app.config["MAX_CONTENT_LENGTH"] = int(max_upload_mb * 1024 * 1024)
    app.config.update(MAX_FORM_PARTS=MAX_FORM_PARTS, MAX_FORM_MEMORY_SIZE=MAX_FORM_FIELD_BYTES)
    app.json.sort_keys = False
    app.extensions["cbir"] = live
    files = app.extensions["cbir-files"] = IndexedFiles()
    # The index is searched one query at a time (the backend, re-ranking's state).
    # Embedding, most of a query's time, runs outside that lock: ONNX Runtime
    # sessions and torch modules in inference are thread-safe, so one client's model
    # run overlaps another's decode, search and HTTP exchange. At most one embedding
    # per core at a time, each on as many threads as it can use (:mod:`.embedding`);
    # uploads' decodes are bounded by the decode budget.
    search_lock = threading.Lock()
    embedding_slots = EmbeddingSlots(usable_cores())
    embedding_slots.prepare(embedder, warm_up)

    def search_image(searcher: Searcher, image: Any, k: int, box: Box | None,
                     result_filter: ResultFilter) -> list[Hit]:
        region = box.crop(image) if box is not None else image
        with embedding_slots.slot(searcher.embedder) as model:
            vectors = embed_images(model, [region])
        with search_lock:
            return searcher.search_vectors(vectors, k, result_filter)[0]

    def error(message: str, status: int) -> tuple[Response, int]:
        return jsonify(error=message), status

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError):
        return error(str(exc), exc.status)

    @app.errorhandler(CbirError)
    def _domain_error(exc: CbirError):
        return error(str(exc), 400)

    @app.errorhandler(NotTheIndexedFile)
    def _not_indexed(exc: NotTheIndexedFile):
        return error(str(exc), 410 if exc.changed else 404)

    @app.errorhandler(DecodeBusy)
    def _busy(exc: DecodeBusy):
        response, status = error(str(exc), 503)
        response.headers["Retry-After"] = "5"
        return response, status

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        if isinstance(exc, HTTPException):
            return _http_error(exc)
        log.exception("unexpected error answering %s", request.path)
        return error(f"internal error ({type(exc).__name__}); see the server's log", 500)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if exc.code == 413:
            return error(too_large_reason(exc, request.content_length, max_upload_mb), 413)
        if exc.code == 404:
            return error(f"not found: {request.path}", 404)
        if exc.code == 405:
            response, status = error(f"method {request.method} not allowed for {request.path}", 405)
            if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
                response.headers["Allow"] = ", ".join(exc.valid_methods)
            return response, status
        return error(exc.description or exc.name, exc.code or 500)

    @app.before_request
    def _no_automatic_options() -> None:
        # Flask answers OPTIONS itself (200, empty HTML) on every route, even on the
        # static one made before any config could turn that off: the API has no
        # OPTIONS (no CORS), so it is a wrong method like any other.
        adapter = app.create_url_adapter(request)
        if request.method == "OPTIONS" and request.url_rule is not None and adapter is not None:
            raise MethodNotAllowed(valid_methods=sorted(set(adapter.allowed_methods()) - {"OPTIONS"}))

    @app.after_request
    def _headers(response: Response) -> Response:
        # Indexed files are served with a type from their extension; never let the
        # browser guess a more dangerous one.
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def lookup(searcher: Searcher, image_id: int):
        try:
            return searcher.row(image_id)
        except CbirError:
            raise ApiError(f"no image with id {image_id} in the index", 404) from None

    def results(searcher: Searcher, query: dict[str, Any], k: int, hits: list[Hit]) -> Response:
        return jsonify(query=query, k=k, count=searcher.count, generation=searcher.store.generation,
                       results=[hit_json(h) for h in hits])

    @app.get("/")
    def page():
        return send_from_directory(STATIC_DIR, "index.html", max_age=0)

    @app.get("/api/health")
    def health():
        from ..search.word_queries import has_text_tower

        searcher = live.current()
        # summary: the page's header, in a user's words; the rest: its details; has_text: the page's word box.
        return jsonify(status="ok", summary=index_summary(searcher), **searcher.info(),
                       has_text=has_text_tower(searcher.model_name),
                       generation=searcher.store.generation, reloads=live.reloads,
                       reload_error=live.last_error, max_k=MAX_K, max_upload_mb=max_upload_mb)

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

    register_file_routes(app, live, files, budget, lookup)

    return app


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_http_server(app: Flask, host: str = "127.0.0.1", port: int = 8000) -> HttpServer:
    """The production server (waitress, :mod:`.http`) bound to ``host:port`` (port 0 =
    any free port); call ``serve_forever()`` on it. A port in use or an unknown host
    is a :class:`CbirError`. Uploads over the app's limit are refused (413, JSON)
    from their headers, before their body is read."""
    return HttpServer(app, host, port, max_body_bytes=int(app.config.get("MAX_CONTENT_LENGTH") or 0))


def server_url(server: HttpServer) -> str:
    return server.url
