"""Descriptor options (pooling, input, scales) on the tiny model: what each does to
the pixels and vectors, both runtimes, the fingerprint, and old (legacy) indexes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_image
from typer.testing import CliRunner

from cbir_cli.cli import app
from cbir_cli.errors import CbirError, StoreMismatchError
from cbir_cli.models.loading import load_embedder, model_fingerprint
from cbir_cli.models.preprocess import preprocess_image
from cbir_cli.models.registry import DEFAULT_DESCRIPTOR, LEGACY_DESCRIPTOR, DescriptorSettings, get_model_config

OPTIONS = [
    LEGACY_DESCRIPTOR,
    DescriptorSettings("gem", 3.0, "crop", (1.0,)),
    DescriptorSettings("mac", input="full", scales=(1.0,)),
    DescriptorSettings("gap", input="full", scales=(1.0,)),
    DescriptorSettings("gem", 4.0, "full", (1.0,)),
    DEFAULT_DESCRIPTOR,
    DescriptorSettings("gem", 3.0, "crop", (1.0, 1.4)),
]
SIZES = [(160, 120), (120, 160), (200, 90), (333, 250), (640, 97)]


@pytest.fixture(scope="module")
def images():
    return [make_image(i, size) for i, size in enumerate(SIZES)]


def test_default_and_legacy_settings_and_validation():
    assert DEFAULT_DESCRIPTOR == DescriptorSettings("gem", 3.0, "full", (1.0, 1.4))
    assert LEGACY_DESCRIPTOR.fingerprint() is None and DEFAULT_DESCRIPTOR.fingerprint() == {
        "pooling": "gem", "gem_p": 3.0, "input": "full", "scales": [1.0, 1.4]}
    assert DescriptorSettings.from_fingerprint(None) == LEGACY_DESCRIPTOR
    assert DescriptorSettings.from_fingerprint(DEFAULT_DESCRIPTOR.fingerprint()) == DEFAULT_DESCRIPTOR
    assert DescriptorSettings("mac", gem_p=5) == DescriptorSettings("mac")  # p means nothing without GeM
    for bad, message in [(dict(pooling="avg"), "unknown pooling"), (dict(input="tile"), "unknown input"),
                         (dict(scales=()), "scales"), (dict(scales=(9.0,)), "scales"), (dict(gem_p=0.5), "GeM")]:
        with pytest.raises(CbirError, match=message):
            DescriptorSettings(**bad)


@pytest.mark.parametrize("size, scales, shapes", [
    ((160, 120), (1.0,), [(3, 64, 88)]),
    ((120, 160), (1.0, 1.4), [(3, 88, 64), (3, 120, 88)]),
    ((640, 97), (1.0,), [(3, 64, 256)]),  # at most 4:1: the centre of a panorama
    ((64, 64), (1.0,), [(3, 64, 64)]),
])
def test_full_input_keeps_the_aspect_ratio_rounded_to_the_stride(size, scales, shapes):
    config = get_model_config("test_tiny").with_descriptor(DescriptorSettings(input="full", scales=scales))
    out = preprocess_image(make_image(1, size), config)
    got = [a.shape for a in (out if isinstance(out, tuple) else (out,))]
    assert got == shapes and all(a.dtype == np.uint8 for a in (out if isinstance(out, tuple) else (out,)))
    assert config.draft_size == min(shapes[-1][1:])  # decoding never goes below the largest short side


def test_full_input_shows_the_whole_image():
    """A full input sees what a centre crop cuts off (a mark near the left edge)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (200, 100), (128, 128, 128))
    ImageDraw.Draw(img).rectangle([2, 40, 20, 60], fill=(255, 0, 255))
    full = preprocess_image(img, get_model_config("test_tiny").with_descriptor(DescriptorSettings(scales=(1.0,))))
    crop = preprocess_image(img, get_model_config("test_tiny").with_descriptor(LEGACY_DESCRIPTOR))
    magenta = lambda a: ((a[0] > 200) & (a[1] < 60) & (a[2] > 200)).sum()  # noqa: E731
    assert magenta(full) > 0 and magenta(crop) == 0


@pytest.fixture(scope="module")
def embedders():
    return {d: load_embedder("test_tiny", device="cpu", descriptor=d) for d in OPTIONS}


def test_every_option_gives_unit_vectors_and_its_own_fingerprint(embedders, images):
    vectors = {d: e.embed_images(images) for d, e in embedders.items()}
    for d, v in vectors.items():
        assert v.shape == (len(images), 256) and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
        assert embedders[d].fingerprint() == model_fingerprint("test_tiny", descriptor=d)
    fingerprints = [json.dumps(e.fingerprint(), sort_keys=True) for e in embedders.values()]
    assert len(set(fingerprints)) == len(OPTIONS)
    legacy = vectors[LEGACY_DESCRIPTOR]
    for d, v in vectors.items():
        if d != LEGACY_DESCRIPTOR:
            assert np.sum(v * legacy, axis=1).min() < 0.9999, d


def test_gem_with_p_1_is_average_pooling(images):
    gem1 = load_embedder("test_tiny", device="cpu", descriptor=DescriptorSettings("gem", 1.0, "full", (1.0,)))
    gap = load_embedder("test_tiny", device="cpu", descriptor=DescriptorSettings("gap", input="full", scales=(1.0,)))
    np.testing.assert_allclose(gem1.embed_images(images), gap.embed_images(images), atol=1e-5)


def test_mixed_sizes_in_one_batch_equal_one_image_at_a_time(embedders, images):
    """Images of different shapes are grouped by shape, never padded together."""
    embedder = embedders[DEFAULT_DESCRIPTOR]
    together = embedder.embed_images(images)
    alone = np.concatenate([embedder.embed_images([img]) for img in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_scales_are_l2_normalised_averaged_and_normalised_again(images):
    per_scale = [load_embedder("test_tiny", device="cpu", descriptor=DescriptorSettings(scales=(s,)))
                 .embed_images(images) for s in (1.0, 1.4)]
    both = load_embedder("test_tiny", device="cpu", descriptor=DEFAULT_DESCRIPTOR).embed_images(images)
    expected = per_scale[0] + per_scale[1]
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(both, expected, atol=1e-5)


@pytest.mark.parametrize("descriptor", [DEFAULT_DESCRIPTOR, DescriptorSettings("mac", input="crop", scales=(1.0,)),
                                        DescriptorSettings("gap", input="full", scales=(1.0, 1.4))])
def test_onnx_runtime_matches_torch_for_the_options(descriptor, images, tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    torch_model = load_embedder("test_tiny", device="cpu", runtime="torch", descriptor=descriptor)
    onnx_model = load_embedder("test_tiny", device="cpu", runtime="onnx", descriptor=descriptor)
    assert type(onnx_model).__name__ == "OnnxEmbedder" and onnx_model.fingerprint() == torch_model.fingerprint()
    a, b = torch_model.embed_images(images), onnx_model.embed_images(images)
    assert np.sum(a * b, axis=1).min() >= 0.9999


def test_a_store_refuses_vectors_of_another_descriptor(image_folder, tmp_path, embedders):
    from cbir_cli.pipeline.sync import index_folder

    folder = image_folder(4)
    index_folder(folder, tmp_path / "idx", embedder=embedders[DEFAULT_DESCRIPTOR])
    make_image(77).save(folder / "more.jpg")
    with pytest.raises(StoreMismatchError, match="descriptor differs"):
        index_folder(folder, tmp_path / "idx", embedder=embedders[LEGACY_DESCRIPTOR])
    with pytest.raises(StoreMismatchError, match="descriptor differs"):
        index_folder(folder, tmp_path / "idx", model="test_tiny", descriptor=DescriptorSettings("mac"))


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_an_old_index_keeps_working_and_rebuild_moves_it_to_the_default(image_folder, tmp_path):
    """An index made before descriptors existed records none (= GAP, centre crop):
    it is searched with that descriptor, grows with it (saying so), and --rebuild
    moves it to the default."""
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.store.feature_store import FeatureStore

    folder = image_folder(5)
    index_folder(folder, tmp_path / "idx", model="test_tiny", descriptor=LEGACY_DESCRIPTOR)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert "descriptor" not in manifest["fingerprint"]  # exactly what an old index holds
    hits = Searcher.open(tmp_path / "idx", device="cpu").search_paths([folder / "img_003.jpg"], k=1)
    assert hits[0][0].path.endswith("img_003.jpg") and hits[0][0].score == pytest.approx(1.0, abs=1e-4)
    make_image(40).save(folder / "new.jpg")
    out = run("index", str(folder), "--index", str(tmp_path / "idx"), "--workers", "0")
    assert "holds GAP, centre crop vectors" in out and "rebuilding it moves it" in out
    assert "descriptor" not in FeatureStore.open(tmp_path / "idx").fingerprint
    run("index", str(folder), "--index", str(tmp_path / "idx"), "--workers", "0", "--rebuild")
    store = FeatureStore.open(tmp_path / "idx")
    assert store.fingerprint["descriptor"] == DEFAULT_DESCRIPTOR.fingerprint() and store.count == 6
    hits = Searcher.open(tmp_path / "idx", device="cpu").search_paths([folder / "new.jpg"], k=1)
    assert hits[0][0].path.endswith("new.jpg")


def test_cli_descriptor_options_are_recorded_and_checked(image_folder, tmp_path):
    folder = image_folder(3)
    run("index", str(folder), "--index", str(tmp_path / "idx"), "--model", "test_tiny", "--workers", "0",
        "--pooling", "mac", "--input", "crop", "--scales", "1,1.5")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["fingerprint"]["descriptor"] == {"pooling": "mac", "input": "crop", "scales": [1.0, 1.5]}
    result = CliRunner().invoke(app, ["index", str(folder), "--index", str(tmp_path / "other"), "--model",
                                      "test_tiny", "--scales", "1,x"])
    assert result.exit_code == 1 and "scales must be comma-separated numbers" in result.output
    assert "Traceback" not in result.output


def test_device_decoding_is_for_the_centre_crop_only(embedders):
    """The device JPEG decoder resizes and centre-crops at one scale: full-image and
    multi-scale inputs are decoded on the CPU even when decoding on the device is asked for."""
    from cbir_cli.pipeline.local import resolve_decode

    assert resolve_decode("gpu", embedders[LEGACY_DESCRIPTOR]) == "gpu"
    assert resolve_decode("gpu", embedders[DEFAULT_DESCRIPTOR]) == "cpu"
    assert resolve_decode("gpu", embedders[DescriptorSettings("gem", 3.0, "crop", (1.0, 1.4))]) == "cpu"
