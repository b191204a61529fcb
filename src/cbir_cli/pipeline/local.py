"""The local executor: reader -> model -> sink, on this machine.

* reader: worker processes read, decode (JPEG draft mode) and preprocess images
  into uint8 arrays (:class:`~cbir_cli.imageio.readers.ImageFolderDataset`,
  :func:`~cbir_cli.imageio.readers.read_chunks`), overlapping with inference.
  With GPU decoding they only read JPEG bytes and the main process decodes and
  resizes them on the model's device
  (:mod:`cbir_cli.imageio.gpu_decode`); other formats are still decoded in the workers.
* model: batches of ``batch_size`` images go through the embedder here.
* sink: vectors go to the store's write transaction, which writes and commits shards.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..imageio.files import list_images
from ..imageio.gpu_decode import DeviceJpegDecoder, EncodedJpegDataset
from ..imageio.readers import ImageFolderDataset, ReadChunk, assemble_on_cpu, read_chunks
from .executor import EmbedRequest, FailureCallback, VectorSink
from .options import DEVICE_DECODE_LIBRARIES, ExtractOptions, decode_for
from .plan import HashResult, Item, hash_one
from .writer import BackgroundWriter

if TYPE_CHECKING:
    import torch

    from ..models.protocol import Embedder

Batch = tuple[list[int], "torch.Tensor | None", list[tuple[int, str]]]


def resolve_decode(decode: str, embedder: Any) -> str:
    """``cpu``, ``gpu`` or ``nvimgcodec`` for this embedder (see
    :func:`~.options.decode_for`, which the run plan decides with too)."""
    device = getattr(embedder, "device", None)
    if device is not None and getattr(embedder, "on_cuda", False) and not str(device).startswith("cuda"):
        device = "cuda"
    return decode_for(decode, None if device is None else str(device), getattr(embedder, "config", None))


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done, then act as usual (only the
    main thread owns signal handlers; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {signum: signal.signal(signum, lambda received, _frame: caught.append(received))
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        if caught:
            signal.raise_signal(caught[0])


# Model batches handed to the model thread and not yet delivered to the sink: one
# running, one waiting, while this thread prepares the next.
BATCHES_IN_FLIGHT = 2

# Images per worker task. Small tasks keep every decode worker busy and the model
# fed from the first seconds on; model batches (--batch-size) are assembled from
# them in the main process. With one task per model batch, a 2,000-image run at
# batch 256 had only 8 tasks: most of 14 workers idled (GPU check, bench/).
DECODE_CHUNK = 16


def iter_batches(paths: Sequence[str], embedder: Embedder, options: ExtractOptions) -> Iterator[Batch]:
    """Yield (indices, uint8 batch or None, failures) in input order, each batch
    holding ``options.batch_size`` decoded images (fewer at the end). With GPU
    decoding the batch is already on the embedder's device."""
    draft_size = embedder.config.draft_size
    decoder = None
    library = DEVICE_DECODE_LIBRARIES.get(resolve_decode(options.decode, embedder))
    if library is not None:
        dataset: ImageFolderDataset = EncodedJpegDataset(paths, embedder.preprocess, draft_size)
        decoder = DeviceJpegDecoder(dataset, embedder.config, embedder.device, library)
    else:
        dataset = ImageFolderDataset(paths, embedder.preprocess, draft_size)
    chunk = min(options.batch_size, DECODE_CHUNK)
    workers = options.workers if len(paths) > chunk else 0
    assemble = decoder.assemble if decoder is not None else assemble_on_cpu
    pending: list[ReadChunk] = []
    images = 0
    # Enough tasks in flight to fill two model batches, and each worker busy.
    window = max(2 * workers, -(-2 * options.batch_size // chunk))
    for read in read_chunks(dataset, chunk, workers, window):
        pending.append(read)
        images += len(read.pixel_indices) + len(read.jpeg_indices)
        if images >= options.batch_size:
            yield assemble(pending)
            pending, images = [], 0
    if pending:
        yield assemble(pending)


class LocalExecutor:
    """The :class:`~cbir_cli.pipeline.executor.Executor` on this machine (see the module docstring)."""

    name = "local"
    embeds_unhashed = True

    def __init__(self, options: ExtractOptions) -> None:
        self.options = options

    def list_images(self, root: Path | str) -> list[Path]:
        return list_images(root)  # a folder, or a URL (imageio.sources)

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
        """The model runs in its own thread, up to :data:`BATCHES_IN_FLIGHT` batches
        behind the reader, and the store is written on another
        (:class:`~.writer.BackgroundWriter`): while the model embeds one batch, this
        thread assembles (and with GPU decoding, decodes and resizes) the next ones,
        and vectors and failures reach the sink in order. ONNX Runtime, CUDA and file
        writes release the GIL while they work."""
        from collections import deque
        from concurrent.futures import Future

        embedder = request.load()
        bar = None
        if self.options.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(items), desc=f"embedding ({embedder.config.name})", unit="img")
        embedded = 0
        pending: deque[tuple[Future[Any], list[int]]] = deque()
        writer = BackgroundWriter(sink, on_failure)

        def deliver() -> None:
            nonlocal embedded
            future, indices = pending[0]
            future.result()  # waiting may be interrupted: the batch stays pending
            with signals_deferred():  # a batch is with the writer or still pending, never lost between
                vectors = future.result()
                pending.popleft()
                writer.add(vectors, [items[i] for i in indices])
            embedded += len(indices)
            if bar is not None:
                bar.update(len(indices))

        model = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cbir-model")
        try:
            for indices, batch, failed in iter_batches([p for p, _, _ in items], embedder, self.options):
                for i, reason in failed:
                    writer.failed(i, reason)
                if bar is not None:
                    bar.update(len(failed))
                if batch is not None:
                    pending.append((model.submit(embedder.embed, batch), indices))
                while pending and (len(pending) > BATCHES_IN_FLIGHT or pending[0][0].done()):
                    deliver()
            while pending:
                deliver()
            with signals_deferred():
                writer.drain()
        except BaseException:
            # Ctrl-C or an error: what the model finished still reaches the sink
            # (and is committed by the caller); the batch it is working on is
            # abandoned. The writer finishes what it was handed before this returns,
            # whatever arrives meanwhile: the caller then writes to the store itself.
            with signals_deferred():
                try:
                    while pending and pending[0][0].done() and pending[0][0].exception() is None:
                        deliver()
                    writer.drain()
                except Exception:  # noqa: BLE001 - the error already on its way out wins
                    pass
            raise
        finally:
            writer.close()
            model.shutdown(wait=not pending, cancel_futures=True)
            if bar is not None:
                bar.close()
        return embedded
