#!/usr/bin/env python3
"""Re-running ``cbir index`` / ``cbir extract`` over an unchanged folder: listing,
hashing and planning only (nothing is embedded).

    python bench/rerun.py                      # 100,000 files of 4 KiB in /tmp
    python bench/rerun.py --files 20000 --size 38000

It writes N small files (random bytes named .jpg: nothing decodes them), builds a
store over them directly (random vectors of the tiny test model, real content
hashes, committed shards: what a first ``cbir extract`` leaves, without spending
an hour embedding), then times ``sync_folder`` on it:

1. the first re-run of a store without a stat cache (an older store): every file
   is read and hashed; it writes ``stat-cache.json``;
2. re-runs with the stat cache: one ``stat`` per file, no reads (best of 3);
3. the same after ``touch``-ing 1% of the files (they are hashed again).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=100_000)
    p.add_argument("--size", type=int, default=4096, help="bytes per file")
    p.add_argument("--per-folder", type=int, default=1000, help="files per sub-folder")
    return p.parse_args(argv)


def write_files(root: Path, count: int, size: int, per_folder: int) -> list[Path]:
    rng_bytes = os.urandom(size + count)  # one buffer, a different window per file
    paths = []
    for i in range(count):
        folder = root / f"d{i // per_folder:04d}"
        if i % per_folder == 0:
            folder.mkdir(parents=True)
        path = folder / f"img_{i:07d}.jpg"
        path.write_bytes(rng_bytes[i:i + size])
        paths.append(path)
    past = time.time() - 3600  # written "long ago": no racily-clean entries
    for path in paths:
        os.utime(path, (past, past))
    return paths


def build_store(store_dir: Path, paths: list[Path]) -> None:
    """A committed store holding one (random) vector per file, keyed by content."""
    import numpy as np

    from cbir_cli.models.loading import model_fingerprint
    from cbir_cli.paths import normalise_path
    from cbir_cli.pipeline.plan import hash_file
    from cbir_cli.store.feature_store import FeatureStore

    store = FeatureStore.create(store_dir, model_fingerprint("test_tiny"))
    rng = np.random.default_rng(0)
    real_dirs: dict[str, str] = {}
    for start in range(0, len(paths), 1024):
        chunk = paths[start:start + 1024]
        items = [(normalise_path(p, real_dirs), *hash_file(p)) for p in chunk]
        vectors = rng.standard_normal((len(chunk), 256), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        store.add_shard(vectors, items)
    store.commit()


def timed_rerun(folder: Path, store_dir: Path) -> tuple[float, int]:
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    started = time.perf_counter()
    summary = sync_folder(folder, store_dir, model="test_tiny", options=ExtractOptions(workers=0))
    seconds = time.perf_counter() - started
    if summary.embedded or summary.unchanged + summary.added + summary.updated != summary.files:
        raise SystemExit(f"unexpected summary: {summary}")
    return seconds, summary.updated


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-rerun-"))
    try:
        started = time.perf_counter()
        paths = write_files(scratch / "images", args.files, args.size, args.per_folder)
        build_store(scratch / "store", paths)
        print(f"{args.files} files of {args.size} bytes and their store ready in "
              f"{time.perf_counter() - started:.1f}s", flush=True)
        # Drop what the set-up left in the page cache? Not possible without root
        # privileges everywhere; the figures are for a warm page cache.
        cold, _ = timed_rerun(scratch / "images", scratch / "store")
        print(f"re-run without a stat cache (hashes every file): {cold:.2f}s", flush=True)
        warm = min(timed_rerun(scratch / "images", scratch / "store")[0] for _ in range(3))
        print(f"re-run with the stat cache (best of 3): {warm:.2f}s", flush=True)
        touched = paths[:: 100]
        for path in touched:
            os.utime(path)
        some, _ = timed_rerun(scratch / "images", scratch / "store")
        print(f"re-run after touching {len(touched)} files ({len(touched)} hashed again): {some:.2f}s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(f"{'files':>8s} {'no stat cache s':>16s} {'stat cache s':>13s} {'1% touched s':>13s} {'speed-up':>9s}")
    print(f"{args.files:8d} {cold:16.2f} {warm:13.2f} {some:13.2f} {cold / warm:8.1f}x")
    table = [{"files": args.files, "bytes per file": args.size, "no stat cache s": cold,
              "stat cache s (best of 3)": warm, "1% touched s": some, "speed-up": f"{cold / warm:.1f}x"}]
    print(f"written {write_result('rerun', {'table': table})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
