"""The run plan: every choice a run makes from the user's settings, made here, once.

User settings (an index folder or none, a model or none, ``auto`` device, runtime,
precision and decode, a backend or none, an index type or none, an engine) become a
:class:`RunPlan` of concrete answers: which folder, which model and weights, which
descriptor, where the model runs, in which runtime and precision, where JPEGs are
decoded, which search backend and index type, which executor. An index that exists
already has its say (its model, descriptor, precision, backend, index type), read
without writing anything or loading a model.

``cbir index --dry-run`` prints the plan; :func:`cbir_cli.pipeline.sync.index_folder`
(the CLI and the Python API alike) runs by it; ``cbir evaluate`` and ``cbir serve``
decide model, device and runtime through the same functions.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..models.family import model_config
from ..models.loading import default_precision, resolve_device, resolve_runtime
from ..resolve import ModelSettings, resolve_descriptor, resolve_index_dir, resolve_model
from ..store.feature_store import FeatureStore
from .options import ExtractOptions, IndexSettings, decode_for

if TYPE_CHECKING:
    from ..models.protocol import Embedder
    from ..models.registry import DescriptorSettings
    from ..search.backends import BackendSpec

LOCAL_ENGINE = "local"


@dataclass(frozen=True)
class RunPlan:
    """What a run will do, every ``auto`` and default settled.

    ``device``/``runtime``/``decode`` are this machine's answers for the local
    engine; another engine settles ``auto`` on its own workers, so they stay as asked.
    ``backend``: None is Faiss in the index folder. ``notices``: what the run says
    about choices that are not the obvious ones."""

    index_dir: Path
    model: str
    weights: str | os.PathLike[str] | None
    descriptor: DescriptorSettings | None
    device: str
    runtime: str
    precision: str
    decode: str
    backend: BackendSpec | None
    index_type: str
    executor: str
    exists: bool = False
    rebuild: bool = False
    notices: tuple[str, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (what ``cbir index --dry-run --json`` prints)."""
        backend = asdict(self.backend) if self.backend is not None else {"name": "faiss"}
        return {"index": str(self.index_dir), "exists": self.exists, "rebuild": self.rebuild,
                "model": self.model, "weights": None if self.weights is None else str(self.weights),
                "descriptor": None if self.descriptor is None else self.descriptor.label(),
                "device": self.device, "runtime": self.runtime, "precision": self.precision,
                "decode": self.decode, "backend": {k: v for k, v in backend.items() if v is not None},
                "index_type": self.index_type, "executor": self.executor, "notices": list(self.notices)}


def is_descriptor(model: str) -> bool:
    """A hand-crafted descriptor (no device, no runtime, no precision)."""
    from ..models.descriptors import DESCRIPTORS

    return model in DESCRIPTORS


def choose_precision(requested: str, model: str, device: str, runtime: str, existing: FeatureStore | None,
                     rebuild: bool = False) -> str:
    """``fp32`` or ``int8``. ``auto`` follows an index of the same model (int8 if it
    holds int8 vectors, else fp32), and for a new one (or a rebuild)
    :func:`~cbir_cli.models.loading.default_precision` decides."""
    if requested == "fp32" or is_descriptor(model):
        return "fp32"
    same_model = existing is not None and existing.fingerprint.get("model") == model
    stored_int8 = same_model and existing is not None and existing.fingerprint.get("precision") == "int8"
    if requested == "int8" or stored_int8:
        return "int8"
    if same_model and not rebuild:
        return "fp32"
    return default_precision(model, device, runtime)


def choose_backend(requested: BackendSpec | None, index_type: str | None, existing: FeatureStore | None,
                   index_dir: Path) -> BackendSpec | None:
    """The backend the index will use (None: Faiss), its defaults filled in for the
    index at ``index_dir``; its target is not contacted (the writer checks it, before
    any work)."""
    from ..search.backends import choose_spec

    # A new index: an unwritten store of that folder stands in (nothing is written).
    store = existing if existing is not None else FeatureStore.create(index_dir, {})
    return choose_spec(requested, index_type, store)


def choose_index_type(requested: str | None, backend: BackendSpec | None, existing: FeatureStore | None) -> str:
    """The requested index type, else the one the index was saved with, else auto."""
    if requested is not None:
        from ..search.faiss_backend import resolve_index_type

        resolve_index_type(requested, 0)  # an unknown type fails now
        return requested
    if backend is not None and backend.index_type:
        return backend.index_type
    if existing is not None and existing.count:
        from ..search.backends import saved_index_type

        return saved_index_type(existing)
    return "auto"


def plan_run(index_dir: str | os.PathLike[str] | None, model: ModelSettings | None = None,
             options: ExtractOptions | None = None, index: IndexSettings | None = None,
             engine: str = LOCAL_ENGINE, rebuild: bool = False,
             existing: FeatureStore | bool | None = True, embedder: Embedder | None = None) -> RunPlan:
    """The plan for indexing into ``index_dir`` with these settings.

    Args:
        index_dir: the index folder (None: ``$CBIR_INDEX``, else the per-user one).
        model: model, weights and descriptor as asked (None: all defaults).
        options: how embedding runs (device, runtime, precision, decode...).
        index: backend, index type and DBA as asked (None: the index's, else defaults).
        engine: the executor's name (``local``: device, runtime and decode are
            settled on this machine; any other: on the engine's workers).
        rebuild: whether everything is embedded again into a new index.
        existing: the index as it is (None: there is none); True (default): read it
            from ``index_dir`` without writing anything.
        embedder: a model already loaded (tests, benchmarks): the plan is its
            model, descriptor, device and runtime.

    Returns:
        The :class:`RunPlan`; no model is loaded and nothing is written.

    Raises:
        CbirError: an unknown model, backend or option value, a device that
            is not there, a damaged index manifest.
    """
    model = model or ModelSettings()
    options = options or ExtractOptions()
    index = index or IndexSettings()
    folder = resolve_index_dir(index_dir)
    if existing is True:
        existing = FeatureStore.open(folder, check_files=False) if FeatureStore.exists(folder) else None
    store = existing if isinstance(existing, FeatureStore) else None
    if embedder is not None:
        return _embedder_plan(embedder, folder, options, index, engine, rebuild, store)
    choice = resolve_model(model.model, model.weights, store)
    descriptor, descriptor_notice = resolve_descriptor(model.descriptor, choice.name, store, rebuild)
    local = engine == LOCAL_ENGINE
    precision = choose_precision(options.precision, choice.name, options.device, options.runtime, store, rebuild)
    if is_descriptor(choice.name):
        device, runtime, decode = "cpu", "descriptor", "cpu"
    elif not local:  # settled on the engine's workers
        device, runtime, decode = options.device, options.runtime, options.decode
    else:
        config = model_config(choice.name)
        if hasattr(config, "with_descriptor"):
            config = config.with_descriptor(descriptor)
        # int8 runs where it can (the CPU, ONNX Runtime), whatever ``auto`` would pick.
        int8 = precision == "int8"
        device = "cpu" if int8 and options.device == "auto" else resolve_device(options.device)
        runtime = "onnx" if int8 and options.runtime == "auto" else resolve_runtime(options.runtime, device, config)
        decode = decode_for(options.decode, device, config)
    backend = choose_backend(index.backend, index.index_type, store, folder)
    index_type = choose_index_type(index.index_type, backend, store)
    notices = tuple(n for n in (choice.notice, descriptor_notice) if n)
    return RunPlan(folder, choice.name, choice.weights, descriptor, device, runtime, precision, decode, backend,
                   index_type, engine, exists=store is not None, rebuild=rebuild, notices=notices)


def _embedder_plan(embedder: Embedder, folder: Path, options: ExtractOptions, index: IndexSettings, engine: str,
                   rebuild: bool, store: FeatureStore | None) -> RunPlan:
    """The plan around a model already loaded: its own choices, the index's for the rest."""
    from ..models.loading import runtime_of

    config = embedder.config
    device = getattr(embedder, "device", None)
    backend = choose_backend(index.backend, index.index_type, store, folder)
    return RunPlan(folder, config.name, None, getattr(config, "descriptor", None),
                   "cpu" if device is None else str(device), runtime_of(embedder),
                   str(embedder.fingerprint().get("precision", "fp32")),
                   decode_for(options.decode, None if device is None else str(device), config), backend,
                   choose_index_type(index.index_type, backend, store), engine, exists=store is not None,
                   rebuild=rebuild)
