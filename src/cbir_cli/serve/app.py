"""``cbir serve``: the upload-and-search web page and its JSON API (Flask), served
by waitress (:mod:`.http`).

The app is made by :func:`create_app`, which opens the index by its run plan
(:func:`serve_plan`) and loads the model once, so every request reuses them; its
routes are added by concern: the search API (:mod:`.search_routes`), indexed files
(:mod:`.files`), error answers (:mod:`.handlers`), the page and ``/api/health``
(here). A new generation committed by ``cbir index``
is picked up while serving (:mod:`.live`). Files are only ever reached through an
integer id looked up in the index (``Searcher.row``): no request can name a path,
so there is nothing to traverse and nothing to list; and a file is only sent,
thumbnailed or decoded while it is still the image that was indexed
(:mod:`cbir_cli.pipeline.indexed_files`). Every error is answered as JSON
``{"error": message}``. Decoding (uploads, thumbnails) shares one memory budget
(:class:`~cbir_cli.imageio.decode.DecodeBudget`).

Flask is imported inside functions so that importing this module (and ``cbir
--help``) stays cheap.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.decode import DecodeBudget
from ..models.protocol import embed_images
from ..pipeline.indexed_files import IndexedFiles
from .api_errors import ApiError
from .embedding import EmbeddingSlots
from .files import ThumbnailCache, register_file_routes
from .handlers import MAX_FORM_FIELD_BYTES, MAX_FORM_PARTS, register_error_handlers
from .http import HttpServer
from .live import LiveSearcher
from .results import index_summary
from .search_routes import MAX_K, lookup, register_search_routes

if TYPE_CHECKING:
    from flask import Flask

    from ..pipeline.run_plan import RunPlan
    from ..search.rerank import RerankSettings
    from ..search.searcher import Searcher

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_MB = 20.0
# Decoded rasters of all concurrent uploads and thumbnails together: one image at
# the per-image cap (imageio.decode.MAX_DECODE_BYTES) fits, so anything legal is
# decoded, one huge image at a time. bench/serve_uploads.py: 8 concurrent 9400x9400
# 16-bit PNG uploads keep the server's peak RSS below 1.5 GB with this.
DECODE_BUDGET_BYTES = 400 * 1024 * 1024
DECODE_WAIT_SECONDS = 60.0  # then 503: a request never waits for decodes forever
__all__ = ["MAX_K", "ApiError", "ThumbnailCache", "create_app", "make_http_server", "serve_plan", "server_url"]


def create_app(searcher: Searcher | None = None, index_dir: str | os.PathLike[str] | None = None,
               device: str = "auto", max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, runtime: str = "auto",
               rerank: RerankSettings | None = None) -> Flask:
    """The web app over one index. Opens the index (unless ``searcher`` is given) and
    loads its model now, so a missing index or missing weights fail at start-up with
    a :class:`CbirError`, not on the first request. ``rerank``: how an opened index
    is searched (default: re-ranked, :mod:`cbir_cli.search.rerank`)."""
    from flask import Flask, jsonify, send_from_directory

    if searcher is None:
        from ..search.rerank import RerankSettings
        from ..search.searcher import Searcher

        plan = serve_plan(index_dir, device, runtime)
        searcher = Searcher.open(plan.index_dir, device=plan.device, runtime=plan.runtime,
                                 rerank=rerank if rerank is not None else RerankSettings())
    else:  # a searcher opened by the caller (tests, the Python API): the plan of its model
        from ..pipeline.run_plan import plan_run

        plan = plan_run(searcher.store.root, embedder=searcher.embedder, existing=searcher.store)
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
    app.extensions["cbir-plan"] = plan
    files = app.extensions["cbir-files"] = IndexedFiles()
    embedding_slots = EmbeddingSlots(usable_cores())
    embedding_slots.prepare(embedder, warm_up)
    register_error_handlers(app, max_upload_mb)

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
                       reload_error=live.last_error, max_k=MAX_K, max_upload_mb=max_upload_mb,
                       plan=plan.as_dict())

    register_search_routes(app, live, files, budget, embedding_slots)
    register_file_routes(app, live, files, budget, lookup)

    return app


def serve_plan(index_dir: str | os.PathLike[str] | None = None, device: str = "auto",
               runtime: str = "auto") -> RunPlan:
    """The run plan ``cbir serve`` opens its index by (:mod:`cbir_cli.pipeline.run_plan`,
    as ``cbir index`` and ``cbir evaluate`` decide): the index's model, descriptor,
    precision and backend, with device and runtime settled on this machine.

    Raises:
        CbirError: no index at ``index_dir`` (the error opening it would give), a bad
            device or runtime, a damaged manifest.
    """
    from ..pipeline.options import ExtractOptions
    from ..pipeline.run_plan import plan_run
    from ..store.feature_store import FeatureStore

    plan = plan_run(index_dir, options=ExtractOptions(device=device, runtime=runtime))
    if not plan.exists:
        FeatureStore.open(plan.index_dir, check_files=False)  # serving needs an index: say why there is none
    return plan


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
