"""The Ray executor: the same plan, store and commits as the local one, with the
work spread over a Ray cluster (an optional extra; see :mod:`.ray_session`).
What runs where:

* a new store (a first run, a rebuild): one streaming Ray Data job from listing to
  staged shards (:mod:`.ray_stream`): the driver lists only the top folder's
  sub-folders and holds no list of the files, only the batch in flight;
* a store with rows: listing as one Ray task per top-level sub-folder, each
  stat'ing its files on the worker (the driver only concatenates; its stat cache
  reads those stamps: :class:`~.ray_tasks.ListedStamps`). With a private local
  instance the top folder is read before Ray starts (an empty folder fails at
  once); an object-store URL
  (``s3://...``) is listed through its :class:`~cbir_cli.imageio.fsspec_source.FsspecSource`
  (its listing carries the ETags), and every node reads the objects itself;
* hashing: plain Ray tasks over chunks of :data:`HASH_CHUNK` keys (measured far
  cheaper than a Ray Data job for this), results streamed back as they finish;
* embedding, one Ray Data job: decode + preprocess in CPU tasks (``map_batches``
  of a function, :data:`DECODE_CPUS` each), then the model in an actor
  pool (``map_batches`` of a callable class, one model per actor, ``num_gpus=1``
  per actor on a cluster with GPUs, CPU actors otherwise). The model's weights go
  to the actors through the object store (:mod:`.ray_model`): a node needs only the
  package. Each actor call embeds one shard's worth of images (``shard_size``) and
  writes it straight into the store's staging folder
  (:func:`cbir_cli.store.staging.write_part`); only small metadata rows travel back
  to the driver, which adopts each part into the store and commits.

Design points, each measured (see the README's "Scaling out"):

* parts are whole shards: input blocks hold exactly ``shard_size`` rows and every
  stage's batches divide it, so Ray Data never cuts a remainder batch (a 2-row or
  1-row part, each its own commit) out of the middle of a run;
* decode and the actor must not be fused into one process: their resource
  requests differ (:data:`DECODE_CPUS` vs whole CPUs/GPUs), which keeps them apart;
* actors never restart (``max_restarts=0``): Ray Data's default retries a batch
  that crashes its actor forever, so a deterministic crash would hang the run;
* bad files are rows with a reason (the local engine's one-line reasons), never
  exceptions: a raising task aborts the job, and Ray Data would drop whole blocks
  if told to tolerate errors. Domain errors of an actor (a missing weights file, a
  model that does not match the store) travel back as data too, because Ray Data
  keeps only the text of an exception raised in a UDF.

A killed driver or worker loses only uncommitted parts: they are leftovers in
the staging folder, and the next run (any engine) re-embeds exactly those files.
Ctrl-C or SIGTERM stops the job and commits the parts already adopted.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.files import ImageList, iter_image_files, list_images, listing_error
from ..imageio.sources import is_object_uri
from .executor import EmbedRequest, FailureCallback, StagingSink, VectorSink
from .options import DEVICE_DECODE_LIBRARIES, ExtractOptions
from .plan import HashResult, Item
from .ray_model import EmbedAndStage, ModelPlan, model_plan
from .ray_session import (
    alive_nodes,
    cluster_resources,
    connect,
    disconnect,
    quiet_warnings,
    ray_errors,
    require_ray,
    starts_private_instance,
)
from .ray_stream import StreamedListing, StreamedRows, raise_fatal, stream_new_store
from .ray_tasks import (
    ListedStamps,
    decode_batch,
    hash_and_decode,
    hash_chunk,
    list_below,
    list_top,
    list_unit,
    listing_units,
)

if TYPE_CHECKING:
    from ..store.transaction import WriteTransaction

HASH_CHUNK = 128
# Hash tasks in flight at once (the driver need not hold 400k futures for 50M files).
HASH_WINDOW = 512
# CPUs each decode task asks for: not the actor's whole CPU (or GPU), so Ray Data
# never fuses decoding into the model actor.
DECODE_CPUS = 0.5


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide: the cluster's ``address`` (see :mod:`.ray_session`) and
    the number of model ``actors`` (None: one per GPU on a cluster with GPUs, else
    one per node)."""

    address: str = "auto"
    actors: int | None = None

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise CbirError(f"model actors must be >= 1 (got {self.actors})")


class RayExecutor:
    """The :class:`~cbir_cli.pipeline.executor.Executor` on a Ray cluster (see the
    module docstring). Use it as a context manager, or :meth:`close` it: it
    disconnects from (or stops) the Ray session it started."""

    name = "ray"
    embeds_unhashed = False  # the workers write the rows (hashes included) into staging

    def __init__(self, options: ExtractOptions, ray_options: RayOptions | None = None) -> None:
        require_ray()
        if options.decode in DEVICE_DECODE_LIBRARIES:
            raise CbirError(f"JPEG decoding on the model's device ({options.decode}) is not available with the ray "
                            "engine: it decodes in CPU tasks")
        self.options = options
        self.ray_options = ray_options or RayOptions()
        self._owns_session: bool | None = None  # None: not connected yet
        # (rows, Ray node id) of every part adopted, in order: where the work ran.
        self.parts: list[tuple[int, str]] = []

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            disconnect()
        self._owns_session = None

    def _connect(self) -> Any:
        if self._owns_session is None:
            self._owns_session = connect(self.ray_options.address)
        import ray

        return ray

    # -- listing and hashing ------------------------------------------------------

    def list_images(self, root: Path | str) -> list[Path]:
        if is_object_uri(root):
            # One listing call per prefix, carrying each object's ETag: nothing to
            # stat, no folder a worker must mount (every node reads the objects).
            return list_images(root)
        if self._owns_session is None and starts_private_instance(self.ray_options.address):
            # The workers would be on this machine anyway: read the top folder before
            # Ray starts, so a missing or empty folder is reported at once (a tree of
            # empty folders too: walked up to its first image, not listed).
            error, units = listing_units(str(root))
            if error is None and next(iter_image_files(units[0]["folder"]), None) is None:
                list_images(root)  # no image: its one-line error (or the folders it could not read)
        else:
            ray = self._connect()
            with ray_errors():
                error, units = ray.get(ray.remote(num_cpus=DECODE_CPUS)(listing_units).remote(str(root)))
        if error is not None:
            raise CbirError(error)
        location = Path(root).expanduser()
        return StreamedListing(location, units, lambda: self._list_all(location),  # type: ignore[return-value]
                               lambda *run: stream_new_store(self._embed_stream(run[0]), *run))

    def _list_all(self, root: Path) -> list[Path]:
        """The whole listing, for a store with rows to compare it with."""
        if self._owns_session is None and starts_private_instance(self.ray_options.address):
            # The workers would be on this machine anyway: list before Ray starts,
            # so a missing or empty folder is reported at once.
            return list_images(root)
        ray = self._connect()
        with ray_errors():
            error, entries, below, unreadable = ray.get(ray.remote(num_cpus=DECODE_CPUS)(list_top).remote(str(root)))
            if error is not None:
                raise CbirError(error)
            lister = ray.remote(num_cpus=DECODE_CPUS)(list_below)
            for part, part_unreadable in ray.get([lister.remote(folder) for folder in below]):
                entries.extend(part)
                unreadable.extend(part_unreadable)
        listed = ImageList(Path(entry.uri) for entry in entries)
        listed.unreadable = unreadable
        listed.source = ListedStamps(str(Path(root).expanduser().resolve()), entries)
        error = listing_error(Path(root).expanduser(), listed, unreadable)
        if error is not None:
            raise error
        return listed

    def hash_files(self, paths: Sequence[Path | str]) -> Iterable[HashResult]:
        ray = self._connect()
        hasher = ray.remote(num_cpus=DECODE_CPUS)(hash_chunk)
        chunks = iter([[str(p) for p in paths[s:s + HASH_CHUNK]] for s in range(0, len(paths), HASH_CHUNK)])
        bar = self._bar(len(paths), "hashing", "file", leave=False)
        pending: list[Any] = []
        with ray_errors():
            while True:
                pending.extend(hasher.remote(chunk) for chunk in islice(chunks, HASH_WINDOW - len(pending)))
                if not pending:
                    break
                done, pending = ray.wait(pending, num_returns=1)
                for results in ray.get(done):
                    if bar is not None:
                        bar.update(len(results))
                    yield from results
        if bar is not None:
            bar.close()

    # -- embedding ---------------------------------------------------------------

    def embed(self, items: Sequence[Item], request: EmbedRequest, sink: VectorSink,
              on_failure: FailureCallback) -> int:
        if not items:
            return 0
        if not (hasattr(sink, "staging") and hasattr(sink, "adopt")):
            raise TypeError("the ray executor's workers write shards into the store: pass the write transaction")
        staging_sink: StagingSink = sink  # type: ignore[assignment]
        self._connect()
        plan = model_plan(request)

        def failures(out: dict[str, Any]) -> None:
            for i, reason in zip(out["i"], out["reason"]):
                if reason:
                    on_failure(int(i), str(reason))

        return self._run(lambda folder: self.pipeline(items, plan, folder, staging_sink.shard_dtype),
                         staging_sink, failures, len(items), f"embedding ({request.model}) on ray")

    def _embed_stream(self, listing: StreamedListing) -> Any:
        def run(txn: WriteTransaction, request: EmbedRequest, rows: StreamedRows) -> int:
            self._connect()
            plan = model_plan(request)
            return self._run(lambda folder: self.streamed_pipeline(listing.units, plan, folder, txn.shard_dtype),
                             txn, rows, None, f"listing + embedding ({request.model}) on ray")

        return run

    def _run(self, job: Any, sink: StagingSink, on_rows: Any, total: int | None, desc: str) -> int:
        """Iterate the Ray Data job ``job(staging folder)``: adopt (and commit) each
        part as it arrives, in order; hand each batch's rows to ``on_rows``."""
        embedded = 0
        adopted: set[str] = set()
        bar = self._bar(total, desc, "img")
        try:
            with _staging(sink) as folder, ray_errors(), contextlib.ExitStack() as stack:
                batches = job(folder).iter_batches(batch_size=None, batch_format="numpy")
                # Closed on any exit (Ctrl-C, SIGTERM, an error): Ray Data's streaming executor
                # stops before ray.shutdown(), instead of a thread of it touching a worker
                # that is gone (Ray then ends the process with exit 1 and our message unsaid).
                stack.callback(lambda: getattr(batches, "close", lambda: None)())
                for out in batches:
                    raise_fatal(out)
                    for name, node in dict(zip(out["part"], out["node"])).items():
                        if name and name not in adopted:
                            adopted.add(name)
                            rows = sink.adopt(folder, str(name))
                            self.parts.append((rows, str(node)))
                            embedded += rows
                    on_rows(out)
                    if bar is not None:
                        bar.update(len(out["reason"]))
        finally:
            if bar is not None:
                bar.close()
        return embedded

    def pipeline(self, items: Sequence[Item], plan: ModelPlan, folder: Path, shard_dtype: str) -> Any:
        """The Ray Data job (lazy: nothing runs until it is iterated)."""
        from functools import partial

        import pyarrow as pa
        import ray.data

        _preserve_order()
        # Blocks of exactly one shard, decoded in batches that divide it: the actor's
        # bundles are then whole shards (see the module docstring).
        shard = self.options.shard_size
        blocks = [ray.put(pa.table({
            "i": pa.array(range(s, min(s + shard, len(items))), pa.int64()),
            "path": pa.array([os.fsencode(path) for path, _, _ in items[s:s + shard]], pa.binary()),
            "sha256": pa.array([sha for _, sha, _ in items[s:s + shard]], pa.string()),
            "size": pa.array([size for _, _, size in items[s:s + shard]], pa.int64()),
        })) for s in range(0, len(items), shard)]
        decode = partial(decode_batch, preprocess=plan.preprocess, draft_size=plan.draft_size, layout=plan.layout)
        return self._embed_stages(ray.data.from_arrow_refs(blocks), decode, plan, folder, shard_dtype)

    def streamed_pipeline(self, units: list[dict[str, Any]], plan: ModelPlan, folder: Path,
                          shard_dtype: str) -> Any:
        """A new store's whole run as one Ray Data job (see :mod:`.ray_stream`):
        listing units -> list + stat -> blocks of one shard -> hash + decode -> model."""
        from functools import partial

        import ray.data

        from ..store.verdicts import RACY_SECONDS

        _preserve_order()
        with quiet_warnings():
            ds = ray.data.from_items(units, override_num_blocks=len(units))
            ds = ds.flat_map(list_unit, num_cpus=DECODE_CPUS)
            # Whole shards again, whatever each folder held (see _embed_stages).
            ds = ds.repartition(target_num_rows_per_block=self.options.shard_size, strict=True)
        decode = partial(hash_and_decode, preprocess=plan.preprocess, draft_size=plan.draft_size, layout=plan.layout,
                         racy_ns=int(RACY_SECONDS * 1e9))
        return self._embed_stages(ds, decode, plan, folder, shard_dtype)

    def _embed_stages(self, ds: Any, decode: Any, plan: ModelPlan, folder: Path, shard_dtype: str) -> Any:
        """Decode in CPU tasks, then the model actor pool, over blocks of one shard."""
        import ray.data

        actors, actor_resources = self._actors(cluster_resources())
        shard = self.options.shard_size
        with quiet_warnings():
            ds = ds.map_batches(decode, batch_size=math.gcd(shard, self.options.batch_size), batch_format="numpy",
                                num_cpus=DECODE_CPUS)
            return ds.map_batches(
                EmbedAndStage, batch_size=shard, batch_format="numpy",
                fn_constructor_kwargs={"request": plan.request, "fingerprint": plan.fingerprint,
                                       "folder": str(folder), "batch_size": self.options.batch_size,
                                       "layout": plan.layout, "shard_dtype": shard_dtype, "weights": plan.weights},
                compute=ray.data.ActorPoolStrategy(size=actors), max_restarts=0, **actor_resources)

    def _actors(self, resources: dict[str, float]) -> tuple[int, dict[str, Any]]:
        """How many model actors, and what each asks for: a GPU each where the model
        should run on one, else one CPU (its runtime's threads use the node's cores)."""
        gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 0)
        device = self.options.device
        if device.startswith("cuda") and not gpus:
            raise CbirError("a CUDA device was requested but the Ray cluster has no GPU")
        if gpus and device != "cpu":
            actors = self.ray_options.actors or gpus
            if actors > gpus:
                raise CbirError(f"{actors} model actors need {actors} GPUs; the Ray cluster has {gpus}")
            return actors, {"num_gpus": 1, "num_cpus": 1}
        actors = self.ray_options.actors or alive_nodes()
        if actors + DECODE_CPUS > cpus:
            raise CbirError(f"{actors} model actors (one CPU each) leave no CPU for decoding: the Ray cluster has "
                            f"{cpus:g} CPUs")
        # One per node by default: spread them, or Ray may pack them onto one node.
        return actors, {"num_cpus": 1, "scheduling_strategy": "SPREAD"}

    def _bar(self, total: int | None, desc: str, unit: str, leave: bool = True) -> Any:
        if not self.options.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave)


def _preserve_order() -> None:
    """Parts reach the driver in the listing's order, so rows get the ids a local run
    gives them and a killed run has committed a prefix of it. Set before the dataset
    is made: a dataset keeps the context it was made with."""
    import ray.data

    with quiet_warnings():
        ray.data.DataContext.get_current().execution_options.preserve_order = True


@contextlib.contextmanager
def _staging(sink: StagingSink) -> Any:
    """The sink's staging folder. A run that stops (Ctrl-C, SIGTERM, an error) may
    leave an actor finishing a part after the folder was emptied, so removing it
    fails (directory not empty): that folder is then a leftover, collected by the
    next commit, and the run's own error is what is raised."""
    staging = sink.staging()
    folder = staging.__enter__()
    try:
        yield folder
    except BaseException as exc:
        with contextlib.suppress(OSError):
            staging.__exit__(type(exc), exc, exc.__traceback__)
        raise
    staging.__exit__(None, None, None)
