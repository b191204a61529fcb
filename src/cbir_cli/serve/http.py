"""The HTTP server under ``cbir serve``: waitress, a production WSGI server, with
limits a public port needs (measured against gunicorn in ``bench/serve_servers.py``).

Waitress reads requests in one asynchronous loop and hands only complete requests
to its worker threads, so slow clients cost a socket, not a thread. On top of its
own limits (connections, header and body size, idle connections) a connection
must send its request headers within :data:`HEADER_TIMEOUT` seconds and its body
within :data:`BODY_TIMEOUT`, or it is closed (slowloris, slow-POST); and every
error waitress answers itself (400, 413, 431...) is JSON ``{"error": ...}`` like
the app's own.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import CbirError

if TYPE_CHECKING:
    from flask import Flask

HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to the end of its headers
BODY_TIMEOUT = 120.0  # seconds from the first byte to the end of the body (20 MB at >= 170 KB/s)
IDLE_TIMEOUT = 15.0  # an open connection with no request in progress
# Connections cost a socket and a few KB (no thread) each: a high limit keeps an
# attacker's connections from locking others out while the timeouts cut them.
CONNECTION_LIMIT = 2000
THREADS = 16  # request handlers; reading and writing sockets never takes one
MAX_HEADER_BYTES = 32 * 1024
MULTIPART_OVERHEAD = 64 * 1024  # form fields and boundaries around an upload


def _guarded_classes() -> tuple[type, type]:
    """The waitress channel and error task we use (imported lazily: ``cbir --help``
    and the test client do not need waitress)."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        """Waitress's own error answers, as JSON."""

        def execute(self) -> None:
            error = self.request.error
            body = json.dumps({"error": f"{error.reason.lower()}: {error.body}"}).encode()
            self.status = f"{error.code} {error.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class GuardedChannel(HTTPChannel):
        """A connection that records when its current request started."""

        error_task_class = JsonErrorTask
        request_started = 0.0
        spoke = False  # has sent a byte

        def received(self, data: bytes) -> bool:
            if self.request is None and data:
                self.request_started = time.time()
                self.spoke = True
            return super().received(data)

        def overdue(self, now: float, header_timeout: float, body_timeout: float) -> bool:
            request = self.request
            if self.requests:  # being answered
                return False
            if request is None:  # a new connection must speak as soon as a slow one must finish
                return not self.spoke and now - self.creation_time > header_timeout
            limit = body_timeout if request.headers_finished else header_timeout
            return now - self.request_started > limit

    return GuardedChannel, JsonErrorTask


def _return_freed_memory() -> None:
    """glibc keeps memory freed by a thread in that thread's arena, and raises its
    mmap threshold after each large free: a server whose 16 threads each decoded
    one huge upload kept ~16 decodes' worth of memory (3 GB peak in
    bench/serve_uploads.py, 1.1 GB with 2 arenas). Few arenas, and large blocks
    always mmapped (so freeing them returns them to the system), bound that."""
    from ..imageio.allocator import M_ARENA_MAX, M_MMAP_THRESHOLD, set_malloc_options

    set_malloc_options({M_ARENA_MAX: 2, M_MMAP_THRESHOLD: 1 << 20})


def _raise_open_files_limit(wanted: int) -> None:
    """Raise this process's soft limit of open files towards ``wanted`` (the hard
    limit caps it), so the connection limit is reachable."""
    try:
        import resource
    except ImportError:  # not on this system
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class HttpServer:
    """``app`` served on ``host:port`` (port 0: any free port). A port in use or an
    unknown host is a :class:`CbirError`. ``serve_forever()`` runs it; ``close()``
    (from another thread too) stops it."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 8000, max_body_bytes: int = 0,
                 threads: int = THREADS, header_timeout: float = HEADER_TIMEOUT,
                 body_timeout: float = BODY_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT) -> None:
        from waitress.server import create_server

        _raise_open_files_limit(CONNECTION_LIMIT + 256)
        _return_freed_memory()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            # Bound here so that a failure is one clear line (and port 0 works).
            listener = socket.create_server((host, port), family=family, backlog=1024)
        except OSError as exc:
            raise CbirError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self.app = app
        self.host = host
        self.port = int(listener.getsockname()[1])
        channel_class, _ = _guarded_classes()
        adjustments: dict[str, Any] = dict(
            sockets=[listener], threads=threads, connection_limit=CONNECTION_LIMIT, channel_timeout=idle_timeout,
            cleanup_interval=1, max_request_header_size=MAX_HEADER_BYTES, ident="cbir",
            clear_untrusted_proxy_headers=True,
        )
        if max_body_bytes:
            adjustments["max_request_body_size"] = max_body_bytes + MULTIPART_OVERHEAD
        self._server = create_server(app, **adjustments)
        self._server.channel_class = channel_class
        maintenance = self._server.maintenance

        def enforce_deadlines(now: float) -> None:
            maintenance(now)
            for channel in list(self._server.active_channels.values()):
                if getattr(channel, "overdue", None) and channel.overdue(now, header_timeout, body_timeout):
                    channel.will_close = True  # closed by the loop at its next pass

        self._server.maintenance = enforce_deadlines
        self._running = threading.Event()

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{shown}:{self.port}/"

    def serve_forever(self) -> None:
        self._running.set()
        try:
            self._server.run()
        finally:
            self._running.clear()

    def _close_channels(self) -> None:
        # The listener, every connection and waitress's wake-up trigger: with its map
        # empty, the loop in serve_forever() ends.
        for channel in list(self._server._map.values()):
            try:
                channel.close()
            except OSError:
                pass

    def close(self) -> None:
        """Stop accepting, close every connection, end :meth:`serve_forever`.

        From another thread, the sockets are closed by the serving loop itself (woken
        through waitress's trigger): closing them under its select() made it fail with
        EBADF, or worse, watch a descriptor number already reused."""
        if self._running.is_set():
            closed = threading.Event()
            self._server.trigger.pull_trigger(lambda: (self._close_channels(), closed.set()))
            closed.wait(timeout=5)
        else:
            self._close_channels()
        self._server.task_dispatcher.shutdown(timeout=5)
