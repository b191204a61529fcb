"""How the web app answers what is not a result: every error as JSON
``{"error": message}`` (the app's own, Flask's 404/405/413, an OPTIONS request, an
unexpected 500), and the headers every answer carries."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.decode import DecodeBusy
from ..pipeline.indexed_files import NotTheIndexedFile
from .api_errors import ApiError

if TYPE_CHECKING:
    from flask import Flask, Response

# The search form has at most 5 fields; Werkzeug's own limits, named in the 413s.
MAX_FORM_PARTS = 1000
MAX_FORM_FIELD_BYTES = 500_000
log = logging.getLogger("cbir_cli.serve.app")


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


def register_error_handlers(app: Flask, max_upload_mb: float) -> None:
    """Answer every error of ``app`` as JSON, refuse OPTIONS, add the common headers."""
    from flask import jsonify, request
    from werkzeug.exceptions import HTTPException, MethodNotAllowed

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
