"""The ``cbir`` command line: parses arguments, calls the library, prints.

Heavy libraries (torch, faiss) are imported inside commands so ``cbir --help``
stays instant. Any :class:`~cbir_cli.errors.CbirError` becomes a one-line
``error: ...`` on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

# Importing the command modules registers their commands on the app, in this order
# (the order of `cbir --help`).
# isort: off
from . import indexing, roots, searching, dedup, model_commands, evaluating  # noqa: F401
# isort: on
from .common import app, error_line

__all__ = ["app", "error_line", "main"]


def main() -> None:
    app()

