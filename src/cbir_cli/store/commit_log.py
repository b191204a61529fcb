"""The store's commit log: a commit costs what changed, not what is stored.

``manifest.json`` is a *checkpoint* -- the full state at its ``generation``. Each
commit after it is one file ``log/<generation, 20 digits>.json`` holding only what
that commit changed: the entries of shards added or given new tombstones (a shard
entry is bounded by its own rows, never by the store), the names of shards dropped,
skipped files set or forgotten, and the top-level keys after the commit (``next_id``,
``next_shard``, ``count``, ``updated``, anything else that changed). The state of the
store is the checkpoint with the log entries after it replayed in order.

Taken from Delta Lake's ``_delta_log`` (numbered JSON actions, a checkpoint every
few commits, readers start at the latest checkpoint and replay what follows; a
commit is the creation of the next number, which is never overwritten) and
Lucene's segments (immutable shards plus tombstones; the commit point names
them). Unlike Delta, the checkpoint is the old ``manifest.json`` itself, so a store
without a log is simply a checkpoint, and old indexes open as they are.

Commit point: the entry is written to a temporary, fsynced, then *linked* to its
final name (``os.link`` fails rather than overwrite), and the folder fsynced. A
reader replays contiguous generations from checkpoint + 1; an entry that is
missing (a gap), unparseable or inconsistent with the state it follows ends the
replay: it and everything after it were never committed (they are leftovers, and
``cbir check`` reports them). Entries at or below the checkpoint are stale and
ignored (a checkpoint deletes them, a crash may leave them).

Checkpoints: every :data:`CHECKPOINT_EVERY` commits, and at the end of a writer's
run (:meth:`FeatureStore.checkpoint`) when the manifest is small or the log since
the last checkpoint has grown as large as it; so a run's cost is what it changed
(amortised) and a reader replays at most a checkpoint's worth of log. A server
follows both files (:mod:`cbir_cli.serve.live`). ``manifest.json`` written this way
says ``"format": 2``: a cbir that predates the log would read the checkpoint alone
and miss (or, writing, contradict) the log, so it refuses with one line instead of
serving or corrupting a partial state. Format 1 stores open and are migrated by
their first commit, which writes a format 2 checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import WriteError
from ..fsutil import TMP_MARK, fsync_dir, json_bytes
from .manifest import _shard_problems, is_int, read_manifest
from .roots import ROOTS_KEY, roots_problem

LOG_DIR = "log"
CHECKPOINT_EVERY = 64
# Keys a log entry sets from the state after its commit; others only when they changed.
ALWAYS_SET = ("next_id", "next_shard", "count", "updated")
# Not compared to see whether anything changed: the commit sets them.
UNTRACKED = frozenset({"shards", "skipped", "generation", "updated", "count", "versions", "format"})
_TYPES = {"next_id": int, "next_shard": int, "count": int, "fingerprint": dict}


def entry_path(root: Path, generation: int) -> Path:
    return root / LOG_DIR / f"{generation:020d}.json"


def log_generations(root: Path) -> dict[int, Path]:
    """Generation -> entry file of every well-named entry in the log folder."""
    folder = root / LOG_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    return {int(n[:-5]): folder / n for n in names if n.endswith(".json") and n[:-5].isdigit()}


class Changes:
    """What was changed since the last commit: the next log entry."""

    def __init__(self) -> None:
        self.shards: dict[str, None] = {}  # added or changed (ordered: added ones in order)
        self.new: set[str] = set()  # of those, added since the last commit
        self.dropped: set[str] = set()  # committed shards dropped
        self.skipped: dict[str, Any] = {}
        self.unskipped: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.shards or self.dropped or self.skipped or self.unskipped)

    def added(self, name: str) -> None:
        self.shards[name] = None
        self.new.add(name)

    def changed(self, name: str) -> None:
        self.shards[name] = None

    def drop(self, name: str) -> None:
        self.shards.pop(name, None)
        if name in self.new:
            self.new.discard(name)
        else:
            self.dropped.add(name)

    def skip(self, path: str, value: Any) -> None:
        self.skipped[path] = value
        self.unskipped.discard(path)

    def unskip(self, path: str) -> None:
        self.skipped.pop(path, None)
        self.unskipped.add(path)

    def entry(self, manifest: dict[str, Any], positions: dict[str, int], top: dict[str, Any]) -> dict[str, Any]:
        """The log entry of the commit that makes ``manifest`` (the state after it)
        durable; ``top``: the tracked top-level keys at the last commit."""
        shards = manifest["shards"]
        now = {k: v for k, v in manifest.items() if k not in UNTRACKED}
        return {
            "format": 2, "generation": manifest["generation"],
            "shards": [shards[positions[name]] for name in self.shards],
            "dropped": sorted(self.dropped),
            "skipped": self.skipped, "unskipped": sorted(self.unskipped),
            "set": {**{k: v for k, v in now.items() if top.get(k) != v}, **{k: manifest[k] for k in ALWAYS_SET}},
            "unset": sorted(set(top) - set(now)),
        }


def top_keys(manifest: dict[str, Any]) -> dict[str, Any]:
    """The tracked top-level keys (a copy: callers may change the manifest's in place)."""
    return json.loads(json.dumps({k: v for k, v in manifest.items() if k not in UNTRACKED}))


def write_entry(root: Path, entry: dict[str, Any]) -> int:
    """Commit ``entry``: temporary, fsync, link to its final name (never over
    another), fsync the folder. An entry file already there at that generation
    was never committed (the writer holds the lock and its state replayed the whole
    log): it is removed first. Returns the bytes written."""
    folder = root / LOG_DIR
    final = entry_path(root, entry["generation"])
    tmp = folder / f".{final.name}{TMP_MARK}{os.getpid()}"
    data = json_bytes(entry)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, final)
        except FileExistsError:
            final.unlink()
            os.link(tmp, final)
        tmp.unlink()
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{final}: cannot write ({exc.strerror or exc})") from None
    fsync_dir(folder)
    return len(data)


def _entry_problem(state: dict[str, Any], entry: Any, positions: dict[str, int]) -> str | None:
    if not isinstance(entry, dict) or entry.get("generation") != state["generation"] + 1:
        return "not the entry of the next generation"
    kinds = {"shards": list, "dropped": list, "skipped": dict, "unskipped": list, "set": dict, "unset": list}
    if any(not isinstance(entry.get(k), kind) for k, kind in kinds.items()):
        return "a key is missing or of the wrong type"
    top = entry["set"]
    if any(not is_int(top.get(k)) or top[k] < 0 for k in ALWAYS_SET if k != "updated") or any(
            k in top and not (is_int(top[k]) if kind is int else isinstance(top[k], kind))
            for k, kind in _TYPES.items()):
        return "next_id, next_shard or count missing or invalid"
    if ROOTS_KEY in top and roots_problem(top[ROOTS_KEY]):
        return str(roots_problem(top[ROOTS_KEY]))
    if any(not isinstance(n, str) or n not in positions for n in entry["dropped"]):
        return "drops a shard the state does not hold"
    for i, shard in enumerate(entry["shards"]):
        problems = _shard_problems(i, shard)
        if problems:
            return problems[0]
        if shard["name"] not in positions and int(shard["name"][6:]) >= top["next_shard"]:
            return f"shard {shard['name']} not below next_shard"
    if any(not isinstance(v, dict) or not isinstance(v.get("sha256"), str) or not isinstance(v.get("reason"), str)
           for v in entry["skipped"].values()) or any(not isinstance(p, str) for p in entry["unskipped"]):
        return "skipped entries must each have a sha256 and a reason"
    return None


def apply_entry(state: dict[str, Any], entry: Any, positions: dict[str, int]) -> str | None:
    """Apply one log entry to ``state`` in place (``positions``: shard name -> index,
    kept in step); None, or what is wrong with it (then ``state`` is unchanged)."""
    problem = _entry_problem(state, entry, positions)
    if problem:
        return problem
    shards = state["shards"]
    touched = [*entry["dropped"], *(s["name"] for s in entry["shards"] if s["name"] in positions)]
    live = {n: shards[positions[n]]["rows"] - len(shards[positions[n]]["removed"]) for n in touched}
    names = [s["name"] for s in entry["shards"]]
    if len(set(names)) != len(names) or set(names) & set(entry["dropped"]):
        return "names a shard twice"
    count = state["count"] - sum(live.values()) + sum(s["rows"] - len(s["removed"]) for s in entry["shards"])
    if count != entry["set"]["count"]:
        return f"count {entry['set']['count']} but its changes leave {count} live rows"
    if entry["dropped"]:
        gone = set(entry["dropped"])
        shards[:] = [s for s in shards if s["name"] not in gone]
        positions.clear()
        positions.update((s["name"], i) for i, s in enumerate(shards))
    for shard in entry["shards"]:
        if shard["name"] in positions:
            shards[positions[shard["name"]]] = shard
        else:
            positions[shard["name"]] = len(shards)
            shards.append(shard)
    for path in entry["unskipped"]:
        state["skipped"].pop(path, None)
    state["skipped"].update(entry["skipped"])
    for key in entry["unset"]:
        state.pop(key, None)
    state.update({k: v for k, v in entry["set"].items() if k not in UNTRACKED or k in ALWAYS_SET})
    state["generation"] = entry["generation"]
    return None


def replay(root: Path, state: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint ``state`` (changed in place) with the log entries after it
    applied; and one line per entry file that was not applied though it is above
    the checkpoint (a gap before it, or unreadable or inconsistent: never committed)."""
    entries = log_generations(root)
    positions = {s["name"]: i for i, s in enumerate(state["shards"])}
    ignored: list[str] = []
    for generation in sorted(g for g in entries if g > state["generation"]):
        path = entries[generation]
        if ignored or generation != state["generation"] + 1:
            ignored.append(f"{path}: after a gap in the log; ignored (never committed)")
            continue
        try:
            problem = apply_entry(state, json.loads(path.read_bytes().decode("ascii")), positions)
        except (OSError, ValueError) as exc:
            problem = f"unreadable ({exc})"
        if problem:
            ignored.append(f"{path}: {problem}; ignored (never committed)")
    return state, ignored


def leftover_entries(root: Path, checkpoint: int, generation: int) -> list[Path]:
    """Log files that are not part of the state (checkpoint at ``checkpoint``,
    replayed to ``generation``): entries at or below the checkpoint (it holds them),
    above the state (never committed), temporaries and stray names."""
    folder = root / LOG_DIR
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    live = {entry_path(root, g).name for g in range(checkpoint + 1, generation + 1)}
    return sorted(folder / n for n in names if n not in live)


def prune(paths: Iterable[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


def read_state(root: Path) -> tuple[dict[str, Any], int, list[str]]:
    """The committed state of the store at ``root``: the checkpoint replayed
    (:func:`replay`); its generation; the log entries ignored. Errors as
    :func:`~.manifest.read_manifest`'s."""
    state = read_manifest(root)
    checkpoint = state["generation"]
    state, ignored = replay(root, state)
    return state, checkpoint, ignored
