"""Open registries: what a name on the command line (``--backend milvus``,
``--engine ray``, ``--model fake:tiny``) stands for, and how a package adds one.

Each registry is one entry-point group (``cbir_cli.backends``, ``cbir_cli.executors``,
``cbir_cli.models``); an entry point's name is the name users type, its value
(``package.module:attr``) the object registered. A plugin package declares them
in its ``pyproject.toml``::

    [project.entry-points."cbir_cli.backends"]
    qdrant = "cbir_qdrant:QdrantBackendType"

The built-ins are listed below as the same ``module:attr`` strings and load the
same way, so a running checkout (PYTHONPATH, no install) still has them.

Why ``importlib.metadata`` and not pluggy: a registry here maps a name to one
object, which pluggy's many-implementations hook calls do not need; and a name can
be listed without importing its module, so ``cbir --help`` imports no plugin and a
broken plugin only fails the command that uses it -- with one line naming it.
Objects are loaded once, on first use.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from .errors import CbirError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one kind, from built-ins, installed entry points and
    :meth:`register` calls (Python API, tests); a later source never replaces an
    earlier name."""

    def __init__(self, group: str, kind: str, builtins: dict[str, str]) -> None:
        self.group = group
        self.kind = kind  # how errors call one: "search backend", "model family"...
        self._builtins = dict(builtins)
        self._registered: dict[str, T] = {}
        self._loaded: dict[str, T] = {}

    def _entry_points(self) -> dict[str, Any]:
        from importlib.metadata import EntryPoint, entry_points

        found: dict[str, Any] = {name: EntryPoint(name, value, self.group) for name, value in self._builtins.items()}
        for ep in entry_points(group=self.group):
            found.setdefault(ep.name, ep)
        return found

    def names(self) -> tuple[str, ...]:
        """Every registered name (built-ins first), without importing any plugin."""
        return tuple(dict.fromkeys([*self._builtins, *self._registered, *self._entry_points()]))

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name`` in this process (what an entry point does for every process).

        Args:
            name: the name users type (``--backend NAME``, ``--model NAME:...``).
            obj: the object to register (a backend type, a model family, an executor type).

        Returns:
            ``obj``, so that ``register`` can be used as a decorator's body.

        Raises:
            ValueError: ``name`` is already registered.
        """
        if name in self._builtins or name in self._registered:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._registered[name] = obj
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``, loaded on first use.

        Args:
            name: a name of :meth:`names`.

        Returns:
            The registered object (an entry point's target, imported now if not yet).

        Raises:
            CbirError: no such name, or its plugin fails to import (one line naming it).
        """
        if name in self._registered:
            return self._registered[name]
        if name not in self._loaded:
            entry = self._entry_points().get(name)
            if entry is None:
                raise CbirError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
            try:
                self._loaded[name] = entry.load()
            except Exception as exc:  # noqa: BLE001 - any failure of a plugin's import is reported as one line
                raise CbirError(f"the {self.kind} {name!r} ({entry.value}) cannot be loaded: "
                                f"{type(exc).__name__}: {exc}") from None
        return self._loaded[name]
