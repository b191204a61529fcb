#!/usr/bin/env python3
"""Where the CPU of one ``cbir index`` run goes: per thread of the main process and
for the decoding workers, in core-ms per image, beside the same work done alone.

    python -m bench.cpu_split                       # all Oxford-17 photos, mobilenet_v2 int8, 2 workers
    python -m bench.cpu_split --precision fp32 --workers 1 --repeat 3

``bench/extract.py`` compares the pipeline with its ideal (cores / (decode + model
core-s)); this script says what the pipeline spends beyond decode + model: the
model's threads (ONNX Runtime's pool is native, so it shows as "native threads")
against the model alone on the same batches, the workers (read, decode, resize,
hand the pixels over) against decoding alone in this process, and the main process's own
Python threads (result hand-over, batching, hashing, the store writer). Threads are
sampled from /proc every 0.2 s (Linux only); their CPU is counted from the first
sample, so a thread that lives less than 0.2 s may be missed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.extract import decode_core_ms, model_only_rate, premade_batches
from bench.harness import SHARED, write_result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=SHARED / "oxford17flowers")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    return p.parse_args(argv)


class ThreadCpu:
    """CPU seconds per thread of this process, sampled from /proc/self/task."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[int, str], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)
        self._tick = os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for tid in os.listdir("/proc/self/task"):
            try:
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the thread ended
                continue
            key = (int(tid), names.get(int(tid), "native threads"))
            self.seconds[key] = (int(fields[11]) + int(fields[12])) / self._tick

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def __enter__(self) -> ThreadCpu:
        self._sample()
        self.start = dict(self.seconds)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_name(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for key, seconds in self.seconds.items():
            name = key[1].rstrip("0123456789_-") or key[1]  # Thread-3, cbir-model_0 -> one line each kind
            totals[name] = totals.get(name, 0.0) + seconds - self.start.get(key, 0.0)
        return totals


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from cbir_cli.imageio.files import list_images
    from cbir_cli.models.loading import load_embedder
    from cbir_cli.models.quantize import sample_calibration
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    files = list_images(args.data)
    calibration = None
    if args.precision == "int8":
        calibration = sample_calibration(files, LocalExecutor(ExtractOptions(workers=0)).hash_files)

    def embedder():
        return load_embedder(args.model, device="cpu", runtime="onnx", calibration=calibration)

    alone = embedder()
    batches = premade_batches(alone, len(files), args.batch_size, args.data)
    _, model_ms = model_only_rate(alone, len(files), batches)
    decode_ms = decode_core_ms(alone, args.data)
    print(f"{args.model} {args.precision}, {len(files)} images of {args.data.name}, {args.workers} workers, "
          f"batch {args.batch_size}; alone: model {model_ms:.2f}, decode {decode_ms:.2f} core-ms/img "
          f"(load {os.getloadavg()[0]:.1f})")
    scratch = Path(tempfile.mkdtemp(prefix="cbir-split-"))
    table = []
    try:
        for run in range(args.repeat):
            store = scratch / f"store-{run}"
            options = ExtractOptions(workers=args.workers, batch_size=args.batch_size)
            pipeline_embedder = embedder()  # a fresh session, as `cbir index` has
            workers_before, started = children_cpu(), time.perf_counter()
            with ThreadCpu() as threads:
                summary = sync_folder(args.data, store, embedder=pipeline_embedder, options=options)
            wall = time.perf_counter() - started
            n = max(1, summary.embedded)
            per_image = {name: s * 1000 / n for name, s in threads.by_name().items() if name != "cpu-sampler"}
            workers_ms = (children_cpu() - workers_before) * 1000 / n
            model = per_image.pop("cbir-model", 0.0) + per_image.pop("native threads", 0.0)
            total = model + workers_ms + sum(per_image.values())
            print(f"run {run + 1}: {n / wall:.1f} img/s, {total:.2f} core-ms/img in all "
                  f"(load {os.getloadavg()[0]:.1f})")
            print(f"  model thread + ONNX Runtime pool  {model:6.2f}  (alone {model_ms:.2f}: {model - model_ms:+.2f})")
            print(f"  decoding workers                  {workers_ms:6.2f}  (decode alone {decode_ms:.2f}: "
                  f"{workers_ms - decode_ms:+.2f})")
            for name, ms in sorted(per_image.items(), key=lambda kv: -kv[1]):
                if ms >= 0.005:
                    print(f"  main process: {name:19s} {ms:6.2f}")
            table.append({"run": run + 1, "img/s": round(n / wall, 1), "core-ms/img in all": round(total, 2),
                          "model thread + ORT pool": round(model, 2), "model alone": round(model_ms, 2),
                          "decoding workers": round(workers_ms, 2), "decode alone": round(decode_ms, 2),
                          "main process, other threads": round(sum(per_image.values()), 2)})
            shutil.rmtree(store, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = write_result("cpu_split", {"table": table},
                       extra={"model": args.model, "precision": args.precision, "images": len(files),
                              "workers": args.workers, "batch_size": args.batch_size})
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
