"""Package attributes imported on first use.

``qgraph.export`` and ``qgraph.runtime`` re-export names from modules that
pull in torch, transformers or onnxruntime; importing those on
``import qgraph.<package>`` would make every CLI start-up pay for them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: str, homes: dict[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``__getattr__`` and ``__dir__`` for ``package``.

    ``homes`` maps each exported name to the submodule defining it; a name
    is imported on first access and then kept in ``namespace`` (the
    package's ``globals()``), so later accesses are plain lookups.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
