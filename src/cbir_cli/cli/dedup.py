"""``cbir dedup``."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from .common import IndexDirOpt, cli_errors, command, printable, stderr, stdout
from .option_groups import DedupOutputOptions, MoveOptions, VerifyOptions, grouped

PROGRESS_FROM = 5000  # images; a smaller index is compared in seconds


@command("dedup")
@grouped
def dedup_cmd(
    index_dir: IndexDirOpt = None,
    threshold: Annotated[Optional[float], typer.Option(
        "--threshold", metavar="SCORE", min=0.0, max=1.0, show_default=False,
        help="Cosine similarity at or above which two images are near-duplicates (default: the threshold measured "
             "best for the index's model, see the README).")] = None,
    *,
    output: DedupOutputOptions,
    move: MoveOptions,
    pair_checks: VerifyOptions,
) -> None:
    """Find groups of near-duplicate images in the index; optionally move the duplicates aside.

    Each group is sorted best first (the largest picture, then the largest file), with every image's
    score to the best."""
    with cli_errors():
        from ..search.dedup import check_threshold, default_threshold
        from ..search.searcher import Searcher

        output.check()
        move.check()
        searcher = Searcher.open(index_dir)
        if threshold is None:
            choice = default_threshold(searcher.store.fingerprint)
            if choice.note:
                stderr().print(f"note: {choice.note}", markup=False)
            threshold = choice.threshold
        check_threshold(threshold)
        result = _find(searcher, threshold, pair_checks.settings(), progress=output.as_text)
        plan = None
        if move.move_to is not None:
            from ..pipeline.dedup_moves import apply_moves, plan_moves

            plan = plan_moves(searcher, result, move.move_to)
            if move.yes:
                apply_moves(plan, searcher.store.root)
        if output.report is not None:
            from ..search.gallery import write_dedup_report

            stderr().print(f"wrote {write_dedup_report(output.report, result)}", markup=False)
        if output.as_json:
            payload = result.as_dict()
            if plan is not None:
                payload["move"] = {**plan.as_dict(), "dry_run": not move.yes}
            typer.echo(json.dumps(payload, indent=2))
        elif output.as_csv:
            _print_csv(result, plan)
        else:
            _print_groups(result)
        if plan is not None and not output.as_json:
            _print_moves(plan, move.yes)


def _find(searcher, threshold: float, verification, progress: bool):
    from ..search.dedup import find_duplicates

    if not progress or searcher.count < PROGRESS_FROM:
        return find_duplicates(searcher, threshold, verification=verification)
    from tqdm import tqdm

    with tqdm(total=searcher.count, desc="comparing", unit="img") as bar:
        return find_duplicates(searcher, threshold, on_progress=lambda done, _total: bar.update(done - bar.n),
                               verification=verification)


def _print_groups(result) -> None:
    out = stdout()
    for number, group in enumerate(result.groups, start=1):
        out.print(f"group {number}: {len(group.members)} images", markup=False)
        for i, m in enumerate(group.members):
            size = f"{m.width}x{m.height}" if m.width else "unreadable"
            head = "keep  " if i == 0 else f"{m.score_to_best:.4f}"
            out.print(f"  {head}  {size:>11}  {m.bytes / 1024:>9,.0f} KiB  {printable(m.path)}", markup=False)
    for note in result.notes:
        stderr().print(f"note: {note}", markup=False)
    stderr().print(f"{len(result.groups)} groups, {result.duplicates} duplicates "
                   f"({result.duplicate_bytes / 2**20:,.1f} MiB) among {result.images:,} images at similarity "
                   f">= {result.threshold:g} ({result.index_type} index, {result.seconds:.1f} s)", markup=False)


def _print_csv(result, plan) -> None:
    import csv
    import sys

    from ..paths import display_path

    targets = {m.id: display_path(m.target) for m in (plan.moves if plan is not None else [])}
    writer = csv.writer(sys.stdout)
    writer.writerow(["group", "rank", "keep", "id", "path", "width", "height", "bytes", "score_to_best", "move_to"])
    for number, group in enumerate(result.groups, start=1):
        for rank, m in enumerate(group.members, start=1):
            writer.writerow([number, rank, int(rank == 1), m.id, display_path(m.path), m.width, m.height, m.bytes,
                             f"{m.score_to_best:.6f}", targets.get(m.id, "")])


def _print_moves(plan, yes: bool) -> None:
    err = stderr()
    done = plan.moved if yes else plan.moves
    for move in done:
        err.print(f"{'moved' if yes else 'would move'} {printable(move.source)} -> {printable(move.target)}",
                  markup=False)
    for path, reason in plan.skipped:
        err.print(f"warning: kept {printable(path)}: {printable(reason)}", markup=False)
    if yes:
        err.print(f"moved {len(plan.moved)} files to {printable(plan.destination)} and dropped them from the "
                  "index", markup=False)
    else:
        err.print(f"dry run: {len(plan.moves)} files would move to {printable(plan.destination)}; nothing was "
                  "changed (add --yes to move them and drop them from the index)", markup=False)
