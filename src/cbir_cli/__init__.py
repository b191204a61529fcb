"""cbir-cli: content-based image retrieval with pretrained CNN features and Faiss.

The public Python API is imported lazily so that ``import cbir_cli`` (and
``cbir --help``) never pays for torch or faiss.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CbirError": "cbir_cli.errors",
    "list_models": "cbir_cli.models",
    "get_model_config": "cbir_cli.models",
    "load_embedder": "cbir_cli.models",
    "extract_folder": "cbir_cli.extract",
    "FeatureStore": "cbir_cli.store",
    "build_index": "cbir_cli.index",
    "Searcher": "cbir_cli.query",
    "Hit": "cbir_cli.query",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbir_cli' has no attribute {name!r}")
    return getattr(import_module(module), name)
