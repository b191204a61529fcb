"""The local executor: reader -> model -> sink, on this machine.

* reader: worker processes read, decode (JPEG draft mode) and preprocess images
  into uint8 arrays (:class:`~cbir_cli.imageio.readers.ImageFolderDataset`),
  overlapping with inference. With GPU decoding they only read JPEG bytes and the
  main process decodes and resizes them on the model's device
  (:mod:`cbir_cli.imageio.gpu_decode`); other formats are still decoded in the workers.
* model: batches of ``batch_size`` images go through the embedder here.
* sink: vectors go to the store's write transaction, which writes and commits shards.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.files import list_images
from ..imageio.gpu_decode import DeviceJpegDecoder, EncodedJpegDataset
from ..imageio.lifetime import exit_with_parent
from ..imageio.readers import ImageFolderDataset, ReadChunk, assemble_on_cpu, collate_for_transfer, collate_images
from .executor import EmbedRequest, FailureCallback, VectorSink
from .options import DECODE_CHOICES, ExtractOptions
from .plan import HashResult, Item, hash_one

if TYPE_CHECKING:
    import torch

    from ..models.protocol import Embedder

Batch = tuple[list[int], "torch.Tensor | None", list[tuple[int, str]]]


def resolve_decode(decode: str, embedder: Any) -> str:
    """``cpu`` or ``gpu`` for this embedder. ``gpu`` means "decode JPEGs with
    torchvision on the embedder's device": nvJPEG on CUDA; on a CPU model it is
    torchvision's libjpeg in the main process (what the tests exercise). Embedders
    without a device (hand-crafted descriptors, which run on PIL images in the
    workers) always decode on the CPU."""
    if decode not in DECODE_CHOICES:
        raise CbirError(f"unknown decode {decode!r}; choose one of: {', '.join(DECODE_CHOICES)}")
    if getattr(embedder, "device", None) is None:
        return "cpu"
    if decode == "auto":
        return "gpu" if getattr(embedder, "on_cuda", False) else "cpu"
    return decode


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; only the main process should react
    # (it commits what it has and exits cleanly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... and the main process's SIGTERM handler (the write transaction's) is not for workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    exit_with_parent()  # a SIGKILLed parent must not leave workers behind


# Images per worker task. Small tasks keep every decode worker busy and the model
# fed from the first seconds on; model batches (--batch-size) are assembled from
# them in the main process. With one task per model batch, a 2,000-image run at
# batch 256 had only 8 tasks: most of 14 workers idled (GPU check, bench/).
DECODE_CHUNK = 16


def iter_batches(paths: Sequence[str], embedder: Embedder, options: ExtractOptions) -> Iterator[Batch]:
    """Yield (indices, uint8 batch or None, failures) in input order, each batch
    holding ``options.batch_size`` decoded images (fewer at the end). With GPU
    decoding the batch is already on the embedder's device."""
    draft_size = embedder.config.resize_size
    decoder = None
    if resolve_decode(options.decode, embedder) == "gpu":
        dataset: ImageFolderDataset = EncodedJpegDataset(paths, embedder.preprocess, draft_size)
        decoder = DeviceJpegDecoder(dataset, embedder.config, embedder.device)
    else:
        dataset = ImageFolderDataset(paths, embedder.preprocess, draft_size)
    chunk = min(options.batch_size, DECODE_CHUNK)
    workers = options.workers if len(paths) > chunk else 0
    assemble = decoder.assemble if decoder is not None else assemble_on_cpu
    pending: list[ReadChunk] = []
    images = 0
    for read in _read_chunks(dataset, chunk, workers, options.batch_size, bool(getattr(embedder, "on_cuda", False))):
        pending.append(read)
        images += len(read.pixel_indices) + len(read.jpeg_indices)
        if images >= options.batch_size:
            yield assemble(pending)
            pending, images = [], 0
    if pending:
        yield assemble(pending)


def _read_chunks(dataset: ImageFolderDataset, chunk: int, workers: int, batch_size: int,
                 pin_memory: bool) -> Iterable[ReadChunk]:
    """The dataset in tasks of ``chunk`` images, in order: in this process when
    ``workers`` is 0 (no torch needed), else in torch DataLoader worker processes."""
    if workers == 0:
        for start in range(0, len(dataset), chunk):
            yield collate_images([dataset[i] for i in range(start, min(len(dataset), start + chunk))])
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(
        dataset,
        batch_size=chunk,
        num_workers=workers,
        collate_fn=collate_for_transfer,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_sigint,
        # Enough decoded tasks in flight to fill two model batches.
        prefetch_factor=max(2, -(-2 * batch_size // (chunk * workers))),
    )


class LocalExecutor:
    """The :class:`~cbir_cli.pipeline.executor.Executor` on this machine (see the module docstring)."""

    name = "local"

    def __init__(self, options: ExtractOptions) -> None:
        self.options = options

    def list_images(self, root: Path) -> list[Path]:
        return list_images(root)

    def hash_files(self, paths: Sequence[Path | str]) -> Iterable[HashResult]:
        # hashlib releases the GIL: threads overlap the reads.
        with ThreadPoolExecutor(max_workers=4) as pool:
            results: Iterable[HashResult] = pool.map(hash_one, paths)
            if self.options.progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(paths), desc="hashing", unit="file", leave=False)
            yield from results

    def embed(self, items: Sequence[Item], request: EmbedRequest, sink: VectorSink,
              on_failure: FailureCallback) -> int:
        embedder = request.load()
        bar = None
        if self.options.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=f"embedding ({embedder.config.name})", unit="img")
        embedded = 0
        try:
            for indices, batch, failed in iter_batches([p for p, _, _ in items], embedder, self.options):
                for i, reason in failed:
                    on_failure(i, reason)
                if batch is not None:
                    sink.add(embedder.embed(batch), [items[i] for i in indices])
                    embedded += len(indices)
                if bar is not None:
                    bar.update(len(indices) + len(failed))
        finally:
            if bar is not None:
                bar.close()
        return embedded
