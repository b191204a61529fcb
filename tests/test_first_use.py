"""First use as a newcomer meets it (issue 10, items 14, 16-18): the default model
is ResNet-50 when its weights can be downloaded, the official weights file given
as --weights is recognised, the one-off ONNX export says what it is doing, and
$CBIR_CACHE moves every cache."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from conftest import mobilenet_weights_path

from cbir_cli import resolve
from cbir_cli.models import weights
from cbir_cli.models.loading import load_embedder, model_fingerprint


@pytest.fixture
def only_mobilenet_cached(tmp_path, monkeypatch) -> Path:
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v2-b0353104.pth").write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))  # where "the note was said" is remembered
    return checkpoints


def test_resnet50_is_the_default_when_its_weights_can_be_downloaded(only_mobilenet_cached, monkeypatch):
    monkeypatch.setattr(resolve, "weights_downloadable", lambda config: config.name == "resnet50")
    assert resolve.choose_default_model() == resolve.ModelChoice("resnet50")
    monkeypatch.setattr(resolve, "weights_downloadable", lambda config: False)
    offline = resolve.choose_default_model()
    assert offline.name == "mobilenet_v2" and "resnet50 weights are not installed" in offline.notice


def test_the_fallback_note_is_said_once_not_on_every_new_index(only_mobilenet_cached, monkeypatch):
    """Issue 22 item 6: it was repeated on every new index and every evaluation."""
    monkeypatch.setattr(resolve, "weights_downloadable", lambda config: False)
    first, second = resolve.choose_default_model(), resolve.choose_default_model()
    assert "shown once" in first.notice
    assert second == resolve.ModelChoice("mobilenet_v2")  # the same model, silently


def test_offline_the_download_probe_never_touches_the_network(monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    from cbir_cli.models.registry import get_model_config

    assert weights.weights_downloadable(get_model_config("resnet50")) is False  # CBIR_OFFLINE is set


def test_the_official_file_given_as_weights_is_recognised_by_its_hash(tmp_path):
    official = mobilenet_weights_path()
    if official is None:
        pytest.skip("real MobileNetV2 weights not installed (cbir weights install mobilenet_v2)")
    copy = tmp_path / "my-download.pth"
    shutil.copyfile(official, copy)
    assert model_fingerprint("mobilenet_v2", copy) == model_fingerprint("mobilenet_v2")
    other = tmp_path / "fine-tuned.pth"
    other.write_bytes(copy.read_bytes() + b"\0")
    assert model_fingerprint("mobilenet_v2", other)["weights"].startswith("file-sha256:")


def test_the_one_off_onnx_export_says_what_it_is_doing(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="cbir_cli"):
        load_embedder("test_tiny", device="cpu", runtime="onnx")
    assert any("preparing test_tiny for ONNX Runtime (a one-off export" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cbir_cli"):
        load_embedder("test_tiny", device="cpu", runtime="onnx")  # cached: silent
    assert not caplog.records


def test_cbir_cache_moves_every_cache(tmp_path, monkeypatch):
    from cbir_cli.evaluate.datasets import load_folder
    from cbir_cli.evaluate.features import default_features_root
    from cbir_cli.models.onnx_embedder import onnx_cache_dir

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    (tmp_path / "data" / "a").mkdir(parents=True)
    from conftest import make_image

    make_image(1).save(tmp_path / "data" / "a" / "x.jpg")
    collection = load_folder(tmp_path / "data")
    assert default_features_root(collection).is_relative_to(tmp_path / "cache")
    assert onnx_cache_dir().is_relative_to(tmp_path / "cache")
