"""The suite never writes into the user's cache or index (issue 22, item 7): two
ONNX models in ~/.cache/cbir were once re-made by `python -m pytest`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

from cbir_cli.paths import cache_root, default_index_dir


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def test_the_suite_has_its_own_cache_and_index(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert _inside(cache_root(), base) and not _inside(cache_root(), Path(user_cache_dir("cbir", appauthor=False)))
    assert _inside(default_index_dir(), base)
    assert not _inside(default_index_dir(), Path(user_data_dir("cbir", appauthor=False)))
    # A command run as a subprocess sees the same folders.
    shown = subprocess.run([sys.executable, "-c", "from cbir_cli.paths import cache_root; print(cache_root())"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert _inside(Path(shown), base)
