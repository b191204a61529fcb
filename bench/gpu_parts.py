"""The GPU reference figures of ``bench/extract.py`` (CUDA only; imported by it).

* bare decode: batched ``decode_jpeg(device="cuda")`` of in-memory bytes, nothing
  else; the same with nvImageCodec where it is installed (``--decode nvimgcodec``);
* loops over in-memory bytes: nvJPEG decode -> resize/crop -> model, with a
  per-image resize (the 40-line loop of issue 14) and with the product's batched
  resize (:func:`cbir_cli.imageio.batched_resize.resize_crop_batch`); the batched
  one also with nvImageCodec;
* a profile of the product pipeline (``sync_folder --decode gpu``, or
  ``nvimgcodec``): where the main thread's wall time goes, stage by stage, and
  torch.profiler's top operators.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def jpeg_files(folder: Path) -> list[Path]:
    from cbir_cli.imageio.files import list_images

    return [f for f in list_images(folder) if f.suffix.lower() in (".jpg", ".jpeg")]


def _encoded(files: list[Path]) -> list[Any]:
    import torch

    return [torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8) for f in files]


def _decode(datas: list[Any], device: Any) -> list[Any]:
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)


def batch_decoder(library: str, device: Any) -> Callable[[list[Any]], list[Any]]:
    """encoded uint8 tensors -> decoded (3, H, W) tensors, with ``library``
    (torchvision or nvimgcodec: cbir_cli.imageio.gpu_decode.JPEG_LIBRARIES)."""
    if library == "nvimgcodec":
        import torch

        from cbir_cli.imageio.nvimgcodec_decode import NvImageCodecJpegDecoder

        return NvImageCodecJpegDecoder(torch.device(device))
    return lambda datas: _decode(datas, device)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():  # (the functions also run on a CPU device, for a dry run)
        torch.cuda.synchronize()


def _rate(run: Callable[[list[Any]], int], datas: list[Any], batch_size: int) -> float:
    run(datas[:batch_size])  # warm-up: nvJPEG handles, cudnn
    _synchronize()
    started = time.perf_counter()
    done = run(datas)
    _synchronize()
    return done / (time.perf_counter() - started)


def bare_decode_rate(embedder: Any, folder: Path, batch_size: int, library: str = "torchvision") -> float:
    """img/s of batched GPU decoding alone, bytes already in memory."""
    datas = _encoded(jpeg_files(folder))
    decode = batch_decoder(library, embedder.device)

    def run(items: list[Any]) -> int:
        for start in range(0, len(items), batch_size):
            decode(items[start:start + batch_size])
        return len(items)

    return _rate(run, datas, batch_size)


def loop_rate(embedder: Any, folder: Path, batch_size: int, batched_resize: bool,
              library: str = "torchvision") -> float:
    """img/s of in-memory bytes -> GPU decode -> resize/crop -> model (no files, no store)."""
    import torch
    import torchvision.transforms.v2.functional as F

    from cbir_cli.imageio.batched_resize import resize_crop_batch

    config = embedder.config
    datas = _encoded(jpeg_files(folder))
    decode = batch_decoder(library, embedder.device)

    def run(items: list[Any]) -> int:
        for start in range(0, len(items), batch_size):
            images = decode(items[start:start + batch_size])
            if batched_resize:
                batch = resize_crop_batch(images, config.resize_size, config.input_size, config.interpolation)
            else:
                batch = torch.stack([F.center_crop(F.resize(img, [config.resize_size], antialias=True),
                                                   [config.input_size]) for img in images])
            embedder.embed(batch)
        return len(items)

    return _rate(run, datas, batch_size)


@contextmanager
def stage_timers() -> Iterator[dict[str, float]]:
    """Wall seconds per pipeline stage (main thread; the model's and the writer's
    own threads apart, the writer's shown as such), by wrapping the functions that
    do each stage for the duration."""
    from cbir_cli.imageio.gpu_decode import DeviceJpegDecoder
    from cbir_cli.pipeline import local
    from cbir_cli.pipeline.statcache import StatCache
    from cbir_cli.pipeline.writer import BackgroundWriter
    from cbir_cli.store.transaction import WriteTransaction

    totals: dict[str, float] = defaultdict(float)
    patched: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - started

        patched.append((owner, name, original))
        setattr(owner, name, timed)

    def timed_chunks(*args: Any, **kwargs: Any) -> Iterator[Any]:
        chunks = original_read_chunks(*args, **kwargs)
        while True:
            started = time.perf_counter()
            chunk = next(chunks, None)
            totals["wait for worker chunks"] += time.perf_counter() - started
            if chunk is None:
                return
            yield chunk

    original_read_chunks = local.read_chunks
    patched.append((local, "read_chunks", original_read_chunks))
    local.read_chunks = timed_chunks
    wrap(StatCache, "hash_files", "list stat + hash files (before embedding)")
    wrap(DeviceJpegDecoder, "_decode", "device JPEG decoder calls")
    wrap(DeviceJpegDecoder, "resize_crop", "batched resize + crop")
    wrap(DeviceJpegDecoder, "assemble", "assemble a batch (decode + resize + stack)")
    # The store is written on the writer thread (pipeline/writer.py): its time is not
    # the main thread's; the main thread only waits when 4 writes are pending.
    wrap(WriteTransaction, "add", "writer thread: shard writes + commits")
    wrap(BackgroundWriter, "add", "hand vectors to the writer (waits if behind)")
    try:
        yield totals
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)


def profile_pipeline(embedder: Any, folder: Path, store_dir: Path, workers: int, batch_size: int,
                     device: str, decode: str = "gpu") -> list[str]:
    """One ``sync_folder`` pass (``decode``: gpu or nvimgcodec) under the stage timers
    and torch.profiler."""
    import shutil

    import torch
    from torch.profiler import ProfilerActivity, profile

    from cbir_cli.pipeline.options import ExtractOptions
    from cbir_cli.pipeline.sync import sync_folder

    shutil.rmtree(store_dir, ignore_errors=True)
    options = ExtractOptions(batch_size=batch_size, workers=workers, device=device, decode=decode)
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    with stage_timers() as totals, profile(activities=activities) as prof:
        started = time.perf_counter()
        summary = sync_folder(folder, store_dir, embedder=embedder, options=options)
        _synchronize()
        wall = time.perf_counter() - started
    lines = [f"profile: --decode {decode}, {workers} workers, {summary.embedded} images in {wall:.2f}s under the "
             f"profiler ({summary.embedded / wall:.0f} img/s); main-thread wall seconds per stage:"]
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {label:45s} {seconds:7.2f} s ({100 * seconds / wall:4.0f}%)")
    averages = prof.key_averages()
    for keys in (("self_device_time_total", "self_cuda_time_total"), ("self_cpu_time_total",)):
        for key in keys:  # torch renamed the CUDA column; either name, whichever this torch has
            try:
                table = averages.table(sort_by=key, row_limit=12, max_name_column_width=48)
            except (AttributeError, KeyError, ValueError):
                continue
            lines += [f"torch.profiler top operators by {key}:", table]
            break
    return lines
