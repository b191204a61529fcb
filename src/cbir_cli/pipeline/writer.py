"""Handing vectors and failures to the store on a thread of their own, in order.

Writing a shard is hashing, an ``.npy`` and a rows file, fsyncs and a manifest
commit: on the lent H100 that was 21 % of the main thread's time, which decodes and
resizes every batch there and was the bottleneck (README, GPU figures). File writes
and fsync release the GIL, so on this thread they overlap with decoding and the
model. Everything that changes the store during an embedding run (vectors and
failures) goes through this one thread, in the order it was handed over, so the
store is never changed from two threads at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from .executor import FailureCallback, VectorSink
    from .plan import Item

# Writes handed over and not yet done before the hand-over waits: a slow disk holds
# back the model instead of letting vectors pile up in memory.
WRITES_IN_FLIGHT = 4


class BackgroundWriter:
    """``add`` and ``failed`` as the sink and failure callback do them, on one
    thread, in order. :meth:`drain` waits for everything handed over and raises the
    first error a write met; after an error nothing more is written."""

    def __init__(self, sink: VectorSink, on_failure: FailureCallback) -> None:
        self._sink, self._on_failure = sink, on_failure
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-writer")
        self._pending: deque[Future[Any]] = deque()
        self._error: BaseException | None = None  # the first error, as seen by the caller
        self._broken = False  # set on the writer thread when a write fails

    def add(self, vectors: np.ndarray, items: Sequence[Item]) -> None:
        self._submit(self._sink.add, vectors, items)

    def failed(self, index: int, reason: str) -> None:
        self._submit(self._on_failure, index, reason)

    def drain(self) -> None:
        """Wait until every write handed over is done; raise the first error."""
        while self._pending:
            self._settle(self._pending.popleft())
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread (after :meth:`drain`, or when giving up after an error)."""
        self._thread.shutdown(wait=True, cancel_futures=True)

    def _submit(self, write: Callable[..., None], *args: Any) -> None:
        while self._pending and (len(self._pending) >= WRITES_IN_FLIGHT or self._pending[0].done()):
            self._settle(self._pending.popleft())
        if self._error is not None:
            raise self._error
        self._pending.append(self._thread.submit(self._unless_broken, write, *args))

    def _unless_broken(self, write: Callable[..., None], *args: Any) -> None:
        # Once a write failed, later ones would build on a store in an unknown state.
        if self._broken:
            return
        try:
            write(*args)
        except BaseException:
            self._broken = True
            raise

    def _settle(self, future: Future[Any]) -> None:
        error = future.exception()
        if error is not None and self._error is None:
            self._error = error
