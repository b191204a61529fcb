#!/usr/bin/env python3
"""Milvus Lite against Faiss HNSW, both through cbir's SearchBackend, in one run.

    python -m bench.milvus_backend                       # 100k x 512-d, 200 queries
    python -m bench.milvus_backend --n 20000 --queries 100

Data: seeded clustered unit vectors (1,000 centres plus noise, so nearest
neighbours mean something; uniformly random vectors are all equidistant and no
ANN index can rank them), written as a feature store of 10k-row shards in a
temporary folder. Queries: stored vectors plus a little noise.

For each backend: build time (Faiss: ``build(store, "hnsw")``; Milvus Lite:
``build`` = create the collection, upsert every vector from the shards, flush;
then the time Lite takes to build its per-segment HNSW indexes, forced with
release + load, reported separately), single-query latency p50/p95 (one search
call per query, as ``cbir query`` and the web server do) and recall@10 against
exact search. Both build HNSW with M=32, efConstruction=40 and search with
ef=64. Needs the milvus extra (pip install 'cbir-cli[milvus]').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100_000, help="vectors in the collection")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    return p.parse_args(argv)


def make_store(root: Path, n: int, dim: int) -> Any:
    import numpy as np

    from cbir_cli.store.feature_store import FeatureStore

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    store = FeatureStore.create(root, {"model": "synthetic", "weights": "none", "dim": dim, "preprocessing": {}})
    for start in range(0, n, 10_000):
        rows = min(10_000, n - start)
        x = centres[rng.integers(0, 1000, rows)] + 0.6 * rng.standard_normal((rows, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        store.add_shard(x, [(f"/img/{i:07d}.jpg", f"{i:064x}", 1) for i in range(start, start + rows)])
    store.commit()
    return store


def latencies(backend: Any, queries: Any, k: int) -> tuple[list[float], Any]:
    import numpy as np

    times, ids = [], []
    for q in queries:
        t = time.perf_counter()
        _, found = backend.search(q[None], k)
        times.append((time.perf_counter() - t) * 1000)
        ids.append(found[0])
    return times, np.stack(ids)


def summarise(name: str, build_s: float, times: list[float], ids: Any, truth: Any, k: int, **extra: Any) -> dict:
    import numpy as np

    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, truth)]))
    return {"backend": name, "build_s": round(build_s, 1), "p50_ms": round(statistics.median(times), 2),
            "p95_ms": round(float(np.percentile(times, 95)), 2), f"recall@{k}": round(recall, 3), **extra}


def main(argv: list[str] | None = None) -> None:
    import numpy as np

    from cbir_cli.search import faiss_backend, milvus_backend
    from cbir_cli.search.exact import exact_search
    from cbir_cli.search.faiss_backend import FaissBackend
    from cbir_cli.search.milvus_backend import MilvusBackend

    args = parse_args(argv)
    # Same graph for both: HNSW32, efConstruction 40, ef 64 (the backends' settings).
    assert milvus_backend.HNSW_BUILD == {"M": 32, "efConstruction": 40}
    assert faiss_backend.HNSW_EF_SEARCH == milvus_backend.HNSW_EF == 64
    work = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    print(json.dumps({"n": args.n, "dim": args.dim, "queries": args.queries, "load_1min": os.getloadavg()[0]}))
    try:
        store = make_store(work / "store", args.n, args.dim)
        vectors = store.load_vectors()
        rng = np.random.default_rng(1)
        queries = vectors[rng.choice(args.n, args.queries, replace=False)]
        queries = queries + 0.05 * rng.standard_normal(queries.shape).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        ids = np.array([r.id for r in store.live_rows()])
        truth = ids[exact_search(vectors, queries, args.k)[1]]
        del vectors

        results = []
        faiss = FaissBackend()
        t = time.perf_counter()
        faiss.build(store, "hnsw", persist=False)
        build = time.perf_counter() - t
        times, found = latencies(faiss, queries, args.k)
        results.append(summarise("faiss hnsw", build, times, found, truth, args.k))
        print(json.dumps(results[-1]), flush=True)

        milvus = MilvusBackend(str(work / "bench.db"), "bench")
        t = time.perf_counter()
        milvus.build(store, "hnsw")
        build = time.perf_counter() - t
        t = time.perf_counter()
        client = milvus.client()
        client.release_collection("bench")
        client.load_collection("bench")  # Lite builds the segments' HNSW graphs here, synchronously
        index_build = time.perf_counter() - t
        times, found = latencies(milvus, queries, args.k)
        t = time.perf_counter()
        milvus.search(queries, args.k)
        batch_ms = (time.perf_counter() - t) * 1000 / len(queries)
        results.append(summarise("milvus lite hnsw", build, times, found, truth, args.k,
                                 index_build_s=round(index_build, 1), batched_ms_per_query=round(batch_ms, 2)))
        print(json.dumps(results[-1]), flush=True)
        milvus.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'backend':18} {'build s':>8} {'p50 ms':>8} {'p95 ms':>8} {'recall@' + str(args.k):>9}")
    for r in results:
        build = f"{r['build_s']}" + (f"+{r['index_build_s']}" if "index_build_s" in r else "")
        print(f"{r['backend']:18} {build:>8} {r['p50_ms']:8.2f} {r['p95_ms']:8.2f} {r[f'recall@{args.k}']:9.3f}")
    out = write_result("milvus_backend", results, extra={"n": args.n, "dim": args.dim, "queries": args.queries,
                                                          "k": args.k})
    print(f"written {out}")


if __name__ == "__main__":
    main()
