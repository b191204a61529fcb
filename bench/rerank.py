#!/usr/bin/env python3
"""Query latency with re-ranking (alpha-QE + DBA + the pinned raw top-1) against
plain search, side by side in one run, on synthetic vectors.

    python -m bench.rerank                        # 100k vectors, flat and ivfpq
    python -m bench.rerank --sizes 10000 --queries 50

The vectors are bench/query.py's (seeded 2048-d unit vectors near a 16-d subspace).
For each size the DBA vectors are computed once, through the IVF-PQ backend (its
time is printed: what `cbir index` adds), written to a memory-mapped file as the
index keeps them, and shared by both index types. For each index type: single-query
p50/p95 of plain search (k=10) and of the re-ranked search (measured in turn, query
by query), their ratio, and how many of the re-ranked top-10 agree with the
re-ranking over the exact (flat) index.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import percentiles_ms, write_result
from bench.query import DIM, K, synthetic_vectors


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000", help="comma list of collection sizes")
    p.add_argument("--types", default="flat,ivfpq", help="index types")
    p.add_argument("--queries", type=int, default=200)
    return p.parse_args()


def backend_over(vectors, index_type: str):
    """A FaissBackend holding ``vectors`` (ids = positions), as a saved index loads."""
    import numpy as np

    from cbir_cli.search.faiss_backend import FaissBackend, build_index, needs_rerank

    backend = FaissBackend()
    backend.index = build_index(vectors, index_type)
    backend.index_type, backend.ids = index_type, np.arange(len(vectors), dtype=np.int64)
    backend.exact = vectors if needs_rerank(backend.index) else None
    return backend


def interleaved_latencies(plain, reranked, queries) -> tuple[list[float], list[float]]:
    """Single-query latencies of both, query by query in turn (the machine's load
    drifts; measuring one after the other would compare different moments)."""
    plain.search(queries[:1], K), reranked.search(queries[:1], K)  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for q in queries:
        for backend, out in zip((plain, reranked), times):
            started = time.perf_counter()
            backend.search(q[None, :], K)
            out.append(time.perf_counter() - started)
    return times


def main() -> int:
    import numpy as np

    from cbir_cli.search.dba import DbaSettings, augment
    from cbir_cli.search.rerank import RerankingBackend, RerankSettings

    args = parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-rerank-"))
    basis = np.random.default_rng(12345).standard_normal((16, DIM), dtype=np.float32) / 4
    queries = synthetic_vectors(args.queries, seed=999, basis=basis)
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",") if s):
            path = scratch / f"vectors-{n}.npy"
            np.save(path, synthetic_vectors(n, seed=n, basis=basis))
            vectors = np.load(path, mmap_mode="r")
            ids = np.arange(n, dtype=np.int64)
            started = time.perf_counter()
            aug_path = scratch / f"dba-{n}.npy"

            def allocate(shape, aug_path=aug_path):
                return np.lib.format.open_memmap(aug_path, mode="w+", dtype=np.float32, shape=shape)

            augmentation = augment(backend_over(vectors, "ivfpq"), ids, DbaSettings(), allocate=allocate)
            augmentation.vectors.flush()
            augmentation.vectors = np.load(aug_path, mmap_mode="r")
            dba_s = time.perf_counter() - started
            print(f"n={n}: DBA (n=3) through ivfpq in {dba_s:.1f} s", flush=True)
            reference = None
            for index_type in (t for t in args.types.split(",") if t):
                plain = backend_over(vectors, index_type)
                reranked = RerankingBackend(plain, RerankSettings())
                reranked.augmentation = augmentation
                plain_s, reranked_s = interleaved_latencies(plain, reranked, queries)
                (p50, p95), (r50, r95) = percentiles_ms(plain_s), percentiles_ms(reranked_s)
                found = reranked.search(queries, K)[1]
                if reference is None:
                    reference = found
                agree = sum(len(set(a) & set(b)) for a, b in zip(found, reference)) / reference.size
                rows.append((n, index_type, dba_s, p50, p95, r50, r95, r50 / p50, agree))
                print(f"  {index_type}: plain p50 {p50:.2f} ms, re-ranked p50 {r50:.2f} ms", flush=True)
            del vectors, augmentation
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n{args.queries} queries, k={K}, dim {DIM}; re-ranking: DBA n=3 a=3 + aQE n=3 a=3 + raw top-1 pinned")
    print("| n | index | DBA build s | plain p50 / p95 ms | re-ranked p50 / p95 ms | ratio (p50) "
          "| top-10 agreement with flat |")
    print("|---|---|---|---|---|---|---|")
    for n, kind, dba_s, p50, p95, r50, r95, ratio, agree in rows:
        print(f"| {n:,} | {kind} | {dba_s:.0f} | {p50:.2f} / {p95:.2f} | {r50:.2f} / {r95:.2f} | {ratio:.2f}x "
              f"| {agree:.3f} |")
    table = [{"n": n, "index": kind, "DBA build s": round(dba_s), "plain p50 / p95 ms": f"{p50:.2f} / {p95:.2f}",
              "re-ranked p50 / p95 ms": f"{r50:.2f} / {r95:.2f}", "ratio (p50)": f"{ratio:.2f}x",
              "top-10 agreement with flat": f"{agree:.3f}"}
             for n, kind, dba_s, p50, p95, r50, r95, ratio, agree in rows]
    print(f"written {write_result('rerank', {'table': table}, extra={'queries': args.queries, 'k': K, 'dim': DIM})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
