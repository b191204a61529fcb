"""``cbir query`` and ``cbir serve``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import CbirError, ImageError
from .common import (
    AUTO_DEVICE,
    AUTO_RUNTIME,
    DeviceOpt,
    IndexDirOpt,
    JsonOpt,
    RuntimeOpt,
    cli_errors,
    command,
    printable,
    stderr,
    stdout,
)
from .option_groups import RerankOptions, grouped


@command("query")
@grouped
def query_cmd(
    images: Annotated[Optional[list[Path]], typer.Argument(metavar="IMAGE", help="Query image file(s).",
                                                                   show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--top-k", metavar="K", min=1, max=1000, help="Results per query.")] = 5,
    ids: Annotated[Optional[list[int]], typer.Option("--id", metavar="ID",
        help="More like this: an indexed image (its id, as "
                                                     "printed by --json or the web page) is the query, by its "
                                                     "stored vector. Repeatable.", show_default=False)] = None,
    paths: Annotated[Optional[list[Path]], typer.Option("--path", metavar="FILE",
        help="More like this: an indexed file, by path; "
                                                        "its stored vector is the query. Repeatable.",
                                                        show_default=False)] = None,
    texts: Annotated[Optional[list[str]], typer.Option("--text", metavar="WORDS",
        help="Search by words (a model with a text tower: clip:...). Repeatable; with images and --not, "
             "every term goes into ONE query: the sum of their unit vectors minus the --not ones, "
             "renormalised. 'N:words' weighs a term N times (default 1).", show_default=False)] = None,
    negatives: Annotated[Optional[list[str]], typer.Option("--not", metavar="WORDS",
        help="Steer away from these words: subtracted from the query (see --text). Repeatable.",
        show_default=False)] = None,
    box: Annotated[Optional[str], typer.Option("--box", metavar="X0,Y0,X1,Y1",
                                               help="Search with this region of each query image: pixels of the "
                                                    "upright image, or fractions 0-1 of its width and height "
                                                    "(e.g. 0.5,0,1,1 = the right half). With --id/--path, the "
                                                    "region of the indexed file is embedded.",
                                               show_default=False)] = None,
    under: Annotated[Optional[Path], typer.Option("--under", metavar="FOLDER",
                                                  help="Only results below this folder: absolute, or relative "
                                                       "to the indexed folder (as on the web page). An error if "
                                                       "no indexed image lies below it.",
                                                  show_default=False)] = None,
    min_score: Annotated[Optional[float], typer.Option("--min-score", metavar="SCORE", min=-1.0, max=1.0,
                                                       help="Only results with at least this cosine similarity "
                                                            "(fewer than K if fewer qualify).",
                                                       show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", metavar="DIR",
        help="Also write an HTML page (index.html) and "
                                                   "results.png of the queries and their results, with "
                                                   "thumbnails and scores, into this folder.",
                                                   show_default=False)] = None,
    grid: Annotated[Optional[Path], typer.Option("--grid", metavar="PNG",
        help="Also write the queries and their results as one "
                                                 "PNG thumbnail grid with scores.", show_default=False)] = None,
    preview: Annotated[bool, typer.Option("--preview",
        help="Also draw each query's top hits inline in the terminal: kitty graphics, iTerm2 (WezTerm, mintty) "
             "or sixel, told from the environment (CBIR_PREVIEW=kitty|iterm2|sixel|none overrides); where "
             "it cannot, one line says why.")] = False,
    index_dir: IndexDirOpt = None,
    device: DeviceOpt = AUTO_DEVICE,
    runtime: RuntimeOpt = AUTO_RUNTIME,
    *,
    rerank: RerankOptions,
    as_json: JsonOpt = False,
    verify: Annotated[bool, typer.Option("--verify", help="Check the first 5 results against each query with "
                                         "local features and geometry; results verified as the same picture "
                                         "(a crop, a greyscale or edited copy) move first and are listed under "
                                         "'verified' in --json. Reads their files.")] = False,
) -> None:
    """Find the K indexed images most similar to each query image, or to words.

    Queries: image files, a region of them (--box), indexed images (--id, --path), or words (--text, with
    --not to steer away; all terms then make one query); optionally only
    below a folder or above a score. Re-ranked (query expansion, DBA; --no-rerank: plain). score: cosine
    similarity, never rising down the list; a re-ranked hit whose own cosine is higher shows it beside
    (cosine)."""
    with cli_errors():
        from ..imageio.region import Box
        from ..search.filters import ResultFilter
        from ..search.queries import QueryRequest
        from ..search.searcher import Searcher

        request = QueryRequest(images or [], ids or [], paths or [], Box.parse(box) if box is not None else None,
                               ResultFilter.make(under, min_score), texts=texts or [], negatives=negatives or [])
        request.check()
        searcher = Searcher.open(index_dir, device=device.value, runtime=runtime.value,
                                 rerank=rerank.settings())  # the model loads when used
        if request.result_filter is not None:  # a wrong --under fails before the model loads
            request.result_filter.allowed_ids(searcher.rows)
        # Files that cannot be opened are named before the model loads (the torch
        # runtime takes seconds and ~1 GB just to say "not found").
        bad = [(path, error) for path, error in map(_unopenable, request.images) if error]
        if bad and len(request.images) == 1 and not (request.ids or request.paths):
            raise bad[0][1]  # the only query: its reason is the error
        if request.texts or request.negatives:  # all terms make one query: no per-file answers
            from ..search.queries import answer_queries

            if bad:
                raise bad[0][1]
            answers = answer_queries(searcher, request, k)
        elif verify:
            from ..search.verified_queries import CANDIDATES, verify_answers

            answers, bad = _answer_each(searcher, request, max(k, CANDIDATES), bad)
            verify_answers(answers, k)
        else:
            answers, bad = _answer_each(searcher, request, k, bad)
        written = _write_visuals(answers, report, grid)
        protocol = _preview_protocol(as_json) if preview else None
        if as_json:
            typer.echo(json.dumps([a.as_dict() for a in answers], indent=2))
        else:
            _print_answers(answers, protocol)
        for path in written:
            stderr().print(f"wrote {path}", markup=False)
        # An empty answer is not an error, but it should never look like one that failed silently.
        why = " at or above --min-score" if min_score is not None else ""
        for answer in answers:
            if not answer.hits:
                stderr().print(f"note: {printable(answer.view.label)}: no result{why}", markup=False)
        if bad:  # the good ones are answered above; the run still failed
            raise CbirError(f"{len(bad)} of {len(request.images)} query images could not be read")


def _unopenable(path: Path) -> tuple[Path, ImageError | None]:
    """``(path, why it cannot be opened as an image file)``, or ``(path, None)``."""
    from ..imageio.decode import open_image_file

    try:
        fh, _ = open_image_file(path)
    except ImageError as exc:
        return path, exc
    fh.close()
    return path, None


def warn_query(path: str, reason: str) -> None:
    stderr().print(f"warning: {printable(path)}: {printable(reason)}; no results for it", markup=False)


def _answer_each(searcher, request, k: int, bad: list[tuple[Path, ImageError]]):
    """The answers to every query file that can be read, one warning line per one
    that cannot (as ``cbir index`` skips a bad file), then the indexed images'
    answers; returns the answers and the files that failed. A lone query's
    failure is the error itself."""
    from dataclasses import replace

    from ..search.queries import answer_queries

    alone = len(request.images) == 1 and not (request.ids or request.paths)
    for path, error in bad:
        warn_query(str(path), error.reason)
    unopenable = {path for path, _ in bad}
    answers = []
    for path in request.images:
        if path in unopenable:
            continue
        try:
            answers += answer_queries(searcher, replace(request, images=[path], ids=[], paths=[]), k)
        except ImageError as exc:  # opened, but not a picture it can decode
            if alone:
                raise
            warn_query(str(path), exc.reason)
            bad.append((path, exc))
    if request.ids or request.paths:
        answers += answer_queries(searcher, replace(request, images=[]), k)
    return answers, bad


def _write_visuals(answers, report: Path | None, grid: Path | None) -> list[Path]:
    from ..search.gallery import write_query_grid, write_query_report

    views, hits = [a.view for a in answers], [a.hits for a in answers]
    written = []
    if report is not None:
        written.append(write_query_report(report, views, hits))
    if grid is not None:
        written.append(write_query_grid(grid, views, hits))
    return written


def _cosine_cell(hit) -> str:
    """The cosine beside the score, only where they differ (re-ranking lifted the hit)."""
    return f"{hit.cosine:.4f}" if f"{hit.cosine:.4f}" != f"{hit.score:.4f}" else ""


def _preview_protocol(as_json: bool) -> str | None:
    """The terminal's image protocol for --preview, or None after one line saying why."""
    import os
    import sys

    from ..imageio.terminal_preview import detect_protocol

    protocol, why = (None, "stdout is JSON (--json)") if as_json else detect_protocol(os.environ, sys.stdout.isatty())
    if protocol is None:
        stderr().print(f"note: --preview draws nothing: {why}; the results follow as text", markup=False)
    return protocol


def _print_answers(answers, preview: str | None = None) -> None:
    import sys

    if not sys.stdout.isatty():
        # Piped: one plain line per hit (query, rank, score, path; tab-separated), never
        # wrapped, whatever the terminal width; four fields as scripts expect (--json
        # has the cosine too).
        for answer in answers:
            for h in answer.hits:
                typer.echo(f"{printable(answer.view.label)}\t{h.rank}\t{h.score:.4f}\t{printable(h.path)}")
        return
    from rich.table import Table

    console = stdout()
    for answer in answers:
        table = Table(title=printable(answer.view.label), title_justify="left")
        table.add_column("rank", justify="right")
        table.add_column("score", justify="right")
        reordered = any(_cosine_cell(h) for h in answer.hits)
        if reordered:
            table.add_column("cosine", justify="right")
        table.add_column("id", justify="right")
        table.add_column("path", overflow="fold")
        for h in answer.hits:
            cells = [str(h.rank), f"{h.score:.4f}", *([_cosine_cell(h)] if reordered else []), str(h.id),
                     printable(h.path)]
            table.add_row(*cells)
        if not answer.hits:
            table.caption = "no result passes the filter"
        elif reordered:
            table.caption = "score: the lowest cosine down to this rank; cosine: the hit's own, where higher"
        console.print(table)
        if preview is not None:
            from ..imageio.terminal_preview import inline_image
            from ..search.gallery import query_preview

            console.file.write(inline_image(query_preview(answer.view, answer.hits), preview))
            console.file.flush()


@command("serve")
@grouped
def serve_cmd(
    index_dir: IndexDirOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. The default serves this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0 = any free port).")] = 8000,
    device: DeviceOpt = AUTO_DEVICE,
    runtime: RuntimeOpt = AUTO_RUNTIME,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001,
                                                 help="Largest accepted upload, in MB.")] = 20.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the run plan the server would open the index "
                                          "by (index folder, model, device, runtime, precision, descriptor, "
                                          "backend) and stop: no model is loaded, nothing is served.")] = False,
    *,
    rerank: RerankOptions,
) -> None:
    """Serve the search web page and JSON API over an index (model loaded once at start-up)."""
    with cli_errors():
        from ..serve.app import create_app, is_loopback, make_http_server, serve_plan, server_url

        if dry_run:
            from .indexing import show_plan

            show_plan(serve_plan(index_dir, device.value, runtime.value), as_json=False)
            return
        app_ = create_app(index_dir=index_dir, device=device.value, max_upload_mb=max_upload_mb,
                          runtime=runtime.value, rerank=rerank.settings())
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
