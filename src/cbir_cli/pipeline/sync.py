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
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.files import is_under, source_location
from ..models.int8_store import prune_int8_models
from ..models.loading import keep_int8_model, model_fingerprint, shared_calibration_for
from ..models.quantize import Calibration, sample_calibration
from ..paths import display_path
from ..resolve import ModelSettings, resolve_index_dir
from ..store.feature_store import FeatureStore
from ..store.transaction import WriteTransaction, write_transaction
from .executor import EmbedRequest, Executor
from .index_roots import record_root, root_key
from .local import LocalExecutor
from .options import ExtractOptions, ExtractSummary, IndexSettings
from .plan import HashesInBackground, Item, Plan, holds_nothing, plan_fresh, plan_sync
from .run_plan import LOCAL_ENGINE, RunPlan, choose_index_type, plan_run
from .statcache import StatCache

if TYPE_CHECKING:
    import numpy as np

    from ..models.protocol import Embedder
    from ..models.registry import DescriptorSettings

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


def choose_calibration(plan: RunPlan, existing: FeatureStore | None, files: Sequence[Path | str],
                       executor: Executor) -> Calibration | None:
    """The int8 calibration to embed with, or None for an fp32 plan (the plan's
    precision: :func:`~.run_plan.choose_precision`). An int8 index keeps its
    calibration, so its vectors stay comparable; a new int8 index, or a rebuild,
    takes the calibration its model already has (:mod:`cbir_cli.models.calibration_cache`:
    calibrating takes minutes, once), else calibrates on a seeded sample of the folder
    (:func:`~cbir_cli.models.quantize.sample_calibration`)."""
    if plan.precision != "int8":
        return None
    same_model = existing is not None and existing.fingerprint.get("model") == plan.model
    stored = Calibration.from_fingerprint(existing.fingerprint, existing.root) \
        if same_model and existing is not None else None
    if stored is not None and not plan.rebuild:
        return stored
    return (shared_calibration_for(plan.model, plan.weights, plan.descriptor)
            or sample_calibration(files, executor.hash_files))


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


def _sync_folder(root: str | os.PathLike[str], index_dir: Path, model: ModelSettings, options: ExtractOptions | None,
                 embedder: Embedder | None, on_skip: SkipCallback | None, on_notice: NoticeCallback | None,
                 rebuild: bool, executor: Executor | None, index: IndexSettings | None = None,
                 after_commit: Callable[[FeatureStore, RunPlan], None] | None = None) -> ExtractSummary:
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

    with write_transaction(index_dir, rebuild=rebuild, shard_size=options.shard_size,
                           shard_dtype=options.shard_dtype) as txn:
        plan = plan_run(index_dir, model, options, index, engine=getattr(executor, "name", LOCAL_ENGINE),
                        rebuild=rebuild, existing=txn.existing, embedder=embedder)
        if embedder is not None:
            fingerprint = embedder.fingerprint()
            request = EmbedRequest(plan.model, model.weights, options.device, options.runtime, embedder)
        else:
            for notice in plan.notices:
                if on_notice:
                    on_notice(notice)
            calibration = choose_calibration(plan, txn.existing, files, executor)
            if calibration is not None:  # the index will keep its int8 model (see begin_int8 below)
                calibration = replace(calibration, index_dir=str(index_dir))
            fingerprint = model_fingerprint(plan.model, plan.weights, plan.descriptor, calibration)
            request = EmbedRequest(plan.model, plan.weights, plan.device, plan.runtime,
                                   descriptor=plan.descriptor, calibration=calibration)
        store = txn.begin(fingerprint)
        int8_model = None if embedder is not None else begin_int8(txn, request, rebuild, on_notice)
        for repair in txn.repairs:
            if on_notice:
                on_notice(f"repaired: {repair}")
        if index is not None:  # the search backend, checked before any work and recorded
            from ..search.backends import check_target, record_spec

            check_target(plan.backend, store)
            record_spec(store, plan.backend)
        root_note = record_root(store, root_key(root_path), rebuild)
        if root_note and on_notice:
            on_notice(root_note)
        if request.weights is not None:
            store.manifest["weights_path"] = str(Path(request.weights).expanduser().absolute())
        sync_files(txn, root_path, files, request, executor, summary, skip)
        txn.commit()
        if int8_model is not None and store.committed:
            prune_int8_models(index_dir, int8_model or None)
        summary.store_count = store.count
        if after_commit is not None and store.committed:
            after_commit(store, plan)
    summary.seconds = time.perf_counter() - started
    return summary


def sync_folder(root: str | os.PathLike[str], index_dir: str | os.PathLike[str], model: str | None = None,
                weights: str | os.PathLike[str] | None = None, options: ExtractOptions | None = None,
                embedder: Embedder | None = None, on_skip: SkipCallback | None = None,
                on_notice: NoticeCallback | None = None, rebuild: bool = False,
                executor: Executor | None = None, descriptor: DescriptorSettings | None = None) -> ExtractSummary:
    """Make the vectors at ``index_dir`` hold one vector per readable image below
    ``root``: embed new and changed files, drop deleted ones, keep the rest. No
    search index is built (see :func:`index_folder`).

    Args:
        root: a folder of images (searched recursively) or a URL (``s3://bucket/prefix``).
        index_dir: the folder of shards and manifest.
        model: a registered model name (default: the folder's own model, else the
            default one; see :func:`cbir_cli.resolve.resolve_model`); loaded only if
            there is something to embed.
        weights: a local weights file instead of the model's pretrained weights.
        options: how embedding runs (device, runtime, precision, batch size...).
        embedder: an already loaded model instead (tests pass the tiny model).
        on_skip: called with (path, reason) for each image that could not be read.
        on_notice: called with each notice (a fallback model, a repair...).
        rebuild: embed everything again into a new store that replaces the old one
            in one commit at the end; an interrupted rebuild leaves it untouched.
        executor: how images become vectors (default: this machine).
        descriptor: pooling, input and scales (default: a growing store's own,
            else the model's; see :func:`cbir_cli.resolve.resolve_descriptor`).

    Returns:
        What the run did (:class:`~.options.ExtractSummary`).

    Raises:
        CbirError: a missing folder, an unknown model, an index made by another
            model, an interrupted run (:class:`~cbir_cli.errors.Interrupted`).
    """
    return _sync_folder(root, Path(index_dir).expanduser(), ModelSettings(model, weights, descriptor), options,
                        embedder, on_skip, on_notice, rebuild, executor)


def extract_folder(root: str | os.PathLike[str], out_dir: str | os.PathLike[str], model: str | None = None,
                   weights: str | os.PathLike[str] | None = None, options: ExtractOptions | None = None,
                   **settings: Any) -> ExtractSummary:
    """``cbir extract``: features only, into the folder ``out_dir`` (``.npy`` shards
    and ``manifest.json``, no search index), for use outside cbir. The same run as
    :func:`sync_folder`, whose keyword arguments (``embedder``, ``on_skip``,
    ``on_notice``, ``rebuild``, ``executor``, ``descriptor``) it takes."""
    return sync_folder(root, out_dir, model, weights, options, **settings)


def index_folder(root: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None,
                 model: str | ModelSettings | None = None, weights: str | os.PathLike[str] | None = None,
                 options: ExtractOptions | None = None, *, index: IndexSettings | None = None,
                 index_type: str | None = None, descriptor: DescriptorSettings | None = None, rebuild: bool = False,
                 embedder: Embedder | None = None, executor: Executor | None = None,
                 on_skip: SkipCallback | None = None, on_notice: NoticeCallback | None = None) -> ExtractSummary:
    """``cbir index``: :func:`sync_folder`, then bring the search backend and its DBA
    vectors up to date with the committed store, all in one write transaction. Every
    choice is made by :func:`~.run_plan.plan_run` (what ``cbir index --dry-run`` prints).

    Args:
        root: a folder of images or a URL (``s3://bucket/prefix``).
        index_dir: the index folder (default: ``$CBIR_INDEX``, else the per-user one).
        model: a model name, or :class:`~cbir_cli.resolve.ModelSettings` (model,
            weights, descriptor) as one object; default: the index's, else the default.
        weights: a weights file (when ``model`` is a name); see :func:`sync_folder`.
        options: how embedding runs (:class:`~.options.ExtractOptions`).
        index: backend, index type, DBA, rebuild_backend
            (:class:`~.options.IndexSettings`); default: the index's, else Faiss, auto, on.
        index_type: shorthand for ``IndexSettings(index_type=...)``.
        descriptor: pooling, input and scales (when ``model`` is a name); see :func:`sync_folder`.
        rebuild: embed everything again into a new index; see :func:`sync_folder`.
        embedder: an already loaded model instead of ``model``.
        executor: where the work runs (default: this machine).
        on_skip: called with each unreadable file and the reason.
        on_notice: called with each one-line notice of the run.

    Returns:
        What the run did (:class:`~.options.ExtractSummary`).

    Raises:
        CbirError: as :func:`sync_folder`; also an unknown index type, an unreachable
            or incompatible backend (checked before any work: nothing is written).
    """
    from ..search.backends import refresh_backend

    settings = model if isinstance(model, ModelSettings) else ModelSettings(model, weights, descriptor)
    index = index or IndexSettings()
    if index_type is not None:
        index = replace(index, index_type=index_type)
    if index.index_type is not None:
        choose_index_type(index.index_type, None, None)  # validate before any work

    def refresh(store: FeatureStore, plan: RunPlan) -> None:
        refresh_backend(store, index.index_type, rebuild=index.rebuild_backend, dba=index.dba)

    return _sync_folder(root, resolve_index_dir(index_dir), settings, options, embedder, on_skip, on_notice,
                        rebuild, executor, index=index, after_commit=refresh)
