"""How a shard's bytes become float32 rows, and how rows become a shard's bytes.

A store keeps its vectors in one of :data:`SHARD_DTYPES`, chosen when the store is
created and recorded in its manifest (``shard_dtype``; absent in stores made before
the choice existed, which are float32): ``float32``, the default, or ``float16``,
half the disk. Every reader gets float32 (the Faiss array contract): a full read
converts here (:func:`read_shard_file`), row reads convert the rows they read
(:class:`~cbir_cli.store.vectors.ShardVectors`), so nothing streamed makes a
float32 copy of a whole store. A shard's ``.npy`` header says its dtype; it must be
the store's, like its shape must be the manifest's, or the shard is damaged.

One store holds one dtype: a run that asks an existing store for another one is
refused (:func:`check_requested_dtype`) and a rebuild is the way to change it, so
a store is never half one format and half the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptStoreError, StoreMismatchError

if TYPE_CHECKING:
    import numpy as np

SHARD_DTYPES = ("float32", "float16")
DEFAULT_SHARD_DTYPE = "float32"
MANIFEST_KEY = "shard_dtype"


def shard_dtype_of(record: dict[str, Any]) -> str:
    """The shard dtype a manifest (or ``store.json``) records; float32 when it
    records none (every store made before float16 shards existed)."""
    return str(record.get(MANIFEST_KEY, DEFAULT_SHARD_DTYPE))


def dtype_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the recorded shard dtype, or None."""
    value = record.get(MANIFEST_KEY, DEFAULT_SHARD_DTYPE)
    if value not in SHARD_DTYPES:
        return f"shard dtype {value!r} is not one of {', '.join(SHARD_DTYPES)}"
    return None


def check_requested_dtype(stored: str, requested: str | None, where: Path) -> None:
    """Refuse a run that asks for ``requested`` shards in a store of ``stored``
    ones (None asks for nothing: the store keeps its own)."""
    if requested is not None and requested != stored:
        raise StoreMismatchError(f"{where}: its shards are {stored}, chosen when it was created; "
                                 f"{requested} shards need a rebuild", remedy="shard-dtype")


def encode(vectors: np.ndarray, dtype: str) -> np.ndarray:
    """``vectors`` as a shard of ``dtype`` stores them (C-contiguous, (n, d))."""
    import numpy as np

    return np.ascontiguousarray(vectors, dtype=np.dtype(dtype))


def item_size(dtype: np.dtype) -> int:
    """Bytes per stored number."""
    return int(dtype.itemsize)


def to_float32(rows: np.ndarray) -> np.ndarray:
    """Rows as float32 (no copy when they already are)."""
    import numpy as np

    return np.asarray(rows, dtype=np.float32)


def read_shard_file(path: Path, sha256: str | None, shape: tuple[int, int], dtype: str) -> np.ndarray:
    """A shard's vectors file, checked to hold ``shape`` rows of ``dtype``.

    ``sha256`` given: a full read, checked against it (a flipped bit must not be
    served) and returned as float32. None: a memory map (for a few rows, or the
    header's offset and shape), as stored."""
    import io

    import numpy as np

    from ..fsutil import bytes_sha256

    try:
        if sha256 is None:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        else:
            data = path.read_bytes()
            if bytes_sha256(data) != sha256:
                raise ValueError("checksum mismatch, damaged or replaced")
            arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise CorruptStoreError(f"{path}: unreadable shard ({exc})") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != 2 or arr.shape != shape:
        raise CorruptStoreError(f"{path}: shard has shape {arr.shape} {arr.dtype}, "
                                f"manifest says ({shape[0]}, {shape[1]}) {dtype}")
    return arr if sha256 is None else to_float32(arr)
