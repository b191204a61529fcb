"""The package's shape is checked, not wished for: the import-linter contracts in
pyproject.toml (layers, no cycles) hold, ruff is clean, and no module grows past a
size one person can hold in their head."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "cbir_cli"
# "No module over ~400 lines" (the architecture issue), with a little slack for docstrings.
MAX_MODULE_LINES = 450


def test_import_layers_and_no_cycles():
    tool = shutil.which("lint-imports")
    if tool is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    result = subprocess.run([tool], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "BROKEN" not in result.stdout and result.stdout.count("KEPT") >= 2


def test_ruff_is_clean():
    tool = shutil.which("ruff")
    if tool is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    result = subprocess.run([tool, "check", "src", "tests", "bench"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]


def test_no_module_is_too_long():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_the_layers_are_folders():
    for layer in ("models", "imageio", "store", "pipeline", "search", "evaluate", "serve", "cli"):
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
