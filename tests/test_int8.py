"""int8 precision: an ONNX Runtime statically quantised model, calibrated on a
seeded sample of the folder, recorded in the fingerprint (issue 14)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from conftest import make_image

from cbir_cli.errors import CbirError, StoreMismatchError
from cbir_cli.models.quantize import Calibration
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

INT8 = ExtractOptions(workers=0, device="cpu", precision="int8")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


def test_int8_index_records_its_calibration_and_queries_with_it(tmp_path, image_folder, cache):
    folder = image_folder(12)
    summary = index_folder(folder, tmp_path / "idx", "test_tiny", options=INT8)
    assert summary.embedded == 12
    fingerprint = FeatureStore.open(tmp_path / "idx").fingerprint
    calibration = Calibration.from_fingerprint(fingerprint)
    assert fingerprint["precision"] == "int8" and calibration is not None
    assert fingerprint["calibration"] == calibration.id and len(calibration.images) == 12
    assert len(list(cache.glob("test_tiny-*-int8-*.onnx"))) == 1

    searcher = Searcher.open(tmp_path / "idx")  # loads the int8 model from the fingerprint
    assert searcher.embedder.fingerprint()["calibration"] == calibration.id
    files = sorted(folder.iterdir())
    for query, hits in zip(files, searcher.search_paths(files, k=1)):
        assert hits[0].path == str(query) and hits[0].score > 0.999

    # More images later: the store keeps its calibration (its vectors stay comparable).
    make_image(77).save(folder / "img_new.jpg", quality=90)
    index_folder(folder, tmp_path / "idx", "test_tiny", options=INT8)
    assert FeatureStore.open(tmp_path / "idx").fingerprint["calibration"] == calibration.id
    # auto follows the store; an fp32 run on it is refused, as another model would be.
    index_folder(folder, tmp_path / "idx", "test_tiny", options=ExtractOptions(workers=0, device="cpu"))
    with pytest.raises(StoreMismatchError, match="calibration"):
        index_folder(folder, tmp_path / "idx", "test_tiny",
                     options=ExtractOptions(workers=0, device="cpu", precision="fp32"))


def test_int8_vectors_differ_from_fp32_but_rank_alike(tmp_path, image_folder, cache):
    folder = image_folder(12)
    index_folder(folder, tmp_path / "int8", "test_tiny", options=INT8)
    index_folder(folder, tmp_path / "fp32", "test_tiny", options=ExtractOptions(workers=0, device="cpu"))
    int8 = FeatureStore.open(tmp_path / "int8").load_vectors()
    fp32 = FeatureStore.open(tmp_path / "fp32").load_vectors()
    cosine = (int8 * fp32).sum(axis=1)
    assert cosine.min() > 0.9 and not np.allclose(int8, fp32, atol=1e-4)
    assert "precision" not in FeatureStore.open(tmp_path / "fp32").fingerprint  # fp32 stores are as before


def test_cleared_cache_recalibrates_from_the_recorded_images(tmp_path, image_folder, cache):
    folder = image_folder(10)
    index_folder(folder, tmp_path / "idx", "test_tiny", options=INT8)
    shutil.rmtree(tmp_path / "idx" / "int8")  # as an index made before it kept its model (issue 20)
    files = sorted(folder.iterdir())
    before = Searcher.open(tmp_path / "idx").embedder.embed_images([make_image(5)])
    shutil.rmtree(cache)
    after = Searcher.open(tmp_path / "idx").embedder.embed_images([make_image(5)])
    np.testing.assert_allclose(after, before, atol=1e-6)
    # A calibration image that changed cannot re-create the same model: say so.
    shutil.rmtree(cache)
    make_image(99).save(files[3], quality=90)
    with pytest.raises(CbirError, match="changed since it calibrated"):
        Searcher.open(tmp_path / "idx").embedder  # noqa: B018 - loading is the point


def test_int8_needs_the_cpu(tmp_path, image_folder):
    from cbir_cli.models.loading import load_embedder

    calibration = Calibration((("x.jpg", "0" * 64),))
    with pytest.raises(CbirError, match="int8 precision runs on the CPU"):
        load_embedder("test_tiny", device="cpu", runtime="torch", calibration=calibration)
    with pytest.raises(CbirError, match="unknown precision"):
        ExtractOptions(precision="int4")


def test_auto_precision_is_int8_on_the_cpu_for_measured_models():
    from cbir_cli.models.loading import default_precision

    assert default_precision("mobilenet_v2", "cpu") == "int8"
    assert default_precision("mobilenet_v2", "cpu", runtime="torch") == "fp32"
    assert default_precision("resnet50", "cpu") == "fp32"  # its int8 quality is not measured yet
    assert default_precision("test_tiny", "cpu") == "fp32"  # test models stay bit-comparable
    assert default_precision("hsv", "cpu") == "fp32"


def test_auto_keeps_an_existing_fp32_store_fp32(tmp_path, image_folder, cache, monkeypatch):
    from cbir_cli.pipeline import run_plan

    folder = image_folder(4)
    index_folder(folder, tmp_path / "idx", "test_tiny", options=ExtractOptions(workers=0, device="cpu",
                                                                               precision="fp32"))
    monkeypatch.setattr(run_plan, "default_precision", lambda *a, **k: "int8")  # as for a registry model on the CPU
    make_image(50).save(folder / "more.jpg", quality=90)
    summary = index_folder(folder, tmp_path / "idx", "test_tiny", options=ExtractOptions(workers=0, device="cpu"))
    assert summary.added == 1 and "precision" not in FeatureStore.open(tmp_path / "idx").fingerprint
    fresh = index_folder(folder, tmp_path / "new", "test_tiny", options=ExtractOptions(workers=0, device="cpu"))
    assert fresh.added == 5 and FeatureStore.open(tmp_path / "new").fingerprint["precision"] == "int8"


def test_calibration_feeds_the_quantiser_what_the_embedder_runs_on(tmp_path, cache, monkeypatch):
    """The default descriptor (whole images, two scales) gives each image arrays of
    its own shapes: calibration must see every one of them, each batch of one shape
    (the graph's height and width are dynamic; nothing padded), decoded with the
    descriptor's JPEG draft size. Stacking whole images failed before (ragged)."""
    import hashlib

    from PIL import Image

    from cbir_cli.models import quantize
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.preprocess import image_preprocessor
    from cbir_cli.models.registry import get_model_config

    config = get_model_config("test_tiny")
    assert config.descriptor.input == "full" and len(config.descriptor.scales) == 2
    folder = tmp_path / "photos"
    folder.mkdir()
    images = []
    for i, size in enumerate([(160, 120), (120, 160), (200, 100), (160, 120), (90, 180)] * 3):
        path = folder / f"{i:02d}.jpg"
        make_image(i, size).save(path, quality=90)
        images.append((str(path), hashlib.sha256(path.read_bytes()).hexdigest()))
    calibration = Calibration(tuple(images))
    preprocess = image_preprocessor(config)
    batches = list(quantize._calibration_batches(calibration, preprocess, config.draft_size))
    assert all(b.ndim == 4 and b.dtype == np.uint8 for b in batches)
    assert all(len(b) == 1 or b[0].size <= 3 * quantize.CALIBRATION_PIXELS // len(b) for b in batches)
    expected = []
    for path, _ in images:
        with Image.open(path) as img:
            img.draft("RGB", (config.draft_size, config.draft_size))
            expected.extend(preprocess(img.convert("RGB")))
    assert len({b.shape[1:] for b in batches}) == len({a.shape for a in expected}) > 2
    key = sorted((a.shape, a.tobytes()) for a in expected)
    assert sorted((a.shape, a.tobytes()) for b in batches for a in b) == key
    # The quantiser's reader decodes with the descriptor's draft size, not the crop's resize size.
    drafts = []
    real_batches = quantize._calibration_batches

    def spy(calibration, preprocess, draft_size):
        drafts.append(draft_size)
        return real_batches(calibration, preprocess, draft_size)

    monkeypatch.setattr(quantize, "_calibration_batches", spy)
    embedder = load_embedder("test_tiny", device="cpu", runtime="auto", calibration=calibration)
    assert drafts == [config.draft_size] and config.draft_size != config.resize_size
    assert embedder.precision == "int8"


def test_quantising_prints_no_onnxruntime_advice(tmp_path, image_folder, cache, caplog):
    """`cbir index` on the CPU quantises on its first run: ORT's quantiser logs
    advice through the root logger, which printed two WARNING:root lines."""
    import logging

    folder = image_folder(6)
    handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.DEBUG):
        index_folder(folder, tmp_path / "idx", "test_tiny", options=INT8)
    assert not [r for r in caplog.records if "onnxruntime" in r.pathname]
    assert logging.getLogger().handlers == handlers
