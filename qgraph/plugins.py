"""Passes from a ``.py`` file or an importable module, without packaging them.

Entry points (``registry.py``) are how a finished pass ships; while a model
engineer is still writing one, installing a package after every edit is a
trap. A plug-in is therefore also accepted as

* a path to a Python file (``--plugin my_pass.py``), imported under a
  private module name so two files called ``rules.py`` do not clash, or
* a module name on ``sys.path`` (``--plugin mypkg.passes``),

given with ``--plugin`` to any ``qgraph`` command (repeatable) or listed in
the ``QGRAPH_PLUGINS`` environment variable (separated by ``os.pathsep``),
which the process-wide registry reads when it is created, so the Python API
sees the same passes as the command line.

Every ``qgraph.Pass`` subclass *defined* in the plug-in (not merely imported
into it) with a ``name`` is registered, and the registry remembers where it
came from, which ``qgraph passes`` prints. A plug-in that cannot be imported,
defines no pass, or reuses the name of a registered pass is bad input
(exit 2) naming the plug-in: it never silently replaces a built-in pass.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from qgraph.errors import BadInputError
from qgraph.pass_base import Pass

if TYPE_CHECKING:
    from qgraph.registry import Registry

__all__ = ["ENVIRONMENT_VARIABLE", "load_plugin", "load_plugins", "plugins_from_environment"]

ENVIRONMENT_VARIABLE = "QGRAPH_PLUGINS"


def plugins_from_environment() -> list[str]:
    """The plug-ins listed in ``QGRAPH_PLUGINS`` (``os.pathsep``-separated), in order."""
    raw = os.environ.get(ENVIRONMENT_VARIABLE, "")
    return [part.strip() for part in raw.split(os.pathsep) if part.strip()]


def _is_file_spec(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise BadInputError(f"plugin file {path} does not exist")
    resolved = path.resolve()
    # A private, path-derived module name: two plug-ins named rules.py coexist,
    # and loading the same file twice gives the same module.
    digest = hashlib.blake2b(str(resolved).encode(), digest_size=6).hexdigest()
    module_name = f"qgraph_plugin_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise BadInputError(f"plugin file {path} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        del sys.modules[module_name]
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise BadInputError(f"plugin file {path} failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and name.startswith(exc.name):
            raise BadInputError(f"cannot import plugin module {name}: not found on sys.path") from exc
        raise BadInputError(f"plugin module {name} failed to import: {type(exc).__name__}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the plug-in is its author's bad input
        raise BadInputError(f"plugin module {name} failed to import: {type(exc).__name__}: {exc}") from exc


def _passes_defined_in(module: ModuleType) -> list[type[Pass]]:
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Pass) and obj.__module__ == module.__name__ and obj.name:
            found.append(obj)
    return found


def load_plugin(spec: str, registry: Registry) -> list[str]:
    """Import one plug-in (a file path or a module name) and register its passes.

    Returns the names of the passes it registered. Raises ``BadInputError``
    naming the plug-in when it cannot be imported, defines no pass, or
    defines a pass whose name is already taken by another class.
    """
    if _is_file_spec(spec):
        module, origin = _import_file(Path(spec)), f"plugin file {spec}"
    else:
        module, origin = _import_module(spec), f"plugin module {spec}"
    classes = _passes_defined_in(module)
    if not classes:
        raise BadInputError(
            f"{origin} defines no qgraph pass (a subclass of qgraph.Pass with a 'name', defined in that file)"
        )
    names = []
    for cls in classes:
        if cls.name in registry and registry.get(cls.name) is not cls:
            raise BadInputError(
                f"{origin}: pass '{cls.name}' is already registered by {registry.origin(cls.name)}; rename it"
            )
        registry.register(cls, origin=origin)
        names.append(cls.name)
    return sorted(names)


def load_plugins(specs: list[str], registry: Registry) -> list[str]:
    """Load several plug-ins in order; returns every pass name registered."""
    names: list[str] = []
    for spec in specs:
        names.extend(load_plugin(spec, registry))
    return names
