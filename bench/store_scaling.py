#!/usr/bin/env python3
"""The feature store's write and open paths at scale: does a new shard cost the same
at 300k stored rows as at 10k, and how long does opening the store and reading its
rows take?

    python bench/store_scaling.py                       # 300k rows in 1,024-row shards (~1 min)
    python bench/store_scaling.py --rows 1000000        # a million (~4 min, ~1 GB of rows files)

Vectors are 4-d (the rows bookkeeping is what is measured here; shard bytes scale
with the dimension and are measured by bench/query.py --million). Each shard is
committed, as the write transaction does. Prints the milliseconds per shard
(add + commit) in each tenth of the run -- flat means linear, rising means every
shard pays for the rows already stored -- then open + read every row, and a
writer's lookups with and without the row catalog.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per shard (cbir index --shard-size default)")
    args = p.parse_args()

    import numpy as np

    from cbir_cli.store.feature_store import FeatureStore

    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-store-"))
    try:
        store = FeatureStore.create(scratch / "idx", {"model": "bench", "weights": "w", "dim": 4,
                                                      "preprocessing": {}})
        rng = np.random.default_rng(0)
        shards = args.rows // args.shard_rows
        tenth = max(1, shards // 10)
        started = last = time.perf_counter()
        table: list[dict[str, object]] = []
        print(f"{shards} shards of {args.shard_rows} rows")
        for k in range(shards):
            v = rng.normal(size=(args.shard_rows, 4)).astype(np.float32)
            v /= np.linalg.norm(v, axis=1, keepdims=True)
            store.add_shard(v, [(f"/photos/d{k:05d}/img_{i:05d}.jpg", f"{k:032x}{i:032x}", 40_000)
                                for i in range(args.shard_rows)])
            store.commit()
            if (k + 1) % tenth == 0:
                now = time.perf_counter()
                # What the commit wrote: its log entry (or checkpoint); a store without
                # a commit log rewrites the whole manifest.
                written = getattr(store, "last_commit_bytes", None) or (store.root / "manifest.json").stat().st_size
                per_shard = (now - last) * 1000 / tenth
                print(f"  {(k + 1) * args.shard_rows:>9,} rows stored: {per_shard:6.1f} ms per shard, "
                      f"last commit wrote {written:,} bytes", flush=True)
                table.append({"rows stored": f"{(k + 1) * args.shard_rows:,}", "ms per shard": round(per_shard, 1),
                              "last commit wrote (bytes)": written})
                last = now
        print(f"written in {time.perf_counter() - started:.1f} s")
        for _ in range(2):
            t = time.perf_counter()
            reopened = FeatureStore.open(scratch / "idx")
            rows = reopened.live_rows()
            print(f"open + read {len(rows):,} rows: {time.perf_counter() - t:.2f} s")
        catalog_figures(scratch / "idx", shards)
        print(f"written {write_result('store_scaling', {'table': table}, extra={'shard_rows': args.shard_rows})}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def catalog_figures(root: Path, shards: int) -> None:
    """A writer's run that replaces 1,000 stored paths and looks 1,000 contents up
    (pipeline/sync.py's reuse): with the in-memory index of live paths (every rows
    file read), then with the row catalog (store/row_catalog.py): its first build,
    then a later run that finds it current. Nothing is committed."""
    from cbir_cli.store.feature_store import FeatureStore

    paths = [f"/photos/d{k:05d}/img_{i:05d}.jpg" for k in range(0, shards, max(1, shards // 100)) for i in range(10)]
    shas = [f"{k:032x}{i:032x}" for k in range(0, shards, max(1, shards // 100)) for i in range(10)]
    for label, catalog in (("in-memory index", False), ("row catalog, first build", True),
                           ("row catalog, current", True)):
        t = time.perf_counter()
        store = FeatureStore.open(root)
        if catalog:
            store.attach_catalog()
        found = store.rows_by_sha(shas)
        removed = store.remove_paths(paths)
        store.release()
        print(f"writer open + {len(paths):,} path and {len(found):,} content lookups ({label}): "
              f"{time.perf_counter() - t:.2f} s (removed {removed:,})")


if __name__ == "__main__":
    main()
