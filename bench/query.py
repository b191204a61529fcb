#!/usr/bin/env python3
"""Query latency, search-only latency per index type, recall@10 and memory, in one run.

    python -m bench.query                     # real index (ukbench_mini) + 10k and 100k synthetic
    python -m bench.query --sizes 10000       # quick
    python -m bench.query --skip-real --sizes "" --million   # a real 1M-row store: build + query RSS

Parts:

1. ``cbir --help`` and a cold ``cbir query`` (subprocess wall time, median of 3).
2. Warm single-query latency p50/p95 on a real index (mobilenet_v2 over
   ../shared/datasets/ukbench_mini): decode + embed + search through one long-lived
   :class:`~cbir_cli.search.searcher.Searcher`, as the web server does.
3. Search only, on seeded synthetic 2048-d unit vectors with structure (a random
   16-d subspace plus noise, so that nearest neighbours mean something; isotropic
   random vectors are all equidistant and no ANN index can rank them): for each
   index type its build time, serialized index bytes, RSS growth, single-query
   p50/p95 and recall@10 against exact search (ivfpq re-ranks a shortlist exactly
   from the vectors memory-mapped from disk, as the Searcher does from the shards).
4. ``--million``: a real feature store of 1,000,000 rows (2048-d, the same synthetic
   vectors, written shard by shard; ~8 GB in the scratch folder), then, each in a
   fresh process so its peak RSS is its own: building the saved IVF-PQ index
   (``FaissBackend.build``, what ``cbir index`` does) and answering queries through
   ``Searcher.open`` + ``search_vectors`` (single queries, p50/p95, recall@10
   against exact search computed while the vectors were written).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import SHARED, percentiles_ms, write_result

DIM = 2048
K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real-data", type=Path, default=SHARED / "ukbench_mini", help="folder indexed for part 2")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--runtime", default="auto", help="model runtime for parts 1-2 (auto, torch, onnx)")
    p.add_argument("--sizes", default="10000,100000", help="comma list of synthetic collection sizes")
    p.add_argument("--million", action="store_true", help="part 4: a 1,000,000-row store, build and query RSS")
    p.add_argument("--million-rows", type=int, default=1_000_000, help=argparse.SUPPRESS)
    p.add_argument("--types", default="flat,hnsw,ivfpq", help="index types for part 3")
    p.add_argument("--queries", type=int, default=200, help="synthetic queries per size")
    p.add_argument("--skip-real", action="store_true", help="skip parts 1 and 2")
    return p.parse_args(argv)


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------
# Parts 1 and 2: the CLI and the warm query path on a real index.


def wall_times(cmd: list[str], env: dict[str, str], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - started)
        if result.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {result.stderr.strip()[-500:]}")
    return statistics.median(times)


def real_index_part(args: argparse.Namespace, scratch: Path) -> list[str]:
    from cbir_cli.imageio.files import list_images
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import index_folder
    from cbir_cli.search.searcher import Searcher

    if not args.real_data.is_dir():
        return [f"real-index part skipped: {args.real_data} not found"]
    index_dir = scratch / "real-index"
    options = ExtractOptions(batch_size=32, device="cpu", runtime=args.runtime)
    started = time.perf_counter()
    summary = index_folder(args.real_data, index_dir, args.model, options=options, index_type="flat")
    index_seconds = time.perf_counter() - started
    files = list_images(args.real_data)

    env = {**os.environ, "CBIR_INDEX": str(index_dir)}
    cbir = [sys.executable, "-m", "cbir_cli.cli"]
    help_s = wall_times([*cbir, "--help"], env)
    cold_s = wall_times([*cbir, "query", str(files[0]), "-k", str(K), "--device", "cpu", "--runtime", args.runtime,
                         "--json"], env)

    searcher = Searcher.open(index_dir, device="cpu", runtime=args.runtime)
    searcher.search_paths([files[0]], K)  # warm-up: loads the model
    latencies = []
    for f in files[1:]:
        started = time.perf_counter()
        searcher.search_paths([f], K)
        latencies.append(time.perf_counter() - started)
    p50, p95 = percentiles_ms(latencies)
    from cbir_cli.models.loading import runtime_of

    runtime = runtime_of(searcher.embedder)
    return [
        f"real index: {summary.store_count} images of {args.real_data.name}, {args.model} ({runtime}), "
        f"indexed in {index_seconds:.1f}s",
        f"cbir --help: {help_s * 1000:.0f} ms; cold cbir query (1 image, new process): {cold_s * 1000:.0f} ms "
        "(median of 3)",
        f"warm query (decode+embed+search, {len(latencies)} queries): p50 {p50:.1f} ms, p95 {p95:.1f} ms",
    ]


# ---------------------------------------------------------------------------
# Part 3: search only, synthetic vectors.


def synthetic_vectors(n: int, seed: int, basis, chunk: int = 65536):
    """n unit vectors near a shared 16-d subspace (``basis``: (16, DIM))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        block = rng.standard_normal((m, basis.shape[0]), dtype=np.float32) @ basis
        block += 0.35 * rng.standard_normal((m, DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out


def recall_at_k(found, truth) -> float:
    return sum(len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth)) / truth.size


def single_query_latencies(search, queries) -> list[float]:
    search(queries[:1])  # warm-up
    latencies = []
    for q in queries:
        started = time.perf_counter()
        search(q[None, :])
        latencies.append(time.perf_counter() - started)
    return latencies


def synthetic_part(args: argparse.Namespace, scratch: Path) -> list[tuple]:
    import faiss
    import numpy as np

    from cbir_cli.search.exact import exact_search
    from cbir_cli.search.faiss_backend import build_index, factory_string, search_index

    sizes = [int(s) for s in args.sizes.split(",") if s]
    types = [t for t in args.types.split(",") if t]
    basis = np.random.default_rng(12345).standard_normal((16, DIM), dtype=np.float32) / 4
    queries = synthetic_vectors(args.queries, seed=999, basis=basis)
    rows = []
    for n in sizes:
        path = scratch / f"vectors-{n}.npy"
        np.save(path, synthetic_vectors(n, seed=n, basis=basis))
        # Memory-mapped, like the store's shards: pages are read as needed.
        vectors = np.load(path, mmap_mode="r")
        _, truth = exact_search(np.asarray(vectors), queries, K)
        print(f"n={n}: vectors ready", flush=True)
        for index_type in types:
            if n >= 1_000_000 and index_type == "hnsw":
                continue  # hours to build on 2 cores; not a sane choice at this size here
            rss_before = rss_mib()
            started = time.perf_counter()
            if n >= 1_000_000 and index_type == "flat":
                # An IndexFlat would copy 8 GB; a flat scan of the memory map is the same search.
                def search(q, vectors=vectors):
                    return faiss.knn(q, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
                build_s, index_bytes, label = 0.0, vectors.nbytes, "flat (scan of mmap)"
            else:
                index = build_index(vectors, index_type)
                build_s = time.perf_counter() - started
                index_bytes = len(faiss.serialize_index(index))
                exact = vectors if index_type == "ivfpq" else None

                def search(q, index=index, exact=exact):
                    return search_index(index, q, K, exact)
                reranked = ", re-ranked" if exact is not None else ""
                label = f"{index_type} ({factory_string(index_type, n, DIM)}{reranked})"
            rss_growth = rss_mib() - rss_before
            latencies = single_query_latencies(search, queries)
            p50, p95 = percentiles_ms(latencies)
            started = time.perf_counter()
            _, found = search(queries)
            batch_ms = (time.perf_counter() - started) * 1000 / len(queries)
            recall = recall_at_k(found, truth)
            rows.append((n, label, build_s, index_bytes / 2**20, rss_growth, p50, p95, batch_ms, recall))
            print(f"  {label}: build {build_s:.1f}s, p50 {p50:.2f} ms, recall@10 {recall:.3f}", flush=True)
            search = index = None  # free this index before building the next
        del vectors
        path.unlink()
    return rows


# ---------------------------------------------------------------------------
# Part 4: a real 1M-row store, building its index and querying it, RSS per process.

STORE_SHARD_ROWS = 16384  # FeatureStore.add_shard scans every stored row: few big shards keep set-up fast


def write_store(store_dir: Path, n: int, queries, basis) -> object:
    """A committed store of n synthetic rows; returns the exact top-K ids per query
    (kept as a running top-K while the shards are written: no 8 GB in memory)."""
    import hashlib

    import numpy as np

    from cbir_cli.store.feature_store import FeatureStore

    fingerprint = {"model": "resnet50", "weights": "bench-synthetic", "dim": DIM,
                   "preprocessing": {"synthetic": True}}
    store = FeatureStore.create(store_dir, fingerprint)
    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_ids = np.zeros((len(queries), K), dtype=np.int64)
    rng = np.random.default_rng(n)
    for start in range(0, n, STORE_SHARD_ROWS):
        m = min(STORE_SHARD_ROWS, n - start)
        block = rng.standard_normal((m, basis.shape[0]), dtype=np.float32) @ basis
        block += 0.35 * rng.standard_normal((m, DIM), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        rows = store.add_shard(block, [(f"/bench/photos/d{i // 1000:04d}/img_{i:07d}.jpg",
                                        hashlib.sha256(str(i).encode()).hexdigest(), 38_000 + i % 1000)
                                       for i in range(start, start + m)])
        scores = queries @ block.T
        ids = np.broadcast_to(np.array([r.id for r in rows]), scores.shape)
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, ids], axis=1)
        top = np.argsort(-all_scores, axis=1)[:, :K]
        best_scores, best_ids = np.take_along_axis(all_scores, top, 1), np.take_along_axis(all_ids, top, 1)
    store.commit()
    return best_ids


# Peak RSS of a child from /proc (VmHWM): ru_maxrss would carry over the parent's
# RSS at fork time across the exec.
PEAK = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024"

CHILD_BUILD = """
import json, sys, time
from cbir_cli.search.faiss_backend import FaissBackend, factory_string
from cbir_cli.store.feature_store import FeatureStore
store = FeatureStore.open(sys.argv[1])
started = time.perf_counter()
FaissBackend().build(store, "ivfpq")
print(json.dumps({"seconds": time.perf_counter() - started, "factory": factory_string("ivfpq", store.count, store.dim),
                  "peak_mib": """ + PEAK + """}))
"""

CHILD_QUERY = """
import json, sys, time
import numpy as np
from cbir_cli.search.searcher import Searcher
queries = np.load(sys.argv[2])
started = time.perf_counter()
searcher = Searcher.open(sys.argv[1])
opened = time.perf_counter() - started
found, latencies = [], []
searcher.search_vectors(queries[:1], k=10)
for q in queries:
    started = time.perf_counter()
    hits = searcher.search_vectors(q[None, :], k=10)[0]
    latencies.append(time.perf_counter() - started)
    found.append([h.id for h in hits])
with open("/proc/self/statm") as fh:
    rss = int(fh.read().split()[1]) * 4096 / 2**20
print(json.dumps({"open_seconds": opened, "latencies": latencies, "found": found, "rss_mib": rss,
                  "peak_mib": """ + PEAK + """, "index_type": searcher.index_type}))
"""


def run_child(code: str, *args: str) -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"child failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def million_part(args: argparse.Namespace, scratch: Path) -> list[str]:
    import numpy as np

    n = args.million_rows
    basis = np.random.default_rng(12345).standard_normal((16, DIM), dtype=np.float32) / 4
    queries = synthetic_vectors(args.queries, seed=999, basis=basis)
    started = time.perf_counter()
    truth = write_store(scratch / "store-1m", n, queries, basis)
    setup_s = time.perf_counter() - started
    print(f"{n}-row store written in {setup_s:.0f}s", flush=True)
    build = run_child(CHILD_BUILD, str(scratch / "store-1m"))
    print(f"index built: {build}", flush=True)
    np.save(scratch / "queries.npy", queries)
    lines = [f"{n:,} rows x {DIM}-d store ({disk_gib(scratch / 'store-1m'):.1f} GiB on disk, shards of "
             f"{STORE_SHARD_ROWS} rows), written in {setup_s:.0f} s",
             f"  build {build['factory']} (FaissBackend.build, fresh process): {build['seconds']:.0f} s, "
             f"peak RSS {build['peak_mib']:.0f} MiB"]
    # Twice: the first process may find the shards' pages on disk, the second in the page cache.
    for attempt in ("first", "again"):
        query = run_child(CHILD_QUERY, str(scratch / "store-1m"), str(scratch / "queries.npy"))
        p50, p95 = percentiles_ms(query["latencies"])
        recall = recall_at_k(np.asarray(query["found"]), truth)
        lines.append(f"  query, {attempt} (Searcher.open + search_vectors, fresh process, {len(query['latencies'])} "
                     f"single queries): open {query['open_seconds']:.1f} s, p50 {p50:.2f} ms, p95 {p95:.2f} ms, "
                     f"recall@10 {recall:.3f}, RSS after {query['rss_mib']:.0f} MiB, peak {query['peak_mib']:.0f} MiB "
                     f"({query['index_type']})")
    return lines


def disk_gib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**30


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-query-"))
    lines: list[str] = []
    try:
        if not args.skip_real:
            lines = real_index_part(args, scratch)
            for line in lines:
                print(line, flush=True)
        rows = synthetic_part(args, scratch)
        million = million_part(args, scratch) if args.million else []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    import faiss

    print()
    print(f"{os.cpu_count()} cores, faiss {faiss.__version__}, {args.queries} queries, k={K}, dim {DIM}")
    for line in lines:
        print(line)
    header = (f"{'n':>9s} {'index':44s} {'build s':>8s} {'index MiB':>10s} {'RSS +MiB':>9s} "
              f"{'p50 ms':>7s} {'p95 ms':>7s} {'batch ms/q':>10s} {'recall@10':>9s}")
    print(header)
    for n, label, build_s, mib, rss, p50, p95, batch_ms, recall in rows:
        print(f"{n:9d} {label:44s} {build_s:8.1f} {mib:10.1f} {rss:9.0f} {p50:7.2f} {p95:7.2f} {batch_ms:10.2f} "
              f"{recall:9.3f}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    for line in million:
        print(line)
    table = [{"n": n, "index": label, "build s": round(build_s, 1), "index MiB": round(mib, 1),
              "RSS +MiB": round(rss), "p50 ms": round(p50, 2), "p95 ms": round(p95, 2),
              "batched ms/query": round(batch_ms, 2), "recall@10": f"{recall:.3f}"}
             for n, label, build_s, mib, rss, p50, p95, batch_ms, recall in rows]
    out = write_result("query", {"table": table, "real_index": lines, "million": million},
                       extra={"queries": args.queries, "k": K, "dim": DIM})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
