"""Where things live by default."""

from __future__ import annotations

import os
from pathlib import Path

INDEX_ENV = "CBIR_INDEX"


def default_index_dir() -> Path:
    """``$CBIR_INDEX`` if set, else the per-user data directory (XDG on Linux),
    so ``cbir query`` finds what ``cbir index`` built from any working directory."""
    env = os.environ.get(INDEX_ENV)
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("cbir", appauthor=False)) / "index"


def resolve_index_dir(index_dir: Path | str | None) -> Path:
    return Path(index_dir).expanduser() if index_dir is not None else default_index_dir()
