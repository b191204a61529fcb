"""SIFT bag of visual words: a vocabulary fitted by k-means on local descriptors,
then one power-normalised, L2-normalised word histogram per image (see
:class:`BovwEncoder`). OpenCV and Faiss are imported lazily."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from .handcrafted import DEFAULT_MAX_SIDE, _cv2, _gray, _l2_normalise

if TYPE_CHECKING:
    from PIL import Image as PILImage


def _detector_available(name: str) -> bool:
    cv2 = _cv2()
    return hasattr(cv2, "SIFT_create") if name == "sift" else hasattr(cv2, "ORB_create")


def _compact(desc: np.ndarray) -> np.ndarray:
    """Store descriptors as uint8 when that is lossless (OpenCV's SIFT values are
    integers in 0..255; ORB is uint8 already): a quarter of the memory."""
    if desc.dtype == np.uint8:
        return desc
    d = np.asarray(desc, dtype=np.float32)
    if d.size and d.min() >= 0 and d.max() <= 255 and np.array_equal(d, np.round(d)):
        return d.astype(np.uint8)
    return d


class BovwEncoder:
    """Bag of visual words over local descriptors (SIFT, or ORB as a fallback).

    ``fit`` samples local descriptors from a set of images and clusters them with
    k-means into a vocabulary of visual words; ``transform`` counts, for one image,
    how many of its descriptors fall nearest to each word, applies power
    normalisation (``counts ** power``, square root by default) and L2-normalises.
    No TF-IDF weighting. An image with no keypoints (e.g. blank) gives the zero vector.

    Images are converted to grayscale and downscaled so that their longer side is at
    most ``max_side`` pixels before detection; at most ``max_keypoints`` keypoints
    (the strongest) are kept per image.

    ``detector``: ``"sift"`` (default), ``"orb"``, or ``"auto"`` (SIFT if
    ``cv2.SIFT_create`` exists, else ORB). A vocabulary fixes the detector: 128-D
    words are SIFT, 32-D words are ORB.
    """

    def __init__(
        self,
        vocabulary: np.ndarray | None = None,
        *,
        detector: str = "auto",
        max_side: int = DEFAULT_MAX_SIDE,
        max_keypoints: int = 500,
        power: float = 0.5,
    ) -> None:
        if detector not in ("auto", "sift", "orb"):
            raise ValueError(f"unknown detector {detector!r}; valid choices: auto, sift, orb")
        if detector == "auto":
            detector = "sift" if _detector_available("sift") else "orb"
        elif not _detector_available(detector):
            raise RuntimeError(f"this OpenCV build has no {detector.upper()} detector")
        if max_side < 16 or max_keypoints < 1 or power <= 0:
            raise ValueError("need max_side >= 16, max_keypoints >= 1 and power > 0")
        self.detector = detector
        self.max_side = int(max_side)
        self.max_keypoints = int(max_keypoints)
        self.power = float(power)
        self.vocabulary: np.ndarray | None = None
        if vocabulary is not None:
            self._set_vocabulary(vocabulary)

    # -- properties

    @property
    def descriptor_size(self) -> int:
        """Length of one local descriptor: 128 for SIFT, 32 for ORB."""
        return 128 if self.detector == "sift" else 32

    @property
    def is_fitted(self) -> bool:
        return self.vocabulary is not None

    @property
    def vocab_size(self) -> int:
        """Number of visual words (= output dimension). Needs a fitted encoder."""
        return int(self._vocab().shape[0])

    @property
    def dim(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        words = self.vocabulary.shape[0] if self.vocabulary is not None else "unfitted"
        return f"BovwEncoder(detector={self.detector!r}, words={words}, max_side={self.max_side})"

    # -- local features

    def local_descriptors(self, img: PILImage.Image) -> np.ndarray:
        """Local descriptors of one image, shape ``(n, descriptor_size)``; ``n`` may be 0.
        SIFT descriptors come back as uint8 (lossless for OpenCV's SIFT)."""
        cv2 = _cv2()
        gray = _gray(img, self.max_side)
        if self.detector == "sift":
            det = cv2.SIFT_create(nfeatures=self.max_keypoints)
        else:
            det = cv2.ORB_create(nfeatures=self.max_keypoints)
        _, desc = det.detectAndCompute(gray, None)
        if desc is None or len(desc) == 0:
            return np.zeros((0, self.descriptor_size), dtype=np.uint8)
        return _compact(desc)

    # -- vocabulary

    def fit(
        self,
        images: Iterable[PILImage.Image],
        vocab_size: int = 256,
        max_descriptors: int = 100_000,
        seed: int = 0,
        kmeans_backend: str = "auto",
    ) -> BovwEncoder:
        """Build the vocabulary from ``images`` (any iterable, read once).

        A uniform random sample (seeded; reservoir-style, so memory stays bounded by
        ``2 * max_descriptors`` descriptors) of all local descriptors is clustered
        with k-means (``kmeans_backend``: ``"faiss"``, ``"opencv"`` or ``"auto"`` =
        Faiss when importable). When the sample holds fewer distinct descriptors
        than ``vocab_size``, the vocabulary is those descriptors themselves, so it
        has **fewer** words than asked (check :attr:`vocab_size`). No descriptors at
        all raises ``ValueError``. Returns ``self``.
        """
        return self._fit_descriptors(
            (self.local_descriptors(im) for im in images), vocab_size, max_descriptors, seed, kmeans_backend
        )

    def fit_transform(
        self,
        images: Iterable[PILImage.Image],
        vocab_size: int = 256,
        max_descriptors: int = 100_000,
        seed: int = 0,
        kmeans_backend: str = "auto",
    ) -> np.ndarray:
        """Fit on ``images`` and encode the same images, detecting keypoints only
        once (their descriptors are kept in memory as uint8 meanwhile: ~64 KB per
        image with 500 SIFT keypoints). Returns ``(n, vocab_size)`` float32."""
        _check_fit_args(vocab_size, max_descriptors, kmeans_backend)
        per_image = [self.local_descriptors(im) for im in images]
        self._fit_descriptors(iter(per_image), vocab_size, max_descriptors, seed, kmeans_backend)
        return self._encode_many(per_image)

    def _fit_descriptors(
        self,
        descs: Iterable[np.ndarray],
        vocab_size: int,
        max_descriptors: int,
        seed: int,
        kmeans_backend: str,
    ) -> BovwEncoder:
        _check_fit_args(vocab_size, max_descriptors, kmeans_backend)
        rng = np.random.default_rng(seed)
        kept = np.zeros((0, self.descriptor_size), dtype=np.float32)
        kept_keys = np.zeros(0, dtype=np.float64)
        new: list[np.ndarray] = []
        new_keys: list[np.ndarray] = []
        pending = 0
        n_images = 0
        for d in descs:
            n_images += 1
            if d.shape[0] == 0:
                continue
            new.append(d)
            new_keys.append(rng.random(d.shape[0]))
            pending += d.shape[0]
            if kept.shape[0] + pending > 2 * max_descriptors:
                kept, kept_keys = self._reservoir(kept, kept_keys, new, new_keys, max_descriptors)
                new, new_keys, pending = [], [], 0
        kept, kept_keys = self._reservoir(kept, kept_keys, new, new_keys, max_descriptors)
        if kept.shape[0] == 0:
            raise ValueError(
                f"no {self.detector.upper()} keypoints found in the {n_images} fit images; "
                "cannot build a visual vocabulary"
            )
        uniq = np.unique(kept, axis=0)
        if uniq.shape[0] <= vocab_size:
            vocab = uniq
        else:
            vocab = _kmeans(kept, vocab_size, seed, kmeans_backend)
        self._set_vocabulary(vocab)
        return self

    @staticmethod
    def _reservoir(
        kept: np.ndarray,
        kept_keys: np.ndarray,
        new: list[np.ndarray],
        new_keys: list[np.ndarray],
        limit: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Keep the ``limit`` descriptors with the smallest random keys: a uniform
        sample without replacement of everything seen so far."""
        if new:
            kept = np.concatenate([kept, *(d.astype(np.float32) for d in new)], axis=0)
            kept_keys = np.concatenate([kept_keys, *new_keys])
        if kept.shape[0] <= limit:
            return kept, kept_keys
        idx = np.argpartition(kept_keys, limit - 1)[:limit]
        idx.sort()
        return kept[idx], kept_keys[idx]

    def _set_vocabulary(self, vocab: np.ndarray) -> None:
        v = np.asarray(vocab, dtype=np.float32)
        if v.ndim != 2 or v.shape[0] < 1:
            raise ValueError(f"vocabulary must be a non-empty 2-D array, got shape {v.shape}")
        if v.shape[1] not in (32, 128):
            raise ValueError(f"vocabulary words must be 128-D (SIFT) or 32-D (ORB), got {v.shape[1]}-D")
        detector = "sift" if v.shape[1] == 128 else "orb"
        if detector != self.detector:
            if not _detector_available(detector):
                raise RuntimeError(f"vocabulary is for {detector.upper()}, which this OpenCV lacks")
            self.detector = detector
        self.vocabulary = np.ascontiguousarray(v)
        self._word_sq = (self.vocabulary.astype(np.float64) ** 2).sum(axis=1)

    def _vocab(self) -> np.ndarray:
        if self.vocabulary is None:
            raise RuntimeError("BovwEncoder is not fitted: call fit() or load() first")
        return self.vocabulary

    # -- encoding

    def encode_descriptors(self, desc: np.ndarray) -> np.ndarray:
        """Histogram of nearest words for a ``(n, d)`` descriptor array -> unit-L2
        float32 vector of length :attr:`vocab_size` (zeros when ``n == 0``)."""
        vocab = self._vocab()
        out = np.zeros(vocab.shape[0], dtype=np.float64)
        if desc.shape[0] == 0:
            return out.astype(np.float32)
        x = desc.astype(np.float64)
        d2 = self._word_sq[None, :] - 2.0 * (x @ vocab.T.astype(np.float64))
        words = np.argmin(d2, axis=1)
        out += np.bincount(words, minlength=vocab.shape[0])
        return _l2_normalise(out**self.power)

    def transform(self, img: PILImage.Image) -> np.ndarray:
        """BoVW vector of one image: float32, length :attr:`vocab_size`, unit L2, or
        all zeros when the image has no keypoints."""
        self._vocab()
        return self.encode_descriptors(self.local_descriptors(img))

    def transform_many(self, images: Iterable[PILImage.Image]) -> np.ndarray:
        """``(n, vocab_size)`` float32 array of :meth:`transform` for each image."""
        self._vocab()
        return self._encode_many(self.local_descriptors(im) for im in images)

    def _encode_many(self, descs: Iterable[np.ndarray]) -> np.ndarray:
        rows = [self.encode_descriptors(d) for d in descs]
        if not rows:
            return np.zeros((0, self.vocab_size), dtype=np.float32)
        return np.stack(rows).astype(np.float32, copy=False)

    # -- persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save the vocabulary as a float32 ``.npy`` array ``(words, 128 | 32)``.
        Only the words are stored; ``max_side``/``max_keypoints``/``power`` are
        constructor arguments to pass again to :meth:`load`."""
        np.save(path, self._vocab(), allow_pickle=False)

    @classmethod
    def load(cls, path: str | os.PathLike[str], **kwargs: Any) -> BovwEncoder:
        """Load a vocabulary written by :meth:`save`; the detector follows from the
        word length (128 = SIFT, 32 = ORB). ``kwargs`` go to the constructor."""
        vocab = np.load(path, allow_pickle=False)
        return cls(vocab, **kwargs)


def _check_fit_args(vocab_size: int, max_descriptors: int, kmeans_backend: str) -> None:
    if vocab_size < 1 or max_descriptors < 1:
        raise ValueError("vocab_size and max_descriptors must be >= 1")
    if kmeans_backend not in ("auto", "faiss", "opencv"):
        raise ValueError(f"unknown kmeans_backend {kmeans_backend!r}; valid choices: auto, faiss, opencv")


def _kmeans(x: np.ndarray, k: int, seed: int, backend: str, niter: int = 20) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise
        else:
            km = faiss.Kmeans(
                x.shape[1],
                k,
                niter=niter,
                seed=int(seed) & 0x7FFFFFFF,
                verbose=False,
                min_points_per_centroid=1,  # no "please provide at least..." warning
                max_points_per_centroid=max(256, math.ceil(x.shape[0] / k) + 1),  # use every sample
            )
            km.train(x)
            return np.asarray(km.centroids, dtype=np.float32).reshape(k, x.shape[1])
    cv2 = _cv2()
    cv2.setRNGSeed(int(seed))
    criteria = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, niter, 1e-4)
    _, _, centers = cv2.kmeans(x, k, None, criteria, 1, cv2.KMEANS_PP_CENTERS)
    return np.asarray(centers, dtype=np.float32)
