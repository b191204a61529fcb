"""The Embedder seam: anything that turns images into L2-normalised float32 vectors.

The extraction pipeline, the search side and ``cbir evaluate`` only ever talk to
this protocol. Implementations: :class:`~cbir_cli.models.torch_embedder.TorchEmbedder`
(PyTorch, CPU or CUDA), :class:`~cbir_cli.models.onnx_embedder.OnnxEmbedder`
(ONNX Runtime, CPU) and :class:`~cbir_cli.models.descriptors.DescriptorEmbedder`
(hand-crafted descriptors); tests add fakes. Get one with
:func:`cbir_cli.models.loading.load_embedder`.

The work is split in two so that it can be spread over processes:

* ``preprocess(image) -> pixels`` runs where images are decoded (decoding worker
  processes; it must be picklable) and returns a uint8 (3, H, W) array, or a tuple
  of them (one per scale) -- or, for a descriptor, already the vector;
* ``embed(batch) -> (n, dim) float32`` runs where the model lives, on a batch of
  those: a list, or stacked into one array when they are arrays of one shape (the
  decoding workers stack what they can, :mod:`cbir_cli.imageio.readers`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage


@runtime_checkable
class Embedder(Protocol):
    """See the module docstring. ``config`` is the model's config: at least ``name``,
    ``dim`` and ``draft_size`` (the smallest side decoding may reduce an image to)."""

    config: Any
    preprocess: Callable[[PILImage.Image], Any]

    def fingerprint(self) -> dict[str, Any]:
        """What a store records to refuse vectors of another model: at least
        ``model``, ``weights``, ``dim`` and ``preprocessing`` (and ``descriptor``
        unless it is the legacy one).

        Returns:
            A JSON-serialisable dict; equal fingerprints mean interchangeable vectors.
        """
        ...

    def embed(self, batch: Any) -> np.ndarray:
        """Embed a batch of preprocessed images.

        Args:
            batch: ``preprocess`` outputs, stacked (one input shape) or a list.

        Returns:
            float32 (n, dim), rows L2-normalised.
        """
        ...


@runtime_checkable
class TextEmbedder(Embedder, Protocol):
    """An Embedder whose model also has a text tower (its config's ``has_text``):
    words land in the same space as images, so a sentence can query an index."""

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 (n, dim), rows L2-normalised, comparable with :meth:`embed`'s."""
        ...


def embed_images(embedder: Embedder, images: Sequence[PILImage.Image]) -> np.ndarray:
    """Preprocess and embed decoded RGB images in one batch (the query path)."""
    import numpy as np

    if not images:
        return np.zeros((0, int(embedder.config.dim)), dtype=np.float32)
    return embedder.embed([embedder.preprocess(img) for img in images])


def model_fingerprint_of(config: Any, weights_id: str, family: str | None = None) -> dict[str, Any]:
    """The fingerprint of a registered model's vectors (every runtime reports this
    one): ``family`` is recorded for a plugin family's models (the built-in CNNs add
    no key); a CNN's legacy descriptor (GAP, centre crop) adds no key either, so
    stores made before families and descriptors existed keep their fingerprint."""
    fingerprint = {"model": config.name, "weights": weights_id, "dim": config.dim,
                   "preprocessing": config.preprocessing()}
    if family is not None:
        fingerprint["family"] = family
    descriptor = getattr(config, "descriptor", None)
    if descriptor is not None and descriptor.fingerprint() is not None:
        fingerprint["descriptor"] = descriptor.fingerprint()
    return fingerprint


class EmbedderBase:
    """Conveniences shared by the implementations (not part of the protocol)."""

    config: Any
    preprocess: Callable[[PILImage.Image], Any]
    # Where ``embed`` runs: a torch device, or None where it does not matter (CPU-only
    # runtimes, descriptors). Decoding on the device needs a CUDA one.
    device: Any = None
    on_cuda: bool = False

    def embed(self, batch: Any) -> np.ndarray:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    @property
    def name(self) -> str:
        return str(self.config.name)

    @property
    def dim(self) -> int:
        return int(self.config.dim)

    def embed_images(self, images: Sequence[PILImage.Image]) -> np.ndarray:
        """Preprocess and embed decoded RGB images (the query path)."""
        return embed_images(self, images)
