"""Reaching Milvus: one pymilvus ``MilvusClient`` API for Milvus Lite (a ``.db``
path: an embedded engine in this process) and a Milvus server or cluster
(``http://host:19530``), its errors worded as one line, and the names cbir uses.

``pymilvus`` is imported here only, and lazily: it is an optional extra, and its
import reads a ``.env`` file into the environment (disabled here) and installs
its own logging handlers (quietened here).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any

from ..errors import CbirError

MILVUS_EXTRA = "pip install 'cbir-cli[milvus]'"
SERVER_SCHEMES = ("http://", "https://", "tcp://", "grpc://", "unix:")
LITE_SUFFIX = ".db"
# Seconds to wait for a server: pymilvus's default (10 s) makes a typo feel like a hang.
CONNECT_TIMEOUT = 5.0


def is_lite(uri: str) -> bool:
    return not uri.startswith(SERVER_SCHEMES)


def check_uri(uri: str) -> None:
    if is_lite(uri) and not uri.endswith(LITE_SUFFIX):
        raise CbirError(f"{uri}: a Milvus address is http://host:19530 (a server) or a file path ending in "
                        f"{LITE_SUFFIX} (Milvus Lite)")


def default_collection(root: Path) -> str:
    """``cbir_<folder name>_<hash of its absolute path>``: one collection per index,
    two indexes never share one by accident (Milvus names: letters, digits, _)."""
    root = Path(root).expanduser().absolute()
    stem = re.sub(r"[^0-9A-Za-z_]", "_", root.name)[:40] or "index"
    return f"cbir_{stem}_{hashlib.sha1(str(root).encode()).hexdigest()[:8]}"


def check_collection_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][0-9A-Za-z_]{0,254}", name):
        raise CbirError(f"{name!r}: a Milvus collection name is letters, digits and _, not starting with a digit")


def import_pymilvus() -> Any:
    import importlib.util

    if importlib.util.find_spec("pymilvus") is None:
        raise CbirError(f"the milvus backend needs pymilvus and milvus-lite, an optional extra: {MILVUS_EXTRA}")
    os.environ.setdefault("PYTHON_DOTENV_DISABLED", "1")
    import pymilvus

    for name in ("pymilvus", "milvus_lite"):  # each failed call would log a traceback on stderr
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def open_client(uri: str) -> Any:
    """A connected ``MilvusClient``, or a one-line :class:`CbirError` saying why not."""
    pymilvus = import_pymilvus()
    check_uri(uri)
    try:
        if is_lite(uri):
            if not Path(uri).parent.is_dir():
                raise CbirError(f"{uri}: the folder for this Milvus Lite database does not exist")
            return pymilvus.MilvusClient(uri)
        return pymilvus.MilvusClient(uri, token=os.environ.get("MILVUS_TOKEN", ""), timeout=CONNECT_TIMEOUT)
    except pymilvus.MilvusException as exc:
        if is_lite(uri) and lite_locked(uri):
            raise LiteInUseError(uri, lite_holder(uri)) from None
        raise CbirError(f"cannot reach Milvus at {uri} ({message_of(exc)})") from None


class LiteInUseError(CbirError):
    """Another process holds the Milvus Lite database: it is busy, not damaged."""

    def __init__(self, uri: str, holder: str) -> None:
        self.in_use = f"{uri}: this Milvus Lite database is open in {holder}"
        super().__init__(f"{self.in_use}; Milvus Lite allows one process per database file at a time (stop the "
                         "other one, such as a search server on this index, or serve the file with `milvus-lite "
                         "server` and use its http:// address)")


class LiteDamagedError(CbirError):
    """A Milvus Lite database opened, then failed to read its collections (damaged
    files): a writer sets it aside and makes the collection again from the shards."""

    remedy = "rebuild-backend"


def _lock_file(uri: str) -> Path:
    return Path(uri) / "LOCK"


def lite_locked(uri: str) -> bool:
    """Whether another process holds Milvus Lite's lock (an flock on ``LOCK`` in the
    database folder) on this database."""
    import fcntl

    lock = _lock_file(uri)
    if not lock.is_file():
        return False
    try:
        with open(lock, "rb") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
    except OSError:
        return True
    return False


def lite_holder(uri: str) -> str:
    """Which process holds a Lite database's lock, in words: ``another process (pid
    N: its command line)`` from ``/proc/locks`` (Linux), or just ``another process``."""
    try:
        st = os.stat(_lock_file(uri))
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as locks:
            pids = [int(f[4]) for f in (line.split() for line in locks)
                    if len(f) > 5 and f[1] == "FLOCK" and f[5] == device and f[4].isdigit()]
        pid = next(p for p in pids if p != os.getpid())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (OSError, StopIteration, ValueError):
        return "another process"
    return f"another process (pid {pid}: {command[:120]})" if command else f"another process (pid {pid})"


def set_aside_lite(uri: str, collection: str | None) -> Path:
    """Move a damaged Lite collection's folder (``collection``), or the whole
    database (None), into ``<database>.damaged/`` -- kept for whoever wants to look,
    out of the way of a new one. The database must not be open in this process.
    Returns where it went."""
    import time

    source = Path(uri) / "collections" / collection if collection else Path(uri)
    aside = Path(f"{uri}.damaged")
    aside.mkdir(exist_ok=True)
    target = aside / f"{source.name}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        source.rename(target)
    except OSError as exc:
        raise CbirError(f"{source}: damaged, and cannot be moved aside to {target} ({exc.strerror})") from None
    return target


def release_lite(uri: str) -> None:
    """Stop this process's embedded server for a Lite database, so another process
    may open the file (pymilvus keeps it until the process exits)."""
    from milvus_lite.server_manager import server_manager_instance

    server_manager_instance.release_server(uri)


def message_of(exc: BaseException) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).strip().splitlines()[0] if str(message).strip() else type(exc).__name__


def milvus_errors(where: str) -> Any:
    """A context manager turning a MilvusException into one line naming ``where``."""
    import contextlib

    pymilvus = import_pymilvus()

    @contextlib.contextmanager
    def wrap() -> Any:
        try:
            yield
        except pymilvus.MilvusException as exc:
            raise CbirError(f"{where}: {message_of(exc)}") from None

    return wrap()
