"""Where things live by default, and how a path is written down: resolved when
stored, printable when shown."""

from __future__ import annotations

import os
from pathlib import Path

INDEX_ENV = "CBIR_INDEX"
CACHE_ENV = "CBIR_CACHE"


def default_index_dir() -> Path:
    """``$CBIR_INDEX`` if set, else the per-user data directory (XDG on Linux),
    so ``cbir query`` finds what ``cbir index`` built from any working directory."""
    env = os.environ.get(INDEX_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("cbir", appauthor=False)) / "index"


def cache_root() -> Path:
    """The one cache folder (ONNX exports, evaluate's features): ``$CBIR_CACHE`` if
    set, else the per-user cache directory (``~/.cache/cbir`` on Linux)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("cbir", appauthor=False))


def normalise_path(path: str | os.PathLike[str], real_dirs: dict[str, str] | None = None) -> str:
    """The form in which an image path is stored: absolute, with ``..`` and
    symlinked folders resolved, the file name itself kept (a symlinked file stays
    itself). ``./a/../photos/x.jpg`` and ``/abs/photos/x.jpg`` become one key.

    ``real_dirs``: a cache of resolved folders for many paths at once (one
    ``realpath`` per folder instead of per file)."""
    head, name = os.path.split(os.path.abspath(os.fspath(path)))
    if real_dirs is None:
        return os.path.join(os.path.realpath(head), name)
    real = real_dirs.get(head)
    if real is None:
        real = real_dirs[head] = os.path.realpath(head)
    return os.path.join(real, name)


def display_path(path: str | os.PathLike[str]) -> str:
    """A printable form of a path, even for names that are not valid UTF-8."""
    return os.fsencode(path).decode("utf-8", errors="replace")


def lossless_path(path: str | os.PathLike[str]) -> str | None:
    """The exact bytes of a path that :func:`display_path` cannot show (it is not
    valid UTF-8), percent-encoded (RFC 3986, ``/`` kept; decode with
    ``urllib.parse.unquote_to_bytes``); None when the display form is exact."""
    from urllib.parse import quote_from_bytes

    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return quote_from_bytes(raw, safe="/")
    return None


def json_path(path: str | os.PathLike[str], key: str = "path") -> dict[str, str]:
    """``{key: display form}``, plus ``{key}_bytes`` (:func:`lossless_path`) when the
    display form lost bytes: how JSON output names a file, so a client can always
    recover the real path."""
    raw = lossless_path(path)
    return {key: display_path(path), **({f"{key}_bytes": raw} if raw is not None else {})}


def common_folder(paths: list[str]) -> str:
    """The deepest folder holding every one of ``paths`` (of an index: the folder
    that was indexed, as far as its rows tell). ``paths`` must not be empty."""
    return os.path.commonpath([os.path.dirname(p) for p in paths])
