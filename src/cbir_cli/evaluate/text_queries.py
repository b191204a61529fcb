"""``cbir evaluate --dataset folder --text-queries``: words find images, the
zero-shot protocol of the CLIP papers run as retrieval.

Each class folder's name, put into a prompt template (``"a photo of a {}"``,
underscores read as spaces), is one text query over every image of the
collection (no image is left out: the query is not in the gallery). A class's
images are its relevant ones; per class: average precision over the whole
ranking and R@K (a relevant image among the top K); overall: their means.
The images' vectors are cached as for the image protocol.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..resolve import resolve_model
from .datasets import LabelledCollection
from .features import cache_features, default_features_root, fingerprint_key
from .metrics import average_precision, relevance_matrix

if TYPE_CHECKING:
    import numpy as np

    from .features import NotifyCallback
    from .run import EvaluationOptions

DEFAULT_PROMPT = "a photo of a {}"


def class_prompt(template: str, class_name: str) -> str:
    """``"a photo of a {}"`` and ``"golden_retriever"`` -> ``"a photo of a golden retriever"``."""
    if template.count("{}") != 1:
        raise CbirError(f"--prompt {template!r}: needs exactly one {{}} where the class name goes")
    return template.replace("{}", class_name.replace("_", " ").strip())


def score_text_queries(query_vectors: np.ndarray, query_labels: np.ndarray, image_vectors: np.ndarray,
                       image_labels: np.ndarray, ks: tuple[int, ...]) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(AP per query, {K: R@K per query}) of each text query ranking every image by cosine."""
    import numpy as np

    order = np.argsort(-(np.asarray(query_vectors) @ np.asarray(image_vectors).T), axis=1, kind="stable")
    rel = relevance_matrix(query_labels, np.asarray(image_labels)[order])
    num_relevant = rel.sum(axis=1)
    if np.any(num_relevant == 0):
        raise CbirError("a text query's class has no image in the collection")
    return average_precision(rel, num_relevant), {k: rel[:, :k].any(axis=1).astype(np.float64) for k in ks}


@dataclass
class TextEvaluation:
    dataset: str
    model: str
    prompt: str
    ks: tuple[int, ...]
    classes: list[dict[str, Any]]
    overall: dict[str, float]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "protocol": "text queries", "model": self.model, "prompt": self.prompt,
                "overall": self.overall, "classes": self.classes, "seconds": round(self.seconds, 3),
                "notes": self.notes}


def evaluate_text_queries(collection: LabelledCollection, options: EvaluationOptions, prompt: str,
                          on_notice: NotifyCallback | None = None) -> TextEvaluation:
    """The protocol of the module docstring, with ``options``' model (one with a text tower)."""
    import numpy as np

    from ..models.family import model_config, text_models
    from ..models.loading import load_embedder
    from .run import feature_source

    started = time.perf_counter()
    if not collection.class_names:
        raise CbirError(f"{collection.describe()}: text queries need class names (the folder layout)")
    prompts = {label: class_prompt(prompt, name) for label, name in sorted(collection.class_names.items())}
    cache_root = Path(options.features_dir).expanduser() if options.features_dir else default_features_root(collection)
    model = resolve_model(options.model, options.weights).name
    if not model_config(model).has_text:  # before any image is embedded
        raise CbirError(f"--text-queries: model {model} has no text tower; use one that has: "
                        f"{', '.join(text_models())}")
    source = feature_source("deep", collection, cache_root, options, on_notice)
    # One model for both towers: the images missing from the cache are embedded with it too.
    embedder = load_embedder(model, source.request.weights, options.extract.device, options.extract.runtime)
    source = replace(source, request=replace(source.request, embedder=embedder))
    cached = cache_features(collection.paths, cache_root / fingerprint_key(source.fingerprint), source,
                            options.extract)
    labels = collection.labels[cached.readable]
    queried = [label for label in prompts if np.any(labels == label)]
    texts = embedder.embed_text([prompts[label] for label in queried])  # type: ignore[attr-defined]
    ks = tuple(sorted(set(options.recall_ks)))
    ap, recall = score_text_queries(texts, np.asarray(queried), cached.vectors, labels, ks)
    classes = [{"class": collection.class_names[label], "prompt": prompts[label],
                "images": int(np.sum(labels == label)), "ap": float(ap[i]),
                **{f"recall@{k}": float(recall[k][i]) for k in ks}} for i, label in enumerate(queried)]
    overall = {"map": float(ap.mean()), **{f"recall@{k}": float(recall[k].mean()) for k in ks},
               "queries": len(queried)}
    notes = [f"{path}: unreadable ({reason})" for path, reason in cached.unreadable]
    return TextEvaluation(collection.describe(), model, prompt, ks, classes, overall,
                          time.perf_counter() - started, notes)
