"""Finding passes and presets by name, through entry points.

The framework never imports a concrete pass: the built-in passes in
``passes/`` are declared in qgraph's own ``pyproject.toml`` under the
``qgraph.passes`` entry-point group, exactly as a third-party package
declares its own. Presets (named pipelines) come through ``qgraph.presets``.
A broken plug-in is reported when it is used or listed, naming the package,
and does not take the other passes down with it. Passes can also come from a
file or module given at run time (``qgraph.plugins``: ``--plugin`` and
``QGRAPH_PLUGINS``); the registry records where each pass came from.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from qgraph.errors import BadInputError
from qgraph.pass_base import Pass

__all__ = ["PASS_GROUP", "PRESET_GROUP", "Registry", "default_registry"]

PASS_GROUP = "qgraph.passes"
PRESET_GROUP = "qgraph.presets"


def _origin(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"package '{dist.name}'" if dist is not None else f"entry point '{ep.value}'"


class Registry:
    """Passes and presets by name; entry points are loaded on first use."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._passes: dict[str, type[Pass]] = {}
        self._presets: dict[str, Any] = {}
        self._broken: dict[str, str] = {}
        self._origins: dict[str, str] = {}
        self._pending: dict[str, list[EntryPoint]] = {}  # declared, not imported yet

    def _ensure_loaded(self) -> None:
        """Read the entry points' names; a pass module is imported only when its name is asked for.

        Importing every built-in pass costs more than some whole passes (the
        qaic lowering compiles its function bodies with onnxscript at import),
        and a pipeline names a handful of them.
        """
        if self._loaded:
            return
        self._loaded = True
        if not self._load_entry_points:
            return
        for ep in entry_points(group=PASS_GROUP):
            self._pending.setdefault(ep.name, []).append(ep)
        for ep in entry_points(group=PRESET_GROUP):
            self._presets.setdefault(ep.name, ep)

    def _load(self, name: str) -> None:
        """Import the entry points declared as ``name``, in order, until one gives a pass class."""
        self._ensure_loaded()
        for ep in self._pending.pop(name, []):
            if name in self._passes:
                break
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must not hide the others
                self._broken[name] = f"{_origin(ep)} failed to import {ep.value}: {exc}"
                continue
            problem = _check_pass_class(name, cls)
            if problem:
                self._broken[name] = f"{_origin(ep)}: {problem}"
                continue
            self._passes[name] = cls
            self._origins[name] = _origin(ep)

    def _load_all(self) -> None:
        self._ensure_loaded()
        for name in list(self._pending):
            self._load(name)

    def register(self, cls: type[Pass], *, replace: bool = False, origin: str | None = None) -> type[Pass]:
        """Register a pass class in this process (usable as a decorator).

        ``origin`` says where it came from (shown by ``qgraph passes``); by
        default, the module that defines the class.
        """
        self._load(cls.name)  # an installed pass of that name is there first, as if all were loaded
        problem = _check_pass_class(cls.name, cls)
        if problem:
            raise TypeError(problem)
        if cls.name in self._passes and self._passes[cls.name] is not cls and not replace:
            raise ValueError(f"a pass named '{cls.name}' is already registered")
        self._passes[cls.name] = cls
        self._origins[cls.name] = origin or f"module {cls.__module__}"
        self._broken.pop(cls.name, None)
        return cls

    def origin(self, name: str) -> str:
        """Where pass ``name`` came from: a package, a plugin file or module, or a module."""
        self.get(name)
        return self._origins[name]

    def register_preset(self, name: str, spec: Mapping[str, Any]) -> None:
        self._ensure_loaded()
        self._presets[name] = spec

    def names(self) -> list[str]:
        self._load_all()
        return sorted(self._passes)

    def broken(self) -> dict[str, str]:
        self._load_all()
        return dict(self._broken)

    def __contains__(self, name: str) -> bool:
        self._load(name)
        return name in self._passes

    def get(self, name: str) -> type[Pass]:
        self._load(name)
        if name in self._passes:
            return self._passes[name]
        self._load_all()  # for the hints below
        if name in self._broken:
            raise BadInputError(f"pass '{name}' is registered but cannot be loaded: {self._broken[name]}")
        close = difflib.get_close_matches(name, self._passes, n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise BadInputError(f"unknown pass '{name}'{hint} (run 'qgraph passes' for the list)")

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> Pass:
        return self.get(name)(**dict(options or {}))

    def preset_names(self) -> list[str]:
        self._ensure_loaded()
        return sorted(self._presets)

    def preset(self, name: str) -> Mapping[str, Any]:
        """The pipeline spec of a preset (a mapping with a ``steps`` list)."""
        self._ensure_loaded()
        if name not in self._presets:
            close = difflib.get_close_matches(name, self._presets, n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            known = ", ".join(sorted(self._presets)) or "none"
            raise BadInputError(f"unknown preset '{name}'{hint} (known presets: {known})")
        spec = self._presets[name]
        if isinstance(spec, EntryPoint):
            try:
                spec = spec.load()
            except Exception as exc:  # noqa: BLE001
                raise BadInputError(f"preset '{name}' cannot be loaded from {_origin(spec)}: {exc}") from exc
            self._presets[name] = spec
        if not isinstance(spec, Mapping):
            raise BadInputError(f"preset '{name}' is not a pipeline mapping with 'steps'")
        return spec


def _check_pass_class(name: str, cls: Any) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        return f"'{name}' does not name a qgraph.Pass subclass (got {cls!r})"
    if cls.name != name:
        return f"pass class {cls.__name__} is named '{cls.name}' but registered as '{name}'"
    return None


_DEFAULT: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry: installed entry points, then the plug-ins in ``QGRAPH_PLUGINS``."""
    global _DEFAULT
    if _DEFAULT is None:
        from qgraph.plugins import load_plugins, plugins_from_environment

        registry = Registry()
        load_plugins(plugins_from_environment(), registry)
        _DEFAULT = registry
    return _DEFAULT
