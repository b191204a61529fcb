"""What an index was given and how it lets go: its roots (:mod:`cbir_cli.store.roots`)
recorded by every ``cbir index`` run, ``cbir status`` (roots with their image
counts, model, size on disk, last change) and ``cbir forget PATH`` (a root or a
folder inside one leaves the index in one commit; no file is touched).

A forget goes through the store's write transaction like any writer (the lock,
Ctrl-C handling, one commit) and then refreshes the search backend the way
``cbir index`` does after its commit, so searches and ``cbir check`` agree with it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CbirError
from ..imageio.files import source_location
from ..paths import display_path, json_path
from ..store.feature_store import FeatureStore
from ..store.roots import (
    ROOTS_KEY,
    count_by_root,
    derived_roots,
    inside,
    recorded_roots,
    roots_of,
    with_root,
    without,
)
from ..store.transaction import write_transaction


def root_key(location: str | os.PathLike[str]) -> str:
    """How a root (or a path to forget) is recorded: a URL as given without its
    trailing ``/``, a folder absolute with every symlink resolved (as the paths of
    the rows below it are stored)."""
    where = source_location(location)
    return where if isinstance(where, str) else os.path.realpath(where.absolute())


def record_root(store: FeatureStore, root: str, rebuild: bool) -> str | None:
    """Record that ``root`` (a :func:`root_key`) was indexed into ``store`` (a
    writer's, before it commits). A rebuild holds only ``root``. An index that
    recorded no roots first gets the ones its rows tell: returns a note saying so."""
    roots = recorded_roots(store.manifest)
    note = None
    if rebuild or not store.committed:
        roots = []
    elif roots is None:
        roots = derived_roots(r.path for r in store.live_rows())
        if roots:
            note = (f"note: {display_path(store.root)} recorded no indexed folders (made by an older cbir); "
                    f"took {display_path(roots[0])}, its images' common folder, as one")
    new = with_root(roots, root)
    if store.manifest.get(ROOTS_KEY) != new:
        store.manifest[ROOTS_KEY] = new
    return note


@dataclass
class IndexStatus:
    """``cbir status``: what the index at ``index`` holds."""

    index: str
    roots: dict[str, int]  # root -> live images below it
    derived: bool  # roots not recorded (an older index): taken from the rows' common folder
    count: int
    model: str
    precision: str
    dim: int
    bytes: int  # every file of the index folder
    updated: float | None  # the last commit (seconds since the epoch)
    generation: int

    def as_dict(self) -> dict[str, Any]:
        return {**json_path(self.index, "index"),
                "roots": [{**json_path(r), "images": n} for r, n in self.roots.items()],
                "roots_derived": self.derived, "count": self.count, "model": self.model,
                "precision": self.precision, "dim": self.dim, "bytes": self.bytes, "updated": self.updated,
                "generation": self.generation}


def folder_bytes(folder: Path) -> int:
    total = 0
    for top, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(top, name)).st_size
            except OSError:
                pass  # removed by a writer meanwhile
    return total


def index_status(index_dir: str | os.PathLike[str]) -> IndexStatus:
    """The status of the index at ``index_dir`` (read only: :class:`IndexNotFoundError`
    when there is none)."""
    store = FeatureStore.open(index_dir)
    rows = store.live_rows()
    roots, derived = roots_of(store.manifest, lambda: (r.path for r in rows))
    fp = store.fingerprint
    updated = store.manifest.get("updated")
    return IndexStatus(str(store.root), count_by_root(roots, (r.path for r in rows)), derived, store.count,
                       str(fp["model"]), str(fp.get("precision", "fp32")), store.dim, folder_bytes(store.root),
                       float(updated) if isinstance(updated, (int, float)) else None, store.generation)


@dataclass
class Forgotten:
    """What ``cbir forget PATH`` did."""

    path: str
    removed: int = 0  # images that left the index
    roots_dropped: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # the roots after it

    def as_dict(self) -> dict[str, Any]:
        return {**json_path(self.path), "removed": self.removed,
                "roots_dropped": [display_path(r) for r in self.roots_dropped],
                "roots": [display_path(r) for r in self.roots]}


def forget_path(index_dir: str | os.PathLike[str], path: str | os.PathLike[str]) -> Forgotten:
    """Drop every image at or below ``path`` from the index in one commit, and the
    roots at or below it; the files stay as they are. ``path`` must be a root, lie
    inside one, or hold some (else a :class:`CbirError`: nothing is changed)."""
    from ..search.backends import refresh_backend

    target = root_key(path)
    with write_transaction(index_dir, noun="removals") as txn:
        existing = txn.existing
        if existing is None:
            raise CbirError(f"{display_path(index_dir)}: no index here", remedy="build")
        store = txn.begin(existing.fingerprint)
        rows = store.live_rows()
        roots, _derived = roots_of(store.manifest, lambda: (r.path for r in rows))
        if not any(inside(target, r) or inside(r, target) for r in roots):
            listed = ", ".join(display_path(r) for r in roots) or "none"
            raise CbirError(f"{display_path(target)}: not inside any folder of the index (its folders: {listed})")
        done = Forgotten(target, roots_dropped=[r for r in roots if inside(r, target)],
                         roots=without(roots, target))
        done.removed = txn.remove_paths([r.path for r in rows if inside(r.path, target)])
        store.forget_skipped([p for p in store.manifest["skipped"] if inside(p, target)])
        store.manifest[ROOTS_KEY] = done.roots
        if txn.commit() and store.count:  # an empty index has no search index to keep
            refresh_backend(store, None)
    return done
