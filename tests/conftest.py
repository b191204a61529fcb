"""Shared fixtures: synthetic images (seeded) and the tiny random test model.

Nothing here downloads: the tiny model's weights are made in code, and the tests
marked ``real`` skip with a reason when real weights or ../shared data are absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBIR_SHARED", REPO.parent / "shared"))


def make_image(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A distinctive synthetic photo-like RGB image: smooth colour gradients plus a
    few random rectangles and ellipses, all determined by ``seed``."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.zeros((h, w, 3), dtype=np.float32)
    for c in range(3):
        fx, fy, ph = rng.uniform(0.5, 4.0), rng.uniform(0.5, 4.0), rng.uniform(0, 2 * np.pi)
        base[..., c] = 127 + 100 * np.sin(2 * np.pi * (fx * xx / w + fy * yy / h) + ph)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw_random_shapes(img, rng, count=6, min_side=15, max_side=(w // 2, h // 2))
    return img


def draw_random_shapes(img: Image.Image, rng: np.random.Generator, count: int, min_side: int,
                       max_side: tuple[int, int]) -> None:
    """Draw ``count`` random filled rectangles/ellipses on ``img`` (in place)."""
    from PIL import ImageDraw

    w, h = img.size
    draw = ImageDraw.Draw(img)
    for _ in range(count):
        x0, y0 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x1, y1 = x0 + int(rng.integers(min_side, max_side[0])), y0 + int(rng.integers(min_side, max_side[1]))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=colour)


@pytest.fixture(scope="session", autouse=True)
def _own_cache_and_index(tmp_path_factory: pytest.TempPathFactory):
    """The suite is hermetic: ONNX exports, int8 models and evaluate's features go
    to a cache folder of its own (shared by the session's tests, so each export is
    made once per run), never the user's ``~/.cache/cbir``; an index not given goes
    to a folder of its own too, never the user's. Subprocesses inherit both.
    A test that needs a cold cache or its own index still sets its own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CBIR_CACHE", str(tmp_path_factory.mktemp("cbir-cache")))
        patch.setenv("CBIR_INDEX", str(tmp_path_factory.mktemp("cbir-index") / "index"))
        yield


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download (nor probe the network for) weights; a test that
    simulates a download unsets it."""
    monkeypatch.setenv("CBIR_OFFLINE", "1")


@pytest.fixture
def image_folder(tmp_path: Path):
    """Factory: ``image_folder(n, name="images")`` writes n distinct JPEGs
    (img_000.jpg ...) and returns the folder."""

    def make(n: int = 8, name: str = "images", seed0: int = 0) -> Path:
        folder = tmp_path / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            make_image(seed0 + i).save(folder / f"img_{i:03d}.jpg", quality=90)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_embedder():
    """The registry's random-weight test model on CPU (built once per session)."""
    from cbir_cli.models.loading import load_embedder

    return load_embedder("test_tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_crop_embedder():
    """The test model with the legacy descriptor: centre crop, global average pooling."""
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR

    return load_embedder("test_tiny", device="cpu", descriptor=LEGACY_DESCRIPTOR)


@pytest.fixture
def index_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $CBIR_INDEX at a fresh folder so no test touches the user's index."""
    target = tmp_path / "index"
    monkeypatch.setenv("CBIR_INDEX", str(target))
    return target


def mobilenet_weights_path() -> Path | None:
    try:
        from cbir_cli.models.weights import installed_weights_path

        path = installed_weights_path("mobilenet_v2")
    except Exception:  # noqa: BLE001 - any failure means: no real weights here
        return None
    return path if path.exists() else None


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED} (set CBIR_SHARED)")
    return SHARED


def store_of_vectors(root: Path, vectors: np.ndarray, paths: list[str] | None = None, shard_size: int = 500):
    """A committed feature store at ``root`` holding ``vectors`` (rows as given, in
    shards of ``shard_size``) for ``paths`` (default ``/img/00000.jpg``...), with a
    synthetic fingerprint: for search tests that need no model."""
    from cbir_cli.store.feature_store import FeatureStore

    paths = paths if paths is not None else [f"/img/{i:05d}.jpg" for i in range(len(vectors))]
    store = FeatureStore.create(root, {"model": "synthetic", "weights": "none", "dim": int(vectors.shape[1]),
                                       "preprocessing": {}})
    for start in range(0, len(vectors), shard_size):
        stop = min(len(vectors), start + shard_size)
        store.add_shard(vectors[start:stop], [(paths[i], f"{i:064x}", 100) for i in range(start, stop)])
    store.commit()
    return store


# The clip family (issue 24) on a tiny open_clip model with random weights: no download.
TINY = "cbir-tiny-clip"
MODEL = f"clip:{TINY}"
TINY_CONFIG = {"embed_dim": 24,
               "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config registered with open_clip; returns its checkpoint (a state dict)."""
    import json

    open_clip = pytest.importorskip("open_clip")
    import torch

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder / f"{TINY}.json")
    torch.manual_seed(0)
    checkpoint = folder / "tiny_clip.pt"
    torch.save(open_clip.create_model(TINY).state_dict(), checkpoint)
    return checkpoint


@pytest.fixture(scope="session")
def tiny_clip_embedder(tiny_clip):
    from cbir_cli.models.loading import load_embedder

    return load_embedder(MODEL, weights=tiny_clip, device="cpu")
