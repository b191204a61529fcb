"""The Ray executor: the same plan, store and commits as the local one, with the
work spread over a Ray cluster (an optional extra; see :mod:`.ray_session`).

* listing: one Ray task per top-level sub-folder (the driver only concatenates);
* hashing: plain Ray tasks over chunks of :data:`HASH_CHUNK` paths (measured far
  cheaper than a Ray Data job for this), results streamed back as they finish;
* embedding, one Ray Data job: decode + preprocess in CPU tasks (``map_batches``
  of a function, :data:`DECODE_CPUS` each), then the model in an actor pool
  (``map_batches`` of a callable class, one model per actor, ``num_gpus=1`` per
  actor on a cluster with GPUs, CPU actors otherwise). Each actor call embeds one
  shard's worth of images (``shard_size``) in model batches of ``batch_size`` and
  writes it straight into the store's staging folder
  (:func:`cbir_cli.store.staging.write_part`); only small metadata rows travel back
  to the driver, which adopts each part into the store and commits.

Design points, each measured (see the README's "Scaling out"):

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
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.files import ImageList, image_folder, is_image_name, iter_image_files, listing_error
from ..imageio.readers import ImageFolderDataset, stack_pixels
from ..store.manifest import check_fingerprint
from ..store.staging import write_part
from .executor import EmbedRequest, FailureCallback, StagingSink, VectorSink
from .options import DEVICE_DECODE_LIBRARIES, ExtractOptions
from .plan import HashResult, Item, hash_one
from .ray_session import (
    alive_nodes,
    cluster_resources,
    connect,
    disconnect,
    quiet_warnings,
    ray_errors,
    require_ray,
)

if TYPE_CHECKING:
    import numpy as np

HASH_CHUNK = 128
# Hash tasks in flight at once (the driver need not hold 400k futures for 50M files).
HASH_WINDOW = 512
# CPUs each decode task asks for: not the actor's whole CPU (or GPU), so Ray Data
# never fuses decoding into the model actor.
DECODE_CPUS = 0.5
# Input blocks per cluster CPU: enough tasks to keep every decode slot busy.
BLOCKS_PER_CPU = 8


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


# -- what runs on the workers ------------------------------------------------------


def list_top(root: str) -> tuple[str | None, list[str], list[str], list[tuple[str, str]]]:
    """(error, image files directly in ``root``, sub-folders to list, unreadable
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
    files = [str(folder / name) for name in sorted(filenames) if is_image_name(name)]
    below = [str(folder / name) for name in sorted(dirnames) if not (folder / name).is_symlink()]
    return None, files, below, unreadable


def list_below(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    unreadable: list[tuple[str, str]] = []
    return [str(p) for p in iter_image_files(folder, unreadable)], unreadable


def hash_chunk(paths: list[str]) -> list[HashResult]:
    return [hash_one(p) for p in paths]


def decode_batch(batch: dict[str, np.ndarray], preprocess: Any, draft_size: int | None,
                 layout: PixelLayout) -> dict[str, np.ndarray]:
    """Decode + preprocess a batch of files; a file that fails keeps its row, with
    no pixels and its one-line reason. A file whose folder does not exist on this
    node is not a bad file but a node without the shared storage: that is fatal
    (recording every image as bad would be worse than stopping)."""
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
            if not os.path.isdir(os.path.dirname(paths[j])):
                fatal[:] = unreachable(os.path.dirname(paths[j]), "the images' folder")
        else:
            pixels[j], shapes[j] = layout.pack(result)
    return {"i": batch["i"], "path": batch["path"], "sha256": batch["sha256"], "size": batch["size"],
            "pixels": pixels, "shapes": shapes, "reason": reasons, "fatal": fatal}


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


class EmbedAndStage:
    """The model actor: loads the model once, embeds each call's images in model
    batches and writes them as one part into the store's staging ``folder``."""

    def __init__(self, request: EmbedRequest, fingerprint: dict[str, Any], folder: str, batch_size: int,
                 layout: PixelLayout, shard_dtype: str) -> None:
        self.folder, self.batch_size, self.layout, self.shard_dtype = folder, batch_size, layout, shard_dtype
        self.error: CbirError | None = None
        try:
            if not Path(folder).is_dir():
                raise CbirError(unreachable(folder, "the index folder"))
            self.embedder = request.load()
            check_fingerprint(fingerprint, self.embedder.fingerprint(), Path(folder).parent.parent)
        except CbirError as exc:
            self.error = exc

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        from ..store.validity import INVALID_VECTOR, invalid_rows

        n = len(batch["i"])
        out = {"i": batch["i"], "reason": np.array(batch["reason"], dtype=object),  # a copy: inputs are read-only
               "part": np.full(n, "", dtype=object), "fatal": np.full(n, "", dtype=object),
               "remedy": np.full(n, "", dtype=object)}
        try:
            if self.error is not None:
                raise self.error
            if batch["fatal"][0]:
                raise CbirError(str(batch["fatal"][0]))
            good = np.flatnonzero(batch["reason"] == "")
            if len(good):
                vectors = np.concatenate([self.embedder.embed(stack_pixels(
                    [self.layout.unpack(batch["pixels"][j], batch["shapes"][j]) for j in good[s:s + self.batch_size]]))
                    for s in range(0, len(good), self.batch_size)])
                # What the store refuses to hold is a skipped file, as in the local engine.
                refused = invalid_rows(vectors)
                out["reason"][good[refused]] = INVALID_VECTOR
                good, vectors = good[~refused], vectors[~refused]
            if len(good):
                items = [(os.fsdecode(batch["path"][j]), str(batch["sha256"][j]), int(batch["size"][j]))
                         for j in good]
                out["part"][good] = write_part(self.folder, vectors, items, self.shard_dtype)
        except CbirError as exc:
            out["fatal"][:], out["remedy"][:] = exc.message, exc.remedy or ""
        except OSError as exc:  # the staging folder is on this node's storage, but not writable
            out["fatal"][:] = f"{self.folder}: cannot write a shard here ({exc.strerror or exc})"
        return out


# -- the driver ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelPlan:
    """What the driver needs to know of the model without loading it."""

    request: EmbedRequest  # as shipped to the actors
    fingerprint: dict[str, Any]
    preprocess: Any
    draft_size: int | None
    layout: PixelLayout


def model_plan(request: EmbedRequest) -> ModelPlan:
    """Registry models are loaded by name on the workers (never pickled through the
    object store); an embedder object given by the caller is shipped as it is."""
    from PIL import Image

    from ..models.loading import model_fingerprint
    from ..models.preprocess import image_preprocessor
    from ..models.registry import get_model_config, model_names

    if request.embedder is None or request.model in model_names():
        if request.embedder is not None:
            config, fingerprint = request.embedder.config, request.embedder.fingerprint()
            request = replace(request, embedder=None, descriptor=config.descriptor,
                              calibration=getattr(request.embedder, "calibration", None))
        else:
            config = get_model_config(request.model).with_descriptor(request.descriptor)
            fingerprint = model_fingerprint(request.model, request.weights, request.descriptor, request.calibration)
        preprocess = image_preprocessor(config)
    else:
        config, preprocess, fingerprint = request.embedder.config, request.embedder.preprocess, \
            request.embedder.fingerprint()
    draft_size = getattr(config, "draft_size", None)
    sample = preprocess(Image.new("RGB", (draft_size or 256, draft_size or 256)))
    return ModelPlan(request, fingerprint, preprocess, draft_size, PixelLayout.of(sample))


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

    def list_images(self, root: Path) -> list[Path]:
        ray = self._connect()
        with ray_errors():
            error, files, below, unreadable = ray.get(ray.remote(num_cpus=DECODE_CPUS)(list_top).remote(str(root)))
            if error is not None:
                raise CbirError(error)
            lister = ray.remote(num_cpus=DECODE_CPUS)(list_below)
            for part, part_unreadable in ray.get([lister.remote(folder) for folder in below]):
                files.extend(part)
                unreadable.extend(part_unreadable)
        listed = ImageList(Path(p) for p in files)
        listed.unreadable = unreadable
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
        embedded = 0
        adopted: set[str] = set()
        bar = self._bar(len(items), f"embedding ({request.model}) on ray", "img")
        try:
            with staging_sink.staging() as folder, ray_errors():
                job = self.pipeline(items, plan, folder, staging_sink.shard_dtype)
                for out in job.iter_batches(batch_size=None, batch_format="numpy"):
                    if len(out["fatal"]) and out["fatal"][0]:
                        raise CbirError(str(out["fatal"][0]), str(out["remedy"][0]) or None)
                    for i, reason in zip(out["i"], out["reason"]):
                        if reason:
                            on_failure(int(i), str(reason))
                    for name in dict.fromkeys(out["part"]):
                        if name and name not in adopted:
                            adopted.add(name)
                            embedded += staging_sink.adopt(folder, str(name))
                    if bar is not None:
                        bar.update(len(out["i"]))
        finally:
            if bar is not None:
                bar.close()
        return embedded

    def pipeline(self, items: Sequence[Item], plan: ModelPlan, folder: Path, shard_dtype: str) -> Any:
        """The Ray Data job (lazy: nothing runs until it is iterated)."""
        from functools import partial

        import pyarrow as pa
        import ray.data

        resources = cluster_resources()
        actors, actor_resources = self._actors(resources)
        # Parts reach the driver in the plan's order, so rows get the ids a local run
        # gives them and a killed run has committed a prefix of the plan.
        with quiet_warnings():
            ray.data.DataContext.get_current().execution_options.preserve_order = True
        per_block = max(self.options.batch_size,
                        min(self.options.shard_size, -(-len(items) // int(BLOCKS_PER_CPU * resources.get("CPU", 1)))))
        table = pa.table({
            "i": pa.array(range(len(items)), pa.int64()),
            "path": pa.array([os.fsencode(path) for path, _, _ in items], pa.binary()),
            "sha256": pa.array([sha for _, sha, _ in items], pa.string()),
            "size": pa.array([size for _, _, size in items], pa.int64()),
        })
        ds = ray.data.from_arrow([table.slice(s, per_block) for s in range(0, len(items), per_block)])
        decode = partial(decode_batch, preprocess=plan.preprocess, draft_size=plan.draft_size, layout=plan.layout)
        with quiet_warnings():
            ds = ds.map_batches(decode, batch_size=self.options.batch_size, batch_format="numpy",
                                num_cpus=DECODE_CPUS)
            return ds.map_batches(
                EmbedAndStage, batch_size=self.options.shard_size, batch_format="numpy",
                fn_constructor_kwargs={"request": plan.request, "fingerprint": plan.fingerprint,
                                       "folder": str(folder), "batch_size": self.options.batch_size,
                                       "layout": plan.layout, "shard_dtype": shard_dtype},
                compute=ray.data.ActorPoolStrategy(size=actors), max_restarts=0, **actor_resources)

    def _actors(self, resources: dict[str, float]) -> tuple[int, dict[str, float]]:
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
        return actors, {"num_cpus": 1}

    def _bar(self, total: int, desc: str, unit: str, leave: bool = True) -> Any:
        if not self.options.progress:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=leave)

