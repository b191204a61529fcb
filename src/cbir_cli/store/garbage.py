"""The store's leftovers: files no committed state names -- shards of an
interrupted or dropped write, temporaries of an interrupted atomic write, staged
worker parts of a run that is not the current writer's. Harmless (never read);
a writer deletes them at its start, its checkpoints and its end (listing the
shards folder is O(shards): not something to do per commit)."""

from __future__ import annotations

import os
from collections.abc import Container
from pathlib import Path

from ..fsutil import TMP_MARK
from .manifest import INDEX_DIR, SHARDS_DIR
from .staging import remove_empty_runs, staged_leftovers


def leftover_files(root: Path, live: Container[str], active_staging: Path | None) -> list[Path]:
    """Files in the store folder ``root`` that its state (``live``: its shard names)
    does not name, the run folder ``active_staging`` excepted (the log's own
    leftovers: :func:`.commit_log.leftover_entries`)."""
    shards_dir = root / SHARDS_DIR
    out = []
    try:
        names = os.listdir(shards_dir)  # names, not Path objects: ~20k of them at 10M rows
    except OSError:
        names = []
    for name in names:
        if name.startswith(".") or name.removesuffix(".npy").removesuffix(".rows.json") not in live:
            out.append(shards_dir / name)
    for folder in (root, root / INDEX_DIR):
        if folder.is_dir():
            out.extend(p for p in folder.iterdir() if p.name.startswith(".") and TMP_MARK in p.name)
    out.extend(staged_leftovers(root, active_staging))
    return sorted(out)


def collect_garbage(root: Path, paths: list[Path], active_staging: Path | None) -> list[Path]:
    """Delete ``paths`` (what :func:`leftover_files` found) and empty staging runs."""
    deleted = []
    for path in paths:
        try:
            path.unlink()
            deleted.append(path)
        except OSError:
            pass
    remove_empty_runs(root, active_staging)
    return deleted
