"""A reorder of a projection's output columns moved into its weight and bias, where nothing else reads them.

GPT-NeoX lays its fused QKV projection out head by head (``[h0: q, k, v]
[h1: q, k, v] ...``); GroupQueryAttention wants ``[Q | K | V]``. The
reorder is a ``Gather(p, perm, axis=-1)`` of the projection ``p``, and it
costs nothing once it is in the constants::

    Gather(x @ W, perm, -1)           == x @ W[..., perm]     # column j is x . W[:, perm[j]]: same sums
    Gather(y + c, perm, -1)           == Gather(y, perm, -1) + c[..., perm]   # (c's last dim 1: c itself)
    Gather(Split(y)[i], perm, -1)     == Split(Gather(y, perm', -1))[i]       # perm' moves segment i only

(``Sub`` and ``Mul`` by a constant likewise). :func:`fold_column_gather`
walks from the Gather up through those ops to a constant weight, and
rewrites the constants only when every value it passes is read by the next
op of the walk alone (a Split's other outputs keep their columns): a value
read elsewhere would see its columns moved. Otherwise the Gather stays, and
the caller is told why. The permuted weights are lazy, read when the model
is saved or a later pass reads them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir
from qgraph_passes.fresh_names import FreshNames

__all__ = ["fold_column_gather"]

_ARITHMETIC = frozenset({"Add", "Sub", "Mul"})


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The value's tensor if it is a constant (an initializer a graph input may override is not)."""
    if value is None or value.is_graph_input():
        return None
    if value.producer() is not None and value.producer().op_type != "Constant":
        return None
    return ir.convenience.get_const_tensor(value)


def _permuted(graph: ir.Graph, value: ir.Value, tensor: ir.TensorProtocol, perm: np.ndarray) -> ir.Value:
    """A new initializer: ``tensor`` with its last axis reordered by ``perm`` (computed when read)."""
    name = FreshNames(graph)(f"{value.name}/columns")
    lazy = ir.LazyTensor(lambda: ir.tensor(np.ascontiguousarray(tensor.numpy()[..., perm])), dtype=tensor.dtype,
                         shape=tensor.shape, name=name)
    new = ir.Value(name=name, const_value=lazy)
    new.dtype, new.shape = tensor.dtype, ir.Shape(list(tensor.shape))
    graph.register_initializer(new)
    return new


def _read_only_by(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(use.node is node for use in value.uses())


def _plan(graph: ir.Graph, value: ir.Value, perm: np.ndarray, reader: ir.Node,
          actions: list[Callable[[], None]], depth: int = 0) -> str | None:
    """Add to ``actions`` what makes ``value`` hold its columns reordered by ``perm``; why not, if it cannot."""
    if not _read_only_by(value, reader):
        return f"'{value.name}' is read outside the projection's heads"
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or depth > 8:
        return f"'{value.name}' is not computed by a projection"
    width = len(perm)
    if node.op_type in _ARITHMETIC and len(node.inputs) == 2:
        constants = [i for i, x in enumerate(node.inputs) if _constant(x) is not None]
        if len(constants) != 1:
            return f"{node.op_type} '{node.name}' does not add or scale by one constant"
        at = constants[0]
        tensor = _constant(node.inputs[at])
        shape = list(tensor.shape)
        if shape and shape[-1] == width:
            new = _permuted(graph, node.inputs[at], tensor, perm)
            actions.append(lambda: node.replace_input_with(at, new))
        elif shape and shape[-1] != 1:
            return f"the constant of {node.op_type} '{node.name}' has {shape[-1]} columns, not {width} or 1"
        return _plan(graph, node.inputs[1 - at], perm, node, actions, depth + 1)
    if node.op_type == "MatMul":
        tensor = _constant(node.inputs[1])
        if tensor is None or len(tensor.shape) < 2 or tensor.shape[-1] != width:
            return f"MatMul '{node.name}' does not multiply by a constant weight of {width} columns"
        new = _permuted(graph, node.inputs[1], tensor, perm)
        actions.append(lambda: node.replace_input_with(1, new))
        return None
    if node.op_type == "Split":
        source = node.inputs[0]
        rank = len(source.shape) if source.shape is not None else None
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        sizes = _constant(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if rank is None or axis not in (-1, rank - 1) or sizes is None:
            return f"Split '{node.name}' does not cut the last axis by constant sizes"
        offsets = np.concatenate([[0], np.cumsum(sizes.numpy())]).astype(np.int64)
        at = list(node.outputs).index(value)
        if offsets[at + 1] - offsets[at] != width:
            return f"output {at} of Split '{node.name}' is not {width} columns wide"
        wider = np.arange(int(offsets[-1]), dtype=np.int64)
        wider[offsets[at] : offsets[at + 1]] = offsets[at] + perm
        return _plan(graph, source, wider, node, actions, depth + 1)
    return f"'{value.name}' comes from {node.op_type} '{node.name}', which no weight reorder passes through"


def fold_column_gather(graph: ir.Graph, gather: ir.Node) -> str | None:
    """Move ``gather`` (a constant reorder of its input's last axis) into the weights above it; why not, if not.

    On success the Gather is gone and its readers read the projection, whose
    constants now give the reordered columns.
    """
    data, indices = gather.inputs[0], _constant(gather.inputs[1])
    rank = len(data.shape) if data.shape is not None else None
    axis = gather.attributes["axis"].value if "axis" in gather.attributes else 0
    if indices is None or rank is None or axis not in (-1, rank - 1):
        return f"Gather '{gather.name}' is not a constant reorder of the last axis"
    perm = indices.numpy().astype(np.int64)
    if perm.ndim != 1 or sorted(perm.tolist()) != list(range(len(perm))):
        return f"Gather '{gather.name}' does not reorder all of its input's columns"
    if gather.outputs[0].is_graph_output():
        return f"Gather '{gather.name}' gives a graph output"
    actions: list[Callable[[], None]] = []
    reason = _plan(graph, data, perm, gather, actions)
    if reason is not None:
        return reason
    for action in actions:
        action()
    gather.outputs[0].replace_all_uses_with(data)
    graph.remove(gather, safe=True)
    return None
