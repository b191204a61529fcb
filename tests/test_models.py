"""Model registry, derived preprocessing, weight resolution (all offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbir_cli.errors import CbirError, WeightsUnavailableError
from cbir_cli.models.loading import load_embedder, model_fingerprint
from cbir_cli.models.registry import LEGACY_DESCRIPTOR, get_model_config, list_models
from cbir_cli.models.torch_embedder import TorchEmbedder, build_backbone
from tests.conftest import make_image


def test_registry_lists_paper_model_first_and_unknown_name_lists_choices():
    names = [m.name for m in list_models()]
    assert names[:2] == ["resnet50", "mobilenet_v2"] and "test_tiny" in names
    assert get_model_config("resnet50").dim == 2048 and get_model_config("mobilenet_v2").dim == 1280
    with pytest.raises(CbirError, match="unknown model 'vgg'; choose one of: mobilenet_v2, resnet50, test_tiny"):
        get_model_config("vgg")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_config_preprocessing_matches_torchvision_weights_transforms(name):
    """Mean/std/sizes live in our config only; this guards them against drift from
    the weights' own transforms."""
    from torchvision.models import get_weight

    config = get_model_config(name)
    transform = get_weight(config.torchvision_weights).transforms()
    assert transform.crop_size == [config.input_size]
    assert transform.resize_size == [config.resize_size]
    assert tuple(transform.mean) == config.mean and tuple(transform.std) == config.std
    assert transform.interpolation.value == config.interpolation
    assert get_weight(config.torchvision_weights).url.endswith(config.weights_file)


def test_embedder_normalisation_equals_torchvision_reference_transform():
    """Our split pipeline (uint8 crop in workers, normalise on device) must give the
    same model input as torchvision's ImageClassification transform."""
    from torchvision.models import get_weight

    config = get_model_config("mobilenet_v2").with_descriptor(LEGACY_DESCRIPTOR)
    embedder = TorchEmbedder(config, torch.nn.Identity(), "x", "cpu")
    img = make_image(3, (333, 250))
    ours = (torch.from_numpy(embedder.preprocess(img))[None].float() - embedder._mean) / embedder._std
    reference = get_weight(config.torchvision_weights).transforms()(img)[None]
    assert ours.shape == reference.shape == (1, 3, 224, 224)
    # PIL vs tensor antialiased resize differ by rounding only.
    assert torch.mean(torch.abs(ours - reference)).item() < 0.02


@pytest.mark.parametrize("name, dim, head", [("resnet50", 2048, "fc"), ("mobilenet_v2", 1280, "classifier")])
def test_trunk_with_average_pooling_is_the_classifiers_own_pooled_features(name, dim, head, tmp_path):
    """The legacy descriptor (GAP) must stay what the headless classifier computed:
    indexes built before descriptors were configurable keep working."""
    from cbir_cli.models.registry import _BUILDERS
    from cbir_cli.models.torch_embedder import pooling_module

    classifier = _BUILDERS[name]()
    path = tmp_path / f"{name}.pth"
    torch.save(classifier.state_dict(), path)  # a full classifier state dict, random weights
    module, weights_id = build_backbone(get_model_config(name), weights=path)
    assert weights_id.startswith("file-sha256:")
    setattr(classifier, head, torch.nn.Identity())
    x = torch.randn(2, 3, 224, 288)
    with torch.inference_mode():
        fmap = module.eval()(x)
        pooled = pooling_module(LEGACY_DESCRIPTOR)(fmap)
        reference = classifier.eval()(x)
    assert fmap.shape == (2, dim, 7, 9) and pooled.shape == (2, dim)
    torch.testing.assert_close(pooled, reference, rtol=1e-4, atol=1e-5)


def test_tiny_model_is_deterministic_and_unit_norm(tiny_embedder):
    other = load_embedder("test_tiny", device="cpu")
    images = [make_image(i) for i in range(3)]
    a, b = tiny_embedder.embed_images(images), other.embed_images(images)
    assert a.dtype == np.float32 and a.shape == (3, 256)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    assert float(a[0] @ a[1]) < 0.999  # different images, different vectors


def test_weights_file_that_is_not_a_state_dict_is_refused_with_reason(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    with pytest.raises(WeightsUnavailableError, match=r"junk.pth: not a PyTorch state dict"):
        load_embedder("mobilenet_v2", weights=junk, device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(WeightsUnavailableError, match=r"wrong.pth: not a mobilenet_v2 state dict \(\d+ missing keys"):
        load_embedder("mobilenet_v2", weights=wrong, device="cpu")
    with pytest.raises(WeightsUnavailableError, match="weights file does not exist"):
        load_embedder("mobilenet_v2", weights=tmp_path / "nope.pth", device="cpu")


def test_missing_official_weights_offline_gives_actionable_paragraph(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CBIR_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as info:
        load_embedder("resnet50", device="cpu")
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message and str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "local state-dict file" in message and "cbir weights install mobilenet_v2" in message
    assert "\n" not in message
    # The CLI words the same way out with its flag.
    from cbir_cli.cli import error_line

    assert "--weights FILE" in error_line(info.value) and "\n" not in error_line(info.value)


def test_failed_download_is_reported_not_raised_as_traceback(tmp_path, monkeypatch):
    """Simulate no network: torchvision's download raises URLError."""
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("CBIR_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailableError, match="download failed: Name or service not known"):
        load_embedder("mobilenet_v2", device="cpu")


def test_fingerprint_is_known_without_building_the_model(tiny_embedder):
    assert model_fingerprint("test_tiny") == tiny_embedder.fingerprint()
    fp = model_fingerprint("resnet50")
    assert fp["weights"] == "ResNet50_Weights.IMAGENET1K_V1" and fp["dim"] == 2048
    assert fp["preprocessing"]["mean"] == [0.485, 0.456, 0.406]


def test_unknown_device_is_a_clear_error():
    with pytest.raises(CbirError, match="unknown device 'tpu'"):
        load_embedder("test_tiny", device="tpu")


@pytest.mark.parametrize("size", [(333, 250), (250, 333), (300, 300), (640, 97), (257, 256)])
@pytest.mark.parametrize("name", ["mobilenet_v2", "test_tiny"])
def test_preprocess_matches_torchvision_functional(name, size):
    """Our Pillow/numpy preprocessing (no torch import on the query path) gives
    torchvision's resize -> center_crop -> pil_to_tensor, within rounding: it
    resamples only the crop region (Pillow's ``box``), so a filter tap can round
    the other way (at most 1/255, rarely)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    from cbir_cli.models.preprocess import preprocess_image

    config = get_model_config(name).with_descriptor(LEGACY_DESCRIPTOR)
    img = make_image(7, size)
    reference = F.pil_to_tensor(F.center_crop(
        F.resize(img, config.resize_size, interpolation=InterpolationMode(config.interpolation), antialias=True),
        config.input_size))
    ours = preprocess_image(img, config)
    assert ours.dtype == np.uint8 and ours.shape == tuple(reference.shape)
    difference = np.abs(ours.astype(int) - reference.numpy().astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())
    # A shifted or mis-scaled crop is far off: the check can fail.
    assert np.abs(ours[:, 1:].astype(int) - reference.numpy()[:, :-1].astype(int)).mean() > 1


def test_hub_dir_without_torch_matches_torch_hub(monkeypatch, tmp_path):
    import sys

    import torch.hub

    from cbir_cli.models.weights import torch_hub_checkpoint_dir

    for env in ({"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}, {}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        expected = torch_hub_checkpoint_dir()  # torch imported: torch's own answer
        with monkeypatch.context() as m:
            m.delitem(sys.modules, "torch")
            assert torch_hub_checkpoint_dir() == expected
        assert expected == __import__("pathlib").Path(torch.hub.get_dir()) / "checkpoints"
