"""Acting on duplicate groups (``cbir dedup --move-to DIR``): nothing is ever
deleted. All but the best image of each group move below ``DIR`` under their path
relative to the indexed folder; the index drops their rows in one commit of the
store's write transaction, and its search index is refreshed. Only duplicates of
the image kept move: a member linked to its group through a chain of look-alikes
(A ~ B ~ C, but A and C below the threshold) stays, and the plan says why.

:func:`plan_moves` only looks (it is the dry run); :func:`apply_moves` moves what a
plan says, after checking each file again: an image whose content changed since
it was indexed, or whose group's best image is gone or changed, stays where it
is, and an existing file at the target is never overwritten.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CbirError
from ..imageio.sources import is_object_uri
from ..paths import common_folder, display_path, json_path, normalise_path
from ..store.transaction import write_transaction
from .plan import hash_file

if TYPE_CHECKING:
    from ..search.dedup import DedupResult
    from ..search.protocol import SearchBackend
    from ..search.searcher import Searcher

MoveCallback = Callable[["Move"], None]


@dataclass(frozen=True)
class Move:
    """One duplicate to move (paths as stored), and the image of its group that stays."""

    id: int
    source: str
    target: str
    sha256: str
    keep: str
    keep_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **json_path(self.source, "from"), **json_path(self.target, "to"),
                **json_path(self.keep, "keep")}


@dataclass
class MovePlan:
    base: str  # the indexed folder: targets keep the paths relative to it
    destination: str
    generation: int  # of the store the groups were found in
    moves: list[Move] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    moved: list[Move] = field(default_factory=list)  # filled by apply_moves

    def as_dict(self) -> dict[str, Any]:
        return {"base": display_path(self.base), "destination": display_path(self.destination),
                "moves": [m.as_dict() for m in self.moves], "moved": [m.as_dict() for m in self.moved],
                "skipped": [{**json_path(p), "reason": r} for p, r in self.skipped]}


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def plan_moves(searcher: Searcher, result: DedupResult, destination: str | os.PathLike[str]) -> MovePlan:
    """What moving to ``destination`` would do: all but the best of each group of
    ``result`` (found in ``searcher``'s index) to ``destination/<path relative to
    the indexed folder>``. The destination must be outside every indexed folder
    (the index's roots: a sibling of them is fine)."""
    if not searcher.rows:
        raise CbirError(f"{display_path(searcher.store.root)}: the index is empty")
    remote = next((r.path for r in searcher.rows if is_object_uri(r.path)), None)
    if remote is not None:
        # Only local files can be moved (and checked again first); an object store
        # has no rename, and a copy-then-delete there is not ours to do.
        raise CbirError(f"{display_path(remote)}: cannot move images out of object storage (URLs); "
                        "moving duplicates works for indexes of local folders only")
    base = common_folder([r.path for r in searcher.rows])
    target_root = normalise_path(destination)
    root = next((r for r in searcher.roots if _inside(target_root, r)), None)
    if root is not None:  # the index's real roots: a sibling of them is fine
        raise CbirError(f"{display_path(target_root)}: the duplicates' folder must be outside the indexed folder "
                        f"{display_path(root)} (indexing it again would add them back)")
    plan = MovePlan(base, target_root, searcher.store.generation)
    for group in result.groups:
        best = searcher.row(group.best.id)
        for member in group.others:
            target = os.path.join(target_root, os.path.relpath(member.path, base))
            if member.score_to_best < result.threshold:
                # Grouped through a chain of look-alikes: not a duplicate of what stays.
                plan.skipped.append((member.path, f"similar to the image kept ({display_path(best.path)}) only "
                                                  f"through other images of its group (cosine "
                                                  f"{member.score_to_best:.4f} with it)"))
                continue
            if os.path.lexists(target):
                plan.skipped.append((member.path, f"{display_path(target)} already exists"))
                continue
            plan.moves.append(Move(member.id, member.path, target, searcher.row(member.id).sha256, best.path,
                                   best.sha256))
    return plan


def _unchanged(path: str, sha256: str) -> str | None:
    """None when ``path`` still holds the content that was indexed, else why not."""
    try:
        found, _ = hash_file(path)
    except OSError as exc:
        return f"cannot read it now ({exc.strerror or exc})"
    return None if found == sha256 else "changed since it was indexed"


def _move_one(move: Move) -> str | None:
    """Move one file (never over an existing one); None, or why it stayed."""
    reason = _unchanged(move.source, move.sha256)
    if reason is not None:
        return reason
    kept = _unchanged(move.keep, move.keep_sha256)
    if kept is not None:
        return f"the image kept for its group, {display_path(move.keep)}, is {kept.replace('it ', '', 1)}"
    if os.path.lexists(move.target):
        return f"{display_path(move.target)} already exists"
    try:
        Path(move.target).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(move.source, move.target)
    except OSError as exc:
        return f"cannot move it to {display_path(move.target)} ({exc.strerror or exc})"
    return None


def apply_moves(plan: MovePlan, index_dir: str | os.PathLike[str], backend: SearchBackend | None = None,
                on_move: MoveCallback | None = None) -> MovePlan:
    """Move what ``plan`` says and drop the moved images from the index in one
    commit, then refresh its search backend (``backend``: default the one the index records).
    Refused when the index changed since the plan was made. Files that cannot be
    moved are added to ``plan.skipped`` with the reason; the plan is returned."""
    from ..search.backends import refresh_backend

    with write_transaction(index_dir, noun="removals") as txn:
        existing = txn.existing
        if existing is None:
            raise CbirError(f"{display_path(index_dir)}: no index here", remedy="build")
        if existing.generation != plan.generation:
            raise CbirError(f"{display_path(index_dir)}: the index changed since the duplicates were found; "
                            "find them again")
        store = txn.begin(existing.fingerprint)
        try:
            for move in plan.moves:
                reason = _move_one(move)
                if reason is not None:
                    plan.skipped.append((move.source, reason))
                    continue
                plan.moved.append(move)
                if on_move is not None:
                    on_move(move)
        finally:
            # Also on Ctrl-C: what moved leaves the index in the commit that follows.
            txn.remove_paths([m.source for m in plan.moved])
        txn.commit()
        if plan.moved:
            if backend is not None:
                backend.refresh(store, None)
            else:
                refresh_backend(store, None)
    return plan
