#!/usr/bin/env python3
"""Scale simulation: does per-image work stay flat as the collection grows?

    python -m bench.scale                                # 100k, 1M, 10M rows, 32-d
    python -m bench.scale --sizes 100000,1000000         # what fits a quick run
    python -m bench.scale --sizes 100000 --dim 64 --keep /tmp/scale-stores

For each size it writes a synthetic store through the store's public write API
(``FeatureStore.create`` + ``add_shard`` in 1,024-row shards, as ``cbir index``
writes them; random unit vectors, fake paths and sha256: nothing on disk but the
store; one commit at the end) and saves its search index as
``cbir index`` does (``refresh_backend``, index type ``auto``: IVF-PQ above 50k
rows). Then, each step in a FRESH subprocess so its peak RSS (ru_maxrss) is its
own, in this order (each step sees the previous one's state):

  open+query   ``Searcher.open`` (default backend, no re-ranking) + one query
  plan         an unchanged re-run's planning: ``plan_sync`` over all N files,
               given as an in-memory listing of (path, sha256, size) -- the files
               do not exist, so the stat cache (one os.stat per file) is not in it
  first write  a writer's first run on the store (one time: it verifies every shard
               once and builds the row catalog, the derived state later runs keep
               in step; a store built by ``cbir index`` has it already)
  commit       a writer (``write_transaction``, as ``cbir index``) adds one
               1,024-row shard and commits: the steady per-commit cost
  update       what ``cbir index`` does after planning, for 1,000 new images and
               1,000 removed ones: a write transaction (``begin`` verifies what it
               builds on), ``embed_plan`` with a fake executor (random unit
               vectors: no model), the removals, the commit, then the search-index
               upkeep (``refresh_backend``; DBA off: see --dba)
               -- ``--updates`` rounds (5), each adding and removing other images, in
               its own process; the table shows the median and the slowest round
               (what is paid once in a while: a checkpoint, a merge of index segments)
  reopen       ``Searcher.open`` + one query after the updates

and the bytes on disk. Prints a table and, per figure, the growth ratio between
the two largest sizes (1M -> 10M with the defaults): 10x rows would be 10x
cost for work linear in N, 1x for work independent of it.

Dimension: row bookkeeping (manifest, rows files, planning, commit) does not
depend on it; shard bytes, shard hashing and the index's vectors scale linearly
with it (2048-d is 64x the 32-d default), and so does the IVF-PQ code size
(dim/16 bytes per vector, at least 32 sub-quantizers' worth: see
``faiss_backend.factory_string``).

The result (machine, load, versions, command, figures) is written as JSON under
bench/results/ by ``bench.harness.write_result``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import load_average, write_result

FINGERPRINT_MODEL = "bench-scale"
NEW_SHARD = 1024
CHURN = 1000
FILES_PER_FOLDER = 1000
STEPS = ("generate", "open+query", "plan", "first write", "commit", "update", "reopen")


def fingerprint(dim: int) -> dict[str, Any]:
    return {"model": FINGERPRINT_MODEL, "weights": "synthetic", "dim": dim, "preprocessing": {}}


def fake_path(i: int) -> str:
    return f"/synthetic/images/d{i // FILES_PER_FOLDER:06d}/img_{i:09d}.jpg"


def fake_sha(i: int) -> str:
    return f"{i:064x}"


def unit_vectors(rng: Any, n: int, dim: int) -> Any:
    import numpy as np

    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


# ---------------------------------------------------------------------------
# Steps (each runs in its own process: `scale.py --step NAME --root R ...`).


def step_generate(root: Path, n: int, dim: int, shard_rows: int) -> dict[str, Any]:
    import numpy as np

    from cbir_cli.search.backends import refresh_backend
    from cbir_cli.search.dba import DbaSettings
    from cbir_cli.store.feature_store import FeatureStore

    rng = np.random.default_rng(0)
    t = time.perf_counter()
    store = FeatureStore.create(root, fingerprint(dim))
    for start in range(0, n, shard_rows):
        stop = min(n, start + shard_rows)
        store.add_shard(unit_vectors(rng, stop - start, dim),
                        [(fake_path(i), fake_sha(i), 40_000) for i in range(start, stop)])
    store.commit()
    written = time.perf_counter() - t
    t = time.perf_counter()
    refresh_backend(store, "auto", dba=DbaSettings(depth=0))
    return {"write_s": written, "index_s": time.perf_counter() - t}


def step_open_query(root: Path, dim: int) -> dict[str, Any]:
    import numpy as np

    from cbir_cli.search.searcher import Searcher

    t = time.perf_counter()
    searcher = Searcher.open(root)
    opened = time.perf_counter() - t
    query = unit_vectors(np.random.default_rng(1), 1, dim)
    t = time.perf_counter()
    hits = searcher.search_vectors(query, k=10)
    return {"open_s": opened, "query_s": time.perf_counter() - t, "hits": len(hits[0]),
            "index_type": searcher.index_type}


def step_plan(root: Path, n: int) -> dict[str, Any]:
    from cbir_cli.pipeline.plan import HashResult, plan_sync
    from cbir_cli.store.feature_store import FeatureStore

    t = time.perf_counter()
    store = FeatureStore.open(root)
    listing = (HashResult(fake_path(i), fake_sha(i), 40_000) for i in range(n))
    plan = plan_sync(store, Path("/synthetic/images"), listing)
    seconds = time.perf_counter() - t
    return {"plan_s": seconds, "files_per_s": n / seconds, "unchanged": plan.unchanged,
            "todo": len(plan.todo), "removed": len(plan.removed)}


def step_first_write(root: Path, dim: int) -> dict[str, Any]:
    from cbir_cli.store.transaction import write_transaction

    t = time.perf_counter()
    with write_transaction(root) as txn:
        txn.begin(fingerprint(dim))
    return {"first_write_s": time.perf_counter() - t}


def step_commit(root: Path, n: int, dim: int) -> dict[str, Any]:
    import numpy as np

    from cbir_cli.store.transaction import write_transaction

    vectors = unit_vectors(np.random.default_rng(2), NEW_SHARD, dim)
    first = 2 * n  # new paths, beyond anything generated
    items = [(fake_path(first + i), fake_sha(first + i), 40_000) for i in range(NEW_SHARD)]
    t = time.perf_counter()
    with write_transaction(root, shard_size=NEW_SHARD) as txn:
        txn.begin(fingerprint(dim))
        opened = time.perf_counter() - t
        t = time.perf_counter()
        txn.add(vectors, items)  # a full shard: written and committed here
        committed = time.perf_counter() - t
        entry_bytes = txn.store.last_commit_bytes  # this commit's log entry (the run's end checkpoints)
    return {"open_s": opened, "commit_s": committed, "commit_bytes": entry_bytes}


class FakeExecutor:
    """Embeds by returning random unit vectors: the pipeline without a model."""

    name = "fake"
    embeds_unhashed = False

    def __init__(self, dim: int) -> None:
        import numpy as np

        self.dim, self.rng = dim, np.random.default_rng(3)

    def embed(self, items: Any, request: Any, sink: Any, on_failure: Any) -> int:
        sink.add(unit_vectors(self.rng, len(items), self.dim), list(items))
        return len(items)


def step_update(root: Path, n: int, dim: int, dba: bool, round_: int = 0) -> dict[str, Any]:
    from cbir_cli.pipeline.executor import EmbedRequest
    from cbir_cli.pipeline.options import ExtractSummary
    from cbir_cli.pipeline.plan import Plan
    from cbir_cli.pipeline.sync import embed_plan
    from cbir_cli.search.backends import refresh_backend
    from cbir_cli.search.dba import DbaSettings
    from cbir_cli.store.transaction import write_transaction

    first = 3 * n + round_ * CHURN  # each round adds new paths and removes others
    todo = [(fake_path(first + i), fake_sha(first + i), 40_000) for i in range(CHURN)]
    removed = [fake_path(i) for i in range(round_, n, max(1, n // CHURN))][:CHURN]
    plan = Plan(todo, set(), removed, n - CHURN, [], [])
    summary = ExtractSummary()
    times: dict[str, float] = {}
    t0 = t = time.perf_counter()
    with write_transaction(root) as txn:
        store = txn.begin(fingerprint(dim))
        times["begin_s"] = time.perf_counter() - t
        t = time.perf_counter()
        embed_plan(plan, txn, FakeExecutor(dim), EmbedRequest(FINGERPRINT_MODEL), summary,
                   lambda path, reason: None)
        summary.removed += txn.remove_paths(plan.removed)
        times["write_s"] = time.perf_counter() - t
        t = time.perf_counter()
    times["commit_s"] = time.perf_counter() - t
    t = time.perf_counter()
    refresh_backend(store, None, dba=None if dba else DbaSettings(depth=0))
    times["index_upkeep_s"] = time.perf_counter() - t
    times["update_s"] = time.perf_counter() - t0
    return {**times, "removed": summary.removed, "embedded": summary.embedded, "count": store.count}


def disk_bytes(root: Path) -> dict[str, int]:
    out = {"shard_vectors": 0, "rows_files": 0, "manifest": 0, "search_index": 0, "other": 0}
    for folder, _, files in os.walk(root):
        for name in files:
            size = (Path(folder) / name).stat().st_size
            if name.endswith(".npy") and "shards" in folder:
                out["shard_vectors"] += size
            elif name.endswith(".rows.json"):
                out["rows_files"] += size
            elif name == "manifest.json":
                out["manifest"] += size
            elif "index" in Path(folder).name and folder != str(root):
                out["search_index"] += size
            else:
                out["other"] += size
    out["total"] = sum(out.values())
    return out


def run_step(args: argparse.Namespace) -> None:
    root, n, dim = Path(args.root), args.rows, args.dim
    if args.step == "generate":
        figures = step_generate(root, n, dim, args.shard_rows)
    elif args.step in ("open+query", "reopen"):
        figures = step_open_query(root, dim)
    elif args.step == "plan":
        figures = step_plan(root, n)
    elif args.step == "first write":
        figures = step_first_write(root, dim)
    elif args.step == "commit":
        figures = step_commit(root, n, dim)
    else:
        figures = step_update(root, n, dim, args.dba, args.round)
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(figures))


# ---------------------------------------------------------------------------
# The driver.


def in_subprocess(step: str, root: Path, n: int, args: argparse.Namespace, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--step", step, "--root", str(root), "--rows", str(n), "--dim", str(args.dim),
           "--shard-rows", str(args.shard_rows), "--round", str(getattr(args, "round", 0) or 0)] + \
        (["--dba"] if args.dba else [])
    t = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["process_s"] = time.perf_counter() - t
    return figures


def update_rounds(root: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """``--updates`` update steps, each in its own process: the median of each
    figure, and every round's figures under ``rounds``."""
    import statistics

    rounds = []
    for round_ in range(args.first_round, args.first_round + max(1, args.updates)):
        args.round = round_
        rounds.append(in_subprocess("update", root, n, args, args.timeout))
    args.round = 0
    done = [r for r in rounds if "error" not in r]
    if not done:
        return rounds[0]
    keys = [k for k, v in done[0].items() if isinstance(v, (int, float))]
    return {**{k: statistics.median(r[k] for r in done) for k in keys},
            "update_s_max": max(r["update_s"] for r in done), "rounds": rounds}


# (label, step, key, unit): the figures printed and compared across sizes.
FIGURES = [
    ("generate: write store", "generate", "write_s", "s"),
    ("generate: build index", "generate", "index_s", "s"),
    ("generate: peak RSS", "generate", "peak_rss_mib", "MiB"),
    ("open Searcher", "open+query", "open_s", "s"),
    ("one query", "open+query", "query_s", "s"),
    ("open+query: peak RSS", "open+query", "peak_rss_mib", "MiB"),
    ("plan unchanged re-run", "plan", "plan_s", "s"),
    ("plan: files/s", "plan", "files_per_s", "/s"),
    ("plan: peak RSS", "plan", "peak_rss_mib", "MiB"),
    ("first write (one time)", "first write", "first_write_s", "s"),
    ("first write: peak RSS", "first write", "peak_rss_mib", "MiB"),
    ("commit: writer open (begin)", "commit", "open_s", "s"),
    ("commit: add 1,024-row shard + commit", "commit", "commit_s", "s"),
    ("commit: bytes written to the log", "commit", "commit_bytes", "B"),
    ("commit: peak RSS", "commit", "peak_rss_mib", "MiB"),
    ("update: txn begin (verify)", "update", "begin_s", "s"),
    ("update: embed_plan + removals", "update", "write_s", "s"),
    ("update: commit", "update", "commit_s", "s"),
    ("update: index upkeep", "update", "index_upkeep_s", "s"),
    ("update: +1,000/-1,000 total (median)", "update", "update_s", "s"),
    ("update: +1,000/-1,000 total (slowest)", "update", "update_s_max", "s"),
    ("update: peak RSS", "update", "peak_rss_mib", "MiB"),
    ("reopen Searcher", "reopen", "open_s", "s"),
    ("reopen: one query", "reopen", "query_s", "s"),
    ("reopen: peak RSS", "reopen", "peak_rss_mib", "MiB"),
    ("disk: shard vectors", "disk", "shard_vectors", "MiB"),
    ("disk: rows files", "disk", "rows_files", "MiB"),
    ("disk: manifest", "disk", "manifest", "MiB"),
    ("disk: search index", "disk", "search_index", "MiB"),
    ("disk: total", "disk", "total", "MiB"),
]
# Figures that grow with the vector dimension (the rest are row bookkeeping).
DIM_BOUND = {"first write (one time)", "disk: shard vectors", "disk: search index", "disk: total",
             "generate: write store", "generate: build index", "update: txn begin (verify)", "update: index upkeep",
             "one query"}


def value(results: dict[str, Any], step: str, key: str) -> float | None:
    got = results.get(step, {}).get(key)
    if got is None:
        return None
    return got / 2**20 if step == "disk" else float(got)


def print_table(sizes: list[int], per_size: dict[int, dict[str, Any]], dim: int) -> dict[str, float]:
    head = f"{'figure':40s}" + "".join(f"{n:>14,}" for n in sizes)
    ratios: dict[str, float] = {}
    last_two = sizes[-2:] if len(sizes) >= 2 else []
    if last_two:
        head += f"  {f'{last_two[0] // 1000:,}k->{last_two[1] // 1000:,}k':>12s}"
    print(head)
    for label, step, key, unit in FIGURES:
        cells = [value(per_size[n], step, key) for n in sizes]
        line = f"{label + ' (' + unit + ')':40s}"
        for c in cells:
            line += f"{'-':>14s}" if c is None else f"{c:>14.3f}" if c < 100 else f"{c:>14,.0f}"
        if last_two:
            a, b = value(per_size[last_two[0]], step, key), value(per_size[last_two[1]], step, key)
            if a and b:
                ratios[label] = b / a
                line += f"  {b / a:>11.2f}x"
        if label in DIM_BOUND:
            line += "  [x dim]"
        print(line)
    for n in sizes:
        for step in STEPS:
            if "error" in per_size[n].get(step, {}):
                print(f"{n:,} rows, {step}: {per_size[n][step]['error']}")
    print(f"\n[x dim]: grows linearly with the vector dimension (here {dim}; 2048-d is {2048 / dim:.0f}x these "
          "bytes and hashing/reading seconds); the other figures are row bookkeeping, independent of it.")
    if last_two:
        print(f"growth ratio: {last_two[0]:,} -> {last_two[1]:,} rows ({last_two[1] / last_two[0]:.0f}x rows); "
              "1.0x = independent of the collection size.")
    return ratios


def table_rows(sizes: list[int], per_size: dict[int, dict[str, Any]]) -> list[dict[str, str]]:
    """The printed table as rows (column -> text) for the docs (:mod:`bench.tables`)."""
    rows = []
    for label, step, key, unit in FIGURES:
        row = {"figure": f"{label} ({unit})"}
        cells = [value(per_size[n], step, key) for n in sizes]
        for n, c in zip(sizes, cells):
            row[f"{n:,}"] = "-" if c is None else f"{c:.3f}" if c < 100 else f"{c:,.0f}"
        if len(sizes) >= 2 and cells[-2] and cells[-1]:
            row["growth"] = f"{cells[-1] / cells[-2]:.2f}x" + (" [x dim]" if label in DIM_BOUND else "")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="100000,1000000,10000000", help="comma list of collection sizes (rows)")
    p.add_argument("--dim", type=int, default=32, help="vector dimension (see above for what scales with it)")
    p.add_argument("--shard-rows", type=int, default=1024, help="rows per generated shard (cbir index writes 1,024)")
    p.add_argument("--dba", action="store_true", help="include DBA in the update's index upkeep (slow: "
                   "it searches every vector today)")
    p.add_argument("--keep", type=Path, help="write the stores here and keep them (default: a temp folder, removed)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per step before it is given up")
    p.add_argument("--out", type=Path, help="result JSON (default: bench/results/scale-<time>.json)")
    p.add_argument("--updates", type=int, default=5, help="update rounds per size (each adds and removes "
                   "other images); the table shows their median, the result file each round: costs paid "
                   "once in a while (a checkpoint, a merge of index segments) show as the spread")
    p.add_argument("--only", help="comma list of steps to run again on the stores kept by an earlier --keep "
                   "run (same --keep, no generate): e.g. 'update,reopen' on a quieter machine")
    p.add_argument("--first-round", type=int, default=0, help="with --only update: the first update round's "
                   "number (rounds add and remove other images than earlier rounds did)")
    p.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        run_step(args)
        return

    sizes = [int(s) for s in args.sizes.split(",") if s]
    scratch = args.keep or Path(tempfile.mkdtemp(prefix="cbir-bench-scale-"))
    load_start = load_average()
    per_size: dict[int, dict[str, Any]] = {}
    only = [s for s in (args.only or "").split(",") if s]
    if only and (not args.keep or any(s not in STEPS or s == "generate" for s in only)):
        p.error("--only takes steps other than generate, with the --keep folder of an earlier run")
    try:
        for n in sizes:
            root = scratch / f"store-{n}"
            if not only:
                shutil.rmtree(root, ignore_errors=True)
            elif not (root / "manifest.json").exists():
                p.error(f"{root}: no store kept there (run once with --keep {scratch})")
            results: dict[str, Any] = {}
            for step in (only or STEPS):
                print(f"[{time.strftime('%H:%M:%S')}] {n:,} rows: {step}", file=sys.stderr, flush=True)
                if step == "update":
                    results[step] = update_rounds(root, n, args)
                    continue
                results[step] = in_subprocess(step, root, n, args, args.timeout)
                if step == "generate" and "error" in results[step]:
                    break
                if step == "generate":
                    results["disk_generated"] = disk_bytes(root)
            results["disk"] = disk_bytes(root)
            per_size[n] = results
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    ratios = print_table(sizes, per_size, args.dim)
    figures: dict[str, Any] = {str(n): r for n, r in per_size.items()}
    out = write_result("scale", {**figures, "table": table_rows(sizes, per_size)}, out=args.out,
                       extra={"load_start": load_start, "dim": args.dim, "sizes": sizes,
                              "growth_ratio_last_two": ratios})
    print(f"written {out}")


if __name__ == "__main__":
    main()
