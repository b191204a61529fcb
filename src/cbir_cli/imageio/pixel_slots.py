"""Decoded pixels handed from the decoding workers to the main process through
shared memory instead of a pickle.

Why: a photo's model inputs are ~0.6 MB (the default descriptor's two scales), and
a pickled result is copied four times (pickle, pipe write, pipe read, unpickle)
with a pipe wake-up per 64 KB. On the 2-core machine that was ~1.2 core-ms per
image of the ~22 a ``cbir index`` run spends (``bench/cpu_split.py``), and on a
16-core GPU machine it all lands in one receiving thread of the main process.

How: the main process maps one anonymous shared region (``mmap(-1, n)``: no file,
nothing to clean up after a crash) with one slot per task in flight, *before* the
workers are forked, so they inherit it. A task is given a free slot; the worker
writes its pixels there and returns only their layout (:class:`SlotPixels`); the
main process copies them out (one copy, which the batch needs anyway) and frees
the slot for the next task. A task whose pixels do not fit its slot returns them
pickled, as before. Linux only (fork); elsewhere the results are pickled.
"""

from __future__ import annotations

import math
import mmap
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import numpy as np

# Bytes per slot. A task holds at most 16 images (pipeline.local.DECODE_CHUNK); the
# default descriptor's largest input, a 4:1 panorama at two scales, is 1.8 MB, so 16
# of them fit. Pages are only committed where written: typical photos touch ~10 MB.
SLOT_BYTES = 32 << 20

# One array's place in a slot: (byte offset, shape); uint8 throughout.
Placement = tuple[int, tuple[int, ...]]


class SlotPixels(NamedTuple):
    """What a worker returns instead of a task's pixels: where they are in its slot.
    ``layout`` mirrors the pixels' structure: a placement for one stacked array, or
    a list with a placement (or a tuple of them: several scales) per image."""

    slot: int
    layout: Placement | list[Placement | tuple[Placement, ...]]


class PixelSlots:
    """``count`` slots of ``slot_bytes`` in one shared anonymous mapping."""

    def __init__(self, count: int, slot_bytes: int = SLOT_BYTES) -> None:
        self.count = count
        self.slot_bytes = slot_bytes
        self._memory = mmap.mmap(-1, count * slot_bytes)

    def put(self, slot: int, pixels: Any) -> SlotPixels | None:
        """In a worker: write ``pixels`` (a stacked uint8 array, or a list of arrays or
        tuples of arrays) into ``slot``; None (nothing written that matters) where
        they do not fit or are not all uint8 arrays (they are then pickled)."""
        import numpy as np

        arrays = [pixels] if isinstance(pixels, np.ndarray) else \
            [a for item in pixels for a in (item if isinstance(item, tuple) else (item,))]
        if not all(isinstance(a, np.ndarray) and a.dtype == np.uint8 for a in arrays):
            return None
        if sum(a.nbytes for a in arrays) > self.slot_bytes:
            return None
        region = self._region(slot)
        offset = 0

        def place(array: Any) -> Placement:
            nonlocal offset
            region[offset:offset + array.size].reshape(array.shape)[...] = array
            placed = (offset, array.shape)
            offset += array.size
            return placed

        if isinstance(pixels, np.ndarray):
            return SlotPixels(slot, place(pixels))
        return SlotPixels(slot, [tuple(place(a) for a in item) if isinstance(item, tuple) else place(item)
                                 for item in pixels])

    def take(self, placed: SlotPixels) -> Any:
        """In the main process: the pixels ``placed`` describes, copied out of the
        slot (which the caller may then give to another task)."""
        region = self._region(placed.slot)

        def copy(placement: Placement) -> np.ndarray:
            offset, shape = placement
            return region[offset:offset + math.prod(shape)].reshape(shape).copy()

        if isinstance(placed.layout, tuple):
            return copy(placed.layout)
        return [tuple(copy(p) for p in item) if isinstance(item[0], tuple) else copy(item)
                for item in placed.layout]

    def _region(self, slot: int) -> np.ndarray:
        import numpy as np

        if not 0 <= slot < self.count:
            raise IndexError(f"slot {slot} of {self.count}")
        return np.frombuffer(self._memory, dtype=np.uint8, count=self.slot_bytes, offset=slot * self.slot_bytes)

    def close(self) -> None:
        try:
            self._memory.close()
        except BufferError:  # an array still views it: the mapping goes with the last one
            pass
