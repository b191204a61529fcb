"""``cbir index``, ``cbir extract`` and ``cbir check``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..errors import remedy_text
from .common import (
    SPEED_PANEL,
    FolderArg,
    IndexDirOpt,
    IndexType,
    JsonOpt,
    ModelOpt,
    OptionalFolderArg,
    WeightsOpt,
    cli_errors,
    command,
    notice,
    print_summary,
    printable,
    show_progress,
    stderr,
    stdout,
    warn_skip,
)
from .option_groups import (
    BackendOptions,
    DbaOptions,
    DescriptorOptions,
    EmbedOptions,
    EngineOptions,
    ShardOptions,
    grouped,
)
from .scaling import RebuildBackendOpt

if TYPE_CHECKING:
    from ..pipeline.run_plan import RunPlan


@command("index")
@grouped
def index_cmd(
    folder: OptionalFolderArg = None,
    index_dir: IndexDirOpt = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    index_type: Annotated[Optional[IndexType], typer.Option("--index-type", rich_help_panel=SPEED_PANEL,
                                                      help="Search index: flat (exact), hnsw, ivfpq (compressed, "
                                                           "re-ranked exactly from the shards) or auto (flat up to "
                                                           "50k images, then ivfpq). Default: the existing index's "
                                                           "type, else auto.", show_default=False)] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Embed everything again into a new index (after damage, or "
                                                       "to switch --model or the descriptor: without descriptor "
                                                       "options it gets the default one); the previous index keeps "
                                                       "serving until the new one is complete.")] = False,
    *,
    descriptor: DescriptorOptions,
    dba: DbaOptions,
    embed: EmbedOptions,
    shards: ShardOptions,
    engine: EngineOptions,
    backend: BackendOptions,
    rebuild_backend: RebuildBackendOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the run plan (index folder, model, device, "
                                          "runtime, precision, descriptor, backend, index type, decode, engine) "
                                          "and stop: nothing is written, no model is loaded.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image below FOLDER and build a searchable index (incremental, resumable)."""
    if folder is None and not rebuild_backend:
        raise typer.BadParameter("missing FOLDER (only --rebuild-backend runs without one)", param_hint="FOLDER")
    spec = backend.spec()
    with cli_errors():
        from ..pipeline.options import IndexSettings
        from ..pipeline.sync import index_folder
        from ..resolve import ModelSettings, resolve_index_dir

        target = resolve_index_dir(index_dir)
        kind = index_type.value if index_type else None
        options = embed.extract_options(show_progress(as_json), shards)
        settings = ModelSettings(model, weights, descriptor.settings())
        index = IndexSettings(kind, spec, dba.settings(), rebuild_backend)
        if dry_run:
            print_plan(target, settings, options, index, engine.engine, rebuild, as_json)
            return
        if folder is None:
            from ..search.backends import rebuild_backend as rebuild_search_backend
            from ..search.backends import recorded_spec

            store = rebuild_search_backend(target, kind, spec, dba=index.dba)
            if as_json:
                recorded = recorded_spec(store)
                typer.echo(json.dumps({"index": str(target), "rebuilt_backend": True, "store_count": store.count,
                                       "backend": recorded.name if recorded else "faiss"}, indent=2))
                return
            stderr().print(f"re-populated the search backend of {target} (and its DBA vectors) from its "
                           f"{store.count} stored vectors", markup=False)
            return
        with engine.executor(options) as executor:
            summary = index_folder(folder, target, settings, options=options, index=index, rebuild=rebuild,
                                   on_skip=warn_skip, on_notice=notice, executor=executor)
        print_summary(summary, target, as_json, "indexed")


def print_plan(target: Path, settings, options, index, engine: str, rebuild: bool, as_json: bool) -> None:
    """``--dry-run``: the run plan, as :func:`~cbir_cli.pipeline.run_plan.plan_run`
    makes it for ``cbir index`` (the same call the run makes), on stdout."""
    from ..pipeline.executor import EXECUTOR_TYPES
    from ..pipeline.run_plan import plan_run

    EXECUTOR_TYPES.get(engine)  # an unknown engine fails as the run would
    show_plan(plan_run(target, settings, options, index, engine=engine, rebuild=rebuild), as_json)


def show_plan(plan: RunPlan, as_json: bool) -> None:
    """A run plan on stdout: JSON, or one aligned line per choice (``--dry-run``)."""
    for line in plan.notices:
        notice(line)
    shown = plan.as_dict()
    if as_json:
        typer.echo(json.dumps(shown, indent=2))
        return
    backend = shown["backend"]
    shown["backend"] = " ".join([backend["name"], *(f"{k}={v}" for k, v in backend.items() if k != "name")])
    shown["exists"] = "yes" if plan.exists else "no (a new index)"
    del shown["notices"]
    width = max(map(len, shown))
    out = stdout()
    out.print("run plan (dry run: nothing written, no model loaded)", markup=False)
    for key, value in shown.items():
        out.print(f"  {key.ljust(width)}  {printable(str(value))}", markup=False)


@command("extract")
@grouped
def extract_cmd(
    folder: FolderArg,
    out: Annotated[Path, typer.Option("--out", "-o", metavar="OUT",
                                      help="Output folder for .npy shards + manifest.json.")],
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    *,
    descriptor: DescriptorOptions,
    embed: EmbedOptions,
    shards: ShardOptions,
    engine: EngineOptions,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image below FOLDER into .npy shards + manifest (features only, no search index)."""
    with cli_errors():
        from ..pipeline.sync import extract_folder

        options = embed.extract_options(show_progress(as_json), shards)
        with engine.executor(options) as executor:
            summary = extract_folder(folder, out, model, weights, options, on_skip=warn_skip, on_notice=notice,
                                     executor=executor, descriptor=descriptor.settings())
        print_summary(summary, out, as_json, "extracted")


@command("check")
def check_cmd(
    index_dir: IndexDirOpt = None,
    repair: Annotated[bool, typer.Option("--repair", help="First repair what needs no images: recover a lost "
                                         "manifest from the shards, drop damaged shards (the next `cbir index "
                                         "FOLDER` embeds their images again), delete leftovers, rebuild the "
                                         "search index.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Verify that the index's manifest, shards, ids and search index agree (exit 1 if not)."""
    with cli_errors():
        from ..resolve import resolve_index_dir
        from ..search.check import check_index

        if repair:
            from ..search.repair import repair_index

            repaired = repair_index(resolve_index_dir(index_dir))
            for line in repaired.repairs:
                stderr().print(f"repaired: {printable(line)}", markup=False)
            if not repaired.changed:
                stderr().print("nothing to repair", markup=False)
        report = check_index(resolve_index_dir(index_dir))
        repair = remedy_text(report.repair, cli=True)
        if as_json:
            typer.echo(json.dumps({**report.as_dict(), "repair": repair}, indent=2))
        else:
            err = stderr()
            for problem in report.problems:
                err.print(f"problem: {printable(problem)}", markup=False)
            for note in report.notes:
                err.print(f"note: {printable(note)}", markup=False)
            if report.ok:
                err.print(f"ok {report.index}: {report.count} images in {report.shards} {report.shard_dtype} "
                          f"shards, model {report.model} (dim {report.dim}), generation {report.generation}, "
                          f"search index {report.search_index}"
                          f"{'' if report.backend == 'faiss' else f' ({report.backend})'}", markup=False)
            else:
                err.print(f"{len(report.problems)} problem(s) in {report.index}; {repair}", markup=False)
        if not report.ok:
            raise typer.Exit(1)
