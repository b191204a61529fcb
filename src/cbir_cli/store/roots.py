"""An index's roots: the folders (or URLs) ``cbir index`` was given, recorded in the
store's state as ``"roots"`` (a sorted list of strings, in the form the rows' paths
below them have: absolute with symlinked folders resolved, or a URL without its
trailing ``/``). A top-level key of the state, so a commit that changes them writes
them in its log entry (:mod:`.commit_log`) and one that does not costs nothing more.

Roots never nest: a folder inside a recorded root is already covered, and a root
given above recorded ones replaces them. An index made before roots were recorded
has none; its roots are then *derived* once from its rows' deepest common folder
(:func:`derived_roots`), the only thing they can tell.

Kept to strings (no file system access): the store layer knows no image sources;
the pipeline hands in roots already normalised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

ROOTS_KEY = "roots"
SEP = "/"


def inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (folders and URLs alike)."""
    return path == folder or path.startswith(folder.rstrip(SEP) + SEP)


def recorded_roots(manifest: dict[str, Any]) -> list[str] | None:
    """The roots the state records, or None for an index made before they were."""
    roots = manifest.get(ROOTS_KEY)
    return list(roots) if isinstance(roots, list) else None


def roots_problem(value: Any) -> str | None:
    """What is wrong with a ``roots`` value read from disk, or None."""
    if not isinstance(value, list) or any(not isinstance(r, str) or not r for r in value):
        return "roots is not a list of folder names"
    return None


def common_folder_of(paths: Iterable[str]) -> str | None:
    """The deepest folder holding every path, by ``/``-separated parts (so that a
    URL's ``//`` survives, which ``os.path.commonpath`` would collapse)."""
    common: list[str] | None = None
    for path in paths:
        parts = path.split(SEP)[:-1]
        if common is None:
            common = parts
            continue
        n = 0
        while n < min(len(common), len(parts)) and common[n] == parts[n]:
            n += 1
        common = common[:n]
    if common is None:
        return None
    folder = SEP.join(common)
    return folder or SEP


def derived_roots(paths: Iterable[str]) -> list[str]:
    """The roots of an index that recorded none: its rows' common folder (none
    when it holds no rows)."""
    folder = common_folder_of(paths)
    return [] if folder is None else [folder]


def roots_of(manifest: dict[str, Any], paths: Callable[[], Iterable[str]]) -> tuple[list[str], bool]:
    """The index's roots, and whether they were derived (``paths``: its live rows'
    paths, asked only when no roots are recorded)."""
    roots = recorded_roots(manifest)
    if roots is not None:
        return roots, False
    return derived_roots(paths()), True


def with_root(roots: list[str], root: str) -> list[str]:
    """``roots`` after indexing ``root``: unchanged when a root holds it already,
    else with it added and the roots below it folded into it."""
    if any(inside(root, r) for r in roots):
        return sorted(roots)
    return sorted([r for r in roots if not inside(r, root)] + [root])


def without(roots: list[str], path: str) -> list[str]:
    """``roots`` after forgetting ``path``: the roots at or below it dropped (a
    sub-folder of a root leaves the root as it is)."""
    return [r for r in roots if not inside(r, path)]


def root_holding(roots: list[str], path: str) -> str | None:
    """The root ``path`` lies in (roots never nest), or None."""
    return next((r for r in roots if inside(path, r)), None)


def count_by_root(roots: list[str], paths: Iterable[str]) -> dict[str, int]:
    """How many of ``paths`` lie in each root (paths outside every root: not counted)."""
    counts = dict.fromkeys(roots, 0)
    for path in paths:
        root = root_holding(roots, path)
        if root is not None:
            counts[root] += 1
    return counts
