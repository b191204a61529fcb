"""glibc allocator settings (:func:`set_malloc_options`, the one place that calls
``mallopt``; the web server bounds its threads' memory with it) and the decoding
workers' policy: keep freed pixel buffers instead of returning them to the kernel
after every image.

glibc serves allocations above its mmap threshold (128 KiB at start) with fresh
``mmap`` pages and unmaps them on free; a decoded photo and its preprocessed scales
are 0.2-1 MB each, so until glibc's adaptive threshold catches up every image
faulted in new zeroed pages and returned them. In a fresh ``cbir index`` process
(Oxford-17, default descriptor, 2 workers) that was 324 page faults and ~1 core-ms
of kernel time per image in the workers; with the thresholds below, 77 faults and
0.4 core-ms (bench/extract.py measures the whole pipeline).
"""

from __future__ import annotations

import sys

# mallopt parameter numbers (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Above any one image's buffers (a 4:1 panorama at 1.4 scale is ~2 MB), below what
# would let one worker keep much: freed memory above 256 MiB at the heap top is
# still returned.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20


def set_malloc_options(options: dict[int, int]) -> bool:
    """``mallopt(parameter, value)`` for each item, in this process. True when all
    were applied (glibc on Linux); elsewhere a no-op that returns False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    applied = True
    for parameter, value in options.items():  # every one, even after a refusal
        applied = bool(mallopt(parameter, value)) and applied
    return applied


def reuse_large_buffers() -> bool:
    """Make this process's allocator keep freed large buffers for reuse (see the
    module docstring); True when applied."""
    return set_malloc_options({M_MMAP_THRESHOLD: MMAP_THRESHOLD, M_TRIM_THRESHOLD: TRIM_THRESHOLD})
