"""Modules that qgraph's dependencies import eagerly but seldom use, executed on first use instead.

``onnx_ir`` imports sympy when it is imported, for the arithmetic of
symbolic dimensions (``SymbolicDim + 1``, ``.evaluate``) and for its parser
of dimension expressions (``onnx_ir._symbolic_shapes``, whose table of
functions reads sympy at import); a ``SymbolicDim`` made from a name, which
is all that loading and rewriting a model makes, never touches either.
Importing sympy costs about 0.2 CPU seconds -- a tenth of the whole
``qgraph optimize`` budget (issue 19: <= 2 s on SmolLM2-135M).

``defer`` adds a finder to ``sys.meta_path`` that answers the first import
of each named module with a stand-in: ``import sympy`` then costs a path
search, and the first attribute read from the stand-in that it lacks
(``sympy.Expr``, or ``sympy.__path__`` for ``import sympy.core``) imports
the real module through the ordinary finders, copies its namespace into the
stand-in and answers from there. Nothing changes for a caller but when
sympy's code runs; nothing is in ``sys.modules`` before someone imports it.

Not ``importlib.util.LazyLoader``: on Python 3.11 a second ``import sympy``
(onnx_ir has two) reads ``__spec__`` from the lazy module, which executes it
at once.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFERRED", "defer"]

# What onnx_ir imports at start-up and loading or rewriting a model does not use.
DEFERRED = ("onnx_ir._symbolic_shapes", "sympy")


class _Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module whose code has not run; a missing attribute runs it."""

    _qgraph_armed = False  # set once the import system is done setting the stand-in up

    def __getattr__(self, attr: str) -> Any:
        if not self._qgraph_armed:  # the import system probing __path__ & co. while it sets us up
            raise AttributeError(attr)
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


class _StandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Deferred(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        """Nothing runs now: the stand-in imports the real module when first read."""
        module._qgraph_armed = True


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Answers the first import of each of its names with a stand-in; later imports go to the usual finders."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        self.names.discard(fullname)  # the real import, later, must not get a stand-in again
        if importlib.machinery.PathFinder.find_spec(fullname, path) is None:
            return None  # not installed as a plain module: let the import fail or succeed as usual
        return importlib.util.spec_from_loader(fullname, _StandInLoader())


_FINDER = _DeferringFinder()


def defer(name: str) -> bool:
    """Make the first ``import name`` free until an attribute of the module is read; True if it was deferred."""
    if name in sys.modules:
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    _FINDER.names.add(name)
    return True
