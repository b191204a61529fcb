#!/usr/bin/env python3
"""Extraction throughput: the full pipeline against the model alone, in one run.

    python -m bench.extract                                  # 256 oxford17flowers images, mobilenet_v2
    python -m bench.extract --limit 512 --runtime torch,onnx --workers 0,1,2
    python -m bench.extract --synthesize 2000 --model resnet50 --random-weights --device cuda --batch-size 256 \
        --decode cpu,gpu --workers 4,14

For every (runtime, decode, workers) combination it prints:

* model img/s   - ``embed`` on pre-made uint8 batches (no decoding at all);
* pipeline img/s - ``sync_folder`` into a fresh temporary store: list + hash files,
  JPEG decode + resize/crop, model, shard writes. ``--decode cpu``: Pillow (draft
  mode) in the decoding worker processes; ``--decode gpu``: workers only read the files,
  the main process decodes them with torchvision's ``decode_jpeg`` on the model's
  device and resizes/crops there (on a CPU model: torchvision's libjpeg, in the
  main process); ``--decode nvimgcodec``: the same with nvImageCodec's batch decoder;
* ratio         - pipeline / model (1.0 = decoding fully hidden behind compute).

Same model, same batch size and the same torch/ORT thread count for both figures;
each pipeline run gets a fresh ONNX Runtime session of the same model file (as
``cbir index`` loads one; see ``pipeline_embedder``). ``--descriptor legacy`` (the
default here) measures the centre-crop GAP input every figure of this script was
first measured with, and the only input the GPU decoder serves; ``--descriptor
default`` measures the product's default (full image at two scales, GeM): its
model-only figure then embeds the very batches the pipeline embeds, decoded
beforehand, since their shapes differ. Peak RSS (this process + worker children) is
printed at the end. Needs no faiss: only the feature store is written, no search
index.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python bench/x.py`: see bench/harness.py
from bench.harness import SHARED, peak_rss_mib, write_result

DEFAULT_DATA = SHARED / "oxford17flowers"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of images (read in place)")
    p.add_argument("--limit", type=int, default=256, help="use the first N images (0 = all)")
    p.add_argument("--synthesize", type=int, default=0, metavar="N",
                   help="instead of --data, write N synthetic 500x375 JPEGs to a temp folder first")
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights (no download needed; speed is the same)")
    p.add_argument("--runtime", default="torch,onnx",
                   help="comma list of torch, onnx, int8 (ONNX Runtime int8, calibrated on the images as "
                        "`cbir index --precision int8` does)")
    p.add_argument("--workers", default="1", help="comma list of decoding worker process counts")
    p.add_argument("--decode", default="cpu",
                   help="comma list of cpu, gpu, nvimgcodec (where JPEGs are decoded; ExtractOptions)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--descriptor", choices=("legacy", "default"), default="legacy",
                   help="legacy: centre crop + GAP (one input shape); default: the product's default descriptor")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--repeat", type=int, default=2, help="best of R interleaved runs per row")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch / ORT intra-op threads")
    p.add_argument("--gpu-decode", action="store_true",
                   help="CUDA only: also time bare batched decode_jpeg and the in-memory decode -> resize -> "
                        "model loops (per-image and batched resize; no files, no store), references for "
                        "--decode gpu")
    p.add_argument("--profile", action="store_true",
                   help="CUDA only: one --decode gpu pass with per-stage wall times and torch.profiler's top ops")
    p.add_argument("--decode-check", action="store_true",
                   help="also time single-process decode+preprocess with and without Pillow draft mode")
    return p.parse_args(argv)


def _synthesize_one(task: tuple[Path, int, tuple[int, int]]) -> Path:
    """One seeded photo-like JPEG (smooth gradients plus noise, so it compresses like a
    photo); seeded by its index, so the set does not depend on the process count."""
    import numpy as np
    from PIL import Image

    path, i, (w, h) = task
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    freq = rng.uniform(0.5, 4.0, size=(3, 2)).astype(np.float32)
    phase = rng.uniform(0, 6.28, size=3).astype(np.float32)
    img = np.stack([127 + 90 * np.sin(6.28 * (fx * xx / w + fy * yy / h) + ph)
                    for (fx, fy), ph in zip(freq, phase)], axis=-1)
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB").save(path, quality=90)
    return path


def synthesize_jpegs(folder: Path, count: int, size: tuple[int, int] = (500, 375)) -> list[Path]:
    """``count`` synthetic JPEGs, written by one process per core (~25 s per 1,000 on
    one core of the 2-core CI machine; 6,000 on 16 cores take ~10 s)."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    tasks = [(folder / f"syn_{i:05d}.jpg", i, size) for i in range(count)]
    processes = max(1, min(os.cpu_count() or 1, count // 50))
    if processes == 1:
        return [_synthesize_one(t) for t in tasks]
    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(_synthesize_one, tasks, chunksize=max(1, count // (processes * 4))))


def pick_images(args: argparse.Namespace, scratch: Path) -> Path:
    """A folder holding exactly the images to embed (symlinks: datasets are read in place)."""
    from cbir_cli.imageio.files import list_images

    if args.synthesize:
        return synthesize_jpegs(scratch / "images", args.synthesize)[0].parent
    files = list_images(args.data)
    if args.limit:
        files = files[: args.limit]
    folder = scratch / "images"
    folder.mkdir()
    for i, f in enumerate(files):
        (folder / f"{i:06d}{f.suffix.lower()}").symlink_to(f)
    return folder


def load_torch_embedder(args: argparse.Namespace):
    from cbir_cli.models.loading import load_embedder, resolve_device
    from cbir_cli.models.registry import LEGACY_DESCRIPTOR, build_classifier, get_model_config, trunk_of
    from cbir_cli.models.torch_embedder import TorchEmbedder

    device = resolve_device(args.device)
    descriptor = LEGACY_DESCRIPTOR if args.descriptor == "legacy" else None
    if not args.random_weights:
        return load_embedder(args.model, device=device, runtime="torch", descriptor=descriptor)
    config = get_model_config(args.model).with_descriptor(descriptor)
    # The embedder runs the convolutional trunk and pools its feature map itself.
    module = trunk_of(config.name, build_classifier(config.name))
    return TorchEmbedder(config, module.eval(), "random-bench", device)


def make_embedder(runtime: str, torch_embedder, scratch: Path, threads: int, folder: Path):
    if runtime == "torch":
        return torch_embedder
    from cbir_cli.models.onnx_embedder import OnnxEmbedder

    # Random-weight exports go to the scratch folder, never the user's cache.
    cache = scratch / "onnx" if torch_embedder.weights_id == "random-bench" else None
    fp32 = OnnxEmbedder.from_torch(torch_embedder, cache_dir=cache, threads=threads)
    if runtime == "onnx":
        return fp32
    from cbir_cli.imageio.files import list_images
    from cbir_cli.models.quantize import quantize_onnx, quantized_path, sample_calibration
    from cbir_cli.pipeline.local import LocalExecutor
    from cbir_cli.pipeline.options import ExtractOptions

    calibration = sample_calibration(list_images(folder), LocalExecutor(ExtractOptions(workers=0)).hash_files)
    path = quantized_path(fp32.model_path, calibration)
    if not path.is_file():
        quantize_onnx(fp32.model_path, path, calibration, fp32.config, fp32.preprocess)
    return OnnxEmbedder(fp32.config, fp32.weights_id, path, threads=threads, calibration=calibration)


def model_only_rate(embedder, n_images: int, batches: list) -> tuple[float, float]:
    """(img/s, CPU core-ms per image) of ``embed`` alone on ``batches`` (see
    :func:`premade_batches`), as many images as the pipeline's run embeds. Core-ms is
    this process's CPU time (all its threads: ORT's, torch's)."""
    embedder.embed(batches[0])  # warm-up (allocations, cudnn/oneDNN kernel choice)
    repeats = max(1, round(n_images / sum(len(b) for b in batches)))
    started, cpu_started = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for batch in batches:
            embedder.embed(batch)
    images = repeats * sum(len(b) for b in batches)
    return images / (time.perf_counter() - started), (time.process_time() - cpu_started) * 1000 / images


def premade_batches(embedder, n_images: int, batch_size: int, folder: Path) -> list:
    """When every input has one shape: one batch of random uint8 pixels (pinned on
    CUDA), the cost of a batch does not depend on its pixels. Otherwise (full image,
    several scales) exactly the batches the pipeline hands the model: the folder's
    first ``n_images`` images, preprocessed beforehand, in file order, ``batch_size``
    per batch -- the model runs once per input shape within a batch, so its cost
    depends on which images share a batch (the first batch repeated measured 6 % less
    model time than the pipeline's own batches on Oxford-17)."""
    import torch

    if not embedder.config.descriptor.one_input_shape:
        from cbir_cli.imageio.decode import load_image
        from cbir_cli.imageio.files import list_images

        inputs = [embedder.preprocess(load_image(f, draft_size=embedder.config.draft_size))
                  for f in list_images(folder)[:n_images]]
        return [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    size = embedder.config.input_size
    batch = torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    return [batch.pin_memory() if embedder.on_cuda else batch]


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the decoding workers)."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def pipeline_rate(embedder, folder: Path, store_dir: Path, workers: int, batch_size: int, device: str,
                  decode: str = "cpu") -> tuple[float, float]:
    """(img/s, CPU core-ms per image, workers included) of ``sync_folder`` into a fresh store."""
    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    shutil.rmtree(store_dir, ignore_errors=True)
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, decode=decode)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    summary = sync_folder(folder, store_dir, embedder=embedder, options=options)
    seconds = time.perf_counter() - started
    if summary.embedded != summary.files:
        print(f"  note: {summary.files - summary.embedded} files not embedded ({summary.skipped} skipped)")
    return summary.embedded / seconds, (cpu_seconds() - cpu_started) * 1000 / max(1, summary.embedded)


def decode_core_ms(embedder, folder: Path, limit: int = 200) -> float:
    """CPU core-ms per image of what a decoding worker does for one file (read,
    decode with draft, EXIF, preprocess), in this process, best of 2 passes."""
    from cbir_cli.imageio.files import list_images
    from cbir_cli.imageio.readers import ImageFolderDataset

    files = [str(f) for f in list_images(folder)[:limit]]
    dataset = ImageFolderDataset(files, embedder.preprocess, embedder.config.draft_size)
    best = float("inf")
    for _ in range(2):
        started = time.process_time()
        for i in range(len(dataset)):
            dataset[i]
        best = min(best, (time.process_time() - started) * 1000 / len(files))
    return best


def decode_rates(embedder, folder: Path, limit: int = 200) -> tuple[float, float]:
    """Single-process decode + preprocess img/s without and with Pillow draft mode."""
    from cbir_cli.imageio.decode import load_image
    from cbir_cli.imageio.files import list_images

    files = list_images(folder)[:limit]
    rates = []
    for draft in (None, embedder.config.draft_size):
        started = time.perf_counter()
        for f in files:
            embedder.preprocess(load_image(f, draft_size=draft))
        rates.append(len(files) / (time.perf_counter() - started))
    return rates[0], rates[1]


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    worker_counts = [int(w) for w in args.workers.split(",")]
    decodes = [d.strip() for d in args.decode.split(",") if d.strip()]
    scratch = Path(tempfile.mkdtemp(prefix="cbir-bench-extract-"))
    cores = usable_cores()
    rows = []
    try:
        folder = pick_images(args, scratch)
        n_images = len(list(folder.iterdir()))
        torch_embedder = load_torch_embedder(args)
        on_cpu = not torch_embedder.on_cuda
        print(f"model {args.model} ({'random' if args.random_weights else 'pretrained'} weights, "
              f"{torch_embedder.config.descriptor.label()}), "
              f"device {torch_embedder.device}, {n_images} images, batch {args.batch_size}, "
              f"{args.threads} threads, {cores} cores, torch {torch.__version__}", flush=True)
        combos = [(r, d, w) for r in runtimes for d in decodes for w in worker_counts]
        embedders = {r: make_embedder(r, torch_embedder, scratch, args.threads, folder) for r in runtimes}

        def pipeline_embedder(runtime: str):
            # A session that has not run yet, as `cbir index` has when its decoding
            # workers start: forked from a process whose ORT arena is already grown,
            # the main process pays a copy-on-write fault for every arena page it
            # writes afterwards (measured: 2-3 core-ms per image, 10 % of the run).
            if runtime == "torch":
                return embedders[runtime]
            return make_embedder(runtime, torch_embedder, scratch, args.threads, folder)

        decode_ms = [decode_core_ms(torch_embedder, folder)] if on_cpu else []
        premade: dict[str, list] = {}
        for runtime, decode, workers in combos:
            embedder = embedders[runtime]
            if runtime not in premade:
                premade[runtime] = premade_batches(embedder, n_images, args.batch_size, folder)
            # Interleaved, best of --repeat: on a shared machine the load changes
            # between runs; the figures of a row are always measured together.
            model_rates, model_ms, rates, pipeline_ms = [], [], [], []
            for _ in range(args.repeat):
                rate, core_ms = model_only_rate(embedder, n_images, premade[runtime])
                model_rates.append(rate)
                model_ms.append(core_ms)
                rate, core_ms = pipeline_rate(pipeline_embedder(runtime), folder, scratch / "store", workers,
                                              args.batch_size, args.device, decode)
                rates.append(rate)
                pipeline_ms.append(core_ms)
                if on_cpu:
                    decode_ms.append(decode_core_ms(torch_embedder, folder))
            row = Row(runtime, decode, workers, max(model_rates), max(rates), min(model_ms),
                      min(decode_ms) if on_cpu else 0.0, cores, rates, min(pipeline_ms))
            rows.append(row)
            print("  " + row.line(), flush=True)
        extra = []
        if args.decode_check:
            plain, draft = decode_rates(torch_embedder, folder)
            extra.append(f"decode+preprocess, 1 process: {plain:.1f} img/s plain, {draft:.1f} img/s with draft "
                         f"(x{draft / plain:.2f})")
        if not on_cpu:
            extra += gpu_extras(args, torch_embedder, folder, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for line in extra:
        print(line)
    self_mib, child_mib = peak_rss_mib()
    print(f"peak RSS: main process {self_mib:.0f} MiB, largest child {child_mib:.0f} MiB")
    # The table comes last: it is what a run is read (and pasted) for.
    print()
    print(Row.header(on_cpu))
    for row in rows:
        print(row.table_line(on_cpu))
    if on_cpu and rows:
        print(f"ideal = cores / (decode core-s + model core-s) per image, {cores} cores; 'at share': with the "
              "cores the model-only run really got (shared machine); goal: pipeline >= 0.9 x ideal")
    if len({r.runtime for r in rows}) > 1:
        best = {rt: max(r.model_rate for r in rows if r.runtime == rt) for rt in runtimes}
        base = best.get("torch")
        if base:
            print("model-only speed-up vs torch: " + ", ".join(f"{rt} x{v / base:.2f}" for rt, v in best.items()))
    table = [row.table_cells(on_cpu) for row in rows]
    out = write_result("extract", {"table": table, "notes": extra,
                                   "peak_rss_mib": {"main": self_mib, "largest_child": child_mib}},
                       extra={"model": args.model, "images": n_images, "batch_size": args.batch_size,
                              "threads": args.threads, "cores": cores})
    print(f"written {out}")
    return 0


@dataclass
class Row:
    """One (runtime, decode, workers) measurement: best of its repeats."""

    runtime: str
    decode: str
    workers: int
    model_rate: float
    rate: float
    model_ms: float  # CPU core-ms per image of the model alone
    decode_ms: float  # CPU core-ms per image of a worker's decode + preprocess (0 on GPU)
    cores: int
    rates: list[float]
    pipeline_ms: float  # CPU core-ms per image of the whole pipeline, workers included

    @property
    def ideal(self) -> float:
        """img/s if decoding and the model shared the cores perfectly."""
        return self.cores * 1000 / (self.decode_ms + self.model_ms)

    @property
    def ideal_at_share(self) -> float:
        """:attr:`ideal` with the cores this process really got while the model ran
        alone (model img/s x model core-s): on a machine shared with other jobs the
        nominal cores are not all ours. Equal to :attr:`ideal` on an idle machine."""
        return min(self.cores, self.model_rate * self.model_ms / 1000) * 1000 / (self.decode_ms + self.model_ms)

    def spread(self) -> str:
        return f"{min(self.rates):.1f}-{max(self.rates):.1f}"

    def line(self) -> str:
        text = (f"{self.runtime:5s} decode={self.decode} workers={self.workers}: model {self.model_rate:8.1f} img/s, "
                f"pipeline {self.rate:8.1f} img/s (runs {self.spread()}), ratio {self.rate / self.model_rate:.2f}")
        if self.decode_ms:
            text += (f"; decode {self.decode_ms:.2f} + model {self.model_ms:.2f} core-ms/img (pipeline "
                     f"{self.pipeline_ms:.2f}), ideal {self.ideal:.1f} img/s ({self.ideal_at_share:.1f} at the "
                     f"measured CPU share), pipeline/ideal {self.rate / self.ideal:.2f} "
                     f"({self.rate / self.ideal_at_share:.2f} at share)")
        return text

    @staticmethod
    def header(on_cpu: bool) -> str:
        text = (f"{'runtime':8s} {'decode':10s} {'workers':>7s} {'model img/s':>12s} {'pipeline img/s':>15s} "
                f"{'ratio':>6s}")
        if on_cpu:
            text += (f" {'decode core-ms':>14s} {'model core-ms':>13s} {'pipe core-ms':>12s} {'ideal img/s':>11s} "
                     f"{'pipe/ideal':>10s} {'at share':>8s}")
        return text

    def table_cells(self, on_cpu: bool) -> dict[str, object]:
        """The row for the result file (the docs' table): :meth:`table_line`'s columns."""
        cells: dict[str, object] = {"runtime": self.runtime, "decode": self.decode, "workers": self.workers,
                                    "model img/s": round(self.model_rate, 1), "pipeline img/s": round(self.rate, 1),
                                    "ratio": round(self.rate / self.model_rate, 2)}
        if on_cpu:
            cells.update({"decode core-ms": round(self.decode_ms, 2), "model core-ms": round(self.model_ms, 2),
                          "pipeline core-ms": round(self.pipeline_ms, 2), "ideal img/s": round(self.ideal, 1),
                          "pipeline / ideal": round(self.rate / self.ideal, 2),
                          "at share": round(self.rate / self.ideal_at_share, 2)})
        return cells

    def table_line(self, on_cpu: bool) -> str:
        text = (f"{self.runtime:8s} {self.decode:10s} {self.workers:>7d} {self.model_rate:12.1f} {self.rate:15.1f} "
                f"{self.rate / self.model_rate:6.2f}")
        if on_cpu:
            text += (f" {self.decode_ms:14.2f} {self.model_ms:13.2f} {self.pipeline_ms:12.2f} {self.ideal:11.1f} "
                     f"{self.rate / self.ideal:10.2f} {self.rate / self.ideal_at_share:8.2f}")
        return text


def gpu_extras(args: argparse.Namespace, embedder, folder: Path, scratch: Path) -> list[str]:
    """Reference figures on CUDA (bench/gpu_parts.py)."""
    from bench import gpu_parts

    lines = []
    device_decodes = [d for d in args.decode.split(",") if d.strip() in ("gpu", "nvimgcodec")] or ["gpu"]
    if args.gpu_decode:
        bare = gpu_parts.bare_decode_rate(embedder, folder, args.batch_size)
        per_image = gpu_parts.loop_rate(embedder, folder, args.batch_size, batched_resize=False)
        batched = gpu_parts.loop_rate(embedder, folder, args.batch_size, batched_resize=True)
        lines += [f"bare batched decode_jpeg on the GPU, bytes in memory: {bare:.1f} img/s",
                  f"loop, bytes in memory -> GPU decode -> per-image resize -> model: {per_image:.1f} img/s",
                  f"loop, bytes in memory -> GPU decode -> batched resize -> model: {batched:.1f} img/s"]
        if "nvimgcodec" in device_decodes:
            bare = gpu_parts.bare_decode_rate(embedder, folder, args.batch_size, "nvimgcodec")
            batched = gpu_parts.loop_rate(embedder, folder, args.batch_size, True, "nvimgcodec")
            lines += [f"bare batched nvImageCodec decode on the GPU, bytes in memory: {bare:.1f} img/s",
                      f"loop, bytes in memory -> nvImageCodec decode -> batched resize -> model: {batched:.1f} img/s"]
    if args.profile:
        workers = max(int(w) for w in args.workers.split(","))
        for decode in device_decodes:
            lines += gpu_parts.profile_pipeline(embedder, folder, scratch / "store-profile", workers,
                                                args.batch_size, args.device, decode)
    return lines


if __name__ == "__main__":
    sys.exit(main())
