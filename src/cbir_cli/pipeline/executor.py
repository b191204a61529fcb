"""The Executor seam: how a plan's files become vectors.

An executor lists and hashes the files (the plan's input) and embeds the files the
plan says to embed, handing vectors to a :class:`VectorSink` (the store's write
transaction) and failures to a callback. The sync step (:mod:`.sync`) decides what
to do; the executor only does it. Implementations: :class:`~.local.LocalExecutor`
(decoding worker processes + the model in this process),
:class:`~.ray_executor.RayExecutor` (tasks and an actor pool on a Ray cluster);
tests add fakes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..models.quantize import Calibration
from ..plugins import Registry
from .plan import HashResult, Item

if TYPE_CHECKING:
    import numpy as np

    from ..models.protocol import Embedder
    from ..models.registry import DescriptorSettings
    from .options import ExtractOptions

# (index into the items, one-line reason) for a file that could not be embedded.
FailureCallback = Callable[[int, str], None]


@dataclass(frozen=True)
class EmbedRequest:
    """Which model to embed with; loaded only where, and if, there is work for it
    (an already loaded ``embedder`` is used as is)."""

    model: str
    weights: str | os.PathLike[str] | None = None
    device: str = "auto"
    runtime: str = "auto"
    embedder: Embedder | None = None
    descriptor: DescriptorSettings | None = None  # None: the model's default
    calibration: Calibration | None = None  # an int8 model calibrated on these images

    def load(self) -> Embedder:
        if self.embedder is not None:
            return self.embedder
        from ..models.loading import load_embedder

        return load_embedder(self.model, self.weights, self.device, self.runtime, descriptor=self.descriptor,
                             calibration=self.calibration)


class VectorSink(Protocol):
    """Where vectors go (the store's write transaction)."""

    def add(self, vectors: np.ndarray, items: Sequence[Item]) -> None: ...


class StagingSink(VectorSink, Protocol):
    """A sink whose store distributed workers write shards into themselves (the
    write transaction; see :mod:`cbir_cli.store.staging`): a run folder inside the
    store, then the driver adopts each part the workers wrote, in the store's
    ``shard_dtype`` (float32 or float16: :mod:`cbir_cli.store.shard_format`)."""

    @property
    def shard_dtype(self) -> str: ...

    def staging(self) -> AbstractContextManager[Path]: ...

    def adopt(self, folder: Path, name: str) -> int: ...


@runtime_checkable
class Executor(Protocol):
    name: str
    #: Whether :meth:`embed` takes items whose content hash is still being computed
    #: (empty; a sink that knows the hashes fills them in). A new store's files are
    #: then hashed in the background while they are embedded. An executor whose
    #: workers write rows themselves (into the store's staging area) needs the hashes
    #: first.
    embeds_unhashed: bool

    def list_images(self, root: Path | str) -> list[Path]:
        """Image files below ``root`` (normalised paths, sorted); a missing or empty
        folder is a :class:`~cbir_cli.errors.CbirError`. A ``str`` root is a URL
        (``s3://bucket/prefix``): its objects' URIs, with the listing's
        ``source`` for change detection (:func:`cbir_cli.imageio.files.list_images`);
        an executor that cannot read URLs raises a :class:`~cbir_cli.errors.CbirError`."""
        ...

    def hash_files(self, paths: Sequence[Path | str]) -> Iterable[HashResult]:
        """One :class:`HashResult` per path, in any order."""
        ...

    def embed(self, items: Sequence[Item], request: EmbedRequest, sink: VectorSink,
              on_failure: FailureCallback) -> int:
        """Embed ``items`` into ``sink``; report each file that fails. Returns how
        many were embedded. With :attr:`embeds_unhashed`, only the items' paths
        matter: their hashes may still be empty, filled in by the sink."""
        ...


@runtime_checkable
class ExecutorType(Protocol):
    """What the ``cbir_cli.executors`` registry holds (``--engine NAME``): one way of
    running the pipeline's work."""

    name: str
    #: One line for ``cbir models``.
    description: str

    def open(self, options: ExtractOptions, settings: Mapping[str, Any]) -> AbstractContextManager[Executor | None]:
        """An executor for a run with ``options``, held open for the run (None: the
        library's default, this machine). ``settings``: the engine's own options as
        the CLI gathered them (``address``, ``actors``); one it does not know is ignored.

        Args:
            options: batch size, workers, device, runtime... of the run.
            settings: the engine's own options (``address``, ``actors``).

        Returns:
            A context manager giving the executor, closed when the run ends.
        """
        ...


EXECUTOR_TYPES: Registry[ExecutorType] = Registry("cbir_cli.executors", "engine", {
    "local": "cbir_cli.pipeline.executor_types:LOCAL",
    "ray": "cbir_cli.pipeline.executor_types:RAY",
})
