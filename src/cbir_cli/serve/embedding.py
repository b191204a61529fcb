"""Which model session runs a query's embedding in ``cbir serve``, and when.

Embedding is most of a query's CPU time and runs outside the search lock, at most
one per core at once: more would only contend for the cores and multiply peak
memory. How many threads each run gets matters as much. A lone query runs on the
model's own session, whose intra-op threads span every core, so one client is
answered as fast as the machine allows. Concurrent queries each run on a session
of one thread (ONNX Runtime's advice for concurrent serving): two all-core runs at
once would put twice as many threads as cores on the CPU, and a run split over
threads costs more CPU in all than the same run on one (measured for
mobilenet_v2 int8: 14.0 against 14.5-15.4 ms per query). Runtimes whose threads are
not per session (PyTorch's are per process) run every query on the shared model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..models.protocol import Embedder


@runtime_checkable
class ThreadedEmbedder(Protocol):
    """An embedder that can open the same model in a session of its own with a given
    number of threads (:meth:`cbir_cli.models.onnx_embedder.OnnxEmbedder.with_threads`)."""

    def with_threads(self, threads: int) -> Embedder: ...


class EmbeddingSlots:
    """At most ``cores`` embeddings at once; see the module docstring."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._state = threading.Condition()
        self._in_flight = 0
        self._model: Embedder | None = None  # whose 1-thread siblings are in _free
        self._free: list[Embedder] = []

    def prepare(self, model: Embedder, warm_up: Callable[[Embedder], object]) -> None:
        """Open ``model``'s 1-thread sessions and ``warm_up`` each (its first run pays
        one-off set-up) at start-up, not in a user's request."""
        with self._state:
            self._adopt(model)
            while len(self._free) < self.cores and self._threaded(model):
                single = model.with_threads(1)  # type: ignore[union-attr]
                warm_up(single)
                self._free.append(single)

    @contextmanager
    def slot(self, model: Embedder) -> Iterator[Embedder]:
        """Wait for a free slot, then yield what to run this query's embedding on:
        ``model`` itself when no other embedding is running, else a 1-thread session of it."""
        with self._state:
            self._state.wait_for(lambda: self._in_flight < self.cores)
            self._adopt(model)
            alone = self._in_flight == 0
            self._in_flight += 1
            single = None if alone or not self._threaded(model) else (self._free.pop() if self._free else None)
        try:
            if single is None and not alone and self._threaded(model):
                single = model.with_threads(1)  # type: ignore[union-attr]  # first concurrent use of a new model
            yield single if single is not None else model
        finally:
            with self._state:
                self._in_flight -= 1
                if single is not None and self._model is model:
                    self._free.append(single)
                self._state.notify()

    def _adopt(self, model: Embedder) -> None:
        """A server that reloaded its index onto another model drops the old one's sessions."""
        if self._model is not model:
            self._model, self._free = model, []

    def _threaded(self, model: Embedder) -> bool:
        return self.cores > 1 and isinstance(model, ThreadedEmbedder)
