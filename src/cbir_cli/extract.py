"""Folder -> feature store, in three stages (reader -> model -> writer), incremental.

* plan: list the folder, hash every file's content, compare with the store: new,
  changed, unchanged, removed; a known-bad unchanged file is not decoded again.
* reader: worker processes read, decode (JPEG draft mode) and preprocess images
  into uint8 tensors (:class:`ImageFolderDataset`), overlapping with inference.
  With ``--decode gpu`` they only read JPEG bytes (:class:`EncodedJpegDataset`) and
  the main process decodes and resizes them on the model's device
  (:class:`DeviceJpegDecoder`); other formats are still decoded in the workers.
* model -> writer: batches are embedded, buffered and written as shards; every
  shard is committed to the manifest, so an interrupted run loses at most one
  shard of work and the next run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .errors import CbirError, ImageError, IndexNotFoundError
from .images import MAX_IMAGE_PIXELS, decode_image, display_path, list_images, load_image, read_image_bytes
from .locking import writer_lock
from .models import DEFAULT_MODEL, Embedder, load_embedder, model_fingerprint
from .store import FeatureStore

if TYPE_CHECKING:
    import numpy as np
    import torch

SkipCallback = Callable[[str, str], None]


def default_workers() -> int:
    """Decoding processes: cores - 1 (one core feeds the model), at most 8. On a
    16-core H200 machine (bench/gpu_check.sh, 20,000 JPEGs, nvJPEG decode) 4 workers
    gave 2,637 img/s, 8 gave 2,957 and 15 gave 2,909: more than 8 buys nothing."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


@dataclass
class ExtractOptions:
    """How to run the embedding (not *what* to embed)."""

    batch_size: int = 32
    workers: int = field(default_factory=default_workers)
    shard_size: int = 1024
    device: str = "auto"
    progress: bool = False
    # torch | onnx | auto (ONNX Runtime on CPU, PyTorch on CUDA; see runtime_onnx).
    runtime: str = "auto"
    # Where JPEGs are decoded: cpu (Pillow, in the workers), gpu (torchvision's
    # decode_jpeg on the model's device, nvJPEG on CUDA) or auto (gpu when the model
    # runs on CUDA). See resolve_decode.
    decode: str = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CbirError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.workers < 0:
            raise CbirError(f"--workers must be >= 0 (got {self.workers})")
        if self.shard_size < 1:
            raise CbirError(f"--shard-size must be >= 1 (got {self.shard_size})")
        if self.decode not in DECODE_CHOICES:
            raise CbirError(f"unknown --decode {self.decode!r}; choose one of: {', '.join(DECODE_CHOICES)}")


DECODE_CHOICES = ("auto", "cpu", "gpu")


def resolve_decode(decode: str, embedder: Any) -> str:
    """``cpu`` or ``gpu`` for this embedder. ``gpu`` means "decode JPEGs with
    torchvision on the embedder's device": nvJPEG on CUDA; on a CPU model it is
    torchvision's libjpeg in the main process (what the tests exercise). Embedders
    without a device (hand-crafted descriptors, which run on PIL images in the
    workers) always decode on the CPU."""
    if decode not in DECODE_CHOICES:
        raise CbirError(f"unknown --decode {decode!r}; choose one of: {', '.join(DECODE_CHOICES)}")
    if getattr(embedder, "device", None) is None:
        return "cpu"
    if decode == "auto":
        return "gpu" if getattr(embedder, "on_cuda", False) else "cpu"
    return decode


@dataclass
class ExtractSummary:
    files: int = 0
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    reused: int = 0  # new paths whose content was already stored (moved/copied files)
    skipped: int = 0
    embedded: int = 0  # images that went through the model
    seconds: float = 0.0
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    store_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Interrupted(CbirError):
    exit_code = 130


# ---------------------------------------------------------------------------
# Stage 1: plan.


class NotAFileError(OSError):
    """A FIFO, socket or device named like an image: reading it could block forever."""


def hash_file(path: Path) -> tuple[str, int]:
    """sha256 of the content and its size (OSError propagates). Opened non-blocking
    and checked to be a regular file first, so a named pipe called ``x.jpg`` is
    refused instead of hanging the run."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotAFileError("not a regular file (pipe, socket or device)")
        digest = hashlib.sha256()
        size = 0
        while block := fh.read(1 << 20):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


@dataclass
class Plan:
    todo: list[tuple[str, str, int]]  # (path, sha256, size) to embed or reuse
    replaced: set[str]  # paths in todo whose stored version changed
    removed: list[str]
    unchanged: int
    known_bad: list[tuple[str, str]]
    unreadable: list[tuple[str, str]]


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def plan_sync(store: FeatureStore, root: Path | None, files: Sequence[Path], progress: bool = False) -> Plan:
    """Compare ``files`` with the store by content hash. Stored paths below ``root``
    that are not in ``files`` are planned for removal; ``root=None`` removes nothing
    (a cache over an explicit list of files, as ``cbir evaluate`` keeps)."""
    stored = store.rows_by_path()
    skipped = store.manifest["skipped"]
    todo, replaced, known_bad, unreadable = [], set(), [], []
    unchanged = 0

    def hash_one(p: Path) -> tuple[str, str | None, int, str | None]:
        try:
            sha, size = hash_file(p)
            return str(p), sha, size, None
        except NotAFileError as exc:
            return str(p), None, 0, str(exc)
        except OSError as exc:
            from .images import _oserror_reason

            return str(p), None, 0, _oserror_reason(exc)

    # hashlib releases the GIL: threads overlap the reads.
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(hash_one, files)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(files), desc="hashing", unit="file", leave=False)
        for path, sha, size, error in results:
            if error is not None:
                unreadable.append((path, error))
                continue
            row = stored.get(path)
            if row is not None and row.sha256 == sha:
                unchanged += 1
                continue
            bad = skipped.get(path)
            if row is None and bad is not None and bad["sha256"] == sha:
                known_bad.append((path, bad["reason"]))
                continue
            todo.append((path, sha, size))
            if row is not None:
                replaced.add(path)
    removed: list[str] = []
    if root is not None:
        present = {str(p) for p in files}
        root_s = str(root)
        removed = [p for p in stored if _under(p, root_s) and p not in present]
        store.forget_skipped([p for p in list(skipped) if _under(p, root_s) and p not in present])
    return Plan(todo, replaced, removed, unchanged, known_bad, unreadable)


# ---------------------------------------------------------------------------
# Stage 2: reader.


Pixels = Any  # uint8 (3, H, W) numpy array or tensor, as the embedder's preprocess returns it


def _pixels_or_reason(load: Callable[[], Pixels]) -> Pixels | str:
    """Run one image's decode + preprocess; a failure becomes its one-line reason."""
    try:
        return load()
    except ImageError as exc:
        return exc.reason
    except Exception as exc:  # a decoder bug must not kill a 100k-image run
        return f"cannot decode: {type(exc).__name__}: {exc}"


class ImageFolderDataset:
    """Map-style dataset: index -> (index, uint8 pixels) or (index, failure reason)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Any], Pixels], draft_size: int | None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, _pixels_or_reason(lambda: self.preprocess(load_image(self.paths[i], draft_size=self.draft_size)))

    def decode_on_cpu(self, i: int, data: bytes) -> Pixels:
        """What the CPU path does with file ``i`` whose bytes are ``data``."""
        return self.preprocess(decode_image(data, display_path(self.paths[i]), self.draft_size))


JPEG_MAGIC = b"\xff\xd8\xff"
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112


class EncodedJpeg(NamedTuple):
    data: bytes
    orientation: int  # EXIF orientation, 1 = upright


def device_jpeg(data: bytes) -> EncodedJpeg | None:
    """The JPEG for the device decoder, or None when the file should take the CPU path.

    It needs JPEG magic bytes, a header Pillow parses (only the header: cheap),
    colour RGB/YCbCr or grey, no more pixels than ``MAX_IMAGE_PIXELS`` and the
    end-of-image marker last. Everything else (PNG, CMYK JPEGs, oversized or broken
    headers, truncated files, data after the image) takes the CPU path, which
    decodes it or refuses it with the usual reason: the decompression-bomb rule is
    the same on both paths, and so is the verdict on a truncated file, which nvJPEG
    would decode without complaint (grey where data is missing).

    The EXIF orientation is read here because nvJPEG ignores it (torchvision's
    ``apply_exif_orientation`` works on the CPU decoder only, as of 0.26)."""
    import io
    import warnings

    from PIL import Image

    if not data.startswith(JPEG_MAGIC) or not data.endswith(JPEG_END):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if img.format != "JPEG" or img.mode not in ("RGB", "L") or width * height > MAX_IMAGE_PIXELS:
                    return None
                orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # the CPU path reports why
        return None
    return EncodedJpeg(data, orientation if orientation in range(1, 9) else 1)


def apply_exif_orientation(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> upright, as ``PIL.ImageOps.exif_transpose`` does."""
    import torch

    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, (-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, (-2, -1))
    return image


class EncodedJpegDataset(ImageFolderDataset):
    """For decoding on the device: index -> (index, :class:`EncodedJpeg`) for JPEGs,
    else what :class:`ImageFolderDataset` gives (pixels decoded here, or a reason)."""

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            data = read_image_bytes(self.paths[i])
        except ImageError as exc:
            return i, exc.reason
        jpeg = device_jpeg(data)
        if jpeg is not None:
            return i, jpeg
        return i, _pixels_or_reason(lambda: self.decode_on_cpu(i, data))


class ReadChunk(NamedTuple):
    """One worker task's output: decoded pixels, encoded JPEGs and failures, by index."""

    pixel_indices: list[int]
    pixels: torch.Tensor | None  # uint8 (n, 3, S, S)
    jpeg_indices: list[int]
    jpeg_bytes: torch.Tensor | None  # the JPEG files, concatenated (one transfer, not n)
    jpeg_sizes: list[int]
    jpeg_orientations: list[int]
    failures: list[tuple[int, str]]


def collate_images(items: list[tuple[int, Any]]) -> ReadChunk:
    import torch

    from .models import stack_pixels

    pixels = [(i, t) for i, t in items if not isinstance(t, (str, EncodedJpeg))]
    jpegs = [(i, t) for i, t in items if isinstance(t, EncodedJpeg)]
    failed = [(i, t) for i, t in items if isinstance(t, str)]
    encoded = torch.frombuffer(bytearray(b"".join(t.data for _, t in jpegs)), dtype=torch.uint8) if jpegs else None
    return ReadChunk([i for i, _ in pixels], stack_pixels([t for _, t in pixels]) if pixels else None,
                     [i for i, _ in jpegs], encoded, [len(t.data) for _, t in jpegs],
                     [t.orientation for _, t in jpegs], failed)


def _stack_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """torch.stack, except on the CPU: decode_jpeg returns permuted HWC views there,
    and torch's strided uint8 copy is ~100x slower than numpy's (see stack_pixels)."""
    import torch

    from .models import stack_pixels

    return stack_pixels(rows) if rows[0].device.type == "cpu" else torch.stack(list(rows))


class DeviceJpegDecoder:
    """Decode JPEG bytes on the embedder's device and resize + centre-crop them there,
    as the model's preprocessing does on the CPU (short side to ``resize_size``,
    same output-size rounding and filter with antialiasing, centre crop).

    A batch is decoded in one ``decode_jpeg`` call (nvJPEG batches on CUDA). If that
    raises, its files are decoded one by one on the device, and a file that still
    fails goes through the CPU path (:meth:`ImageFolderDataset.decode_on_cpu`): it is
    decoded by Pillow after all, or skipped with exactly the CPU path's reason."""

    def __init__(self, dataset: ImageFolderDataset, config: Any, device: Any) -> None:
        import torch

        self.dataset = dataset
        self.config = config
        self.device = torch.device(device)

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        import warnings

        from torchvision.io import ImageReadMode, decode_jpeg

        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its decoders in favour of TorchCodec, which
            # is not a dependency; the message would be printed once per run.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision")
            # Orientation is applied by us (apply_exif_orientation), the same on every device.
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)

    def decode(self, indices: Sequence[int], data: Sequence[torch.Tensor],
               orientations: Sequence[int]) -> tuple[dict[int, torch.Tensor], list[tuple[int, str]]]:
        """{index: uint8 (3, S, S) on the device} and [(index, reason)] for ``data``."""
        import torch

        try:
            images: list[torch.Tensor | None] = list(self._decode(list(data)))
        except Exception:  # one bad file fails the whole batch: find it
            images = []
            for one in data:
                try:
                    images.append(self._decode([one])[0])
                except Exception:
                    images.append(None)
        images = [None if image is None else apply_exif_orientation(image, orientation)
                  for image, orientation in zip(images, orientations)]
        decoded = dict(zip(indices, self.resize_crop(images)))
        failures = []
        for i, one, image in zip(indices, data, images):
            if image is not None:
                continue
            pixels = _pixels_or_reason(lambda: self.dataset.decode_on_cpu(i, one.numpy().tobytes()))
            if isinstance(pixels, str):
                failures.append((i, pixels))
            else:
                decoded[i] = torch.as_tensor(pixels).to(self.device)
        return {i: t for i, t in decoded.items() if t is not None}, failures

    def resize_crop(self, images: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """Preprocess on the device; images of one shape go through in one call."""
        import torchvision.transforms.v2.functional as F
        from torchvision.transforms import InterpolationMode

        interpolation = InterpolationMode(self.config.interpolation)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for k, image in enumerate(images):
            if image is not None:
                by_shape.setdefault(tuple(image.shape), []).append(k)
        out: list[torch.Tensor | None] = [None] * len(images)
        for positions in by_shape.values():
            batch = _stack_rows([images[k] for k in positions])
            batch = F.resize(batch, [self.config.resize_size], interpolation=interpolation, antialias=True)
            batch = F.center_crop(batch, [self.config.input_size])
            for k, image in zip(positions, batch):
                out[k] = image
        return out

    def assemble(self, chunks: Sequence[ReadChunk]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
        """One model batch from worker chunks: rows in input order, on the device."""
        import torch

        rows: dict[int, torch.Tensor] = {}
        failures = [f for chunk in chunks for f in chunk.failures]
        indices, data, orientations = [], [], []
        for chunk in chunks:
            if chunk.pixels is not None:
                rows.update(zip(chunk.pixel_indices, chunk.pixels.to(self.device, non_blocking=True)))
            if chunk.jpeg_bytes is not None:
                indices += chunk.jpeg_indices
                data += list(torch.split(chunk.jpeg_bytes, chunk.jpeg_sizes))
                orientations += chunk.jpeg_orientations
        if data:
            decoded, decode_failures = self.decode(indices, data, orientations)
            rows.update(decoded)
            failures += decode_failures
        order = sorted(rows)
        batch = _stack_rows([rows[i] for i in order]) if order else None
        return order, batch, sorted(failures)


def _assemble_on_cpu(chunks: Sequence[ReadChunk]) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    import torch

    tensors = [c.pixels for c in chunks if c.pixels is not None]
    batch = (torch.cat(tensors) if len(tensors) > 1 else tensors[0]) if tensors else None
    return [i for c in chunks for i in c.pixel_indices], batch, [f for c in chunks for f in c.failures]


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; only the main process should react
    # (it commits what it has and exits cleanly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ... and the main process's SIGTERM handler (below) is not for workers.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Images per worker task. Small tasks keep every decode worker busy and the model
# fed from the first seconds on; model batches (--batch-size) are assembled from
# them in the main process. With one task per model batch, a 2,000-image run at
# batch 256 had only 8 tasks: most of 14 workers idled (GPU check, bench/).
DECODE_CHUNK = 16


def iter_batches(paths: Sequence[str], embedder: Embedder, options: ExtractOptions):
    """Yield (indices, uint8 batch or None, failures) in input order, each batch
    holding ``options.batch_size`` decoded images (fewer at the end). With GPU
    decoding the batch is already on the embedder's device."""
    from torch.utils.data import DataLoader

    draft_size = embedder.config.resize_size
    decoder = None
    if resolve_decode(options.decode, embedder) == "gpu":
        dataset: ImageFolderDataset = EncodedJpegDataset(paths, embedder.preprocess, draft_size)
        decoder = DeviceJpegDecoder(dataset, embedder.config, embedder.device)
    else:
        dataset = ImageFolderDataset(paths, embedder.preprocess, draft_size)
    chunk = min(options.batch_size, DECODE_CHUNK)
    workers = options.workers if len(paths) > chunk else 0
    loader = DataLoader(
        dataset,
        batch_size=chunk,
        num_workers=workers,
        collate_fn=collate_images,
        pin_memory=embedder.on_cuda,
        worker_init_fn=_ignore_sigint if workers else None,
        # Enough decoded tasks in flight to fill two model batches.
        prefetch_factor=max(2, -(-2 * options.batch_size // (chunk * max(workers, 1)))) if workers else None,
    )
    assemble = decoder.assemble if decoder is not None else _assemble_on_cpu
    pending: list[ReadChunk] = []
    images = 0
    for read in loader:
        pending.append(read)
        images += len(read.pixel_indices) + len(read.jpeg_indices)
        if images >= options.batch_size:
            yield assemble(pending)
            pending, images = [], 0
    if pending:
        yield assemble(pending)


# ---------------------------------------------------------------------------
# Stage 3: model -> writer.


class ShardWriter:
    """Buffers vectors and writes (and, unless deferred, commits) a shard every
    ``shard_size`` rows."""

    def __init__(self, store: FeatureStore, shard_size: int, commit_each: bool = True) -> None:
        self.store = store
        self.shard_size = shard_size
        # False for a rebuild: shards are written as they fill, the manifest only
        # once at the end (see FeatureStore.successor).
        self.commit_each = commit_each
        self.vectors: list[np.ndarray] = []
        self.items: list[tuple[str, str, int]] = []
        self.committed = 0

    def add(self, vectors: np.ndarray, items: Sequence[tuple[str, str, int]]) -> None:
        self.vectors.append(vectors)
        self.items.extend(items)
        if len(self.items) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        import numpy as np

        if self.items:
            self.store.add_shard(np.concatenate(self.vectors, axis=0), self.items)
            self.committed += len(self.items)
            self.vectors, self.items = [], []
        if self.commit_each:
            self.store.commit()

    def finish(self) -> None:
        """Write what is buffered and commit, also when commits were deferred."""
        self.flush()
        if not self.commit_each:
            self.store.commit()


@dataclass(frozen=True)
class EmbedRequest:
    """Which model to load if there turns out to be work for it."""

    model: str
    weights: str | os.PathLike[str] | None
    options: ExtractOptions


def embed_plan(plan: Plan, store: FeatureStore, writer: ShardWriter, embedder: Embedder | None,
               request: EmbedRequest, summary: ExtractSummary, skip: SkipCallback) -> None:
    """Write vectors for ``plan.todo``: reuse stored vectors of identical content,
    embed the rest (loading the model only if needed), record undecodable files."""
    import numpy as np

    # Files whose exact content is already stored under another path (moved,
    # copied) reuse that vector: no model work.
    by_sha = {r.sha256: r for r in store.live_rows()}
    reuse = [item for item in plan.todo if item[1] in by_sha]
    if reuse:
        vectors = store.vectors_for(by_sha[sha] for _, sha, _ in reuse)
        writer.add(np.stack([vectors[by_sha[sha].id] for _, sha, _ in reuse]), reuse)
        summary.reused = len(reuse)
    todo = [item for item in plan.todo if item[1] not in by_sha]
    if not todo:
        return
    options = request.options
    if embedder is None:
        embedder = load_embedder(request.model, request.weights, options.device, options.runtime)
    bar = None
    if options.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"embedding ({embedder.name})", unit="img")
    try:
        for indices, batch, failed in iter_batches([p for p, _, _ in todo], embedder, options):
            for i, reason in failed:
                path, sha, _ = todo[i]
                store.record_skipped(path, sha, reason)
                if path in plan.replaced:
                    # Its content changed into something undecodable: the stored
                    # vector describes content that no longer exists.
                    summary.removed += store.remove_paths([path])
                skip(path, reason)
            if batch is not None:
                vectors = embedder.embed_tensors(batch)
                writer.add(vectors, [todo[i] for i in indices])
                summary.embedded += len(indices)
            if bar is not None:
                bar.update(len(indices) + len(failed))
    finally:
        if bar is not None:
            bar.close()


def resolve_model(
    store_dir: Path,
    model: str | None,
    weights: str | os.PathLike[str] | None,
    on_notice: Callable[[str], None] | None = None,
    damaged_ok: bool = False,
) -> tuple[str, str | os.PathLike[str] | None]:
    """The model (and weights file) to embed with when the user named none: the one
    an existing store was built with, else the default (ResNet-50, or MobileNetV2
    with a notice when only its weights are installed). ``damaged_ok``: a store too
    damaged to open (about to be rebuilt) does not pin a model."""
    from .errors import CorruptStoreError
    from .models import choose_default_model

    if model is not None:
        return model, weights
    if FeatureStore.exists(store_dir):
        try:
            existing = FeatureStore.open(store_dir)
        except CorruptStoreError:
            if not damaged_ok:
                raise
        else:
            return existing.fingerprint["model"], weights or existing.manifest.get("weights_path")
    chosen, notice = choose_default_model()
    if notice and on_notice:
        on_notice(notice)
    return chosen, weights


def sync_folder(
    root: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    weights: str | os.PathLike[str] | None = None,
    options: ExtractOptions | None = None,
    embedder: Embedder | None = None,
    on_skip: SkipCallback | None = None,
    lock: bool = True,
    rebuild: bool = False,
) -> ExtractSummary:
    """Make the store at ``store_dir`` hold one vector per readable image below
    ``root``: embed new and changed files, drop deleted ones, keep the rest.

    ``embedder``: an already loaded model (tests pass the tiny one); else ``model``
    and ``weights`` are loaded only if there is something to embed. ``lock=False``
    when the caller already holds the store's writer lock. ``rebuild``: embed
    everything again into a new store that replaces the old one in a single commit
    at the end; an interrupted rebuild leaves the previous store untouched.
    """
    options = options or ExtractOptions()
    started = time.perf_counter()
    root_path = Path(root).expanduser().absolute()
    files = list_images(root_path)
    fingerprint = embedder.fingerprint() if embedder else model_fingerprint(model, weights)
    store_path = Path(store_dir).expanduser()
    summary = ExtractSummary(files=len(files))
    skipped_paths: set[str] = set()

    def skip(path: str, reason: str) -> None:
        skipped_paths.add(path)
        summary.skipped += 1
        summary.skipped_files.append((display_path(path), reason))
        if on_skip:
            on_skip(display_path(path), reason)

    with writer_lock(store_path) if lock else nullcontext(), terminate_as_interrupt():
        store = _successor_store(store_path, fingerprint) if rebuild else \
            FeatureStore.open_or_create(store_path, fingerprint)
        if weights is not None:
            store.manifest["weights_path"] = str(Path(weights).expanduser().absolute())
        writer = ShardWriter(store, options.shard_size, commit_each=not rebuild)
        try:
            plan = plan_sync(store, root_path, files, progress=options.progress)
            summary.unchanged = plan.unchanged
            for path, reason in plan.unreadable + plan.known_bad:
                skip(path, reason)
            embed_plan(plan, store, writer, embedder, EmbedRequest(model, weights, options), summary, skip)
            summary.removed += store.remove_paths(plan.removed)
            writer.finish()
        except KeyboardInterrupt:
            if rebuild:
                raise Interrupted(
                    f"interrupted: the rebuild of {store_path} did not finish and the previous index is "
                    "unchanged; run the same command again to rebuild"
                ) from None
            # Ctrl-C: keep what is done (every row written so far is complete), then
            # say how to resume. A second Ctrl-C during this flush still leaves the
            # last committed state intact.
            writer.flush()
            raise Interrupted(
                f"interrupted: {writer.committed} images committed to {store_path}; "
                "run the same command again to resume"
            ) from None
        done = {p for p, _, _ in plan.todo} - skipped_paths
        summary.updated = len(plan.replaced & done)
        summary.added = len(done) - summary.updated
        summary.store_count = store.count
    summary.seconds = time.perf_counter() - started
    return summary


def _successor_store(store_path: Path, fingerprint: dict[str, Any]) -> FeatureStore:
    """The empty store a rebuild fills: the successor of the current one when that
    opens, else (missing or damaged beyond opening) a new one in its place."""
    from .errors import CorruptStoreError

    try:
        return FeatureStore.open(store_path).successor(fingerprint)
    except IndexNotFoundError:
        return FeatureStore.create(store_path, fingerprint)
    except CorruptStoreError:
        import shutil

        for name in ("manifest.json", "shards", "index"):
            target = store_path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        return FeatureStore.create(store_path, fingerprint)


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (``kill PID``, a service manager stopping us) like Ctrl-C while
    indexing: commit what is done and say how to resume, instead of dying mid-way.
    Only the main thread can own signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# Extraction and indexing share one code path; ``cbir index`` adds the search index.
extract_folder = sync_folder
