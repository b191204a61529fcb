#!/usr/bin/env python3
"""The Ray engine against the local engine on this machine: start-up and steady
state, reported separately, measured side by side (interleaved) in one run.

    python bench/ray_engine.py                       # oxford17flowers (1,360 images), mobilenet_v2
    python bench/ray_engine.py --limit 512 --repeat 1 --shard-size 64

Both engines run the same ``sync_folder`` into a fresh temporary store: same
model (ONNX Runtime on the CPU), same model batch (``--batch-size``), same commit
unit (``--shard-size``: the local engine commits a shard as it fills, the Ray
engine adopts one part per actor call). The Ray engine starts a private local Ray
instance for every run (``address="local"``) and stops it at the end, as one
``cbir index --engine ray`` on a single machine does.

Figures per run:

* start-up s  - from the command's start (the executor created; for Ray before
  ``ray.init``) to the first committed shard;
* steady img/s - images committed after the first shard / time from the first to
  the last commit;
* total s, and for Ray the parts of its start-up: Ray init, list + hash (Ray tasks),
  embed start to first commit (Ray Data's workers, the model actor's start).

The ratio printed is Ray's steady img/s over the local engine's measured in the
same repeat. The machine's 1-minute load average is printed with every run:
this machine is shared, and a busy neighbour moves the figures more than
anything measured here. Needs the ray extra (pip install 'cbir-cli[ray]').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "oxford17flowers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images (read in place)")
    p.add_argument("--limit", type=int, default=0, help="use the first N images (0 = all)")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--repeat", type=int, default=2, help="interleaved local/ray pairs")
    p.add_argument("--address", default="local", help="Ray address (default: a private local instance per run)")
    return p.parse_args(argv)


class Timed:
    """An Executor wrapper that timestamps the phases and every commit."""

    def __init__(self, make: Any) -> None:
        self.t0 = time.perf_counter()
        self.inner = make()  # the Ray executor connects lazily, on first use
        self.marks: dict[str, float] = {}
        self.commits: list[tuple[float, int]] = []
        self.name = self.inner.name

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
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    options = ExtractOptions(batch_size=args.batch_size, shard_size=args.shard_size)
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
        summary = sync_folder(folder, store, model=args.model, options=options, executor=timed)
    finally:
        close = getattr(timed.inner, "close", None)
        if close is not None:
            close()
        shutil.rmtree(store, ignore_errors=True)
    total = time.perf_counter() - timed.t0
    # A local run's "commits" are model batches; count a shard when one fills.
    first = next(t for t, _ in _shards(timed.commits, args.shard_size))
    last = timed.commits[-1][0]
    after_first = summary.embedded - min(summary.embedded, args.shard_size)
    return {"engine": engine, "load_1min": round(load, 2), "images": summary.embedded,
            "startup_s": round(first, 2), "steady_img_s": round(after_first / max(1e-9, last - first), 1),
            "total_s": round(total, 2), "img_s_overall": round(summary.embedded / total, 1),
            **{f"{k}_s": round(v, 2) for k, v in timed.marks.items()}}


def _shards(commits: list[tuple[float, int]], shard_size: int) -> list[tuple[float, int]]:
    out, rows = [], 0
    for t, n in commits:
        rows += n
        if rows >= shard_size or (t, n) == commits[-1]:
            out.append((t, rows))
            rows = 0
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    folder = args.data
    if args.limit:
        from cbir_cli.imageio.files import list_images

        folder = Path(tempfile.mkdtemp(prefix="bench-images-"))
        for path in list_images(args.data)[:args.limit]:
            os.symlink(path, folder / path.name)
    import torch  # noqa: F401 - the local engine's DataLoader imports it: not part of either figure

    rows = []
    for repeat in range(args.repeat):
        for engine in ("local", "ray"):
            row = {"repeat": repeat, **run_once(engine, folder, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'engine':6} {'load':>5} {'start-up s':>10} {'steady img/s':>12} {'total s':>8} {'ratio':>6}")
    for local, ray in zip(rows[::2], rows[1::2]):
        for row in (local, ray):
            ratio = f"{row['steady_img_s'] / local['steady_img_s']:.2f}" if row is ray else ""
            print(f"{row['engine']:6} {row['load_1min']:5.1f} {row['startup_s']:10.2f} {row['steady_img_s']:12.1f} "
                  f"{row['total_s']:8.1f} {ratio:>6}")
    if args.limit:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
