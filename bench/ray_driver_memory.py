#!/usr/bin/env python3
"""How the Ray engine's driver memory grows with the number of files to embed.

    python -m bench.ray_driver_memory --sizes 2000,8000

For each size: a temporary tree of tiny images (in 40 sub-folders), indexed into a
new store with ``--engine ray`` (a private local instance) and the ``test_tiny``
model (after one untimed run of 200: imports); prints the peak of the driver's Python allocations during the run
(``tracemalloc``: numpy and pyarrow buffers made from Python included, Ray's
object store not) and its growth per 1,000 files. Process RSS is dominated by
imports (~400 MB) and too noisy on a shared machine to show the growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import write_result


def make_tree(root: Path, n: int) -> None:
    from PIL import Image

    for i in range(n):
        folder = root / f"d{i % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), ((i * 7) % 256, (i * 13) % 256, (i * 29) % 256)).save(folder / f"{i:06d}.png")


def run(n: int) -> dict[str, float]:
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.ray_executor import RayExecutor, RayOptions
    from cbir_cli.pipeline.sync import sync_folder

    images = Path(tempfile.mkdtemp(prefix="bench-mem-images-"))
    store = Path(tempfile.mkdtemp(prefix="bench-mem-store-"))
    try:
        make_tree(images, n)
        options = ExtractOptions(workers=0, batch_size=64, shard_size=256, progress=False)
        load = os.getloadavg()[0]
        started = time.perf_counter()
        tracemalloc.start()
        with RayExecutor(options, RayOptions("local")) as executor:
            summary = sync_folder(images, store, model="test_tiny", options=options, executor=executor)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(images, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return {"files": n, "embedded": summary.embedded, "driver_python_peak_mib": round(peak / 2**20, 2),
            "seconds": round(seconds, 1), "files_per_s": round(n / seconds, 1), "load_1min": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="2000,8000", help="files per run, comma-separated")
    sizes = [int(s) for s in p.parse_args().sizes.split(",")]
    run(200)  # untimed: Ray's and the model's imports would count as the first run's allocations
    rows = [run(n) for n in sizes]
    for row in rows:
        print(json.dumps(row), flush=True)
    if len(rows) > 1:
        grow = (rows[-1]["driver_python_peak_mib"] - rows[0]["driver_python_peak_mib"]) / (
            (rows[-1]["files"] - rows[0]["files"]) / 1000)
        print(f"driver peak growth: {grow:.3f} MiB per 1,000 files")
    growth = grow if len(rows) > 1 else None
    out = write_result("ray_driver_memory", {"table": rows, "growth_mib_per_1000_files": growth})
    print(f"written {out}")


if __name__ == "__main__":
    main()
