"""Hand-crafted baseline descriptors: HSV colour histogram, HOG, SIFT bag of words.

Every descriptor maps one RGB :class:`PIL.Image.Image` to a 1-D float32 vector with
unit L2 norm, so cosine similarity is the inner product, exactly as for the deep
features, and the same Faiss inner-product index can search them. The one exception
is an image with no signal at all (no gradients for HOG, no keypoints for BoVW):
it gets an all-zero vector, which is similar to nothing.

OpenCV is imported lazily inside the functions; importing this module costs only
numpy.

Notes
-----
* OpenCV 5 moved ``cv2.HOGDescriptor`` out of the main package, so
  :func:`hog_descriptor` ships its own numpy implementation (the default, identical
  on every install) and uses OpenCV's only when asked with ``backend="opencv"``.
* :class:`BovwEncoder` uses SIFT (``cv2.SIFT_create``) and falls back to ORB when
  SIFT is missing; the k-means runs on Faiss when it is importable, else on
  ``cv2.kmeans``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "DESCRIPTORS",
    "BovwEncoder",
    "describe_images",
    "descriptor_dim",
    "hog_descriptor",
    "hsv_histogram",
]

DEFAULT_HSV_BINS: tuple[int, int, int] = (8, 12, 3)
DEFAULT_MAX_SIDE = 320
_EPS = 1e-12


# --------------------------------------------------------------------------- helpers


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "hand-crafted descriptors need OpenCV: pip install opencv-python-headless"
        ) from exc
    return cv2


def _rgb_array(img: Any) -> np.ndarray:
    """A PIL image (any mode) or an (H, W, 3) uint8 RGB array -> contiguous uint8 RGB."""
    if isinstance(img, np.ndarray):
        arr = img
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {arr.shape} {arr.dtype}")
    else:
        if getattr(img, "mode", "RGB") != "RGB":
            img = img.convert("RGB")
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError("empty image (0 pixels)")
    return np.ascontiguousarray(arr)


def _gray(img: Any, max_side: int | None = None) -> np.ndarray:
    cv2 = _cv2()
    gray = cv2.cvtColor(_rgb_array(img), cv2.COLOR_RGB2GRAY)
    if max_side is not None:
        h, w = gray.shape
        scale = max_side / max(h, w)
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
    return gray


def _l2_normalise(v: np.ndarray) -> np.ndarray:
    """L2-normalise to float32; an all-zero vector stays zero (no division by zero)."""
    v = np.asarray(v, dtype=np.float64).ravel()
    n = float(np.sqrt(np.dot(v, v)))
    if n > _EPS:
        v = v / n
    else:
        v = np.zeros_like(v)
    return v.astype(np.float32)


# --------------------------------------------------------------------------- HSV


def hsv_histogram(
    img: PILImage.Image, bins: tuple[int, int, int] = DEFAULT_HSV_BINS, hellinger: bool = True
) -> np.ndarray:
    """Joint HSV colour histogram, flattened, ``prod(bins)`` float32 values, unit L2.

    The image is converted with OpenCV (H in 0..180, S and V in 0..256) and binned with
    ``cv2.calcHist`` into ``bins = (h, s, v)`` bins. With ``hellinger=True`` (default)
    the histogram is L1-normalised and square-rooted (Hellinger / RootSIFT-style
    kernel): the inner product of two such vectors is the Bhattacharyya coefficient of
    the colour distributions, and the vector already has unit L2 norm. With
    ``hellinger=False`` the raw counts are L2-normalised.
    """
    cv2 = _cv2()
    hb, sb, vb = (int(b) for b in bins)
    if min(hb, sb, vb) < 1:
        raise ValueError(f"bins must be positive, got {bins}")
    hsv = cv2.cvtColor(_rgb_array(img), cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [hb, sb, vb], [0, 180, 0, 256, 0, 256]).ravel()
    hist = hist.astype(np.float64)
    if hellinger:
        hist = np.sqrt(hist / max(hist.sum(), _EPS))
    return _l2_normalise(hist)


# --------------------------------------------------------------------------- HOG


def _hog_dim(size: int, cell_size: int = 8, block_cells: int = 2, nbins: int = 9) -> int:
    cells = size // cell_size
    blocks = cells - block_cells + 1
    return blocks * blocks * block_cells * block_cells * nbins


def _check_hog_params(size: int, cell_size: int, block_cells: int, nbins: int) -> None:
    if cell_size < 1 or block_cells < 1 or nbins < 1:
        raise ValueError("cell_size, block_cells and nbins must be >= 1")
    if size % cell_size or size < cell_size * block_cells:
        raise ValueError(
            f"size must be a multiple of cell_size ({cell_size}) and at least one block "
            f"({cell_size * block_cells} px), got {size}"
        )


def _hog_numpy(gray: np.ndarray, cell_size: int, block_cells: int, nbins: int) -> np.ndarray:
    """Dalal–Triggs HOG: [-1, 0, 1] gradients, unsigned orientation (0..180 deg) voted
    into ``nbins`` bins with linear interpolation between neighbouring bins, magnitude
    weighted, per-cell histograms, ``block_cells`` x ``block_cells`` blocks with a
    stride of one cell, each block L2-Hys normalised (clip 0.2). No Gaussian block
    window and no spatial interpolation (OpenCV adds both), so values differ slightly
    from ``cv2.HOGDescriptor`` while the layout size is the same."""
    g = gray.astype(np.float32)
    p = np.pad(g, 1, mode="edge")
    gx = p[1:-1, 2:] - p[1:-1, :-2]
    gy = p[2:, 1:-1] - p[:-2, 1:-1]
    mag = np.sqrt(gx * gx + gy * gy)
    ang = np.degrees(np.arctan2(gy, gx)) % 180.0
    # Bin centres at (b + 0.5) * width; vote into the two nearest bins (circularly).
    pos = ang / (180.0 / nbins) - 0.5
    lo = np.floor(pos)
    w_hi = pos - lo
    lo = lo.astype(np.int64) % nbins
    hi = (lo + 1) % nbins
    h, w = g.shape
    ncy, ncx = h // cell_size, w // cell_size
    cy = (np.arange(h) // cell_size)[:, None]
    cx = (np.arange(w) // cell_size)[None, :]
    cell = (cy * ncx + cx) * nbins
    n = ncy * ncx * nbins
    hist = np.bincount((cell + lo).ravel(), weights=(mag * (1.0 - w_hi)).ravel(), minlength=n)
    hist += np.bincount((cell + hi).ravel(), weights=(mag * w_hi).ravel(), minlength=n)
    hist = hist.reshape(ncy, ncx, nbins)
    nby, nbx = ncy - block_cells + 1, ncx - block_cells + 1
    blocks = np.empty((nby, nbx, block_cells, block_cells, nbins), dtype=np.float64)
    for dy in range(block_cells):
        for dx in range(block_cells):
            blocks[:, :, dy, dx] = hist[dy : dy + nby, dx : dx + nbx]
    blocks = blocks.reshape(nby * nbx, -1)
    eps2 = (0.1 * blocks.shape[1]) ** 2 * 1e-6  # tiny, avoids 0/0 on flat blocks
    blocks /= np.sqrt((blocks * blocks).sum(axis=1, keepdims=True) + eps2)
    np.minimum(blocks, 0.2, out=blocks)
    blocks /= np.sqrt((blocks * blocks).sum(axis=1, keepdims=True) + eps2)
    return blocks.ravel()


def hog_descriptor(
    img: PILImage.Image,
    size: int = 128,
    *,
    cell_size: int = 8,
    block_cells: int = 2,
    nbins: int = 9,
    backend: str = "numpy",
) -> np.ndarray:
    """HOG of the image resized to ``size`` x ``size`` grayscale, float32, unit L2.

    Parameters follow ``cv2.HOGDescriptor(winSize=(size, size), blockSize=(16, 16),
    blockStride=(8, 8), cellSize=(8, 8), nbins=9)``: 8-px cells, 2x2-cell blocks with
    an 8-px stride, 9 unsigned orientation bins; the length is
    ``((size/8 - 1) ** 2) * 36`` (8100 for 128). ``backend="numpy"`` (default) is a
    built-in Dalal–Triggs implementation that works on every OpenCV version (OpenCV 5
    dropped ``HOGDescriptor``); ``backend="opencv"`` uses ``cv2.HOGDescriptor`` and
    raises ``RuntimeError`` where it is missing. Vectors of the two backends are
    close but not identical -- do not mix them in one index. A flat image (no
    gradient) gives the zero vector.
    """
    _check_hog_params(size, cell_size, block_cells, nbins)
    if backend not in ("numpy", "opencv"):
        raise ValueError(f"unknown HOG backend {backend!r}; valid choices: numpy, opencv")
    cv2 = _cv2()
    gray = cv2.resize(_gray(img), (size, size), interpolation=cv2.INTER_AREA)
    if backend == "opencv":
        if not hasattr(cv2, "HOGDescriptor"):
            raise RuntimeError(
                f"cv2.HOGDescriptor is not available in OpenCV {cv2.__version__}; use backend='numpy'"
            )
        c, b = cell_size, cell_size * block_cells
        hog = cv2.HOGDescriptor((size, size), (b, b), (c, c), (c, c), nbins)
        vec = np.asarray(hog.compute(gray)).ravel()
    else:
        vec = _hog_numpy(gray, cell_size, block_cells, nbins)
    return _l2_normalise(vec)


# --------------------------------------------------------------------------- BoVW


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


# --------------------------------------------------------------------------- registry

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
