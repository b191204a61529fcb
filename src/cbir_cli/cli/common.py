"""What every ``cbir`` command shares: the Typer app, the option types (their
choices come from the library's tuples), error handling and printing."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .. import __version__
from ..errors import CbirError, remedy_text
from ..evaluate.datasets import RELEVANCE_KINDS
from ..models.loading import DEVICES, RUNTIMES
from ..models.quantize import PRECISIONS
from ..models.registry import INPUTS, POOLINGS
from ..pipeline.options import DECODE_CHOICES
from ..search.faiss_backend import INDEX_TYPES
from ..store.shard_format import SHARD_DTYPES


class _HelpStyle:
    """``--help`` drawn by rich (panels of grouped options; help texts are rich markup,
    so a literal "[" is written "\\["), while usage errors stay plain one-line
    ``Error: ...`` (the app's rich_markup_mode=None: Typer would box them too).

    Without Python type names: a flag takes no value, so nothing beside it (an empty
    metavar), not ``<bool>``; a repeated argument is ``<path>...``, not ``<list[Path]>``
    (Typer ignores an argument's metavar in that column)."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        from typer import rich_utils

        rich_utils.rich_format_help(obj=self, ctx=ctx, markup_mode="rich")  # type: ignore[arg-type]

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            elif getattr(param, "param_type_name", "") == "argument" and param.nargs != 1:
                shown = param.display_type_rich(ctx)
                param.display_type_rich = lambda ctx, shown=shown: re.sub(
                    r"^<list\[(\w+)\]>$", lambda m: f"<{m[1].lower()}>...", shown)
        return params


class Command(_HelpStyle, TyperCommand):
    """Every command's usage line in one convention: a required argument plain
    (``FOLDER``), an optional one in brackets (``[FOLDER]``); Typer writes a
    required one in braces (``{FOLDER}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"^\{(.*)\}", r"\1", piece) for piece in super().collect_usage_pieces(ctx)]


class Group(_HelpStyle, TyperGroup):
    pass


# Help is drawn by rich (see _HelpStyle): help texts are rich markup.
app = typer.Typer(
    name="cbir",
    help="Content-based image retrieval: index a folder of images, then search it by example.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    cls=Group,
)
weights_app = typer.Typer(help="Install and inspect pretrained weights (works offline).", no_args_is_help=True,
                          rich_markup_mode=None, cls=Group)
app.add_typer(weights_app, name="weights")


def command(name: str, typer_app: typer.Typer = app):
    """Register a command (on ``app`` unless told) with the shared usage convention;
    its help is its docstring with each paragraph reflowed (rich keeps the source's
    line breaks otherwise)."""

    def register(function):
        import inspect

        paragraphs = inspect.cleandoc(function.__doc__ or "").split("\n\n")
        return typer_app.command(name, cls=Command, help="\n\n".join(" ".join(p.split()) for p in paragraphs))(
            function)

    return register


# The panels that group long option lists in `--help` (the rest stay under "Options").
MODEL_PANEL = "Model and descriptor"
RERANK_PANEL = "Re-ranking"
SPEED_PANEL = "Speed and storage"
SCALE_PANEL = "Scaling out (Ray, Milvus)"


def _choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """A Typer choice type made from one of the library's tuples (one list, one place)."""
    return Enum(name, {value: value for value in values}, type=str)  # type: ignore[return-value]


Device = _choices("Device", DEVICES)
Runtime = _choices("Runtime", RUNTIMES)
Decode = _choices("Decode", DECODE_CHOICES)
Precision = _choices("Precision", PRECISIONS)
IndexType = _choices("IndexType", INDEX_TYPES)
Relevance = _choices("Relevance", RELEVANCE_KINDS)
Pooling = _choices("Pooling", POOLINGS)
InputMode = _choices("InputMode", INPUTS)
ShardDtype = _choices("ShardDtype", SHARD_DTYPES)
AUTO_DEVICE, AUTO_RUNTIME, AUTO_DECODE = Device("auto"), Runtime("auto"), Decode("auto")
AUTO_PRECISION = Precision("auto")
PRODUCT_RELEVANCE = Relevance("product")

def printable(text: str) -> str:
    """``text`` safe to print as (part of) one terminal line: control characters
    (newlines, ESC, bidi overrides...) written as escapes (``\\n``, ``\\x1b``,
    ``\\u202e``), undecodable bytes of file names as U+FFFD. A file name can then
    neither start a fake ``warning:`` line nor send escape codes to the terminal."""
    import unicodedata

    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() or ch == " " else
                   (ascii(ch)[1:-1] if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")
                    else ch) for ch in text)


def error_line(exc: CbirError) -> str:
    """The one line a domain error prints, with the CLI's remedy."""
    remedy = remedy_text(exc.remedy, cli=True)
    message = printable(exc.message)
    return f"{message}; {remedy}" if remedy else message


def stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


@contextmanager
def above_progress_bars() -> Iterator[None]:
    """Print a line on stderr without gluing it to a progress bar: active tqdm bars
    are cleared first and redrawn after (tqdm's own protocol for outside writes)."""
    import sys

    if "tqdm" not in sys.modules:  # no bar was ever made: nothing to clear
        yield
        return
    from tqdm import tqdm

    with tqdm.external_write_mode(file=sys.stderr):
        yield


def show_progress(as_json: bool) -> bool:
    """Progress bars only on a terminal: in a log file their redraws would be glued
    to the warnings around them."""
    import sys

    return not as_json and sys.stderr.isatty()


@contextmanager
def cli_errors() -> Iterator[None]:
    """Turn domain errors into ``error: <message>`` and an exit code."""
    try:
        yield
    except CbirError as exc:
        from rich.markup import escape

        with above_progress_bars():
            stderr().print(f"[bold red]error:[/] {escape(error_line(exc))}", markup=True, highlight=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        stderr().print("interrupted")
        raise typer.Exit(130) from None


def notice(message: str) -> None:
    with above_progress_bars():
        stderr().print(printable(message), markup=False)


def warn_skip(path: str, reason: str) -> None:
    from rich.markup import escape

    with above_progress_bars():
        stderr().print(f"[yellow]warning:[/] skipped {escape(printable(path))}: {escape(printable(reason))}",
                       markup=True)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cbir {__version__}")
        raise typer.Exit()


class _NoticeHandler:
    """Shows the library's INFO log records (``note: ...``) as notices on stderr."""

    @staticmethod
    def install() -> None:
        import logging

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                notice(record.getMessage())

        logger = logging.getLogger("cbir_cli")
        if not any(type(h).__name__ == "Handler" for h in logger.handlers):
            logger.addHandler(Handler(logging.INFO))
            logger.setLevel(logging.INFO)


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Content-based image retrieval: index a folder of images, then search it by example."""
    _NoticeHandler.install()


# Options shared by the commands that embed images (index, extract, evaluate), each
# declared once here; the long lists are grouped into help panels.
def _folder_argument() -> typer.models.ArgumentInfo:
    return typer.Argument(metavar="FOLDER", show_default=False,
                          help="Folder of images (searched recursively), or a URL: s3://bucket/prefix, gs://, az://, "
                               "file:// (see README).")


# str, not Path: Path("s3://bucket/p") would collapse the URL's "//".
FolderArg = Annotated[str, _folder_argument()]
OptionalFolderArg = Annotated[Optional[str], _folder_argument()]  # index: --rebuild-backend needs none
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", metavar="NAME", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Model name (see `cbir models`). Default: the model the index (extract: OUT) was made with, else "
         "resnet50 (mobilenet_v2, with a notice, when only its weights are installed).")]
IndexDirOpt = Annotated[Optional[Path], typer.Option(
    "--index", metavar="DIR", show_default=False,
    help="Index folder. Default: $CBIR_INDEX, else the per-user data dir (cbir/index).")]
WeightsOpt = Annotated[Optional[Path], typer.Option(
    "--weights", metavar="FILE", rich_help_panel=MODEL_PANEL,
    help="Local state-dict file instead of the model's pretrained weights.")]
DeviceOpt = Annotated[Device, typer.Option("--device", rich_help_panel=SPEED_PANEL, help="Where to run the model.")]
RuntimeOpt = Annotated[Runtime, typer.Option(
    "--runtime", rich_help_panel=SPEED_PANEL,
    help="Model runtime: auto = ONNX Runtime on CPU (faster there), PyTorch on CUDA. Vectors are interchangeable.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, rich_help_panel=SPEED_PANEL,
                                       help="Images per model batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", "-w", min=0, rich_help_panel=SPEED_PANEL, show_default=False,
    help="Decoding processes (0 = decode in the main process). Default: cores - 1, at most 8.")]
ShardOpt = Annotated[int, typer.Option(
    "--shard-size", min=1, rich_help_panel=SPEED_PANEL,
    help="Vectors per .npy shard, the commit unit (whole batches: a shard is written once at least this many are "
         "buffered).")]
ShardDtypeOpt = Annotated[Optional[ShardDtype], typer.Option(
    "--shard-dtype", rich_help_panel=SPEED_PANEL, show_default=False,
    help="How shards keep vectors, chosen when the index is made: float16 = half the disk (vectors rounded to "
         "float16, read back as float32). Default: the index's own, float32 for a new one; changing it needs "
         "--rebuild.")]
DecodeOpt = Annotated[Decode, typer.Option(
    "--decode", rich_help_panel=SPEED_PANEL,
    help="Where JPEGs are decoded: cpu = Pillow in the --workers processes; gpu = nvJPEG on the model's CUDA "
         "device, workers only read files (other formats are still decoded on the CPU); nvimgcodec = the same "
         "with nvImageCodec (pip install 'cbir-cli\\[nvimgcodec]'); auto = gpu when the model runs on CUDA, else "
         "cpu. Vectors are interchangeable.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
PrecisionOpt = Annotated[Precision, typer.Option(
    "--precision", rich_help_panel=MODEL_PANEL,
    help="int8 = a model quantised for the CPU (ONNX Runtime, calibrated on 320 images of the folder; its "
         "vectors differ from fp32's); auto = what the index holds, else int8 for mobilenet_v2 on the CPU, fp32 "
         "otherwise.")]

# The descriptor: how the model's last feature map becomes one vector. Unset options
# keep the default (GeM p=3, full image, scales 1,1.4); an index that grows keeps
# the descriptor it was built with unless one is given.
PoolingOpt = Annotated[Optional[Pooling], typer.Option(
    "--pooling", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Pooling of the last feature map: gem (generalised mean, default), gap (average) or mac (max).")]
GemPOpt = Annotated[Optional[float], typer.Option("--gem-p", min=1.0, max=16.0, rich_help_panel=MODEL_PANEL,
                                                  help="GeM exponent (default 3).", show_default=False)]
InputOpt = Annotated[Optional[InputMode], typer.Option(
    "--input", rich_help_panel=MODEL_PANEL, show_default=False,
    help="full (whole image, aspect ratio kept, default) or crop (centre square, as ImageNet training).")]
ScalesOpt = Annotated[Optional[str], typer.Option(
    "--scales", metavar="S1,S2", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Input scales, averaged (default 1,1.4: short side 224 and 320 for the ImageNet models).")]


# Re-ranking: query time (alpha-QE, the raw top-1 kept first) and index time (DBA).
RerankOpt = Annotated[bool, typer.Option(
    "--rerank/--no-rerank", rich_help_panel=RERANK_PANEL,
    help="Re-rank: alpha query expansion over the database-side-augmented vectors (--dba), the plain top-1 kept "
         "first.")]
QeOpt = Annotated[int, typer.Option("--qe", min=0, max=100, rich_help_panel=RERANK_PANEL,
                                    help="Query expansion: neighbours added to the query (0 = none).")]
QeAlphaOpt = Annotated[float, typer.Option("--qe-alpha", min=0.0, max=16.0, rich_help_panel=RERANK_PANEL,
                                           help="Query expansion: neighbour weight = similarity ** alpha.")]
DbaOpt = Annotated[Optional[int], typer.Option(
    "--dba", min=0, max=100, rich_help_panel=RERANK_PANEL, show_default=False,
    help="Database-side augmentation: neighbours averaged into each indexed vector (0 = none). Default: the "
         "index's own setting, else 3.")]
DbaAlphaOpt = Annotated[Optional[float], typer.Option(
    "--dba-alpha", min=0.0, max=16.0, rich_help_panel=RERANK_PANEL, show_default=False,
    help="DBA neighbour weight = similarity ** alpha (default 3).")]


def rerank_choice(rerank: bool, qe: int, qe_alpha: float):
    """The query-time re-ranking the options ask for."""
    from ..search.rerank import NO_RERANKING, RerankSettings

    return RerankSettings(qe_depth=qe, qe_alpha=qe_alpha) if rerank else NO_RERANKING


def dba_choice(dba: int | None, dba_alpha: float | None):
    """The DBA the options ask for, or None (an index keeps its own, else the default)."""
    if dba is None and dba_alpha is None:
        return None
    from ..search.dba import DbaSettings

    default = DbaSettings()
    return DbaSettings(default.depth if dba is None else dba, default.alpha if dba_alpha is None else dba_alpha)


def descriptor_choice(pooling, gem_p: float | None, input_mode, scales: str | None):
    """The descriptor the options ask for (unset ones from the default), or None when
    none is given (the library then keeps an index's own, else the default)."""
    if pooling is None and gem_p is None and input_mode is None and scales is None:
        return None
    from ..models.registry import DEFAULT_DESCRIPTOR, parse_scales

    return DEFAULT_DESCRIPTOR.with_options(pooling=pooling.value if pooling else None, gem_p=gem_p,
                                           input=input_mode.value if input_mode else None,
                                           scales=parse_scales(scales) if scales is not None else None)


def extract_options(batch_size: int, workers: int | None, shard_size: int, device: Device, progress: bool,
             runtime: Runtime = AUTO_RUNTIME, decode: Decode = AUTO_DECODE, precision: Precision = AUTO_PRECISION,
             shard_dtype: ShardDtype | None = None):
    from ..pipeline.options import ExtractOptions, default_workers

    return ExtractOptions(batch_size=batch_size, workers=default_workers() if workers is None else workers,
                          shard_size=shard_size, device=device.value, progress=progress, runtime=runtime.value,
                          decode=decode.value, precision=precision.value,
                          shard_dtype=None if shard_dtype is None else shard_dtype.value)


def print_summary(summary, target: Path, as_json: bool, what: str) -> None:
    if as_json:
        typer.echo(json.dumps({**summary.as_dict(), "index": str(target)}, indent=2))
        return
    out = stderr()
    out.print(
        f"{what} {target}: {summary.store_count} images "
        f"(added {summary.added}, updated {summary.updated}, removed {summary.removed}, "
        f"unchanged {summary.unchanged}, skipped {summary.skipped}; "
        f"{summary.embedded} embedded, {summary.reused} reused) in {summary.seconds:.1f}s"
    )
