"""The hand-crafted descriptors by name (hsv, hog, sift_bovw), and
:class:`DescriptorEmbedder`, which lets them stand wherever a model's
:class:`~cbir_cli.models.protocol.Embedder` does (the extraction pipeline, the
feature store, ``cbir evaluate``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from .bovw import BovwEncoder
from .handcrafted import DEFAULT_HSV_BINS, _check_hog_params, _hog_dim, hog_descriptor, hsv_histogram
from .protocol import EmbedderBase

if TYPE_CHECKING:
    from PIL import Image as PILImage

# Hand-crafted descriptors look at <= 320 px (BoVW's max_side); JPEG draft decoding
# at that size is several times faster than a full decode of a large photo.
HANDCRAFTED_DRAFT = 320
# Bump when a descriptor's output changes, so cached vectors are not reused.
HANDCRAFTED_VERSION = 1

DESCRIPTORS: dict[str, Callable[..., Any]] = {
    "hsv": hsv_histogram,
    "hog": hog_descriptor,
    "sift_bovw": BovwEncoder,
}
"""Descriptor name -> implementation. ``"hsv"`` and ``"hog"`` are functions
``(img, **params) -> vector``; ``"sift_bovw"`` is the :class:`BovwEncoder` class,
which must be fitted first (:func:`describe_images` does it)."""

_BOVW_INIT = ("detector", "max_side", "max_keypoints", "power")
_BOVW_FIT = ("vocab_size", "max_descriptors", "seed", "kmeans_backend")


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown descriptor {name!r}; valid choices: {', '.join(DESCRIPTORS)}")


def descriptor_dim(name: str, **params: Any) -> int:
    """Output length of descriptor ``name`` with the given parameters.

    ``hsv``: ``prod(bins)`` (default 8*12*3 = 288); ``hog``: ``((size/cell_size -
    block_cells + 1) ** 2) * block_cells**2 * nbins`` (default 8100); ``sift_bovw``:
    the requested ``vocab_size`` (default 256) -- an upper bound, a vocabulary fitted
    on too few descriptors is smaller (see :meth:`BovwEncoder.fit`).
    """
    if name == "hsv":
        _check_params(name, params, ("bins", "hellinger"))
        return int(np.prod([int(b) for b in params.get("bins", DEFAULT_HSV_BINS)]))
    if name == "hog":
        _check_params(name, params, ("size", "cell_size", "block_cells", "nbins", "backend"))
        size = int(params.get("size", 128))
        cell, block, nbins = (int(params.get(k, d)) for k, d in (("cell_size", 8), ("block_cells", 2), ("nbins", 9)))
        _check_hog_params(size, cell, block, nbins)
        return _hog_dim(size, cell, block, nbins)
    if name == "sift_bovw":
        _check_params(name, params, _BOVW_INIT + _BOVW_FIT)
        return int(params.get("vocab_size", 256))
    raise _unknown(name)


def _check_params(name: str, params: dict[str, Any], allowed: tuple[str, ...]) -> None:
    bad = sorted(set(params) - set(allowed))
    if bad:
        raise ValueError(
            f"unknown parameter(s) {', '.join(bad)} for descriptor {name!r}; valid: {', '.join(allowed)}"
        )


def describe_images(
    name: str,
    images: Iterable[PILImage.Image],
    fit_images: Iterable[PILImage.Image] | None = None,
    *,
    encoder: BovwEncoder | None = None,
    **params: Any,
) -> np.ndarray:
    """Describe every image with descriptor ``name`` -> ``(n, d)`` float32, unit-L2 rows.

    ``params`` go to the descriptor (e.g. ``bins=`` for hsv, ``size=`` for hog;
    for sift_bovw both the :class:`BovwEncoder` constructor arguments and the
    ``fit`` arguments ``vocab_size``, ``max_descriptors``, ``seed``,
    ``kmeans_backend``).

    For ``sift_bovw`` a vocabulary is needed: pass a fitted ``encoder`` to reuse one,
    or ``fit_images`` to learn it on those images, or neither to learn it on
    ``images`` themselves (then keypoints are detected only once; ``images`` is read
    once in every case). ``encoder``/``fit_images`` are ignored for hsv/hog.
    """
    if name not in DESCRIPTORS:
        raise _unknown(name)
    if name == "sift_bovw":
        _check_params(name, params, _BOVW_INIT + _BOVW_FIT)
        init = {k: params[k] for k in _BOVW_INIT if k in params}
        fit = {k: params[k] for k in _BOVW_FIT if k in params}
        if encoder is not None:
            if not encoder.is_fitted:
                raise ValueError("encoder is not fitted")
            return encoder.transform_many(images)
        enc = BovwEncoder(**init)
        if fit_images is None:
            return enc.fit_transform(images, **fit)
        enc.fit(fit_images, **fit)
        return enc.transform_many(images)
    dim = descriptor_dim(name, **params)
    fn = DESCRIPTORS[name]
    rows = [fn(im, **params) for im in images]
    if not rows:
        return np.zeros((0, dim), dtype=np.float32)
    return np.stack(rows).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- as an Embedder


@dataclass(frozen=True)
class DescriptorConfig:
    """What the pipeline needs to know of a descriptor (cf. ModelConfig)."""

    name: str
    dim: int
    draft_size: int = HANDCRAFTED_DRAFT  # decoding may reduce an image to this short side


def _describe_pixels(describe: Callable[[PILImage.Image], np.ndarray], img: PILImage.Image) -> np.ndarray:
    return np.asarray(describe(img), dtype=np.float32)


class DescriptorEmbedder(EmbedderBase):
    """A hand-crafted descriptor as an :class:`~cbir_cli.models.protocol.Embedder`.
    The descriptor runs as the "preprocessing", i.e. in the decoding workers, so the
    batch that reaches :meth:`embed` already holds the vectors."""

    def __init__(self, name: str, describe: Callable[[PILImage.Image], np.ndarray], dim: int,
                 fingerprint: dict[str, Any]) -> None:
        self.config = DescriptorConfig(name, dim)
        self.preprocess = partial(_describe_pixels, describe)
        self._fingerprint = fingerprint

    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

    def embed(self, batch: Any) -> np.ndarray:
        return np.asarray(batch, dtype=np.float32)


def descriptor_embedder(name: str,
                        vocabulary: str | os.PathLike[str] | BovwEncoder | None = None) -> DescriptorEmbedder:
    """``hsv`` or ``hog`` with their default parameters, or ``sift_bovw`` with a fitted
    vocabulary (a :class:`BovwEncoder` or its saved ``.npy`` file)."""
    if name not in DESCRIPTORS:
        raise _unknown(name)
    if name != "sift_bovw":
        dim = descriptor_dim(name)
        fingerprint = {"model": name, "weights": f"handcrafted-v{HANDCRAFTED_VERSION}", "dim": dim,
                       "preprocessing": {"draft_size": HANDCRAFTED_DRAFT}}
        return DescriptorEmbedder(name, DESCRIPTORS[name], dim, fingerprint)
    if vocabulary is None:
        raise ValueError("sift_bovw needs a fitted vocabulary")
    encoder = vocabulary if isinstance(vocabulary, BovwEncoder) else BovwEncoder.load(vocabulary)
    vocab_sha = hashlib.sha256(encoder.vocabulary.tobytes()).hexdigest()[:16]
    fingerprint = {"model": "sift_bovw", "weights": f"vocab-sha256:{vocab_sha}", "dim": encoder.vocab_size,
                   "preprocessing": {"draft_size": HANDCRAFTED_DRAFT, "detector": encoder.detector,
                                     "max_side": encoder.max_side, "max_keypoints": encoder.max_keypoints,
                                     "power": encoder.power}}
    return DescriptorEmbedder("sift_bovw", encoder.transform, encoder.vocab_size, fingerprint)
