"""The built-in engines as registered (``cbir_cli.executors`` entry points,
:data:`~.executor.EXECUTOR_TYPES`): this machine, and a Ray cluster. A plugin's
engine looks like these."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from .executor import Executor
from .options import ExtractOptions


class LocalType:
    name = "local"
    description = "this machine: decoding worker processes, the model in this process (the default)"

    def open(self, options: ExtractOptions, settings: Mapping[str, Any]) -> AbstractContextManager[Executor | None]:
        return nullcontext(None)  # the library's default executor is this one


class RayType:
    name = "ray"
    description = "a Ray cluster: Ray Data tasks and model actors (pip install 'cbir-cli[ray]')"

    def open(self, options: ExtractOptions, settings: Mapping[str, Any]) -> AbstractContextManager[Executor | None]:
        from .ray_executor import RayExecutor, RayOptions

        return RayExecutor(options, RayOptions(settings.get("address") or "auto", settings.get("actors")))


LOCAL = LocalType()
RAY = RayType()
