#!/usr/bin/env python3
"""Choose the geometric verification's thresholds (``cbir_cli.search.verify``) by
measurement: inlier counts of true copies against those of hard negatives.

    python bench/verify_copies.py --copies 40 --detector sift

Positives: the copies protocol's distortions (``cbir_cli.evaluate.copies``) of
``--copies`` seeded Oxford-17 photos, each verified against its original.
Negatives, the hard kind a copy detector must not merge:

* Oxford-17: each original against ``--negatives`` other photos of its class
  (same kind of flower; files that are the same picture re-encoded are skipped);
* UKBench-mini: every pair of the 4 photos of each of the 14 objects (the same
  object re-photographed: similar, never a copy).

Printed: per distortion, the share verified and the lowest / median inliers; the
negatives' highest inliers and ratio; seconds per extraction and per pair. With
``--json PATH`` the raw counts are written too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=SHARED / "oxford17flowers")
    parser.add_argument("--ukbench", type=Path, default=SHARED / "ukbench_mini")
    parser.add_argument("--copies", type=int, default=40, help="originals that get every distortion")
    parser.add_argument("--negatives", type=int, default=5, help="same-class photos per original")
    parser.add_argument("--detector", default="sift", choices=("sift", "orb"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    from cbir_cli.evaluate.copies import DISTORTIONS, copy_queries, render_copy, twin_sets
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images
    from cbir_cli.imageio.local_features import extract
    from cbir_cli.search.verify import MAX_RESIDUAL_PX, MIN_INLIER_RATIO, MIN_INLIERS, Verification, verify

    args = parse_args(argv)
    paths = [str(p) for p in list_images(args.root)]
    queries = copy_queries(len(paths), args.copies, args.seed)
    originals = sorted({q.original for q in queries})
    twins = twin_sets(paths, originals)
    extract_seconds: list[float] = []
    pair_seconds: list[float] = []

    def features(img):
        started = time.perf_counter()
        out = extract(img, args.detector)
        extract_seconds.append(time.perf_counter() - started)
        return out

    def check(a, b):
        started = time.perf_counter()
        out = verify(a, b)
        pair_seconds.append(time.perf_counter() - started)
        return out

    cache = {}
    positives: dict[str, list[tuple[int, int]]] = {k: [] for k in DISTORTIONS}
    for q in queries:
        img = load_image(paths[q.original])
        if q.original not in cache:
            cache[q.original] = features(img)
        v = check(features(render_copy(q, lambda _i, img=img: img)), cache[q.original])
        positives[q.kind].append((v.inliers, v.matches, round(v.residual, 3)))
    rng = np.random.default_rng(args.seed)
    classes = [Path(p).parent.name for p in paths]
    negatives: dict[str, list[tuple[int, int]]] = {"oxford same class": [], "ukbench same object": []}
    for o in originals:
        same = [j for j, c in enumerate(classes) if c == classes[o] and j not in set(twins[o].tolist())]
        for j in rng.choice(same, min(args.negatives, len(same)), replace=False):
            v = check(cache[o], features(load_image(paths[int(j)])))
            negatives["oxford same class"].append((v.inliers, v.matches, round(v.residual, 3)))
    groups: dict[str, list[str]] = {}
    for p in list_images(args.ukbench):
        groups.setdefault(Path(p).parent.name, []).append(str(p))
    for members in groups.values():
        feats = [features(load_image(p)) for p in members]
        for i in range(len(feats)):
            for j in range(i + 1, len(feats)):
                v = check(feats[i], feats[j])
                negatives["ukbench same object"].append((v.inliers, v.matches, round(v.residual, 3)))

    def verified(counts):
        return [Verification(m, i, c).same_picture for i, m, c in counts]

    print(f"{args.detector}: {len(originals)} originals; verified = inliers >= {MIN_INLIERS} and "
          f"inliers/matches >= {MIN_INLIER_RATIO} and median residual <= {MAX_RESIDUAL_PX} px")
    print(f"{'pairs':<22}{'n':>5}{'verified':>10}{'min inl':>9}{'p10 inl':>9}{'median':>8}{'max inl':>9}"
          f"{'max ratio':>11}{'resid min/med/max':>18}")
    table = []
    for name, counts in [*positives.items(), *negatives.items()]:
        inl = np.array([c[0] for c in counts])
        ratio = np.array([c[0] / c[1] if c[1] else 0.0 for c in counts])
        corr = np.array([c[2] for c in counts if c[0] >= 3] or [np.inf])
        print(f"{name:<22}{len(counts):>5}{np.mean(verified(counts)):>10.3f}{inl.min():>9}"
              f"{np.percentile(inl, 10):>9.0f}{np.median(inl):>8.0f}{inl.max():>9}{ratio.max():>11.2f}"
              f"{corr.min():>8.2f}/{np.median(corr):.2f}/{corr.max():.2f}")
        table.append({"pairs": name, "n": len(counts), "verified": f"{np.mean(verified(counts)):.3f}",
                      "median inliers": float(np.median(inl)), "max inlier ratio": f"{ratio.max():.2f}"})
    print(f"extraction {1000 * np.median(extract_seconds):.1f} ms/picture (median), "
          f"verification {1000 * np.median(pair_seconds):.1f} ms/pair (median, one core)")
    out = write_result("verify_copies", {"table": table, "extract_ms": 1000 * float(np.median(extract_seconds)),
                                         "pair_ms": 1000 * float(np.median(pair_seconds))},
                       extra={"detector": args.detector, "copies": args.copies, "seed": args.seed})
    print(f"written {out}")
    if args.json:
        args.json.write_text(json.dumps({"detector": args.detector, "positives": positives,
                                         "negatives": negatives,
                                         "extract_ms": 1000 * float(np.median(extract_seconds)),
                                         "pair_ms": 1000 * float(np.median(pair_seconds))}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
