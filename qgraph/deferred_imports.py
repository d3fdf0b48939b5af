"""Modules that qgraph's dependencies import eagerly but seldom use, executed on first use instead.

``onnx_ir`` imports sympy when it is imported, for the arithmetic of
symbolic dimensions (``SymbolicDim + 1``, ``.evaluate``) and for its parser
of dimension expressions (``onnx_ir._symbolic_shapes``, whose table of
functions reads sympy at import); a ``SymbolicDim`` made from a name, which
is all that loading and rewriting a model makes, never touches either. Importing sympy costs about 0.2 CPU seconds -- a tenth of
the whole ``qgraph optimize`` budget (issue 19: <= 2 s on SmolLM2-135M).

``defer`` puts a stand-in module in ``sys.modules``: ``import sympy`` then
returns it at no cost, and the first attribute read from it that it lacks
(``sympy.Expr``, ``sympy.__path__`` for ``import sympy.core``) imports the
real module, copies its namespace into the stand-in and answers from there.
Nothing changes for a caller but when sympy's code runs.

Not ``importlib.util.LazyLoader``: on Python 3.11 a second ``import sympy``
(onnx_ir's own, right after) reads ``__spec__`` from the lazy module, which
executes it at once.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

__all__ = ["DEFERRED", "defer"]

# What onnx_ir imports at start-up and loading or rewriting a model does not use.
DEFERRED = ("onnx_ir._symbolic_shapes", "sympy")


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module whose code has not run; a missing attribute runs it."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        try:
            module = importlib.import_module(name)
        except BaseException:
            sys.modules.setdefault(name, self)
            raise
        # Later reads are plain lookups; the spec, __path__ and all are the real module's.
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def defer(name: str) -> bool:
    """Make ``import name`` free until an attribute of the module is read; True if it was deferred."""
    if name in sys.modules:
        return False
    spec = _find_without_importing(name)
    if spec is None or spec.loader is None:
        return False
    stand_in = _Deferred(name)
    stand_in.__spec__ = spec  # not initializing: the import system returns it as it is
    sys.modules[name] = stand_in
    return True


def _find_without_importing(name: str) -> importlib.machinery.ModuleSpec | None:
    """The spec of ``name``; for a submodule, found on its package's path without importing the package."""
    package, _, _ = name.rpartition(".")
    if not package:
        return importlib.util.find_spec(name)
    if package in sys.modules:
        return None  # the package ran already, and with it whatever it imports
    parent = _find_without_importing(package)
    if parent is None or parent.submodule_search_locations is None:
        return None
    return importlib.machinery.PathFinder.find_spec(name, parent.submodule_search_locations)
