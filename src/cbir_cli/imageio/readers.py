"""Reading images for the model, in decoding worker processes: path -> uint8
pixels (or a one-line failure reason), a worker task's images -> one
:class:`ReadChunk` (the unit sent back to the main process), and the pool of
worker processes (:func:`read_chunks`)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ImageError
from ..paths import display_path
from .allocator import reuse_large_buffers
from .decode import decode_image, load_image
from .lifetime import exit_with_parent
from .pixel_slots import PixelSlots, SlotPixels

if TYPE_CHECKING:
    import numpy as np
    import torch

Pixels = Any  # uint8 (3, H, W) numpy array or tensor, as the embedder's preprocess returns it


def pixels_or_reason(load: Callable[[], Pixels]) -> Pixels | str:
    """Run one image's decode + preprocess; a failure becomes its one-line reason."""
    try:
        return load()
    except ImageError as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill a 100k-image run
        return f"cannot decode: {type(exc).__name__}: {exc}"


class ImageFolderDataset:
    """Map-style dataset: index -> (index, uint8 pixels) or (index, failure reason)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Any], Pixels], draft_size: int | None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, pixels_or_reason(lambda: self.preprocess(load_image(self.paths[i], draft_size=self.draft_size)))

    def decode_on_cpu(self, i: int, data: bytes) -> Pixels:
        """What the CPU path does with file ``i`` whose bytes are ``data``."""
        return self.preprocess(decode_image(data, display_path(self.paths[i]), self.draft_size))


class EncodedJpeg(NamedTuple):
    data: bytes
    orientation: int  # EXIF orientation, 1 = upright


def stack_pixels(images: Sequence[Any]) -> np.ndarray | list[Any]:
    """Stack uint8 (3, H, W) images (numpy arrays or CPU tensors) into one contiguous
    (n, 3, H, W) array -- or, when they differ in shape or are tuples (full-image and
    multi-scale inputs), keep them as a list: the embedder groups them by shape.

    Through numpy: torch's strided uint8 copy (torch.stack of permuted views) is
    ~100x slower than numpy's on CPU (~270 ms vs ~1-3 ms for 32 images of 224 px),
    which made batching cost as much as decoding."""
    import numpy as np

    arrays = [t if isinstance(t, tuple) else np.asarray(t) for t in images]
    if any(isinstance(a, tuple) or a.shape != arrays[0].shape for a in arrays):
        return arrays
    return np.stack(arrays)


class ReadChunk(NamedTuple):
    """One worker task's output: decoded pixels, encoded JPEGs and failures, by index
    (numpy arrays: no torch needed on the CPU path)."""

    pixel_indices: list[int]
    pixels: Any  # uint8 (n, 3, S, S), a list of ragged inputs (see stack_pixels), or None
    jpeg_indices: list[int]
    jpeg_bytes: Any  # uint8: the JPEG files concatenated (one transfer, not n), or None
    jpeg_sizes: list[int]
    jpeg_orientations: list[int]
    failures: list[tuple[int, str]]


def collate_images(items: list[tuple[int, Any]]) -> ReadChunk:
    """One task's ``(index, pixels | EncodedJpeg | reason)`` items as a :class:`ReadChunk`."""
    import numpy as np

    pixels = [(i, t) for i, t in items if not isinstance(t, (str, EncodedJpeg))]
    jpegs = [(i, t) for i, t in items if isinstance(t, EncodedJpeg)]
    failed = [(i, t) for i, t in items if isinstance(t, str)]
    encoded = np.frombuffer(bytearray(b"".join(t.data for _, t in jpegs)), dtype=np.uint8) if jpegs else None
    return ReadChunk([i for i, _ in pixels], stack_pixels([t for _, t in pixels]) if pixels else None,
                     [i for i, _ in jpegs], encoded, [len(t.data) for _, t in jpegs],
                     [t.orientation for _, t in jpegs], failed)


def stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack, except on the CPU: decode_jpeg returns permuted HWC views there,
    and torch's strided uint8 copy is ~100x slower than numpy's (see stack_pixels)."""
    import torch

    return torch.from_numpy(stack_pixels(rows)) if rows[0].device.type == "cpu" else torch.stack(list(rows))


def assemble_on_cpu(chunks: Sequence[ReadChunk]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    """One model batch from chunks decoded on the CPU: (indices, uint8 batch or None, failures)."""
    import numpy as np

    parts = [c.pixels for c in chunks if c.pixels is not None]
    if any(isinstance(p, list) or p.shape[1:] != parts[0].shape[1:] for p in parts):
        batch = [image for p in parts for image in p]  # ragged (see stack_pixels)
    elif len(parts) > 1:
        batch = np.concatenate([np.asarray(p) for p in parts])
    else:
        batch = parts[0] if parts else None
    return [i for c in chunks for i in c.pixel_indices], batch, [f for c in chunks for f in c.failures]


# -- worker processes --------------------------------------------------------

_WORKER_DATASET: ImageFolderDataset | None = None
_WORKER_SLOTS: PixelSlots | None = None


def _init_worker(dataset: ImageFolderDataset, slots: PixelSlots | None = None) -> None:
    global _WORKER_DATASET, _WORKER_SLOTS
    _WORKER_DATASET = dataset
    _WORKER_SLOTS = slots  # inherited through fork, never pickled
    exit_with_parent()  # a SIGKILLed main process must not leave workers behind
    reuse_large_buffers()  # one image's pixels are 0.2-2 MB: no fresh pages per image
    # Ctrl-C goes to the whole process group; only the main process should react
    # (it commits what it has and exits cleanly) ...
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... and the main process's SIGTERM handler (the write transaction's) is not for workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _read_range(task: tuple[int, int, int | None]) -> ReadChunk:
    """A worker task: images ``start`` to ``stop``; their pixels go into shared
    ``slot`` where there is one and they fit (:mod:`.pixel_slots`)."""
    assert _WORKER_DATASET is not None
    start, stop, slot = task
    chunk = read_range(_WORKER_DATASET, start, stop)
    if slot is not None and _WORKER_SLOTS is not None and chunk.pixels is not None:
        placed = _WORKER_SLOTS.put(slot, chunk.pixels)
        if placed is not None:
            return chunk._replace(pixels=placed)
    return chunk


def read_range(dataset: ImageFolderDataset, start: int, stop: int) -> ReadChunk:
    """Items ``start`` to ``stop`` of ``dataset``, read and collated."""
    return collate_images([dataset[i] for i in range(start, stop)])


def _forking() -> bool:
    import sys

    return sys.platform.startswith("linux")


def _pool_context() -> Any:
    import multiprocessing

    # fork on Linux: the workers inherit the dataset (paths, preprocessing) and the
    # pixel slots instead of importing and unpickling them; elsewhere the
    # platform's safe default (and pickled results).
    return multiprocessing.get_context("fork" if _forking() else None)


def read_chunks(dataset: ImageFolderDataset, chunk: int, workers: int, window: int) -> Iterator[ReadChunk]:
    """The dataset in tasks of ``chunk`` images, in order: in this process when
    ``workers`` is 0, else in ``workers`` processes with up to ``window`` tasks in
    flight (decoding runs ahead of the consumer, memory stays bounded).

    A plain process pool, not torch's DataLoader: the CPU path needs no torch at
    all (importing it cost 3-7 s of a ``cbir index`` run on the 2-core machine).
    A task's pixels come back through shared memory where the platform forks
    (:mod:`.pixel_slots`), else pickled."""
    bounds = [(start, min(len(dataset), start + chunk)) for start in range(0, len(dataset), chunk)]
    if workers == 0:
        for start, stop in bounds:
            yield read_range(dataset, start, stop)
        return
    from collections import deque
    from concurrent.futures import Future, ProcessPoolExecutor

    # One slot per task in flight, mapped before the pool forks its workers.
    slots = PixelSlots(min(window, len(bounds))) if _forking() else None
    free = list(range(slots.count)) if slots is not None else []
    pool = ProcessPoolExecutor(min(workers, len(bounds)), mp_context=_pool_context(), initializer=_init_worker,
                               initargs=(dataset, slots))

    def submit(start: int, stop: int) -> tuple[Future[ReadChunk], int | None]:
        slot = free.pop() if free else None
        return pool.submit(_read_range, (start, stop, slot)), slot

    try:
        tasks = iter(bounds)
        # range first: zip must not draw (and drop) one more task than the window.
        pending: deque[tuple[Future[ReadChunk], int | None]] = deque(
            submit(*b) for _, b in zip(range(window), tasks))
        while pending:
            future, slot = pending.popleft()
            result = future.result()
            if isinstance(result.pixels, SlotPixels):
                assert slots is not None
                result = result._replace(pixels=slots.take(result.pixels))
            if slot is not None:
                free.append(slot)  # copied out (or never used): the next task may write it
            following = next(tasks, None)
            if following is not None:
                pending.append(submit(*following))
            yield result
    finally:
        # Also on Ctrl-C or an error downstream: drop what was not started, wait
        # for the few running tasks (tens of ms), leave no worker behind -- and
        # none writing into the slots when they are unmapped.
        pool.shutdown(wait=True, cancel_futures=True)
        if slots is not None:
            slots.close()
