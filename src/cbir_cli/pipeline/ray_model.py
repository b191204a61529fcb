"""The model side of the Ray executor: what the driver knows of the model without
loading it (:func:`model_plan`), the model's weights shipped through Ray's object
store (:class:`ShippedWeights`: a node needs only the package, not a model cache),
and the model actor (:class:`EmbedAndStage`) that embeds a shard's worth of images
and writes it as one part into the store's staging folder."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_write_bytes
from ..imageio.readers import stack_pixels
from ..store.manifest import check_fingerprint
from ..store.staging import write_part
from .executor import EmbedRequest
from .ray_tasks import PixelLayout, unreachable

if TYPE_CHECKING:
    import numpy as np

# What the driver reads of each row besides the part: "i" (an item's index) in a
# run over items, the rest in a streamed run (see .ray_stream).
STREAMED_COLUMNS = ("i", "path", "sha256", "size", "mtime_ns", "etag", "kind", "cacheable")
# Where an actor keeps the weights it was sent (node-local, per content).
WEIGHTS_DIR = "cbir-ray-weights"


@dataclass(frozen=True)
class ShippedWeights:
    """A weights file sent to the actors through the object store: ``official``
    files go into a private torch hub cache on the node (same weights id as the
    driver's cache), a user's file replaces ``--weights`` by its node-local copy
    (its id is its content hash: the same)."""

    name: str
    sha256: str
    data: Any  # an ObjectRef of the file's bytes
    official: bool

    def materialise(self, request: EmbedRequest) -> EmbedRequest:
        """(Actor side.) Write the bytes under this node's temp folder once and
        return the request that loads them."""
        import ray

        folder = Path(tempfile.gettempdir()) / WEIGHTS_DIR / self.sha256[:16]
        target = folder / "hub" / "checkpoints" / self.name if self.official else folder / self.name
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            data = ray.get(self.data) if isinstance(self.data, ray.ObjectRef) else self.data
            atomic_write_bytes(target, data)
        if not self.official:
            return replace(request, weights=str(target))
        os.environ["TORCH_HOME"] = str(folder)  # this actor's process only
        if "torch" in sys.modules:
            sys.modules["torch"].hub.set_dir(str(folder / "hub"))
        return request


def ship_weights(request: EmbedRequest) -> ShippedWeights | None:
    """(Driver side.) The weights file the actors need, put into the object store:
    the user's ``--weights`` file, or the registry model's official file from this
    machine's cache (downloaded here first when missing: a failure is one line on
    the driver, not on every node). None: nothing to ship (a random-weight test
    model, or an embedder object given by the caller)."""
    import ray

    from ..models.descriptors import DESCRIPTORS
    from ..models.registry import get_model_config
    from ..models.weights import pretrained_state_dict, torch_hub_checkpoint_dir

    if request.embedder is not None:
        return None
    if request.weights is not None:
        path, official = Path(request.weights).expanduser(), False
    elif request.model in DESCRIPTORS:
        return None
    else:
        config = get_model_config(request.model)
        if not (config.torchvision_weights and config.weights_file):
            return None
        path, official = torch_hub_checkpoint_dir() / config.weights_file, True
        if not path.is_file():
            pretrained_state_dict(config, None)  # the cache, else a download, else a one-line error
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CbirError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None
    return ShippedWeights(path.name, hashlib.sha256(data).hexdigest(), ray.put(data), official)


@dataclass(frozen=True)
class ModelPlan:
    """What the driver needs to know of the model without loading it."""

    request: EmbedRequest  # as shipped to the actors
    fingerprint: dict[str, Any]
    preprocess: Any
    draft_size: int | None
    layout: PixelLayout
    weights: ShippedWeights | None = None


def model_plan(request: EmbedRequest) -> ModelPlan:
    """Registry models are loaded by name on the workers, their weights shipped
    through the object store (never a pickled model); an embedder object given by
    the caller is shipped as it is."""
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
    return ModelPlan(request, fingerprint, preprocess, draft_size, PixelLayout.of(sample), ship_weights(request))


def _on_node(message: str) -> str:
    import socket

    return message if "Ray node" in message else f"on Ray node {socket.gethostname()}: {message}"


class EmbedAndStage:
    """The model actor: loads the model once (from weights sent through Ray),
    embeds each call's images in model batches and writes them as one part into
    the store's staging ``folder``."""

    def __init__(self, request: EmbedRequest, fingerprint: dict[str, Any], folder: str, batch_size: int,
                 layout: PixelLayout, shard_dtype: str, weights: ShippedWeights | None = None) -> None:
        self.folder, self.batch_size, self.layout, self.shard_dtype = folder, batch_size, layout, shard_dtype
        self.error: CbirError | None = None
        try:
            if not Path(folder).is_dir():
                raise CbirError(unreachable(folder, "the index folder"))
            if weights is not None:
                request = weights.materialise(request)
            self.embedder = request.load()
            check_fingerprint(fingerprint, self.embedder.fingerprint(), Path(folder).parent.parent)
        except CbirError as exc:
            self.error = CbirError(_on_node(exc.message), exc.remedy)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import numpy as np

        from ..store.validity import INVALID_VECTOR, invalid_rows

        n = len(batch["reason"])
        out = {"reason": np.array(batch["reason"], dtype=object),  # a copy: inputs are read-only
               "part": np.full(n, "", dtype=object), "rows": np.zeros(n, dtype=np.int64),
               "node": np.full(n, self.node, dtype=object),
               "fatal": np.full(n, "", dtype=object), "remedy": np.full(n, "", dtype=object),
               **{key: batch[key] for key in STREAMED_COLUMNS if key in batch}}
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
                out["rows"][good] = len(good)
        except CbirError as exc:
            out["fatal"][:], out["remedy"][:] = exc.message, exc.remedy or ""
        except OSError as exc:  # the staging folder is on this node's storage, but not writable
            out["fatal"][:] = f"{self.folder}: cannot write a shard here ({exc.strerror or exc})"
        return out

    @property
    def node(self) -> str:
        """The Ray node this actor runs on (which node produced each part)."""
        import ray

        return str(ray.get_runtime_context().get_node_id())
