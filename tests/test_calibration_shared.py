"""int8 calibration is bounded and visible (issue 22, item 1): it says so when it
runs, and runs once per model + weights + descriptor -- a second new index of the
same model takes the first one's calibration and quantised model from the cache
(and keeps its own copy) instead of calibrating on its own photos for minutes."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("onnxruntime")

from cbir_cli.models import calibration_cache
from cbir_cli.models.int8_store import INT8_DIR
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

INT8 = ExtractOptions(workers=0, device="cpu", precision="int8")


def _no_calibration(*_args, **_kwargs):
    raise AssertionError("calibrated again")


def test_a_second_index_of_the_model_does_not_calibrate(tmp_path, image_folder, monkeypatch, caplog):
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration_cache, "SHARED_MINIMUM", 4)
    first, second = image_folder(8, "first"), image_folder(6, "second", seed0=50)
    with caplog.at_level(logging.INFO, logger="cbir_cli"):
        index_folder(first, tmp_path / "a", "test_tiny", options=INT8)
    assert "calibrating the int8 model on 8 photos" in caplog.text  # the progress line

    caplog.clear()
    monkeypatch.setattr("cbir_cli.models.onnx_embedder.quantize_onnx", _no_calibration)
    with caplog.at_level(logging.INFO, logger="cbir_cli"):
        index_folder(second, tmp_path / "b", "test_tiny", options=INT8)
    assert "calibrating" not in caplog.text
    a, b = FeatureStore.open(tmp_path / "a").fingerprint, FeatureStore.open(tmp_path / "b").fingerprint
    assert b["precision"] == "int8" and b["calibration"] == a["calibration"]
    assert len(list((tmp_path / "b" / INT8_DIR).glob("*.onnx"))) == 1  # its own copy

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cold"))  # the copy answers without the cache
    query = sorted(second.iterdir())[0]
    assert Searcher.open(tmp_path / "b").search_paths([query], k=1)[0][0].path == str(query)


def test_a_tiny_sample_calibrates_its_own_index_only(tmp_path, image_folder, monkeypatch, caplog):
    """Eight quick-start images are too few to stand for every later collection."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    index_folder(image_folder(8, "samples"), tmp_path / "a", "test_tiny", options=INT8)
    with caplog.at_level(logging.INFO, logger="cbir_cli"):
        index_folder(image_folder(6, "photos", seed0=50), tmp_path / "b", "test_tiny", options=INT8)
    assert "calibrating the int8 model on 6 photos" in caplog.text
    a, b = FeatureStore.open(tmp_path / "a").fingerprint, FeatureStore.open(tmp_path / "b").fingerprint
    assert a["calibration"] != b["calibration"]
