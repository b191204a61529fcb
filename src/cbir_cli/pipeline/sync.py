"""Folder -> store (``cbir extract``), and folder -> store + search index
(``cbir index``): plan by content hash, reuse what is stored, embed the rest
through an executor, commit through the store's write transaction.

Everything below happens inside one write transaction (the writer lock, Ctrl-C and
SIGTERM handling, shard-by-shard commits); see :mod:`cbir_cli.store.transaction`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CbirError
from ..imageio.files import is_under, source_location
from ..models.int8_store import prune_int8_models
from ..models.loading import default_precision, keep_int8_model, model_fingerprint, shared_calibration_for
from ..models.quantize import Calibration, sample_calibration
from ..paths import display_path
from ..resolve import resolve_descriptor, resolve_index_dir, resolve_model
from ..store.feature_store import FeatureStore
from ..store.transaction import WriteTransaction, write_transaction
from .executor import EmbedRequest, Executor
from .index_roots import record_root, root_key
from .local import LocalExecutor
from .options import ExtractOptions, ExtractSummary
from .plan import HashesInBackground, Item, Plan, holds_nothing, plan_fresh, plan_sync
from .statcache import StatCache

if TYPE_CHECKING:
    import numpy as np

    from ..models.protocol import Embedder
    from ..models.registry import DescriptorSettings
    from ..search.backends import BackendSpec
    from ..search.dba import DbaSettings

SkipCallback = Callable[[str, str], None]
NoticeCallback = Callable[[str], None]


class RowsWithHashes:
    """The transaction as a vector sink for items hashed in the background: each
    row gets its content hash and size when it is written. A file that could not
    be hashed (it vanished or became unreadable after it was decoded) is skipped."""

    def __init__(self, txn: WriteTransaction, hashes: HashesInBackground, skip: SkipCallback) -> None:
        self.txn, self.hashes, self.skip = txn, hashes, skip

    def add(self, vectors: np.ndarray, items: Sequence[Item]) -> None:
        results = [self.hashes.get(path) for path, _, _ in items]
        keep = [k for k, r in enumerate(results) if r.sha256 is not None]
        for r in results:
            if r.sha256 is None:
                self.skip(r.path, r.error or "unreadable")
        if keep:
            self.txn.add(vectors[keep], [(r.path, r.sha256 or "", r.size) for r in (results[k] for k in keep)])


def embed_plan(plan: Plan, txn: WriteTransaction, executor: Executor, request: EmbedRequest,
               summary: ExtractSummary, skip: SkipCallback, hashes: HashesInBackground | None = None) -> None:
    """Write vectors for ``plan.todo`` (and ``plan.renamed``): reuse stored vectors of
    identical content, embed the rest (the model is loaded only if needed), record
    undecodable files. ``hashes``: the todo items' hashes are still being computed
    (:func:`~.plan.plan_fresh`)."""
    import numpy as np

    store = txn.store
    # Files whose exact content is already stored under another path (moved, copied,
    # or stored under an older spelling of the same path) reuse that vector.
    # Only verified, valid vectors are reused (FeatureStore.vectors_for); a file
    # whose stored vector is not one of them is embedded again.
    renamed = [item for _, item in plan.renamed]
    # From the store's row catalog: no read of every stored row.
    by_sha = store.rows_by_sha(sha for _, sha, _ in plan.todo + renamed)
    vectors = store.vectors_for(by_sha[sha] for _, sha, _ in plan.todo + renamed if sha in by_sha)
    reusable = {sha for sha, row in by_sha.items() if row.id in vectors}
    reuse = [item for item in plan.todo if item[1] in reusable]
    renamed_ok = [(old, item) for old, item in plan.renamed if item[1] in reusable]
    if reuse or renamed_ok:
        items = reuse + [item for _, item in renamed_ok]
        txn.add(np.stack([vectors[by_sha[sha].id] for _, sha, _ in items]), items)
        summary.reused = len(reuse)
    store.remove_paths(old for old, _ in plan.renamed)
    todo = [item for item in plan.todo if item[1] not in reusable]
    todo += [item for old, item in plan.renamed if item[1] not in reusable]
    if not todo:
        return

    def failed(i: int, reason: str) -> None:
        path, sha, _ = todo[i]
        if hashes is not None:
            sha = hashes.get(path).sha256 or ""
        if sha:  # remembered, so an unchanged bad file is not decoded again
            store.record_skipped(path, sha, reason)
        if path in plan.replaced:
            # Its content changed into something undecodable: the stored vector
            # describes content that no longer exists.
            summary.removed += store.remove_paths([path])
        skip(path, reason)

    sink = txn if hashes is None else RowsWithHashes(txn, hashes, skip)
    summary.embedded += executor.embed(todo, request, sink, failed)


def sync_files(txn: WriteTransaction, root: Path | str | None, files: Sequence[Path | str], request: EmbedRequest,
               executor: Executor, summary: ExtractSummary, skip: SkipCallback) -> None:
    """Make ``txn``'s store hold one vector per readable file of ``files``; with a
    ``root``, stored files below it that are not in ``files`` are removed."""
    skipped: set[str] = set()

    def skip_one(path: str, reason: str) -> None:
        skipped.add(path)
        skip(path, reason)

    # Unchanged (size, mtime, ctime, inode) -> the hash recorded last time; only
    # new or touched files are read and hashed (see .statcache).
    stat_cache = StatCache.load(txn.root, trusted=not txn.rebuild)
    hashed = stat_cache.hash_files(files, executor.hash_files)
    hashes = None
    if holds_nothing(txn.store) and executor.embeds_unhashed:
        plan, hashes = plan_fresh(files, hashed)
    else:
        plan = plan_sync(txn.store, root, hashed)
        if txn.store.committed:
            stat_cache.save(keep_unlisted=root is None)
    # Entries of folders that could not be listed are kept, not taken for deleted.
    unreadable = [folder for folder, _ in getattr(files, "unreadable", [])]
    plan.removed = [p for p in plan.removed if not is_under(p, unreadable)]
    summary.unchanged = plan.unchanged
    for path, reason in plan.unreadable + plan.known_bad:
        skip_one(path, reason)
    embed_plan(plan, txn, executor, request, summary, skip_one, hashes)
    if hashes is not None:
        hashes.wait()
    for path, reason in txn.rejected:  # vectors the store refused (not finite / not unit length)
        skip_one(path, reason)
    summary.removed += txn.remove_paths(plan.removed)
    done = {p for p, _, _ in plan.todo} - skipped
    summary.updated = len(plan.replaced & done)
    summary.added = len(done) - summary.updated
    if summary.embedded or summary.reused:  # a first run: the store is about to be committed
        stat_cache.save(keep_unlisted=root is None)


def choose_calibration(options: ExtractOptions, model: str, weights: str | os.PathLike[str] | None,
                       descriptor: DescriptorSettings | None, existing: FeatureStore | None, rebuild: bool,
                       files: Sequence[Path | str], executor: Executor) -> Calibration | None:
    """The int8 calibration to embed with, or None for fp32. ``auto`` follows the
    store, and for a new one :func:`~cbir_cli.models.loading.default_precision`
    decides; an int8 store keeps its calibration, so its vectors stay comparable; a
    new int8 store, or a rebuild, takes the calibration its model already has
    (:mod:`cbir_cli.models.calibration_cache`: calibrating takes minutes, once),
    else calibrates on a seeded sample of the folder
    (:func:`~cbir_cli.models.quantize.sample_calibration`)."""
    from ..models.descriptors import DESCRIPTORS

    if options.precision == "fp32" or model in DESCRIPTORS:
        return None
    same_model = existing is not None and existing.fingerprint.get("model") == model
    stored = Calibration.from_fingerprint(existing.fingerprint, existing.root) \
        if same_model and existing is not None else None
    if options.precision == "auto" and stored is None and (
            same_model or default_precision(model, options.device, options.runtime) == "fp32"):
        return None
    if stored is not None and not rebuild:
        return stored
    return shared_calibration_for(model, weights, descriptor) or sample_calibration(files, executor.hash_files)


def begin_int8(txn: WriteTransaction, request: EmbedRequest, rebuild: bool,
               on_notice: NoticeCallback | None) -> str | None:
    """Put the int8 model into the index before anything is embedded with it (so an
    index never needs its photos again: :mod:`cbir_cli.models.int8_store`), and
    return the key of the model the index needs ("" for an fp32 index; None when
    unknown). An index made before it kept its model gains it here, at its first
    write; if its calibration photos are gone and the model cache is cold, that
    is a warning: the run goes on and fails only if it has something to embed."""
    if request.calibration is None:
        return ""
    try:
        return keep_int8_model(request.model, request.weights, request.descriptor, request.calibration,
                               txn.root)
    except CbirError as exc:
        if txn.existing is None or rebuild:
            raise
        if on_notice:
            on_notice(f"warning: {exc.message}")
        return None


def _sync_folder(root: str | os.PathLike[str], store_dir: Path, model: str | None,
                 weights: str | os.PathLike[str] | None, options: ExtractOptions | None,
                 embedder: Embedder | None, on_skip: SkipCallback | None, on_notice: NoticeCallback | None,
                 rebuild: bool, executor: Executor | None,
                 after_commit: Callable[[FeatureStore], None] | None = None,
                 on_begin: Callable[[FeatureStore], None] | None = None,
                 descriptor: DescriptorSettings | None = None) -> ExtractSummary:
    options = options or ExtractOptions()
    executor = executor or LocalExecutor(options)
    started = time.perf_counter()
    location = source_location(root)  # a folder, or a URL (s3://bucket/prefix) kept as given
    files = executor.list_images(location)  # a bad folder fails before anything else
    for folder, reason in getattr(files, "unreadable", []):
        if on_notice:
            on_notice(f"warning: cannot read folder {display_path(folder)} ({reason}); "
                      "what was indexed from it is kept")
    root_path = location if isinstance(location, str) else location.resolve()
    summary = ExtractSummary(files=len(files))

    def skip(path: str, reason: str) -> None:
        summary.skipped += 1
        summary.skipped_files.append((display_path(path), reason))
        if on_skip:
            on_skip(display_path(path), reason)

    with write_transaction(store_dir, rebuild=rebuild, shard_size=options.shard_size,
                           shard_dtype=options.shard_dtype) as txn:
        if embedder is not None:
            fingerprint = embedder.fingerprint()
            request = EmbedRequest(embedder.config.name, weights, options.device, options.runtime, embedder)
        else:
            choice = resolve_model(model, weights, txn.existing)
            settings, descriptor_notice = resolve_descriptor(descriptor, choice.name, txn.existing, rebuild)
            for notice in (choice.notice, descriptor_notice):
                if notice and on_notice:
                    on_notice(notice)
            calibration = choose_calibration(options, choice.name, choice.weights, settings, txn.existing, rebuild,
                                             files, executor)
            if calibration is not None:  # the index will keep its int8 model (see begin_int8 below)
                calibration = replace(calibration, index_dir=str(store_dir))
            fingerprint = model_fingerprint(choice.name, choice.weights, settings, calibration)
            request = EmbedRequest(choice.name, choice.weights, options.device, options.runtime,
                                   descriptor=settings, calibration=calibration)
        store = txn.begin(fingerprint)
        int8_model = None if embedder is not None else begin_int8(txn, request, rebuild, on_notice)
        for repair in txn.repairs:
            if on_notice:
                on_notice(f"repaired: {repair}")
        if on_begin is not None:
            on_begin(store)
        root_note = record_root(store, root_key(root_path), rebuild)
        if root_note and on_notice:
            on_notice(root_note)
        if request.weights is not None:
            store.manifest["weights_path"] = str(Path(request.weights).expanduser().absolute())
        sync_files(txn, root_path, files, request, executor, summary, skip)
        txn.commit()
        if int8_model is not None and store.committed:
            prune_int8_models(store_dir, int8_model or None)
        summary.store_count = store.count
        if after_commit is not None and store.committed:
            after_commit(store)
    summary.seconds = time.perf_counter() - started
    return summary


def sync_folder(root: str | os.PathLike[str], store_dir: str | os.PathLike[str], model: str | None = None,
                weights: str | os.PathLike[str] | None = None, options: ExtractOptions | None = None,
                embedder: Embedder | None = None, on_skip: SkipCallback | None = None,
                on_notice: NoticeCallback | None = None, rebuild: bool = False,
                executor: Executor | None = None, descriptor: DescriptorSettings | None = None) -> ExtractSummary:
    """``cbir extract``: make the store at ``store_dir`` hold one vector per readable
    image below ``root``: embed new and changed files, drop deleted ones, keep the rest.

    ``model``: default the store's own model, else the default model (see
    :func:`cbir_cli.resolve.resolve_model`); it is loaded only if there is something
    to embed. ``embedder``: an already loaded one instead (tests pass the tiny model).
    ``rebuild``: embed everything again into a new store that replaces the old one in
    a single commit at the end; an interrupted rebuild leaves the previous store
    untouched. ``executor``: how images become vectors (default: this machine).
    ``descriptor``: pooling, input and scales (default: a growing store's own, else
    the model's default; see :func:`cbir_cli.resolve.resolve_descriptor`).
    """
    return _sync_folder(root, Path(store_dir).expanduser(), model, weights, options, embedder, on_skip, on_notice,
                        rebuild, executor, descriptor=descriptor)


extract_folder = sync_folder


def index_folder(root: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None,
                 model: str | None = None, weights: str | os.PathLike[str] | None = None,
                 options: ExtractOptions | None = None, index_type: str | None = None, rebuild: bool = False,
                 embedder: Embedder | None = None, on_skip: SkipCallback | None = None,
                 on_notice: NoticeCallback | None = None, executor: Executor | None = None,
                 descriptor: DescriptorSettings | None = None, dba: DbaSettings | None = None,
                 backend: BackendSpec | None = None, rebuild_backend: bool = False) -> ExtractSummary:
    """``cbir index``: :func:`sync_folder`, then bring the search backend and its DBA
    vectors up to date with the committed store, all in one write transaction.
    ``index_type``: see :data:`cbir_cli.search.faiss_backend.INDEX_TYPES`; default:
    the saved index's type, else auto. ``dba``: database-side augmentation for
    re-ranking (:mod:`cbir_cli.search.dba`); default: the saved one's, else on.
    ``backend``: the search backend to use from now on (recorded in the index;
    default: the recorded one, else Faiss); it is checked before any work, so an
    unreachable or incompatible one writes nothing. ``rebuild_backend``:
    re-populate it (and the DBA vectors) from the shards instead of updating it."""
    from ..search.backends import check_target, choose_spec, record_spec, refresh_backend
    from ..search.faiss_backend import resolve_index_type

    if index_type is not None and (backend is None or backend.name == "faiss"):
        resolve_index_type(index_type, 0)  # validate before any work

    def begin(store: FeatureStore) -> None:
        spec = choose_spec(backend, index_type, store)
        check_target(spec, store)
        record_spec(store, spec)

    def refresh(store: FeatureStore) -> None:
        refresh_backend(store, index_type, rebuild=rebuild_backend, dba=dba)

    return _sync_folder(root, resolve_index_dir(index_dir), model, weights, options, embedder, on_skip, on_notice,
                        rebuild, executor, after_commit=refresh, on_begin=begin, descriptor=descriptor)
