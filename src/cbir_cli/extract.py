"""Folder -> feature store, in three stages (reader -> model -> writer), incremental.

* plan: list the folder, hash every file's content, compare with the store: new,
  changed, unchanged, removed; a known-bad unchanged file is not decoded again.
* reader: worker processes read, decode (JPEG draft mode) and preprocess images
  into uint8 tensors (:class:`ImageFolderDataset`), overlapping with inference.
* model -> writer: batches are embedded, buffered and written as shards; every
  shard is committed to the manifest, so an interrupted run loses at most one
  shard of work and the next run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CbirError, ImageError
from .images import display_path, list_images, load_image
from .locking import writer_lock
from .models import DEFAULT_MODEL, Embedder, load_embedder, model_fingerprint
from .store import FeatureStore

if TYPE_CHECKING:
    import numpy as np
    import torch

SkipCallback = Callable[[str, str], None]


def default_workers() -> int:
    """Decoding processes: leave the cores to the model on small machines."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


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

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CbirError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.workers < 0:
            raise CbirError(f"--workers must be >= 0 (got {self.workers})")
        if self.shard_size < 1:
            raise CbirError(f"--shard-size must be >= 1 (got {self.shard_size})")


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


def plan_sync(store: FeatureStore, root: Path, files: Sequence[Path], progress: bool = False) -> Plan:
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
    present = {str(p) for p in files}
    root_s = str(root)
    removed = [p for p in stored if _under(p, root_s) and p not in present]
    store.forget_skipped([p for p in list(skipped) if _under(p, root_s) and p not in present])
    return Plan(todo, replaced, removed, unchanged, known_bad, unreadable)


# ---------------------------------------------------------------------------
# Stage 2: reader.


class ImageFolderDataset:
    """Map-style dataset: index -> (index, uint8 tensor) or (index, failure reason)."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Any], torch.Tensor], draft_size: int | None) -> None:
        self.paths = list(paths)
        self.preprocess = preprocess
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        try:
            img = load_image(self.paths[i], draft_size=self.draft_size)
            return i, self.preprocess(img)
        except ImageError as exc:
            return i, exc.reason
        except Exception as exc:  # a decoder bug must not kill a 100k-image run
            return i, f"cannot decode: {type(exc).__name__}: {exc}"


def collate_images(items: list[tuple[int, Any]]) -> tuple[list[int], Any, list[tuple[int, str]]]:
    from .models import stack_pixels

    ok = [(i, t) for i, t in items if not isinstance(t, str)]
    failed = [(i, t) for i, t in items if isinstance(t, str)]
    tensor = stack_pixels([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensor, failed


def _ignore_sigint(_worker_id: int) -> None:
    # Ctrl-C goes to the whole process group; only the main process should react
    # (it commits what it has and exits cleanly).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Images per worker task. Small tasks keep every decode worker busy and the model
# fed from the first seconds on; model batches (--batch-size) are assembled from
# them in the main process. With one task per model batch, a 2,000-image run at
# batch 256 had only 8 tasks: most of 14 workers idled (GPU check, bench/).
DECODE_CHUNK = 16


def iter_batches(paths: Sequence[str], embedder: Embedder, options: ExtractOptions):
    """Yield (indices, uint8 batch or None, failures) in input order, each batch
    holding ``options.batch_size`` decoded images (fewer at the end)."""
    import torch
    from torch.utils.data import DataLoader

    dataset = ImageFolderDataset(paths, embedder.preprocess, draft_size=embedder.config.resize_size)
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
    indices: list[int] = []
    tensors: list[torch.Tensor] = []
    failures: list[tuple[int, str]] = []
    for chunk_indices, chunk_tensor, chunk_failures in loader:
        failures.extend(chunk_failures)
        if chunk_tensor is not None:
            indices.extend(chunk_indices)
            tensors.append(chunk_tensor)
        if len(indices) >= options.batch_size:
            yield indices, torch.cat(tensors) if len(tensors) > 1 else tensors[0], failures
            indices, tensors, failures = [], [], []
    if indices or failures:
        yield indices, (torch.cat(tensors) if len(tensors) > 1 else tensors[0]) if tensors else None, failures


# ---------------------------------------------------------------------------
# Stage 3: model -> writer.


class ShardWriter:
    """Buffers vectors and commits a shard every ``shard_size`` rows."""

    def __init__(self, store: FeatureStore, shard_size: int) -> None:
        self.store = store
        self.shard_size = shard_size
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


def sync_folder(
    root: str | os.PathLike[str],
    store_dir: str | os.PathLike[str],
    model: str = DEFAULT_MODEL,
    weights: str | os.PathLike[str] | None = None,
    options: ExtractOptions | None = None,
    embedder: Embedder | None = None,
    on_skip: SkipCallback | None = None,
    lock: bool = True,
) -> ExtractSummary:
    """Make the store at ``store_dir`` hold one vector per readable image below
    ``root``: embed new and changed files, drop deleted ones, keep the rest.

    ``embedder``: an already loaded model (tests pass the tiny one); else ``model``
    and ``weights`` are loaded only if there is something to embed. ``lock=False``
    when the caller already holds the store's writer lock.
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

    with writer_lock(store_path) if lock else nullcontext():
        store = FeatureStore.open_or_create(store_path, fingerprint)
        if weights is not None:
            store.manifest["weights_path"] = str(Path(weights).expanduser().absolute())
        writer = ShardWriter(store, options.shard_size)
        try:
            plan = plan_sync(store, root_path, files, progress=options.progress)
            summary.unchanged = plan.unchanged
            for path, reason in plan.unreadable + plan.known_bad:
                skip(path, reason)
            embed_plan(plan, store, writer, embedder, EmbedRequest(model, weights, options), summary, skip)
            summary.removed += store.remove_paths(plan.removed)
            writer.flush()
        except KeyboardInterrupt:
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


# Extraction and indexing share one code path; ``cbir index`` adds the search index.
extract_folder = sync_folder
