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

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = ["hog_descriptor", "hsv_histogram"]

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
