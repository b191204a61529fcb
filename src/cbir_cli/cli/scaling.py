"""The options that scale ``cbir index`` and ``cbir extract`` out onto existing
engines: ``--engine``/``--ray-address``/``--ray-actors`` (extraction on Ray) and
``--backend``/``--backend-uri``/``--backend-collection``/``--rebuild-backend``
(search on Milvus). Parsing only: the library does the rest. Engines and backends
are names in the library's registries (plugins add more), checked when used, so
that ``--help`` reads no plugin metadata."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from .common import SCALE_PANEL

if TYPE_CHECKING:
    from ..pipeline.executor import Executor
    from ..search.backends import BackendSpec

LOCAL_ENGINE = "local"

EngineOpt = Annotated[str, typer.Option(
    "--engine", rich_help_panel=SCALE_PANEL,
    help="Where images are listed, hashed and embedded: local = this machine; ray = a Ray cluster (pip install "
         "'cbir-cli\\[ray]'; the index folder must be on storage every node sees); or an engine a plugin adds "
         "(`cbir models` lists them).")]
RayAddressOpt = Annotated[str, typer.Option(
    "--ray-address", metavar="ADDRESS", rich_help_panel=SCALE_PANEL,
    help="With --engine ray: auto = the cluster this machine belongs to ($RAY_ADDRESS or `ray start`), else a "
         "local one for this run; local; host:6379; ray://host:10001.")]
RayActorsOpt = Annotated[Optional[int], typer.Option(
    "--ray-actors", min=1, rich_help_panel=SCALE_PANEL, show_default=False,
    help="With --engine ray: model actors (one model each). Default: one per GPU on a cluster with GPUs, else one "
         "per node.")]
BackendOpt = Annotated[Optional[str], typer.Option(
    "--backend", metavar="NAME", rich_help_panel=SCALE_PANEL, show_default=False,
    help="Search backend, recorded in the index for query/serve/check: faiss (embedded), milvus (pip install "
         "'cbir-cli\\[milvus]') or one a plugin adds (`cbir models` lists them). Default: the index's, else faiss.")]
BackendUriOpt = Annotated[Optional[str], typer.Option(
    "--backend-uri", metavar="URI", rich_help_panel=SCALE_PANEL, show_default=False,
    help="Where a backend outside the index folder keeps its index; milvus: http://host:19530 (a server) or a file "
         "path ending in .db (Milvus Lite). Default: the index's, else milvus.db in the index folder.")]
BackendCollectionOpt = Annotated[Optional[str], typer.Option(
    "--backend-collection", metavar="NAME", rich_help_panel=SCALE_PANEL, show_default=False,
    help="With a backend outside the index folder: the collection. Default: the index's, else "
         "cbir_<index folder>_<hash>.")]
# The names before the backends were open (issue 23): still accepted, no longer shown.
MilvusUriOpt = Annotated[Optional[str], typer.Option("--milvus-uri", hidden=True, show_default=False)]
MilvusCollectionOpt = Annotated[Optional[str], typer.Option("--milvus-collection", hidden=True, show_default=False)]
RebuildBackendOpt = Annotated[bool, typer.Option(
    "--rebuild-backend", help="Re-populate the search backend (a lost or emptied Milvus collection, a damaged "
                              "Faiss file) from the stored vectors, re-embedding nothing; FOLDER is optional.")]


@contextmanager
def executor_for(engine: str, address: str, actors: int | None, options: Any) -> Iterator[Executor | None]:
    """The executor ``--engine`` names (None: the library's default, this machine)."""
    from ..pipeline.executor import EXECUTOR_TYPES

    with EXECUTOR_TYPES.get(engine).open(options, {"address": address, "actors": actors}) as executor:
        yield executor


def backend_choice(backend: str | None, uri: str | None, collection: str | None,
                   milvus_uri: str | None = None, milvus_collection: str | None = None) -> BackendSpec | None:
    """The ``--backend`` choice, or None to keep the index's; ``--milvus-uri`` and
    ``--milvus-collection`` are the old names of ``--backend-uri``/``--backend-collection``."""
    from ..search.backends import BackendSpec

    for new, old, value, alias in (("--backend-uri", "--milvus-uri", uri, milvus_uri),
                                   ("--backend-collection", "--milvus-collection", collection, milvus_collection)):
        if value is not None and alias is not None and value != alias:
            raise typer.BadParameter(f"{new} and {old} (its old name) say different things; give one")
    uri, collection = uri or milvus_uri, collection or milvus_collection
    if backend is None:
        if uri or collection:
            raise typer.BadParameter("--backend-uri and --backend-collection go with --backend NAME")
        return None
    return BackendSpec(backend, uri, collection)
