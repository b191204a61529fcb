"""What the Ray executor runs on the workers before the model: listing (with each
file's stamp, so the driver never stats a file), content hashing, and decoding +
preprocessing into Ray Data rows (for a new store, listing and hashing are stages
of the same streaming Ray Data job: :func:`list_unit`, :func:`hash_and_decode`).
Plain functions: Ray ships them to any node, which needs only the package (see :mod:`.ray_executor`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import CbirError
from ..imageio.files import image_folder, is_image_name, iter_image_files, stat_local
from ..imageio.readers import ImageFolderDataset
from ..imageio.sources import SourceEntry, is_object_uri
from .plan import HashResult, hash_one

if TYPE_CHECKING:
    import numpy as np

Listing = tuple[list[SourceEntry], list[tuple[str, str]]]  # entries, unreadable folders


def _entries(paths: Iterator[Any]) -> list[SourceEntry]:
    """Entries of local files, stat'ed here (on the worker); one that cannot be
    stat'ed gets an empty stamp: hashing says why it cannot be read."""
    found = []
    for path in map(str, paths):
        try:
            found.append(stat_local(path))
        except OSError:
            found.append(SourceEntry(path, 0, 0, ""))
    return found


def list_top(root: str) -> tuple[str | None, list[SourceEntry], list[str], list[tuple[str, str]]]:
    """(error, image entries directly in ``root``, sub-folders to list, unreadable
    folders) -- the first level of :func:`~cbir_cli.imageio.files.list_images`'s
    walk, same order and rules (symlinked folders are not entered)."""
    from ..imageio.decode import oserror_reason

    try:
        folder = image_folder(root).resolve()
    except CbirError as exc:
        return exc.message, [], [], []
    unreadable: list[tuple[str, str]] = []

    def failed(exc: OSError) -> None:
        unreadable.append((os.fspath(exc.filename), oserror_reason(exc)))

    _, dirnames, filenames = next(os.walk(folder, onerror=failed), (None, [], []))
    files = _entries(folder / name for name in sorted(filenames) if is_image_name(name))
    below = [str(folder / name) for name in sorted(dirnames) if not (folder / name).is_symlink()]
    return None, files, below, unreadable


def list_below(folder: str) -> Listing:
    unreadable: list[tuple[str, str]] = []
    return _entries(iter_image_files(folder, unreadable)), unreadable


# A streamed listing's row of an unreadable folder (its reason in "reason"): reported
# as a folder that could not be listed, never as a file.
FOLDER_ROW = "folder"


def listing_units(root: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(error, units) of a streamed listing of ``root``: its own images, then each
    sub-folder's, in :func:`~cbir_cli.imageio.files.iter_image_files`' order. Only the
    top folder's names are read here (no file is stat'ed); an unreadable or empty
    top folder is the error (an empty tree below it shows only when it is listed)."""
    from ..imageio.files import listing_error

    try:
        folder = image_folder(root).resolve()
        names = sorted(os.listdir(folder))
    except CbirError as exc:
        return exc.message, []
    except OSError as exc:
        error = listing_error(image_folder(root), [], [(str(image_folder(root).resolve()), _reason(exc))])
        return (error.message if error else str(exc)), []
    below = [str(folder / n) for n in names if (folder / n).is_dir() and not (folder / n).is_symlink()]
    if not below and not any(is_image_name(n) and not (folder / n).is_dir() for n in names):
        error = listing_error(image_folder(root), [], [])
        return (error.message if error else None), []
    return None, [{"folder": str(folder), "deep": False}] + [{"folder": f, "deep": True} for f in below]


def _reason(exc: OSError) -> str:
    from ..imageio.decode import oserror_reason

    return oserror_reason(exc)


def list_unit(unit: dict[str, Any]) -> list[dict[str, Any]]:
    """(A ``flat_map`` stage.) The image rows of one unit of :func:`listing_units`,
    each stat'ed here (path as bytes, stamp), plus a :data:`FOLDER_ROW` row per
    sub-folder that could not be listed."""
    folder, unreadable = unit["folder"], []
    paths: Iterator[Any] = iter([])
    if unit["deep"]:
        paths = iter_image_files(folder, unreadable)
    else:
        try:
            paths = iter([os.path.join(folder, n) for n in sorted(os.listdir(folder))
                          if is_image_name(n) and not os.path.isdir(os.path.join(folder, n))])
        except OSError as exc:
            unreadable.append((folder, _reason(exc)))
    rows = [{"path": os.fsencode(e.uri), "size": e.size, "mtime_ns": e.mtime_ns, "etag": e.etag, "kind": "",
             "reason": ""} for e in _entries(paths)]
    return rows + [{"path": os.fsencode(f), "size": 0, "mtime_ns": 0, "etag": "", "kind": FOLDER_ROW, "reason": r}
                   for f, r in unreadable]


def hash_chunk(paths: list[str]) -> list[HashResult]:
    return [hash_one(p) for p in paths]


class ListedStamps:
    """The stamps the listing tasks took on the workers, as the stat cache's source
    (:class:`~cbir_cli.imageio.files.ImageList`'s ``source``): the driver stats no
    file; a key the listing did not see is stat'ed here."""

    movable = True
    exact_stamps = False

    def __init__(self, location: str, entries: list[SourceEntry]) -> None:
        self.location = location
        self._entries = {entry.uri: entry for entry in entries}

    def entries(self, unreadable: list[tuple[str, str]]) -> Iterator[SourceEntry]:
        yield from self._entries.values()

    def stat(self, uri: str) -> SourceEntry:
        entry = self._entries.get(uri)
        if entry is None or not entry.etag:
            return stat_local(uri)
        return entry

    def open(self, uri: str, max_bytes: int) -> tuple[BinaryIO, int]:
        from ..imageio.decode import open_image_file

        return open_image_file(uri, max_bytes)


@dataclass(frozen=True)
class PixelLayout:
    """One image's model input as a Ray Data row: full-image and multi-scale inputs
    differ in shape from image to image (and are a tuple of ``parts`` arrays, one per
    scale), so each row carries its arrays flattened into one 1-D array (a ragged
    tensor column) plus their shapes; the actor unpacks them."""

    parts: int
    ndim: int
    dtype: str

    @classmethod
    def of(cls, sample: Any) -> PixelLayout:
        import numpy as np

        arrays = [np.asarray(a) for a in (sample if isinstance(sample, tuple) else (sample,))]
        return cls(len(arrays), arrays[0].ndim, str(arrays[0].dtype))

    def pack(self, pixels: Any) -> tuple[np.ndarray, list[int]]:
        import numpy as np

        arrays = [np.asarray(a) for a in (pixels if isinstance(pixels, tuple) else (pixels,))]
        return np.concatenate([a.ravel() for a in arrays]), [d for a in arrays for d in a.shape]

    def unpack(self, flat: np.ndarray, shape: np.ndarray) -> Any:
        import numpy as np

        arrays, offset = [], 0
        for part in range(self.parts):
            dims = tuple(int(d) for d in shape[part * self.ndim:(part + 1) * self.ndim])
            size = int(np.prod(dims))
            arrays.append(np.asarray(flat[offset:offset + size], dtype=self.dtype).reshape(dims))
            offset += size
        return arrays[0] if self.parts == 1 else tuple(arrays)


def unreachable(path: str, what: str) -> str:
    import socket

    return (f"{path}: not found on Ray node {socket.gethostname()}; {what} must be on storage every node "
            "mounts at the same path")


def decode_batch(batch: dict[str, np.ndarray], preprocess: Any, draft_size: int | None,
                 layout: PixelLayout) -> dict[str, np.ndarray]:
    """Decode + preprocess a batch of files; a file that fails keeps its row, with
    no pixels and its one-line reason. A local file whose folder does not exist on
    this node is not a bad file but a node without the shared storage: that is
    fatal (recording every image as bad would be worse than stopping). An object
    URI is read from its store on any node."""
    import numpy as np

    paths = [os.fsdecode(p) for p in batch["path"]]
    images = ImageFolderDataset(paths, preprocess, draft_size)
    pixels = np.empty(len(paths), dtype=object)
    shapes = np.zeros((len(paths), layout.parts * layout.ndim), dtype=np.int64)
    reasons = np.array(batch["reason"], dtype=object) if "reason" in batch else np.full(len(paths), "", object)
    fatal = np.full(len(paths), "", dtype=object)
    for j in range(len(paths)):
        if reasons[j]:  # already known not to be readable (a streamed run's listing or hashing)
            pixels[j] = np.zeros(0, dtype=layout.dtype)
            continue
        _, result = images[j]
        if isinstance(result, str):
            reasons[j] = result
            pixels[j] = np.zeros(0, dtype=layout.dtype)
            if not is_object_uri(paths[j]) and not os.path.isdir(os.path.dirname(paths[j])):
                fatal[:] = unreachable(os.path.dirname(paths[j]), "the images' folder")
        else:
            pixels[j], shapes[j] = layout.pack(result)
    passed = {key: value for key, value in batch.items() if key not in ("pixels", "shapes", "reason", "fatal")}
    return {**passed, "pixels": pixels, "shapes": shapes, "reason": reasons, "fatal": fatal}


def hash_and_decode(batch: dict[str, np.ndarray], preprocess: Any, draft_size: int | None,
                    layout: PixelLayout, racy_ns: int) -> dict[str, np.ndarray]:
    """(A streamed run's stage.) Hash each listed file here, then decode it as
    :func:`decode_batch` does; a file that cannot be hashed keeps its row with the
    reason (a named pipe is refused here, before a reader could block on it). Adds
    ``cacheable``: whether the listing's stamp still describes what was hashed (same
    size, modified more than ``racy_ns`` before hashing began: the stat cache's rule)."""
    import numpy as np

    started = time.time_ns()
    n = len(batch["path"])
    sha = np.full(n, "", dtype=object)
    size = np.array(batch["size"], dtype=np.int64)
    hash_reason = np.array(batch["reason"], dtype=object)
    fatal = ""
    for j in range(n):
        if batch["kind"][j] and not os.path.isdir(os.fsdecode(batch["path"][j])):
            fatal = unreachable(os.fsdecode(batch["path"][j]), "the images' folder")
        if batch["kind"][j] or hash_reason[j]:
            continue
        result = hash_one(os.fsdecode(batch["path"][j]))
        if result.sha256 is None:
            hash_reason[j] = result.error or "unreadable"
            if not os.path.isdir(os.path.dirname(result.path)):  # as in decode_batch: a node without the mount
                fatal = unreachable(os.path.dirname(result.path), "the images' folder")
        else:
            sha[j], size[j] = result.sha256, result.size
    cacheable = (sha != "") & (size == batch["size"]) & (batch["mtime_ns"] < started - racy_ns)
    out = decode_batch({**batch, "sha256": sha, "size": size, "cacheable": cacheable, "reason": hash_reason},
                       preprocess, draft_size, layout)
    if fatal:
        out["fatal"][:] = fatal
    return out
