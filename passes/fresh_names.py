"""Fresh value names for nodes a pass adds: the name it asks for, else the first ``name_2``, ``name_3``... free.

Values of one graph must have distinct names (onnx checks it when the model is saved); passes that add
several nodes per layer ask for readable bases (``projection_heads/Split``) and let this pick a free one.
"""

from __future__ import annotations

import onnx_ir as ir

__all__ = ["FreshNames"]


class FreshNames:
    """Fresh value names: ``base``, else ``base_2``, ``base_3``... (unnamed nodes give empty bases)."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers)
        self._taken |= {v.name for n in graph for v in n.outputs}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            k += 1
            name = f"{base}_{k}"
        self._taken.add(name)
        return name
