"""ONNX Runtime as a CPU runtime for the registry's models.

On a 2-core CPU, ONNX Runtime runs MobileNetV2 about 2-3x faster than eager
PyTorch (see ``bench/extract.py`` and the README's performance section), so it is
the default runtime on CPU; CUDA keeps PyTorch (bf16 autocast).

The exported graph contains the whole embedding of one input size: uint8 pixels
in (batch, height and width dynamic), mean/std normalisation, the convolutional
trunk, the descriptor's pooling and L2 normalisation out, so one ``session.run``
does what :meth:`TorchEmbedder.embed` does for one group of same-shape images
(multi-scale and mixed-size batches: :mod:`.scales`). The export is cached
per model + weights identity + torch version and checked against PyTorch once,
when it is made. An :class:`OnnxEmbedder` reports the same fingerprint as the
PyTorch :class:`~cbir_cli.models.torch_embedder.TorchEmbedder` of the same model: the vectors are
interchangeable (cosine >= 0.999), so a store built with one runtime can be
searched with the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..fsutil import atomic_write_bytes
from ..paths import cache_root
from .calibration_cache import share_calibration, shared_calibration
from .int8_store import find_int8_model, int8_model_key, keep_int8_model
from .preprocess import image_preprocessor
from .protocol import EmbedderBase, model_fingerprint_of
from .quantize import Calibration, quantize_onnx, quantized_path
from .registry import CnnConfig
from .scales import embed_batch
from .torch_embedder import TorchEmbedder, build_backbone, pooling_module
from .weights import torch_hub_checkpoint_dir, weights_id_for

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime
    import torch

# Bump when the exported graph changes (wrapper, opset), so old cache files are not reused.
# 2: trunk + descriptor pooling, dynamic height and width.
EXPORT_VERSION = 2
OPSET = 17
# An export whose vectors disagree with PyTorch's by more than this is refused.
MIN_EXPORT_COSINE = 0.999


def onnx_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def onnx_cache_dir() -> Path:
    return cache_root() / "onnx"


def export_key(config: CnnConfig, weights_id: str) -> str:
    """Cache key: everything that determines the exported graph and its weights.
    (torch's version from package metadata: no torch import on the query path.)"""
    from importlib.metadata import version

    ident = {"config": config.as_dict(), "weights": weights_id, "torch": version("torch"),
             "export": EXPORT_VERSION, "opset": OPSET}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_export_path(config: CnnConfig, weights_id: str, cache_dir: Path | None = None) -> Path:
    return (cache_dir or onnx_cache_dir()) / f"{config.name}-{export_key(config, weights_id)}.onnx"


def _embedding_graph(embedder: TorchEmbedder) -> torch.nn.Module:
    """uint8 (n, 3, H, W) -> L2-normalised float32 (n, dim), as one module."""
    import copy

    import torch

    class EmbeddingGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # Exported in the default memory format: ONNX has no channels_last.
            self.trunk = copy.deepcopy(embedder.module).to("cpu", memory_format=torch.contiguous_format)
            self.pool = pooling_module(embedder.config.descriptor)
            self.register_buffer("mean", embedder._mean.detach().cpu())
            self.register_buffer("std", embedder._std.detach().cpu())

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            x = (pixels.float() - self.mean) / self.std
            feats = self.pool(self.trunk(x)).flatten(1)
            return torch.nn.functional.normalize(feats, dim=1)

    return EmbeddingGraph().eval()


def check_shapes(config: CnnConfig) -> list[tuple[int, int]]:
    """Input (height, width) pairs an export is checked on: the square input and a
    full-image-like rectangle of another size (height and width are dynamic)."""
    size = config.input_size
    return [(size, size), (config.scaled(size * 1.4), config.scaled(size * 1.9))]


def export_onnx(embedder: TorchEmbedder, path: Path) -> None:
    """Export ``embedder`` (a PyTorch one on CPU) to ``path`` with dynamic batch,
    height and width axes, written atomically (a concurrent run never reads half a
    file)."""
    import warnings

    import torch

    size = embedder.config.input_size
    example = torch.zeros((2, 3, size, size), dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.export-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # The TorchScript-based exporter warns that it is legacy; it handles these
            # plain CNNs and, unlike the dynamo exporter, needs no onnxscript.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _embedding_graph(embedder), (example,), str(tmp), input_names=["pixels"],
                output_names=["embedding"],
                dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"}, "embedding": {0: "batch"}},
                opset_version=OPSET, dynamo=False,
            )
        atomic_write_bytes(path, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)


def _session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Errors only: an int8 graph otherwise logs one warning per initializer the
    # optimiser drops, on every load.
    options.log_severity_level = 3
    # Idle ORT threads otherwise spin-wait between runs, stealing the cores the
    # decode workers need (measured: pipeline/model ratio 0.75 -> see README).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CbirError(f"{path}: cannot load the ONNX model ({exc}); delete the file to re-export it") from None


def _default_threads() -> int:
    import sys

    if "torch" in sys.modules:
        return int(sys.modules["torch"].get_num_threads())
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class OnnxEmbedder(EmbedderBase):
    """An :class:`~cbir_cli.models.protocol.Embedder` backed by an ONNX Runtime CPU
    session. Same inputs, same outputs, same fingerprint as the PyTorch embedder it
    was exported from."""

    device = "cpu"

    def __init__(self, config: CnnConfig, weights_id: str, model_path: Path, threads: int | None = None,
                 calibration: Calibration | None = None) -> None:
        self.config = config
        self.weights_id = weights_id
        # Set for an int8 model (models.quantize): part of the fingerprint.
        self.calibration = calibration
        self.preprocess = image_preprocessor(config)
        self.model_path = model_path
        # Same thread count as PyTorch uses by default (one per usable core), so the
        # runtimes compare fairly; torch is not imported just to ask it.
        self.threads = threads or _default_threads()
        self.session = _session(model_path, self.threads)

    @classmethod
    def from_torch(cls, embedder: TorchEmbedder, cache_dir: Path | None = None,
                   threads: int | None = None) -> OnnxEmbedder:
        """Export (or reuse the cached export of) a PyTorch embedder."""
        path = cached_export_path(embedder.config, embedder.weights_id, cache_dir)
        if not path.is_file():
            export_onnx(embedder, path)
            onnx_embedder = cls(embedder.config, embedder.weights_id, path, threads)
            onnx_embedder._check_against(embedder)
            return onnx_embedder
        return cls(embedder.config, embedder.weights_id, path, threads)

    def with_threads(self, threads: int) -> OnnxEmbedder:
        """The same model in a session of its own with ``threads`` intra-op threads
        (a server runs one 1-thread session per core for concurrent queries: see
        :mod:`cbir_cli.serve.embedding`)."""
        import copy

        sibling = copy.copy(self)
        sibling.threads, sibling.session = threads, _session(self.model_path, threads)
        return sibling

    @property
    def precision(self) -> str:
        return "fp32" if self.calibration is None else "int8"

    def fingerprint(self) -> dict[str, Any]:
        fingerprint = model_fingerprint_of(self.config, self.weights_id)
        if self.calibration is not None:
            fingerprint.update(self.calibration.fingerprint())
        return fingerprint

    def _check_against(self, reference: TorchEmbedder) -> None:
        """Refuse (and delete) an export whose vectors differ from PyTorch's."""
        import torch

        generator = torch.Generator().manual_seed(0)
        cosine = min(
            float((self._run(pixels.numpy()) * reference.embed(pixels)).sum(axis=1).min())
            for pixels in (torch.randint(0, 256, (2, 3, h, w), generator=generator, dtype=torch.uint8)
                           for h, w in check_shapes(self.config))
        )
        if not cosine >= MIN_EXPORT_COSINE:
            self.model_path.unlink(missing_ok=True)
            raise CbirError(f"ONNX export of {self.name} disagrees with PyTorch (cosine {cosine:.4f}); "
                            "use --runtime torch")

    def embed(self, batch: Any) -> np.ndarray:
        """A batch of preprocessed images (a stacked uint8 (n, 3, H, W) array, or a
        list of per-image inputs: see :mod:`.scales`) -> float32 (n, dim), rows
        L2-normalised."""
        return embed_batch(batch, self._run, self.dim)

    def _run(self, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        """uint8 (n, 3, H, W), one shape -> float32 (n, dim): one session run."""
        import numpy as np

        pixels = batch.numpy() if hasattr(batch, "numpy") else np.asarray(batch)
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        (out,) = self.session.run(None, {"pixels": np.ascontiguousarray(pixels, dtype=np.uint8)})
        return out.astype(np.float32, copy=False)


def _official_weights_present(config: CnnConfig, weights: str | os.PathLike[str] | None) -> bool:
    return weights is not None or not config.weights_file or \
        (torch_hub_checkpoint_dir() / config.weights_file).is_file()


def int8_model_path(config: CnnConfig, weights: str | os.PathLike[str] | None, calibration: Calibration,
                    cache_dir: Path | None = None) -> Path:
    """The int8 model of ``calibration``: the index's checksummed copy when it has
    one (no photos, cache or weights needed), else the cached one, else quantised
    now from the fp32 export and the calibration images (and cached)."""
    weights_id = weights_id_for(config, weights)
    if calibration.index_dir is not None:
        kept = find_int8_model(calibration.index_dir, int8_model_key(config, weights_id, calibration))
        if kept is not None:
            return kept
    int8_path = quantized_path(cached_export_path(config, weights_id, cache_dir), calibration)
    if not (int8_path.is_file() and _official_weights_present(config, weights)):
        fp32 = load_onnx_embedder(config, weights, cache_dir)
        quantize_onnx(fp32.model_path, int8_path, calibration, config, fp32.preprocess)
        share_calibration(fp32.model_path, calibration, int8_path)
    return int8_path


def shared_int8_calibration(config: CnnConfig, weights: str | os.PathLike[str] | None) -> Calibration | None:
    """The calibration every new int8 index of this model reuses, once one was made
    (see :mod:`.calibration_cache`); None before that."""
    if not _official_weights_present(config, weights):
        return None
    return shared_calibration(cached_export_path(config, weights_id_for(config, weights)))


def keep_int8_in_index(config: CnnConfig, weights: str | os.PathLike[str] | None, calibration: Calibration,
                       index_dir: str | os.PathLike[str]) -> str:
    """Make the index at ``index_dir`` hold its int8 model (see :mod:`.int8_store`);
    returns the model's key."""
    key = int8_model_key(config, weights_id_for(config, weights), calibration)
    if find_int8_model(index_dir, key) is None:
        from_elsewhere = replace(calibration, index_dir=None)  # the cache, else the photos
        keep_int8_model(index_dir, key, int8_model_path(config, weights, from_elsewhere), calibration)
    return key


def load_onnx_embedder(config: CnnConfig, weights: str | os.PathLike[str] | None = None,
                       cache_dir: Path | None = None, calibration: Calibration | None = None) -> OnnxEmbedder:
    """The ONNX embedder of a registered model. A cached export is used without
    building the PyTorch model, but only while the weights it was made from are
    still installed (so a missing-weights error is never masked by the cache).

    ``calibration``: the int8 model quantised on these images (see :func:`int8_model_path`)."""
    weights_id = weights_id_for(config, weights)
    if calibration is not None:
        return OnnxEmbedder(config, weights_id, int8_model_path(config, weights, calibration, cache_dir),
                            calibration=calibration)
    path = cached_export_path(config, weights_id, cache_dir)
    if path.is_file() and _official_weights_present(config, weights):
        return OnnxEmbedder(config, weights_id, path)
    # Seconds of silence on a first run otherwise (the CLI shows INFO as a note).
    logging.getLogger(__name__).info("note: preparing %s for ONNX Runtime (a one-off export, ~10 s; cached in %s)",
                                     config.name, path.parent)
    module, weights_id = build_backbone(config, weights)
    return OnnxEmbedder.from_torch(TorchEmbedder(config, module, weights_id, "cpu"), cache_dir)
