"""The store's layout and its manifest: folder and file names (one constant each),
the manifest's shape and how it is read and validated. Only the store reads and
writes manifests; everything else asks it.

Layout of a store (index) folder::

    manifest.json                 # the checkpoint: full state at its generation (.commit_log)
    log/00000000000000000042.json # one commit after it: only what changed (.commit_log)
    store.json                    # the store's identity: its fingerprint (written at the
                                  # first commit; what lets a lost manifest be recovered)
    .lock                         # the writer lock
    rows.sqlite                   # the row catalog, derived: path -> id, shard, row (.row_catalog)
    shards/shard-000001.npy       # (n, dim), float32 or the store's shard_dtype (.shard_format)
    shards/shard-000001.rows.json # the n rows, same order: id, path, sha256, size
    index/index.faiss, index.json # the saved search index (derived from the shards)
    staging/run-*/part-*.npy      # shards written by distributed workers, not yet adopted
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError, IndexNotFoundError, StoreMismatchError, WriteError
from ..fsutil import atomic_write_bytes, atomic_write_json
from .roots import ROOTS_KEY, roots_problem
from .shard_format import MANIFEST_KEY, dtype_problem

# 2: manifest.json is a checkpoint and log/ may hold commits after it (.commit_log).
# Format 1 (no log) is still read: its first commit rewrites it as format 2.
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
IDENTITY = "store.json"
LOCK_NAME = ".lock"
SHARDS_DIR = "shards"
INDEX_DIR = "index"
STAGING_DIR = "staging"
ROW_KEYS = {"id": int, "path": str, "sha256": str, "size": int}


@dataclass(frozen=True)
class Row:
    """One stored image: a stable integer id (never reused), its path and content hash."""

    id: int
    path: str
    sha256: str
    size: int


# The fingerprint keys that must agree for two sets of vectors to be comparable.
# descriptor: pooling/input/scales (absent in stores made before it existed = GAP of
# the centre crop); precision/calibration: only int8 stores have them (absent =
# fp32, as every store made before them), see cbir_cli.models.quantize.
FINGERPRINT_KEYS = ("model", "weights", "dim", "preprocessing", "descriptor", "precision", "calibration")


def _describe_fingerprint(fp: dict[str, Any]) -> str:
    precision = f", int8 calibration {fp.get('calibration')}" if fp.get("precision") == "int8" else ""
    return f"model {fp.get('model')} (weights {fp.get('weights')}, dim {fp.get('dim')}{precision})"


def check_fingerprint(stored: dict[str, Any], wanted: dict[str, Any], where: Path) -> None:
    """Refuse to mix vectors from different models, weights or preprocessing."""
    for key in FINGERPRINT_KEYS:
        if stored.get(key) != wanted.get(key):
            raise StoreMismatchError(
                f"{where}: holds vectors from {_describe_fingerprint(stored)} but this run uses "
                f"{_describe_fingerprint(wanted)} ({key} differs)"
            )


def library_versions() -> dict[str, str]:
    """Versions of what made the vectors, recorded in the manifest at each commit."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("cbir-cli", "torch", "torchvision", "faiss-cpu", "numpy", "pillow"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


MANIFEST_KEYS = {"format": int, "generation": int, "fingerprint": dict, "next_id": int, "next_shard": int,
                 "shards": list, "count": int, "skipped": dict}
SHARD_KEYS = {"name": str, "rows": int, "sha256": str, "removed": list}
# max_id: the highest id of the shard's rows (shards written before it existed lack it;
# see .ids).
OPTIONAL_SHARD_KEYS = {"bytes": int, "rows_bytes": int, "rows_sha256": str, "max_id": int}
# Shard names become file names: nothing but this shape may ever reach the file system.
SHARD_NAME = re.compile(r"shard-[0-9]{6,}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON true is not a count)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is(value: Any, kind: type) -> bool:
    return is_int(value) if kind is int else isinstance(value, kind)


def fingerprint_shape_problems(fp: dict[str, Any]) -> list[str]:
    """What a fingerprint needs for its vectors to be read at all: a model name and a
    positive integer dimension (whether the model still exists is ``cbir check``'s)."""
    problems = []
    if not isinstance(fp.get("model"), str):
        problems.append(f"fingerprint model {fp.get('model')!r} is not a name")
    if not is_int(fp.get("dim")) or fp["dim"] < 1:
        problems.append(f"fingerprint has no valid dim ({fp.get('dim')!r})")
    return problems


def _shard_problems(i: int, shard: Any) -> list[str]:
    bad = [key for key, kind in SHARD_KEYS.items() if not isinstance(shard, dict) or not _is(shard.get(key), kind)]
    if not bad:
        bad = [key for key, kind in OPTIONAL_SHARD_KEYS.items() if key in shard and not _is(shard[key], kind)]
    if bad:
        return [f"manifest shard #{i}: key(s) {', '.join(bad)} missing or of the wrong type"]
    if not SHARD_NAME.fullmatch(shard["name"]):
        return [f"manifest shard #{i}: name {shard['name'][:40]!r} is not a shard name"]
    removed = shard["removed"]
    if shard["rows"] < 1 or len(set(removed)) != len(removed) or any(
            not is_int(r) or not 0 <= r < shard["rows"] for r in removed):
        return [f"manifest shard {shard['name']}: tombstones out of range or repeated"]
    return []


def manifest_problems(manifest: Any) -> list[str]:
    """Structural problems of a parsed manifest (wrong types, missing keys,
    impossible counts); empty when it is well-formed, and then every value that
    the store reads has the type it expects."""
    if not isinstance(manifest, dict):
        return ["manifest is not a JSON object"]
    if manifest.get("format") not in READABLE_FORMATS:
        return [f"not a cbir manifest of format {FORMAT_VERSION} or older (format {manifest.get('format')!r})"]
    problems = [f"manifest key {key!r} missing or not {kind.__name__}"
                for key, kind in MANIFEST_KEYS.items() if not _is(manifest.get(key), kind)]
    if problems:
        return problems
    problems += fingerprint_shape_problems(manifest["fingerprint"])
    if manifest["next_id"] < 0 or manifest["next_shard"] < 1 or manifest["generation"] < 0:
        problems.append("manifest next_id, next_shard or generation out of range")
    if any(not isinstance(v, dict) or not isinstance(v.get("sha256"), str) or not isinstance(v.get("reason"), str)
           for v in manifest["skipped"].values()):
        problems.append("manifest skipped entries must each have a sha256 and a reason")
    if "weights_path" in manifest and not isinstance(manifest["weights_path"], str):
        problems.append("manifest weights_path is not a path")
    if ROOTS_KEY in manifest and roots_problem(manifest[ROOTS_KEY]):
        problems.append(f"manifest {roots_problem(manifest[ROOTS_KEY])}")
    dtype = dtype_problem(manifest)
    if dtype:
        problems.append(f"manifest {dtype}")
    live = 0
    names: set[str] = set()
    for i, shard in enumerate(manifest["shards"]):
        shard_problems = _shard_problems(i, shard)
        if not shard_problems and shard["name"] in names:
            shard_problems = [f"manifest shard {shard['name']}: listed twice"]
        problems += shard_problems
        if not shard_problems:
            names.add(shard["name"])
            live += shard["rows"] - len(shard["removed"])
    if not problems and live != manifest["count"]:
        problems.append(f"manifest count {manifest['count']} but its shards hold {live} live rows")
    return problems


# Beside the manifest: the sha256 of the last manifest bytes found well-formed (and
# the rules' version). Checking every shard entry of a 10M-row checkpoint took
# ~0.3 s per open; it changes only every many commits (.commit_log), so a reader
# hashes it (~5 ms) and checks its entries only when it is not the one checked.
CHECKED = ".manifest-checked"
CHECK_RULES = "1"


def _checked_stamp(data: bytes) -> str:
    import hashlib

    return f"{hashlib.sha256(data).hexdigest()} {CHECK_RULES}\n"


def remember_checked(root: Path, data: bytes) -> None:
    """Record manifest bytes as well-formed (a writer that just made them: readers
    need not check every entry again); best effort."""
    try:
        atomic_write_bytes(root / CHECKED, _checked_stamp(data).encode("ascii"))
    except WriteError:
        pass  # checked by the next reader instead


def parse_manifest(data: bytes, path: Path) -> dict[str, Any]:
    """A manifest file's bytes -> the manifest, or :class:`CorruptStoreError`
    naming ``path`` and the first problem."""
    try:
        manifest = json.loads(data.decode("ascii"))
    except ValueError as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({exc})") from None
    stamp = _checked_stamp(data)
    checked = path.with_name(CHECKED)
    try:
        known = checked.read_text(encoding="ascii") == stamp
    except (OSError, ValueError):
        known = False
    if known:  # these very bytes were found well-formed
        return manifest
    problems = manifest_problems(manifest)
    if problems:
        raise CorruptStoreError(f"{path}: {problems[0]}")
    remember_checked(path.parent, data)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The committed manifest of the store at ``root``: :class:`IndexNotFoundError`
    when there is none, :class:`CorruptStoreError` when it is damaged."""
    path = root / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        lost = lost_manifest(root)
        if lost:
            raise CorruptStoreError(lost, remedy="recover") from None
        raise IndexNotFoundError(f"{root}: no index here (no {MANIFEST})") from None
    except OSError as exc:
        raise CorruptStoreError(f"{path}: unreadable manifest ({exc.strerror or exc})") from None
    return parse_manifest(data, path)


def inspect_manifest(root: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The manifest at ``root`` and every structural problem found, never raising
    (``cbir check`` reports them all); the manifest is None when it is unusable."""
    path = root / MANIFEST
    if not path.is_file():
        return None, [lost_manifest(root) or f"{path}: missing (no index here)"]
    try:
        manifest = json.loads(path.read_bytes().decode("ascii"))
    except (OSError, ValueError) as exc:
        return None, [f"{path}: unreadable ({exc})"]
    problems = [f"{path}: {p}" for p in manifest_problems(manifest)]
    return (None if problems else manifest), problems


def parse_rows(data: bytes) -> list[Row]:
    """A rows file's bytes -> its rows; ValueError says what is wrong.

    The checks are written out per field (``type(x) is int`` rejects JSON true, as
    :func:`is_int` does): this runs for every row of the store when it is opened,
    and the generic per-key loop took 3x as long as parsing the JSON itself."""
    rows = json.loads(data.decode("ascii"))
    if not isinstance(rows, list):
        raise ValueError("not a JSON list of rows")
    keys = ROW_KEYS.keys()
    out = []
    for i, row in enumerate(rows):
        if type(row) is not dict or row.keys() != keys:
            raise ValueError(f"row #{i} is not {{id, path, sha256, size}} with the right types")
        rid, path, sha256, size = row["id"], row["path"], row["sha256"], row["size"]
        if type(rid) is not int or type(path) is not str or type(sha256) is not str or type(size) is not int:
            raise ValueError(f"row #{i} is not {{id, path, sha256, size}} with the right types")
        out.append(Row(rid, path, sha256, size))
    return out


def write_identity(root: Path, manifest: dict[str, Any]) -> None:
    """Write ``store.json`` (the fingerprint, shard dtype and weights file of the store's vectors)
    unless it already says the same: written after the manifest at a commit, it
    marks a store that has committed, so shards found without a manifest are known
    to be a lost manifest's (recoverable), not an interrupted first run's leftovers."""
    identity = {"format": FORMAT_VERSION, "fingerprint": manifest["fingerprint"]}
    if MANIFEST_KEY in manifest:  # what a recovered manifest must say its shards are
        identity[MANIFEST_KEY] = manifest[MANIFEST_KEY]
    if manifest.get("weights_path"):
        identity["weights_path"] = manifest["weights_path"]
    if read_identity(root) != identity:
        atomic_write_json(root / IDENTITY, identity)


def read_identity(root: Path) -> dict[str, Any] | None:
    """``store.json`` when present and well-formed, else None."""
    try:
        identity = json.loads((root / IDENTITY).read_bytes().decode("ascii"))
    except (OSError, ValueError):
        return None
    if (not isinstance(identity, dict) or not isinstance(identity.get("fingerprint"), dict)
            or fingerprint_shape_problems(identity["fingerprint"]) or dtype_problem(identity)):
        return None
    return identity


def shard_files(root: Path) -> list[Path]:
    """The shard vector files in a store folder, whatever names them."""
    folder = root / SHARDS_DIR
    try:
        return sorted(p for p in folder.iterdir() if SHARD_NAME.fullmatch(p.name.removesuffix(".npy"))
                      and p.name.endswith(".npy"))
    except OSError:
        return []


def lost_manifest(root: Path) -> str | None:
    """When ``root`` has no manifest but did commit (its ``store.json`` says so) and
    still holds shards: the message saying so. Such shards are never taken for an
    interrupted first run's leftovers (and deleted): the manifest can be recovered
    from them."""
    if (root / MANIFEST).exists() or not (root / IDENTITY).exists():
        return None
    shards = shard_files(root)
    if not shards:
        return None
    return (f"{root}: {len(shards)} shard file(s) but no {MANIFEST} (deleted or lost); "
            "nothing was changed")
