"""The options that scale ``cbir index`` and ``cbir extract`` out onto existing
engines: ``--engine``/``--ray-address``/``--ray-actors`` (extraction on Ray) and
``--backend``/``--milvus-uri``/``--milvus-collection``/``--rebuild-backend``
(search on Milvus). Parsing only: the library does the rest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..pipeline.options import ENGINES
from ..search.backends import BACKENDS
from .common import SCALE_PANEL, _choices

if TYPE_CHECKING:
    from ..pipeline.executor import Executor
    from ..search.backends import BackendSpec

Engine = _choices("Engine", ENGINES)
Backend = _choices("Backend", BACKENDS)
LOCAL_ENGINE = Engine("local")

EngineOpt = Annotated[Engine, typer.Option(
    "--engine", rich_help_panel=SCALE_PANEL,
    help="Where images are listed, hashed and embedded: local = this machine; ray = a Ray cluster (pip install "
         "'cbir-cli\\[ray]'; the index folder must be on storage every node sees).")]
RayAddressOpt = Annotated[str, typer.Option(
    "--ray-address", metavar="ADDRESS", rich_help_panel=SCALE_PANEL,
    help="With --engine ray: auto = the cluster this machine belongs to ($RAY_ADDRESS or `ray start`), else a "
         "local one for this run; local; host:6379; ray://host:10001.")]
RayActorsOpt = Annotated[Optional[int], typer.Option(
    "--ray-actors", min=1, rich_help_panel=SCALE_PANEL, show_default=False,
    help="With --engine ray: model actors (one model each). Default: one per GPU on a cluster with GPUs, else one "
         "per node.")]
BackendOpt = Annotated[Optional[Backend], typer.Option(
    "--backend", rich_help_panel=SCALE_PANEL, show_default=False,
    help="Search backend, recorded in the index for query/serve/check: faiss (embedded) or milvus (pip install "
         "'cbir-cli\\[milvus]'). Default: the index's, else faiss.")]
MilvusUriOpt = Annotated[Optional[str], typer.Option(
    "--milvus-uri", metavar="URI", rich_help_panel=SCALE_PANEL, show_default=False,
    help="With --backend milvus: http://host:19530 (a Milvus server) or a file path ending in .db (Milvus Lite). "
         "Default: the index's, else milvus.db in the index folder.")]
MilvusCollectionOpt = Annotated[Optional[str], typer.Option(
    "--milvus-collection", metavar="NAME", rich_help_panel=SCALE_PANEL, show_default=False,
    help="With --backend milvus: the collection. Default: cbir_<index folder>_<hash>.")]
RebuildBackendOpt = Annotated[bool, typer.Option(
    "--rebuild-backend", help="Re-populate the search backend (a lost or emptied Milvus collection, a damaged "
                              "Faiss file) from the stored vectors, re-embedding nothing; FOLDER is optional.")]


@contextmanager
def executor_for(engine: Any, address: str, actors: int | None, options: Any) -> Iterator[Executor | None]:
    """The executor for ``--engine`` (None: the library's default, this machine)."""
    if engine.value == "local":
        yield None
        return
    from ..pipeline.ray_executor import RayExecutor, RayOptions

    with RayExecutor(options, RayOptions(address, actors)) as executor:
        yield executor


def backend_choice(backend: Any, uri: str | None, collection: str | None) -> BackendSpec | None:
    """The ``--backend`` choice, or None to keep the index's."""
    from ..search.backends import BackendSpec

    if backend is None:
        if uri or collection:
            raise typer.BadParameter("--milvus-uri and --milvus-collection go with --backend milvus")
        return None
    if backend.value != "milvus" and (uri or collection):
        raise typer.BadParameter("--milvus-uri and --milvus-collection go with --backend milvus")
    return BackendSpec(backend.value, uri, collection)
