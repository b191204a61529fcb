"""What the Ray executor runs on the workers before the model: listing (with each
file's stamp, so the driver never stats a file), content hashing, and decoding +
preprocessing into Ray Data rows. Plain functions: Ray ships them to any node,
which needs only the package (see :mod:`.ray_executor`)."""

from __future__ import annotations

import os
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
    reasons = np.full(len(paths), "", dtype=object)
    fatal = np.full(len(paths), "", dtype=object)
    for j in range(len(paths)):
        _, result = images[j]
        if isinstance(result, str):
            reasons[j] = result
            pixels[j] = np.zeros(0, dtype=layout.dtype)
            if not is_object_uri(paths[j]) and not os.path.isdir(os.path.dirname(paths[j])):
                fatal[:] = unreachable(os.path.dirname(paths[j]), "the images' folder")
        else:
            pixels[j], shapes[j] = layout.pack(result)
    return {"i": batch["i"], "path": batch["path"], "sha256": batch["sha256"], "size": batch["size"],
            "pixels": pixels, "shapes": shapes, "reason": reasons, "fatal": fatal}
