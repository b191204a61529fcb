#!/usr/bin/env python3
"""``cbir dedup`` at scale: near-duplicate groups over synthetic indexes of 20k and
100k vectors, per search index type, side by side in one run.

    python bench/dedup.py                                   # 20k and 100k, flat/hnsw/ivfpq (flat up to 50k)
    python bench/dedup.py --sizes 100000 --types ivfpq,flat # flat at 100k too (minutes)

Data (seeded): unit vectors of ``--dim`` (1280, MobileNetV2's) near a shared 16-d
subspace plus as much isotropic noise, so that distinct vectors score well below
the threshold (~0.5-0.6 at most); ``--dup-fraction`` of them get 1-3 near copies
(each copy = original + noise, cosine ~0.95-0.99 to it), counted in the size.
The vectors go into a real feature store (a temporary folder), and
:func:`cbir_cli.search.dedup.find_duplicates` runs exactly as ``cbir dedup`` does:
every stored vector queries the backend's range search (exact on flat; k-NN with a
threshold on HNSW and IVF-PQ), links become groups.

Printed per (size, index type): build seconds, dedup seconds (range search +
grouping), the planted groups found complete, pairs found / planted pairs,
extra pairs (linked but not planted), and peak RSS at the end. Faiss uses every
core (the figures in the README: 2 cores).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result

THRESHOLD = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="20000,100000", help="comma list of index sizes (copies included)")
    parser.add_argument("--types", default="flat,hnsw,ivfpq", help="comma list of index types")
    parser.add_argument("--flat-max", type=int, default=50_000, help="skip flat above this size unless --sizes "
                        "has only flat-sized runs (an all-vs-all flat scan is quadratic)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--dup-fraction", type=float, default=0.02, help="share of originals that get copies")
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def synthetic_collection(n: int, dim: int, dup_fraction: float, seed: int):
    """(vectors (n, dim) float32, planted groups as lists of row numbers)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((16, dim), dtype=np.float32) / 4
    originals = int(n / (1 + 2 * dup_fraction))  # each planted original brings 2 copies on average
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, originals, 65536):
        m = min(65536, originals - start)
        block = rng.standard_normal((m, 16), dtype=np.float32) @ basis
        block += rng.standard_normal((m, dim), dtype=np.float32)  # as much noise as subspace
        x[start:start + m] = block / np.linalg.norm(block, axis=1, keepdims=True)
    groups, row = [], originals
    for original in rng.permutation(originals):
        if row >= n:
            break
        copies = min(int(rng.integers(1, 4)), n - row)
        noise = rng.uniform(0.1, 0.3)
        for _ in range(copies):
            v = x[original] + noise * (dim ** -0.5) * rng.standard_normal(dim, dtype=np.float32)
            x[row] = v / np.linalg.norm(v)
            row += 1
        groups.append([int(original), *range(row - copies, row)])
    return x, groups


def write_store(root: Path, x):
    from cbir_cli.store.feature_store import FeatureStore

    store = FeatureStore.create(root, {"model": "synthetic", "weights": "none", "dim": int(x.shape[1]),
                                       "preprocessing": {}})
    for start in range(0, len(x), 16384):
        stop = min(len(x), start + 16384)
        store.add_shard(x[start:stop], [(f"/bench/img_{i:07d}.jpg", f"{i:064x}", 1000) for i in range(start, stop)])
    store.commit()
    return store


def evaluate(result, planted: list[list[int]], id_of_row) -> tuple[int, int, int, int]:
    """(planted groups found whole and alone, planted pairs found, planted pairs, extra pairs)."""
    found_groups = {frozenset(m.id for m in g.members) for g in result.groups}
    planted_sets = [frozenset(id_of_row[r] for r in group) for group in planted]
    complete = sum(s in found_groups for s in planted_sets)
    planted_pairs = {(a, b) for s in planted_sets for a in s for b in s if a < b}
    linked = {(a, b) for g in result.groups for a, b, _ in g.links}
    return complete, len(linked & planted_pairs), len(planted_pairs), len(linked - planted_pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import faiss

    from cbir_cli.search.dedup import find_duplicates
    from cbir_cli.search.faiss_backend import FaissBackend
    from cbir_cli.search.searcher import Searcher

    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; threshold {args.threshold}, "
          f"dim {args.dim}", flush=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        x, planted = synthetic_collection(n, args.dim, args.dup_fraction, args.seed)
        with tempfile.TemporaryDirectory(prefix="cbir-bench-dedup-") as scratch:
            store = write_store(Path(scratch) / "index", x)
            del x
            for index_type in [t for t in args.types.split(",") if t]:
                if index_type == "flat" and n > args.flat_max:
                    continue
                backend = FaissBackend()
                started = time.perf_counter()
                backend.build(store, index_type, persist=False)
                built = time.perf_counter() - started
                searcher = Searcher(store, backend)
                id_of_row = [r.id for r in searcher.rows]
                started = time.perf_counter()
                result = find_duplicates(searcher, args.threshold)
                seconds = time.perf_counter() - started
                complete, found, total, extra = evaluate(result, planted, id_of_row)
                rows.append((n, backend.index_type, built, seconds, complete, len(planted), found, total, extra))
                print(f"  n={n:,} {backend.index_type}: build {built:.1f} s, dedup {seconds:.1f} s, "
                      f"{complete}/{len(planted)} groups whole, pairs {found}/{total}, extra {extra}", flush=True)
                searcher = backend = result = None
    print("\n| n | index | build s | dedup s | planted groups found whole | planted pairs found | extra pairs |")
    print("|---|---|---|---|---|---|---|")
    for n, kind, built, seconds, complete, groups, found, total, extra in rows:
        print(f"| {n:,} | {kind} | {built:.1f} | {seconds:.1f} | {complete:,}/{groups:,} | "
              f"{found / max(1, total):.4f} | {extra} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MiB")
    table = [{"n": n, "index": kind, "build s": round(built, 1), "dedup s": round(seconds, 1),
              "planted groups found whole": f"{complete:,}/{groups:,}",
              "planted pairs found": f"{found / max(1, total):.4f}", "extra pairs": extra}
             for n, kind, built, seconds, complete, groups, found, total, extra in rows]
    out = write_result("dedup", {"table": table, "peak_rss_mib": peak},
                       extra={"threshold": args.threshold, "dim": args.dim, "dup_fraction": args.dup_fraction})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
