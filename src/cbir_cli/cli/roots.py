"""``cbir status`` and ``cbir forget``: what the index was given, and letting go of part of it."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import IndexDirOpt, JsonOpt, app, cli_errors, printable, stderr, stdout


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


@app.command("status")
def status_cmd(index_dir: IndexDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show the index's folders (roots) with their image counts, its model, size on disk and last change."""
    with cli_errors():
        import time

        from ..paths import display_path
        from ..pipeline.index_roots import index_status
        from ..resolve import resolve_index_dir

        status = index_status(resolve_index_dir(index_dir))
        if as_json:
            typer.echo(json.dumps(status.as_dict(), indent=2))
            return
        out = stdout()
        precision = "" if status.precision == "fp32" else f", {status.precision}"
        out.print(f"index {printable(display_path(status.index))}: {status.count} images, model {status.model} "
                  f"(dim {status.dim}{precision}), {_size(status.bytes)} on disk", markup=False)
        if status.updated is not None:
            out.print(f"last change: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(status.updated))} "
                      f"(generation {status.generation})", markup=False)
        out.print("folders:" if status.roots else "folders: none", markup=False)
        for root, count in status.roots.items():
            out.print(f"  {count:>8}  {printable(display_path(root))}", markup=False)
        if status.derived:
            stderr().print("note: this index recorded no folders (made by an older cbir); shown: its images' "
                           "common folder (the next `cbir index` records it)", markup=False)


@app.command("forget")
def forget_cmd(
    path: Annotated[str, typer.Argument(help="An indexed folder (see `cbir status`) or a folder inside one, or a "
                                             "URL.", show_default=False)],
    index_dir: IndexDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop every image at or below PATH from the index, in one commit; the files themselves are untouched."""
    with cli_errors():
        from ..paths import display_path
        from ..pipeline.index_roots import forget_path
        from ..resolve import resolve_index_dir

        target = resolve_index_dir(index_dir)
        done = forget_path(target, path)
        if as_json:
            typer.echo(json.dumps(done.as_dict(), indent=2))
            return
        where = printable(display_path(done.path))
        if not done.removed and not done.roots_dropped:
            stderr().print(f"note: nothing indexed below {where}; nothing changed", markup=False)
            return
        dropped = " (no longer an indexed folder)" if done.roots_dropped else ""
        stderr().print(f"forgot {done.removed} images below {where}{dropped}; files untouched", markup=False)
