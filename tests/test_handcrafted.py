"""Tests for the hand-crafted descriptors (cbir_cli.models.handcrafted, bovw, descriptors) on small
seeded synthetic images."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("cv2")

from cbir_cli.models import handcrafted as H
from cbir_cli.models.bovw import BovwEncoder
from cbir_cli.models.descriptors import DESCRIPTORS, describe_images, descriptor_dim
from cbir_cli.models.handcrafted import hog_descriptor, hsv_histogram
from tests.conftest import draw_random_shapes

# --------------------------------------------------------------------------- fixtures


def _texture(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """Smooth random colour texture: low-res noise upsampled (many SIFT blobs)."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = (rng.random((h // 8, w // 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def _shapes(seed: int, size: int = 128) -> Image.Image:
    """Random filled rectangles and ellipses on a grey background."""
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw_random_shapes(img, np.random.default_rng(seed), count=8, min_side=10, max_side=(60, 60))
    return img


def _noisy_colour(seed: int, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(lo, hi, size=(64, 64, 3), endpoint=True).astype(np.uint8)
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def textures() -> list[Image.Image]:
    return [_texture(s) for s in range(6)]


@pytest.fixture(scope="module")
def fitted(textures) -> BovwEncoder:
    return BovwEncoder().fit(textures, vocab_size=32, seed=0)


def _unit(v: np.ndarray) -> bool:
    return bool(np.isclose(np.linalg.norm(v), 1.0, atol=1e-5))


# --------------------------------------------------------------------------- import cost


def test_import_does_not_load_cv2_or_faiss():
    code = (
        "import sys, cbir_cli.models.descriptors, cbir_cli.evaluate.metrics; "
        "bad = [m for m in ('cv2', 'faiss', 'torch') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- HSV


def test_hsv_shape_dtype_norm():
    v = hsv_histogram(_texture(0))
    assert v.shape == (8 * 12 * 3,) == (descriptor_dim("hsv"),)
    assert v.dtype == np.float32
    assert _unit(v)
    assert (v >= 0).all()
    v2 = hsv_histogram(_texture(0), bins=(4, 4, 4), hellinger=False)
    assert v2.shape == (64,) == (descriptor_dim("hsv", bins=(4, 4, 4)),)
    assert _unit(v2)


def test_hsv_red_vs_blue():
    red_a = hsv_histogram(_noisy_colour(1, (190, 0, 0), (255, 25, 25)))
    red_b = hsv_histogram(_noisy_colour(2, (190, 0, 0), (255, 25, 25)))
    blue = hsv_histogram(_noisy_colour(3, (0, 0, 190), (25, 25, 255)))
    assert float(red_a @ red_b) > 0.95
    assert float(red_a @ blue) < 0.1


def test_hsv_accepts_other_modes():
    rgba = _texture(4).convert("RGBA")
    np.testing.assert_allclose(hsv_histogram(rgba), hsv_histogram(_texture(4)), atol=1e-6)
    assert hsv_histogram(Image.new("L", (10, 10), 7)).shape == (288,)


# --------------------------------------------------------------------------- HOG


def test_hog_shape_dtype_norm():
    v = hog_descriptor(_shapes(0))
    # 128 px, 8 px cells -> 16 cells, 15 x 15 blocks of 2 x 2 cells x 9 bins = 8100
    assert v.shape == (8100,) == (descriptor_dim("hog"),)
    assert v.dtype == np.float32
    assert _unit(v)
    v64 = hog_descriptor(_texture(1), size=64)  # non-square input is resized
    # 8 cells, 7 x 7 blocks -> 7 * 7 * 36 = 1764
    assert v64.shape == (1764,) == (descriptor_dim("hog", size=64),)


def test_hog_shift_more_similar_than_other_pattern():
    a = _shapes(10)
    arr = np.asarray(a)
    shifted = Image.fromarray(np.concatenate([arr[:, :1], arr[:, :-1]], axis=1))  # 1 px right
    other = _shapes(11)
    va, vs, vo = (hog_descriptor(im) for im in (a, shifted, other))
    assert float(va @ vs) > float(va @ vo)
    assert float(va @ vs) > 0.8


def test_hog_blank_is_zero_without_warnings():
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        v = hog_descriptor(Image.new("RGB", (50, 70), (200, 10, 10)))
    assert v.shape == (8100,) and not v.any()


def test_hog_bad_params():
    with pytest.raises(ValueError, match="multiple of cell_size"):
        hog_descriptor(_shapes(0), size=100)
    with pytest.raises(ValueError, match="valid choices"):
        hog_descriptor(_shapes(0), backend="skimage")


def test_hog_opencv_backend_when_available():
    import cv2

    if not hasattr(cv2, "HOGDescriptor"):
        with pytest.raises(RuntimeError, match="backend='numpy'"):
            hog_descriptor(_shapes(0), backend="opencv")
        return
    vo = hog_descriptor(_shapes(0), backend="opencv")
    vn = hog_descriptor(_shapes(0))
    assert vo.shape == vn.shape and _unit(vo)
    assert float(vo @ vn) > 0.8  # same recipe, slightly different details


# --------------------------------------------------------------------------- BoVW


def test_bovw_vocab_size_and_vectors(fitted, textures):
    assert fitted.vocab_size == 32 == fitted.dim
    assert fitted.vocabulary.shape == (32, fitted.descriptor_size)
    v = fitted.transform(textures[0])
    assert v.shape == (32,) and v.dtype == np.float32 and _unit(v)
    assert (v >= 0).all()


def test_bovw_identical_images_identical_vectors(fitted):
    a = fitted.transform(_texture(42))
    b = fitted.transform(_texture(42))
    np.testing.assert_array_equal(a, b)
    c = fitted.transform(_texture(43))
    assert float(a @ c) < 1.0 - 1e-6


def test_bovw_blank_image_zero_vector_without_warnings(fitted):
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        v = fitted.transform(Image.new("RGB", (100, 80), (255, 255, 255)))
    assert v.shape == (32,) and v.dtype == np.float32 and not v.any()


def test_bovw_fewer_words_when_too_few_descriptors():
    img = _texture(5, size=(64, 48))
    enc = BovwEncoder()
    n_unique = np.unique(enc.local_descriptors(img), axis=0).shape[0]
    assert 0 < n_unique < 10_000
    enc.fit([img], vocab_size=10_000)
    assert enc.vocab_size == n_unique  # the descriptors themselves become the words


def test_bovw_max_descriptors_caps_the_sample(textures):
    enc = BovwEncoder().fit(textures, vocab_size=1000, max_descriptors=50, seed=1)
    assert enc.vocab_size <= 50
    # seeded: same sample, same vocabulary
    again = BovwEncoder().fit(textures, vocab_size=1000, max_descriptors=50, seed=1)
    np.testing.assert_array_equal(enc.vocabulary, again.vocabulary)


def test_bovw_no_keypoints_at_all_raises():
    with pytest.raises(ValueError, match=r"no .* keypoints"):
        BovwEncoder().fit([Image.new("RGB", (64, 64))], vocab_size=8)


def test_bovw_unfitted_raises():
    with pytest.raises(RuntimeError, match="not fitted"):
        BovwEncoder().transform(_texture(0))


def test_bovw_save_load_round_trip(fitted, textures, tmp_path):
    path = tmp_path / "vocab.npy"
    fitted.save(path)
    loaded = BovwEncoder.load(path)
    assert loaded.detector == fitted.detector
    np.testing.assert_array_equal(loaded.vocabulary, fitted.vocabulary)
    np.testing.assert_array_equal(loaded.transform(textures[1]), fitted.transform(textures[1]))
    assert np.load(path).dtype == np.float32


def test_bovw_fit_transform_equals_fit_then_transform(textures):
    a = BovwEncoder().fit_transform(textures, vocab_size=16, seed=3)
    enc = BovwEncoder().fit(textures, vocab_size=16, seed=3)
    np.testing.assert_allclose(a, enc.transform_many(textures), atol=1e-7)
    assert a.shape == (len(textures), 16)


def test_bovw_opencv_kmeans_backend(textures):
    enc = BovwEncoder().fit(textures[:3], vocab_size=8, kmeans_backend="opencv")
    assert enc.vocab_size == 8
    assert _unit(enc.transform(textures[0]))


def test_bovw_orb_detector(textures):
    big = [_texture(s, size=(240, 200)) for s in range(3)]  # ORB needs room for its border
    enc = BovwEncoder(detector="orb").fit(big, vocab_size=8)
    assert enc.descriptor_size == 32 and enc.vocabulary.shape == (8, 32)
    v = enc.transform(big[0])
    assert v.shape == (8,) and _unit(v)


# --------------------------------------------------------------------------- registry


def test_registry_names():
    assert set(DESCRIPTORS) == {"hsv", "hog", "sift_bovw"}
    assert descriptor_dim("sift_bovw") == 256
    assert descriptor_dim("sift_bovw", vocab_size=64) == 64


def test_unknown_descriptor_lists_choices():
    for call in (lambda: descriptor_dim("gist"), lambda: describe_images("gist", [])):
        with pytest.raises(ValueError) as exc:
            call()
        assert all(n in str(exc.value) for n in DESCRIPTORS)


def test_unknown_param_rejected():
    with pytest.raises(ValueError, match="unknown parameter"):
        describe_images("hsv", [_texture(0)], size=3)


@pytest.mark.parametrize("name", ["hsv", "hog"])
def test_describe_images_plain(name):
    imgs = [_shapes(0), _texture(1), _shapes(2)]
    X = describe_images(name, imgs)
    assert X.shape == (3, descriptor_dim(name)) and X.dtype == np.float32
    assert np.allclose(np.linalg.norm(X, axis=1), 1.0, atol=1e-5)
    assert describe_images(name, []).shape == (0, descriptor_dim(name))


def test_describe_images_bovw(textures, fitted):
    X = describe_images("sift_bovw", textures, vocab_size=16)  # fit on the images themselves
    assert X.shape == (len(textures), 16) and X.dtype == np.float32
    Y = describe_images("sift_bovw", textures[:2], fit_images=textures, vocab_size=16)
    np.testing.assert_allclose(Y, X[:2], atol=1e-7)  # same fit set and seed -> same vocab
    Z = describe_images("sift_bovw", iter(textures[:2]), encoder=fitted)
    assert Z.shape == (2, fitted.vocab_size)
    with pytest.raises(ValueError, match="not fitted"):
        describe_images("sift_bovw", textures, encoder=BovwEncoder())


def test_numpy_input_accepted():
    arr = np.asarray(_texture(0))
    np.testing.assert_array_equal(hsv_histogram(arr), hsv_histogram(_texture(0)))
    with pytest.raises(ValueError, match="uint8 RGB"):
        hsv_histogram(arr.astype(np.float32))


def test_hsv_and_hog_are_cheap():
    import time

    imgs = [_texture(s, size=(320, 240)) for s in range(20)]
    t = time.perf_counter()
    describe_images("hsv", imgs)
    describe_images("hog", imgs)
    assert time.perf_counter() - t < 5
    assert H.DEFAULT_MAX_SIDE == 320
