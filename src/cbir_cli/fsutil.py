"""Durable file writes and content hashes: the ground floor every layer that writes
files stands on (the store, the ONNX export cache, evaluate's vocabulary cache).

A file is written to a hidden temporary name (``.NAME.tmp-PID``), fsynced and
renamed over its final name, then the folder is fsynced: a reader sees the old
file or the new one, never half of one, and a crash leaves at most a temporary,
which :data:`TMP_MARK` lets its owner recognise and delete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import WriteError

if TYPE_CHECKING:
    import numpy as np

TMP_MARK = ".tmp-"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to ``.NAME.tmp-PID``, fsync, rename over ``path``, fsync the folder.
    A failure (a full disk...) is a :class:`~cbir_cli.errors.WriteError` naming
    ``path``, and the temporary is removed at once: it holds space the disk lacks."""
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise WriteError(f"{path}: cannot write ({exc.strerror or exc})") from None
    fsync_dir(path.parent)


def json_bytes(obj: Any) -> bytes:
    # ensure_ascii keeps non-UTF-8 file names (surrogate escapes) representable.
    # No indent: json's C encoder only runs without one, and the pure-Python one took
    # ~1 s per run on a 10M-row store's manifest and metas (bench/scale.py).
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode("ascii")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def npy_bytes(array: np.ndarray, dtype: str = "float32") -> bytes:
    """An array as the bytes of a ``.npy`` file of ``dtype`` (no pickles)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.dtype(dtype)), allow_pickle=False)
    return buf.getvalue()


def read_json_meta(path: Path) -> Any | None:
    """A small JSON file written by :func:`atomic_write_json` (a saved index's meta):
    None when it does not exist, :class:`~cbir_cli.errors.CorruptStoreError` naming it
    when it cannot be read or parsed."""
    from .errors import CorruptStoreError

    try:
        return json.loads(path.read_text(encoding="ascii"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CorruptStoreError(f"{path}: unreadable ({exc})") from None


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
