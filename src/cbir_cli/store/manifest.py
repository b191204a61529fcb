"""The store's layout and its manifest: folder and file names (one constant each),
the manifest's shape and how it is read and validated. Only the store reads and
writes manifests; everything else asks it.

Layout of a store (index) folder::

    manifest.json                 # the commit point (written atomically, last)
    .lock                         # the writer lock
    shards/shard-000001.npy       # float32 (n, dim)
    shards/shard-000001.rows.json # the n rows, same order: id, path, sha256, size
    index/index.faiss, index.json # the saved search index (derived from the shards)
    staging/run-*/part-*.npy      # shards written by distributed workers, not yet adopted
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError, IndexNotFoundError, StoreMismatchError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LOCK_NAME = ".lock"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
STAGING_DIR = "staging"
# The fingerprint keys that must agree for two sets of vectors to be comparable.
FINGERPRINT_KEYS = ("model", "weights", "dim", "preprocessing")


def _describe_fingerprint(fp: dict[str, Any]) -> str:
    return f"model {fp.get('model')} (weights {fp.get('weights')}, dim {fp.get('dim')})"


def check_fingerprint(stored: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """Refuse to mix vectors from different models, weights or preprocessing."""
    for key in FINGERPRINT_KEYS:
        if stored.get(key) != wanted.get(key):
            raise StoreMismatchError(
                f"{where}: holds vectors from {_describe_fingerprint(stored)} but this run uses "
                f"{_describe_fingerprint(wanted)} ({key} differs)"
            )


MANIFEST_KEYS = {"format": int, "generation": int, "fingerprint": dict, "next_id": int, "next_shard": int,
                 "shards": list, "count": int, "skipped": dict}
SHARD_KEYS = {"name": str, "rows": int, "sha256": str, "removed": list}


def manifest_problems(manifest: Any) -> list[str]:
    """Structural problems of a parsed manifest (wrong types, missing keys,
    impossible counts); empty when it is well-formed."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    if manifest.get("format") != FORMAT_VERSION:
        return [f"not a cbir manifest of format {FORMAT_VERSION} (format {manifest.get('format')!r})"]
    problems = [f"manifest key {key!r} missing or not {kind.__name__}"
                for key, kind in MANIFEST_KEYS.items() if not isinstance(manifest.get(key), kind)]
    if problems:
        return problems
    live = 0
    for i, shard in enumerate(manifest["shards"]):
        bad = [key for key, kind in SHARD_KEYS.items() if not isinstance(shard, dict) or
               not isinstance(shard.get(key), kind)]
        if bad:
            problems.append(f"manifest shard #{i}: key(s) {', '.join(bad)} missing or of the wrong type")
            continue
        removed = shard["removed"]
        if len(set(removed)) != len(removed) or any(not isinstance(r, int) or not 0 <= r < shard["rows"]
                                                    for r in removed):
            problems.append(f"manifest shard {shard['name']}: tombstones out of range or repeated")
            continue
        live += shard["rows"] - len(removed)
    if not problems and live != manifest["count"]:
        problems.append(f"manifest count {manifest['count']} but its shards hold {live} live rows")
    return problems


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """A manifest file's bytes -> the manifest, or :class:`CorruptStoreError`
    naming ``path`` and the first problem."""
    try:
        manifest = json.loads(data.decode("ascii"))
    except ValueError as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({exc})") from None
    problems = manifest_problems(manifest)
    if problems:
        raise CorruptStoreError(f"{path}: {problems[0]}")
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The committed manifest of the store at ``root``: :class:`IndexNotFoundError`
    when there is none, :class:`CorruptStoreError` when it is damaged."""
    path = root / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexNotFoundError(f"{root}: no index here (no {MANIFEST})") from None
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    return parse_manifest(data, path)


def inspect_manifest(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest at ``root`` and every structural problem found, never raising
    (``cbir check`` reports them all); the manifest is None when it is unusable."""
    path = root / MANIFEST
    if not path.is_file():
        return None, [f"{path}: missing (no index here)"]
    try:
        manifest = json.loads(path.read_bytes().decode("ascii"))
    except (OSError, ValueError) as exc:
        return None, [f"{path}: unreadable ({exc})"]
    problems = [f"{path}: {p}" for p in manifest_problems(manifest)]
    return (None if problems else manifest), problems
