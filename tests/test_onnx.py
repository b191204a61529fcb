"""ONNX Runtime gives the same vectors and fingerprint as PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from cbir_cli.errors import CbirError
from cbir_cli.models.loading import load_embedder
from cbir_cli.models.registry import get_model_config
from tests.conftest import make_image, mobilenet_weights_path

pytest.importorskip("onnxruntime")
from cbir_cli.models.loading import resolve_runtime
from cbir_cli.models.onnx_embedder import OnnxEmbedder


@pytest.fixture(scope="module")
def tiny_onnx(tiny_embedder, tmp_path_factory):
    return OnnxEmbedder.from_torch(tiny_embedder, cache_dir=tmp_path_factory.mktemp("onnx"))


def test_onnx_matches_torch_on_tiny_model(tiny_embedder, tiny_onnx):
    images = [make_image(i) for i in range(6)]
    a, b = tiny_embedder.embed_images(images), tiny_onnx.embed_images(images)
    assert b.dtype == np.float32 and b.shape == a.shape == (6, 256)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, rtol=1e-5)
    assert float(b[0] @ b[1]) < 0.999  # not a constant output
    assert tiny_onnx.fingerprint() == tiny_embedder.fingerprint()
    assert tiny_onnx.embed_images([]).shape == (0, 256)


def test_export_is_cached_and_reused(tiny_embedder, tiny_onnx):
    path = tiny_onnx.model_path
    assert path.is_file() and path.suffix == ".onnx"
    stamp = path.stat().st_mtime_ns
    again = OnnxEmbedder.from_torch(tiny_embedder, cache_dir=path.parent)
    assert again.model_path == path and path.stat().st_mtime_ns == stamp


def test_runtime_choice():
    mobilenet, tiny = get_model_config("mobilenet_v2"), get_model_config("test_tiny")
    assert resolve_runtime("auto", "cpu", mobilenet) == "onnx"
    assert resolve_runtime("auto", "cuda", mobilenet) == "torch"
    assert resolve_runtime("auto", "cpu", tiny) == "torch"  # test models stay on PyTorch under auto
    assert resolve_runtime("onnx", "cpu", tiny) == "onnx"
    with pytest.raises(CbirError, match="runs on the CPU only"):
        resolve_runtime("onnx", "cuda:0", mobilenet)
    with pytest.raises(CbirError, match="unknown runtime 'tvm'"):
        resolve_runtime("tvm", "cpu", mobilenet)


def test_load_embedder_onnx_and_store_interchangeable_with_torch(tmp_path, monkeypatch, image_folder, tiny_embedder):
    """A store written through ONNX Runtime is searched with the PyTorch model."""
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder
    from cbir_cli.search.faiss_backend import build_store_index
    from cbir_cli.search.searcher import Searcher
    from cbir_cli.store.feature_store import FeatureStore

    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    onnx = load_embedder("test_tiny", device="cpu", runtime="onnx")
    assert isinstance(onnx, OnnxEmbedder) and onnx.model_path.is_relative_to(tmp_path / "cache")
    folder = image_folder(5)
    sync_folder(folder, tmp_path / "idx", embedder=onnx, options=ExtractOptions(workers=0))
    build_store_index(FeatureStore.open(tmp_path / "idx"), "flat")
    searcher = Searcher.open(tmp_path / "idx", embedder=tiny_embedder)
    results = searcher.search_paths(sorted(folder.iterdir()), k=2)
    for query, hits in zip(sorted(folder.iterdir()), results):
        assert hits[0].path == str(query) and hits[0].score >= 0.999


@pytest.mark.real
def test_onnx_matches_torch_on_real_mobilenet_and_photos(shared_dir):
    if mobilenet_weights_path() is None:
        pytest.skip("MobileNetV2 weights not installed (run `cbir weights install mobilenet_v2`)")
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images

    files = list_images(shared_dir / "datasets" / "ukbench_mini")[::7][:8]
    torch_model = load_embedder("mobilenet_v2", device="cpu", runtime="torch")
    onnx_model = load_embedder("mobilenet_v2", device="cpu", runtime="onnx")  # cached export after the first run
    assert isinstance(onnx_model, OnnxEmbedder) and onnx_model.fingerprint() == torch_model.fingerprint()
    images = [load_image(f, draft_size=256) for f in files]
    a, b = torch_model.embed_images(images), onnx_model.embed_images(images)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999


def test_cold_query_on_onnx_runtime_never_imports_torch(image_folder, tiny_embedder, tmp_path, monkeypatch):
    """torch's import is most of a cold `cbir query` (~7 s of 8 here): with a cached
    ONNX export, the query path (decode, preprocess, embed, search) must not need it."""
    import subprocess
    import sys

    from cbir_cli.pipeline.sync import index_folder

    folder = image_folder(4)
    index_folder(folder, tmp_path / "idx", embedder=tiny_embedder)
    monkeypatch.setenv("CBIR_CACHE", str(tmp_path / "cache"))
    load_embedder("test_tiny", device="cpu", runtime="onnx")  # exports once (this does use torch)
    code = (
        "import sys, json; from typer.testing import CliRunner; from cbir_cli.cli import app; "
        f"r = CliRunner().invoke(app, ['query', {str(folder / 'img_002.jpg')!r}, '--index', "
        f"{str(tmp_path / 'idx')!r}, '--runtime', 'onnx', '--device', 'cpu', '--json']); "
        "assert r.exit_code == 0, r.output; top = json.loads(r.stdout)[0]['results'][0]; "
        "print(top['path'].endswith('img_002.jpg'), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
