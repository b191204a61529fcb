"""An int8 index keeps its quantised model inside itself (issue 20, item 2): with
a calibration photo gone and a cold model cache it still answers queries, grows,
and serves; an index made before that gains the copy at its next write."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
from conftest import make_image

from cbir_cli.errors import CbirError
from cbir_cli.models.int8_store import INT8_DIR, damaged_int8_models
from cbir_cli.models.quantize import Calibration
from cbir_cli.pipeline.options import ExtractOptions
from cbir_cli.pipeline.sync import index_folder
from cbir_cli.search.searcher import Searcher
from cbir_cli.store.feature_store import FeatureStore

INT8 = ExtractOptions(workers=0, device="cpu", precision="int8")


@pytest.fixture
def int8_index(tmp_path, image_folder, monkeypatch):
    """An int8 index of 8 photos (all of them calibrate it), its photos and its queries' results."""
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    folder = image_folder(8)
    index_folder(folder, tmp_path / "idx", "test_tiny", options=INT8)
    queries = sorted(folder.iterdir())[:4]
    return folder, tmp_path / "idx", queries, _results(tmp_path / "idx", queries)


def _results(index, queries):
    return [[(h.path, round(h.score, 5)) for h in hits] for hits in Searcher.open(index).search_paths(queries, k=3)]


def _cold_cache(tmp_path, monkeypatch, name="new-machine"):
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / name))


def _calibration_photo_gone(folder, index):
    calibration = Calibration.from_fingerprint(FeatureStore.open(index).fingerprint)
    gone = sorted(folder.iterdir())[-1]
    assert str(gone) in {p for p, _ in calibration.images}
    gone.unlink()


def test_query_grow_and_serve_need_no_photo_and_no_cache(tmp_path, int8_index, monkeypatch):
    folder, index, queries, before = int8_index
    _calibration_photo_gone(folder, index)
    _cold_cache(tmp_path, monkeypatch)

    assert _results(index, queries) == before  # the same model: the same results

    make_image(77).save(folder / "img_new.jpg", quality=90)
    summary = index_folder(folder, index, "test_tiny", options=INT8)
    assert (summary.added, summary.removed) == (1, 1)
    hits = Searcher.open(index).search_paths([folder / "img_new.jpg"], k=1)[0]
    assert hits[0].path == str(folder / "img_new.jpg") and hits[0].score > 0.999

    from cbir_cli.serve.app import create_app

    client = create_app(index_dir=index, device="cpu").test_client()
    with open(folder / "img_new.jpg", "rb") as fh:
        answer = client.post("/api/search", data={"image": (fh, "q.jpg"), "k": "1"})
    assert answer.status_code == 200 and answer.get_json()["results"][0]["path"] == str(folder / "img_new.jpg")
    assert not (tmp_path / "new-machine" / "onnx").exists()  # nothing was quantised again


def test_an_index_without_its_model_gains_it_at_its_next_write(tmp_path, int8_index, monkeypatch, caplog):
    folder, index, queries, before = int8_index
    shutil.rmtree(index / INT8_DIR)  # as an index made before it kept its model

    index_folder(folder, index, "test_tiny", options=INT8)  # nothing to embed: migrates all the same
    assert len(list((index / INT8_DIR).glob("*.onnx"))) == 1
    _calibration_photo_gone(folder, index)
    _cold_cache(tmp_path, monkeypatch)
    assert _results(index, queries) == before

    # A damaged copy is not used: a warning, and the model comes from elsewhere
    # (here nowhere: the photo is gone, the cache cold -> one clear line).
    model = next((index / INT8_DIR).glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    _cold_cache(tmp_path, monkeypatch, "another-machine")
    assert damaged_int8_models(index) and "checksum mismatch" in damaged_int8_models(index)[0]
    with caplog.at_level(logging.WARNING), pytest.raises(CbirError, match="calibration image unreadable"):
        Searcher.open(index).embedder  # noqa: B018 - loading is the point
    assert "damaged" in caplog.text
    # Where the model cache still has it, the next write puts a good copy back.
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    index_folder(folder, index, "test_tiny", options=INT8)
    assert damaged_int8_models(index) == []
    grown = _results(index, queries)  # without the photo it dropped
    _cold_cache(tmp_path, monkeypatch, "a-third-machine")
    assert _results(index, queries) == grown


def test_a_rebuild_keeps_only_the_model_it_needs(tmp_path, int8_index, image_folder):
    folder, index, _, _ = int8_index
    old = sorted(p.name for p in (index / INT8_DIR).iterdir())
    make_image(90).save(folder / "img_more.jpg", quality=90)  # a new sample: another calibration
    index_folder(folder, index, "test_tiny", options=INT8, rebuild=True)
    new = sorted(p.name for p in (index / INT8_DIR).iterdir())
    assert len(new) == 2 and new != old  # model + sidecar
    index_folder(folder, index, "test_tiny", rebuild=True,
                 options=ExtractOptions(workers=0, device="cpu", precision="fp32"))
    assert not list((index / INT8_DIR).iterdir())
    np.testing.assert_equal(FeatureStore.open(index).fingerprint.get("precision", "fp32"), "fp32")


def test_check_reports_a_damaged_int8_model_in_the_index(int8_index):
    from cbir_cli.search.check import check_index

    _, index, _, _ = int8_index
    assert check_index(index).ok
    model = next((index / INT8_DIR).glob("*.onnx"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    report = check_index(index)
    assert not report.ok
    assert any(str(model) in p and "int8 model damaged" in p for p in report.problems)
