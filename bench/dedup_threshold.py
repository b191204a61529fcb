#!/usr/bin/env python3
"""Measure ``cbir dedup``'s default threshold: the cosine similarity that best tells
distorted copies from distinct images (best F1), for one model and descriptor.

    python bench/dedup_threshold.py --root ../shared/datasets/oxford17flowers --model mobilenet_v2

Data: the copy-detection protocol of ``cbir evaluate --dataset copies``
(:mod:`cbir_cli.evaluate.copies`): ``--copies`` seeded images of the folder get 13
distortions each (half size, JPEG 20, centre crops of 75/70.7/50 % of each side,
mirror, 90 and 10 degree rotations, greyscale, colour jitter, blur, a border,
text), embedded with the model; the folder's own vectors come from the same
feature cache as ``cbir evaluate`` (a re-run embeds nothing).

Pairs scored (cosine similarity):

* duplicates: each copy with its original -- or with a file that is the same
  picture as the original (a re-encode; ``twin_sets``) -- and every pair of such
  same-picture files in the folder;
* distinct: every other pair of folder images, and every copy with every folder
  image that is not its original.

Every threshold on a 0.005 grid is scored by pairwise precision, recall and F1;
the best F1 wins (ties: the higher threshold). Printed: that threshold, precision
and recall, the recall per distortion at it, a few other thresholds for
comparison, and the line of ``MEASURED_THRESHOLDS`` (src/cbir_cli/search/dedup.py)
to paste.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import REPO, write_result

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "oxford17flowers"
COMPARE = (0.80, 0.85, 0.90, 0.95)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_DATA, help="folder of images (default: Oxford-17)")
    parser.add_argument("--model", default=None, help="model (default: cbir's default model)")
    parser.add_argument("--copies", type=int, default=200, help="originals that get the 13 distortions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features-dir", type=Path, default=None, help="feature cache (default: cbir evaluate's)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "int8"),
                        help="the model's precision (default: what a new index of the model gets)")
    return parser.parse_args(argv)


def pair_scores(gallery, copies, originals, twins):
    """(duplicate scores, distinct scores, per-copy score with its original): see
    the module docstring. ``twins[i]``: the gallery images that are picture i."""
    import numpy as np

    n = len(gallery)
    same = np.zeros((n, n), dtype=bool)
    for i, group in twins.items():
        same[i, group] = True
        same[group, i] = True
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    gallery_scores = gallery @ gallery.T
    copy_scores = copies @ gallery.T
    copy_same = same[np.asarray(originals)]  # (copies, n): which images count as the copy's original
    positive = np.concatenate([gallery_scores[upper & same], copy_scores[copy_same]])
    negative = np.concatenate([gallery_scores[upper & ~same], copy_scores[~copy_same]])
    to_original = np.where(copy_same, copy_scores, -np.inf).max(axis=1)
    return positive, negative, to_original


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np

    from cbir_cli.evaluate.copies import DISTORTIONS, twin_sets
    from cbir_cli.evaluate.copy_detection import CopyProtocol, copy_collection, copy_vectors
    from cbir_cli.evaluate.features import default_features_root
    from cbir_cli.evaluate.run import EvaluationOptions, feature_source
    from cbir_cli.pipeline.options import ExtractOptions, default_workers
    from cbir_cli.search.dedup import best_f1_threshold, descriptor_key, score_threshold

    started = time.perf_counter()
    extract = ExtractOptions(workers=default_workers() if args.workers is None else args.workers, progress=True,
                             precision=args.precision)
    options = EvaluationOptions(model=args.model, features_dir=args.features_dir, extract=extract)
    collection = copy_collection(args.root)
    cache_root = args.features_dir or default_features_root(collection)
    source = feature_source("deep", collection, cache_root, options, lambda m: print(m, file=sys.stderr))
    data = copy_vectors(collection, source, cache_root, CopyProtocol(args.copies, args.seed), extract)
    embedded_at = time.perf_counter()
    n = len(data.gallery_paths)
    twins = twin_sets(data.gallery_paths, range(n))
    originals = [q.original for q in data.queries]
    positive, negative, to_original = pair_scores(data.gallery.vectors, data.copies, originals, twins)
    best = best_f1_threshold(positive, negative)
    negative_sorted = np.sort(negative)

    model, descriptor = str(source.fingerprint["model"]), descriptor_key(source.fingerprint)
    twin_pairs = sum(len(t) - 1 for t in twins.values()) // 2
    print(f"\n{collection.root}: {n} images ({twin_pairs} same-picture pairs), {len(data.queries)} copies "
          f"({args.copies} originals x {len(DISTORTIONS)} distortions, seed {args.seed})")
    precision = source.fingerprint.get("precision", "fp32")
    print(f"model {model} ({precision}), descriptor {descriptor}; {len(positive):,} duplicate pairs, "
          f"{len(negative):,} distinct pairs")
    print(f"\nbest F1: threshold {best.threshold:g}  precision {best.precision:.4f}  recall {best.recall:.4f}  "
          f"F1 {best.f1:.4f}  ({best.true_pairs:,} duplicate pairs found, {best.false_pairs:,} distinct pairs "
          "linked)")
    print("\nrecall per distortion at that threshold (copy linked to its original):")
    kinds = np.asarray([q.kind for q in data.queries])
    per_distortion = {}
    for kind in DISTORTIONS:
        mine = to_original[kinds == kind]
        per_distortion[kind] = float(np.mean(mine >= best.threshold))
        print(f"  {kind:<12} {np.mean(mine >= best.threshold):.3f}   (median score {np.median(mine):.3f})")
    print("\nother thresholds:")
    table = [{"threshold": f"{best.threshold:g} (best F1)", "precision": f"{best.precision:.4f}",
              "recall": f"{best.recall:.4f}", "F1": f"{best.f1:.4f}", "distinct pairs linked": best.false_pairs}]
    for t in COMPARE:
        s = score_threshold(positive, negative_sorted, t)
        print(f"  {t:.2f}  precision {s.precision:.4f}  recall {s.recall:.4f}  F1 {s.f1:.4f}  "
              f"({s.false_pairs:,} distinct pairs linked)")
        table.append({"threshold": f"{t:.2f}", "precision": f"{s.precision:.4f}", "recall": f"{s.recall:.4f}",
                      "F1": f"{s.f1:.4f}", "distinct pairs linked": s.false_pairs})
    name = collection.root.name
    print(f"\nMEASURED_THRESHOLDS entry:\n    ({model!r}, {descriptor!r}): MeasuredThreshold(\n"
          f"        {best.threshold:g}, {best.precision:.3f}, {best.recall:.3f}, {best.f1:.3f}, "
          f"\"{name} copies, {args.copies} originals x {len(DISTORTIONS)} distortions\"),")
    print(f"\n{time.perf_counter() - started:.1f} s ({embedded_at - started:.1f} s features)")
    out = write_result("dedup_threshold", {"table": table, "recall_per_distortion": per_distortion},
                       extra={"model": model, "precision": precision, "descriptor": descriptor, "images": n,
                              "copies": args.copies, "seed": args.seed})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
