#!/usr/bin/env python3
"""The Ray engine against the local engine on this machine: start-up and steady
state, reported separately, measured side by side (interleaved) in one run.

    python bench/ray_engine.py --data ../shared/datasets/oxford17flowers   # 340 and 1,360 images, mobilenet_v2
    python bench/ray_engine.py --sizes 256,512 --repeat 1

Both engines run the same ``sync_folder`` into a fresh temporary store: same
model (ONNX Runtime on the CPU), same model batch (``--batch-size``), same commit
unit (``--shard-size``: the local engine commits a shard as it fills, the Ray
engine adopts one part per actor call). The Ray engine starts a private local Ray
instance for every run (``address="local"``) and stops it at the end, as one
``cbir index --engine ray`` on a single machine does.

Each engine indexes the first N1 and the first N2 images (``--sizes``) into fresh
stores; the wall time of a whole run is T(N) = start-up + N / steady, so

* steady img/s = (N2 - N1) / (T(N2) - T(N1)): the marginal rate, free of every fixed
  cost (Ray's start, Ray Data's workers and the model actor's start, the model load)
  and of the decode backlog Ray builds while its actor starts;
* start-up s = T(N2) - N2 / steady: the fixed cost of a run.

An untimed local run over each folder comes first: it leaves the ONNX export and the
int8 model calibrated on that folder in the cache (``--precision``, default the
product's: int8 for mobilenet_v2 on the CPU), so no timed run pays for them.

Each run also prints its time to the first committed shard and, for Ray, when the
listing and hashing (Ray tasks, after ``ray.init``) were done. The ratio printed is
Ray's steady img/s over the local engine's, measured in the same repeat. The
machine's 1-minute load average is printed with every run: this machine is shared,
and a busy neighbour moves the figures more than anything measured here. Needs
the ray extra (pip install 'cbir-cli[ray]').
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
from bench.harness import REPO, write_result

DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "oxford17flowers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images (read in place)")
    p.add_argument("--sizes", default="340,1360", help="N1,N2: images per run (the first N of --data)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=3, help="interleaved local/ray pairs (the median is printed last)")
    p.add_argument("--address", default="local", help="Ray address (default: a private local instance per run)")
    p.add_argument("--precision", default="auto", help="auto (the product's default), fp32 or int8")
    p.add_argument("--descriptor", choices=("default", "legacy"), default="default",
                   help="default: the product's; legacy: centre crop + GAP (what issue 13 first measured)")
    return p.parse_args(argv)


class Timed:
    """An Executor wrapper that timestamps the phases and every commit."""

    def __init__(self, make: Any) -> None:
        self.t0 = time.perf_counter()
        self.inner = make()  # the Ray executor connects lazily, on first use
        self.marks: dict[str, float] = {}
        self.commits: list[tuple[float, int]] = []
        self.name = self.inner.name
        self.embeds_unhashed = self.inner.embeds_unhashed

    def list_images(self, root: Path) -> list[Path]:
        files = self.inner.list_images(root)
        self.marks["listed"] = time.perf_counter() - self.t0
        return files

    def hash_files(self, paths: Any) -> Any:
        yield from self.inner.hash_files(paths)
        self.marks["hashed"] = time.perf_counter() - self.t0

    def embed(self, items: Any, request: Any, sink: Any, on_failure: Any) -> int:
        self.marks["embed_start"] = time.perf_counter() - self.t0
        return self.inner.embed(items, request, TimedSink(sink, self), on_failure)


class TimedSink:
    def __init__(self, txn: Any, timed: Timed) -> None:
        self.txn, self.timed = txn, timed

    def _mark(self, rows: int) -> None:
        self.timed.commits.append((time.perf_counter() - self.timed.t0, rows))

    def add(self, vectors: Any, items: Any) -> None:
        self.txn.add(vectors, items)
        self._mark(len(items))

    def staging(self) -> Any:
        return self.txn.staging()

    def adopt(self, folder: Path, name: str) -> int:
        rows = self.txn.adopt(folder, name)
        self._mark(rows)
        return rows


def run_once(engine: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    options = ExtractOptions(batch_size=args.batch_size, shard_size=args.shard_size, precision=args.precision)
    descriptor = LEGACY_DESCRIPTOR if args.descriptor == "legacy" else None
    if engine == "ray":
        from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions

        def make() -> Any:
            return RayExecutor(options, RayOptions(args.address))
    else:
        def make() -> Any:
            return LocalExecutor(options)
    store = Path(tempfile.mkdtemp(prefix=f"bench-{engine}-"))
    load = os.getloadavg()[0]
    timed = Timed(make)
    try:
        summary = sync_folder(folder, store, model=args.model, options=options, executor=timed, descriptor=descriptor)
    finally:
        close = getattr(timed.inner, "close", None)
        if close is not None:
            close()
        shutil.rmtree(store, ignore_errors=True)
    total = time.perf_counter() - timed.t0
    # A local run's sink calls are model batches; a shard is committed when one fills.
    first = next(t for t, _ in _shards(timed.commits, args.shard_size))
    # Ray: parts adopted, and how many were short of a shard before the run's last
    # (each is a shard and a commit of its own; expected 0).
    parts = [rows for rows, _ in getattr(timed.inner, "parts", [])]
    shape = {"parts": len(parts), "short_parts": sum(r < args.shard_size for r in parts[:-1])} if parts else {}
    return {"engine": engine, "load_1min": round(load, 2), "images": summary.embedded,
            "first_commit_s": round(first, 2), "total_s": round(total, 2), **shape,
            **{f"{k}_s": round(v, 2) for k, v in timed.marks.items()}}


def _shards(commits: list[tuple[float, int]], shard_size: int) -> list[tuple[float, int]]:
    out, rows = [], 0
    for t, n in commits:
        rows += n
        if rows >= shard_size or (t, n) == commits[-1]:
            out.append((t, rows))
            rows = 0
    return out


def subset(data: Path, n: int) -> Path:
    """A temporary folder of symlinks to the first ``n`` images of ``data``."""
    from cbir_cli.imageio.files import list_images

    folder = Path(tempfile.mkdtemp(prefix=f"bench-images-{n}-"))
    files = list_images(data)
    if len(files) < n:
        raise SystemExit(f"{data} has {len(files)} images, fewer than {n}")
    for path in files[:n]:
        os.symlink(path, folder / path.name)
    return folder


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    n1, n2 = (int(v) for v in args.sizes.split(","))
    folders = {n: subset(args.data, n) for n in (n1, n2)}

    table = []
    try:
        # Untimed: a folder's first index makes the ONNX export and the int8 model
        # calibrated on that folder (cached, then shared by both engines); a one-time
        # cost of the folder, not of either engine's runs.
        for n in (n1, n2):
            run_once("local", folders[n], args)
        for repeat in range(args.repeat):
            for engine in ("local", "ray"):
                runs = {}
                for n in (n1, n2):
                    runs[n] = {"repeat": repeat, "n": n, **run_once(engine, folders[n], args)}
                    print(json.dumps(runs[n]), flush=True)
                steady = (n2 - n1) / max(1e-9, runs[n2]["total_s"] - runs[n1]["total_s"])
                table.append({"repeat": repeat, "engine": engine, "steady_img_s": round(steady, 1),
                              "startup_s": round(runs[n2]["total_s"] - n2 / steady, 1),
                              "first_commit_s": runs[n2]["first_commit_s"], "total_s": runs[n2]["total_s"],
                              "load_1min": runs[n2]["load_1min"]})
    finally:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{'engine':6} {'load':>5} {'start-up s':>10} {'steady img/s':>12} {'1st commit s':>12} "
          f"{'total s (' + str(n2) + ')':>14} {'ratio':>6}")
    pairs = list(zip(table[::2], table[1::2]))
    if len(pairs) > 1:
        pairs.append(tuple({"engine": f"{row['engine']}*", **{k: statistics.median(r[k] for r in table[i::2])
                                                               for k in row if k not in ("engine", "repeat")}}
                           for i, row in enumerate(pairs[0])))
    for local, ray in pairs:
        for row in (local, ray):
            ratio = f"{row['steady_img_s'] / local['steady_img_s']:.2f}" if row is ray else ""
            print(f"{row['engine']:6} {row['load_1min']:5.1f} {row['startup_s']:10.1f} {row['steady_img_s']:12.1f} "
                  f"{row['first_commit_s']:12.1f} {row['total_s']:14.1f} {ratio:>6}")
    if len(pairs) > 1:
        print("* = median over the repeats (each column on its own)")
    rows = [{**row, "ratio (steady)": f"{row['steady_img_s'] / local['steady_img_s']:.2f}" if row is ray else ""}
            for local, ray in pairs for row in (local, ray)]
    out = write_result("ray_engine", {"table": rows},
                       extra={"sizes": [n1, n2], "model": args.model, "batch_size": args.batch_size,
                              "shard_size": args.shard_size, "precision": args.precision,
                              "descriptor": args.descriptor})
    print(f"written {out}")


if __name__ == "__main__":
    main()
