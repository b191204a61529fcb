#!/usr/bin/env python3
"""Does whitening the descriptors help? Measured on a labelled folder, with and
without the default re-ranking.

    python bench/whitening.py --root ../shared/datasets/oxford17flowers

Whitening (PCA rotation, then each direction scaled by ``(lambda + s * mean
lambda) ** (-beta / 2)``) is learned on L2-normalised default descriptors of

* ``self``: the evaluated collection itself (all a user's index can learn from);
* ``other classes``: half of the classes, and evaluated on the other half only
  (the same domain, disjoint images: the best case short of a large external set).

Variants: none, PCA-whitening (beta 1), with shrinkage s = 1 and 10, power-law
(beta 0.5, s = 1), and PCA to 256 dimensions (beta 0: rotation only, a memory
saver). The features come from ``cbir evaluate``'s cache (``--features-dir``), so
this takes seconds after an evaluation of the same folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import REPO, write_result

VARIANTS = [("none", None), ("PCA-whitening", (1.0, 0.0, None)), ("shrink s=1", (1.0, 1.0, None)),
            ("shrink s=10", (1.0, 10.0, None)), ("power beta=0.5, s=1", (0.5, 1.0, None)),
            ("PCA to 256 (no whitening)", (0.0, 0.0, 256))]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=REPO.parent / "shared" / "datasets" / "oxford17flowers")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--features-dir", type=Path, default=None, help="cbir evaluate's feature cache")
    return p.parse_args()


def learn(x, beta: float, shrink: float, dim: int | None):
    import numpy as np

    mean = x.mean(axis=0)
    eigenvalues, vectors = np.linalg.eigh(np.cov((x - mean).T, bias=True))
    eigenvalues, vectors = eigenvalues[::-1].clip(0), vectors[:, ::-1]
    keep = dim or x.shape[1]
    scale = (eigenvalues[:keep] + shrink * eigenvalues.mean() + 1e-12) ** (-beta / 2)
    projection = (vectors[:, :keep] * scale).astype(np.float32)

    def apply(y):
        out = (y - mean) @ projection
        return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    return apply


def main() -> None:
    import numpy as np

    from cbir_cli.evaluate.compare import NO_DBA, Variant, ranking_backend
    from cbir_cli.evaluate.datasets import load_folder
    from cbir_cli.evaluate.features import cache_features, default_features_root, fingerprint_key
    from cbir_cli.evaluate.run import EvaluationOptions, feature_source, rank_all_vs_all, score_rankings
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.search.rerank import NO_RERANKING

    args = parse_args()
    collection = load_folder(args.root)
    # fp32, as the README's table was measured (an int8 default would change the vectors).
    options = EvaluationOptions(model=args.model, features_dir=args.features_dir,
                                extract=ExtractOptions(precision="fp32"))
    root = args.features_dir or default_features_root(collection)
    source = feature_source("deep", collection, root, options, print)
    cached = cache_features(collection.paths, root / fingerprint_key(source.fingerprint), source, options.extract)
    vectors, labels = cached.vectors, collection.subset(cached.readable).labels
    classes = np.unique(labels)
    held_out = np.isin(labels, classes[1::2])
    plain = Variant(rerank=NO_RERANKING, dba=NO_DBA)
    reranked = Variant()

    table = []

    def scores(x, y):
        out = []
        for variant in (plain, reranked):
            m = score_rankings(y, rank_all_vs_all(x, len(y) - 1, ranking_backend(variant)), options)
            out.append(f"{m['recall@1']:.3f} / {m['map']:.3f} / {m['map@r']:.3f}")
        return out

    print(f"{collection.describe()}; {source.label}, {len(vectors)} vectors of {vectors.shape[1]} dims")
    print("| whitening | learned on itself: plain | re-ranked | learned on other classes: plain | re-ranked |")
    print("|---|---|---|---|---|")
    for name, params in VARIANTS:
        own = vectors if params is None else learn(vectors, *params)(vectors)
        other = vectors[held_out] if params is None else learn(vectors[~held_out], *params)(vectors[held_out])
        cells = [*scores(own, labels), *scores(other, labels[held_out])]
        print(f"| {name} | {' | '.join(cells)} |")
        table.append(dict(zip(("whitening", "learned on itself: plain", "itself: re-ranked",
                               "learned on other classes: plain", "other classes: re-ranked"), (name, *cells))))
    note = "cells: R@1 / mAP / MAP@R, all-vs-all; 'other classes': evaluated on the held-out half of the classes"
    print(note)
    out = write_result("whitening", {"table": table, "note": note},
                       extra={"dataset": collection.describe(), "features": source.label})
    print(f"written {out}")


if __name__ == "__main__":
    main()
