"""``cbir query`` and ``cbir serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import (
    AUTO_DEVICE,
    AUTO_RUNTIME,
    DeviceOpt,
    IndexDirOpt,
    JsonOpt,
    RuntimeOpt,
    app,
    cli_errors,
    printable,
    stderr,
    stdout,
)


@app.command("query")
def query_cmd(
    images: Annotated[list[Path], typer.Argument(help="Query image file(s).")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1000, help="Results per query.")] = 5,
    index_dir: IndexDirOpt = None,
    device: DeviceOpt = AUTO_DEVICE,
    runtime: RuntimeOpt = AUTO_RUNTIME,
    as_json: JsonOpt = False,
) -> None:
    """Find the K indexed images most similar to each query image (cosine similarity)."""
    with cli_errors():
        from ..search.searcher import Searcher

        searcher = Searcher.open(index_dir, device=device.value, runtime=runtime.value)
        results = searcher.search_paths(images, k)
        if as_json:
            payload = [{"query": str(q), "results": [h.as_dict() for h in hits]} for q, hits in zip(images, results)]
            typer.echo(json.dumps(payload, indent=2))
            return
        import sys

        if not sys.stdout.isatty():
            # Piped: one plain line per hit (query, rank, score, path, tab-separated),
            # never wrapped, whatever the terminal width.
            for query, hits in zip(images, results):
                for h in hits:
                    typer.echo(f"{printable(str(query))}\t{h.rank}\t{h.score:.4f}\t{printable(h.path)}")
            return
        from rich.table import Table

        console = stdout()
        for query, hits in zip(images, results):
            table = Table(title=printable(str(query)), title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            for h in hits:
                table.add_row(str(h.rank), f"{h.score:.4f}", printable(h.path))
            console.print(table)


@app.command("serve")
def serve_cmd(
    index_dir: IndexDirOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. The default serves this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0 = any free port).")] = 8000,
    device: DeviceOpt = AUTO_DEVICE,
    runtime: RuntimeOpt = AUTO_RUNTIME,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001,
                                                 help="Largest accepted upload, in MB.")] = 20.0,
) -> None:
    """Serve the search web page and JSON API over an index (model loaded once at start-up)."""
    with cli_errors():
        from ..serve.app import create_app, is_loopback, make_http_server, server_url

        app_ = create_app(index_dir=index_dir, device=device.value, max_upload_mb=max_upload_mb,
                          runtime=runtime.value)
        server = make_http_server(app_, host, port)
        searcher = app_.extensions["cbir"].current()
        err = stderr()
        if not is_loopback(host):
            err.print(f"warning: listening on {host}: anyone who can reach this machine can search the index "
                      "and fetch its images")
        err.print(f"serving {searcher.count} images ({searcher.model_name}) at {server_url(server)} "
                  "(Ctrl+C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            err.print("stopped")
        finally:
            server.close()
