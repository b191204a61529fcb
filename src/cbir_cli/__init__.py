"""cbir-cli: content-based image retrieval with pretrained CNN features and Faiss.

The public Python API is imported lazily so that ``import cbir_cli`` (and
``cbir --help``) never pays for torch or faiss. Every public function names the
index folder ``index_dir`` (the store layer's own classes call theirs ``root``).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CbirError": "cbir_cli.errors",
    "list_models": "cbir_cli.models.family",
    "model_config": "cbir_cli.models.family",
    "get_model_config": "cbir_cli.models.registry",
    "load_embedder": "cbir_cli.models.loading",
    "extract_folder": "cbir_cli.pipeline.sync",
    "index_folder": "cbir_cli.pipeline.sync",
    "FeatureStore": "cbir_cli.store.feature_store",
    "build_index": "cbir_cli.search.faiss_backend",
    "Searcher": "cbir_cli.search.searcher",
    "Hit": "cbir_cli.search.searcher",
    "check_index": "cbir_cli.search.check",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir_cli' has no attribute {name!r}")
    return getattr(import_module(module), name)
