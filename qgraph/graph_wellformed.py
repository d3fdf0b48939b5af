"""Structural checks of a parsed model that onnx_ir's reader does not make, or makes with an unhelpful message.

Run at load time (``qgraph.io``), on the protobuf, before the IR is built:
a value produced by two nodes made onnx_ir fail with "Error calling
_deserialize_graph with: g", a cycle surfaced much later as a failure of
the ``topological-sort`` pass without naming a node, a corrupt initializer
as a pass failure (exit 1) when a pass first read it, and a model at opset
99, IR version 99 or with an op ONNX does not define went through with exit
0. Each check here costs one walk over the nodes (tensor sizes are read
from field lengths, never by decoding data), and each names the value,
node or version at fault, so the CLI exits 2 with a message a user can act
on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import onnx

from qgraph.errors import BadInputError

__all__ = [
    "check_acyclic",
    "check_default_domain_op",
    "check_single_producers",
    "check_tensor_size",
    "check_versions",
    "node_label",
]


def node_label(node: onnx.NodeProto, index: int) -> str:
    return f"node {node.name!r} ({node.op_type})" if node.name else f"{node.op_type} node #{index}"


def check_versions(proto: onnx.ModelProto, origin: str) -> None:
    """IR version and default-domain opset within what the installed onnx can express."""
    if proto.ir_version > onnx.IR_VERSION:
        raise BadInputError(
            f"{origin}: IR version {proto.ir_version} is newer than the installed onnx "
            f"{onnx.__version__} supports (up to {onnx.IR_VERSION})"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= newest:
            raise BadInputError(
                f"{origin}: imports default-domain opset {opset.version}, but onnx "
                f"{onnx.__version__} knows up to {newest}"
            )


def check_single_producers(graph: onnx.GraphProto, origin: str, where: str) -> None:
    """Every value has one producer: no two nodes write it, no node writes a graph input or initializer."""
    sources: dict[str, str] = {v.name: "a graph input" for v in graph.input}
    sources.update((t.name, "an initializer") for t in graph.initializer if t.name not in sources)
    producers: dict[str, str] = {}
    for index, node in enumerate(graph.node):
        label = node_label(node, index)
        for name in node.output:
            if not name:
                continue
            if name in sources:
                raise BadInputError(f"{origin}: {where}: {label} writes {name!r}, which is {sources[name]}")
            if name in producers:
                raise BadInputError(
                    f"{origin}: {where}: {name!r} is produced by both {producers[name]} and {label}; "
                    "a value has exactly one producer"
                )
            producers[name] = label


def check_acyclic(graph: onnx.GraphProto, origin: str, where: str) -> None:
    """The nodes can be ordered (they need not be in order: topological-sort does that); a cycle is named."""
    nodes = list(graph.node)
    producer = {name: i for i, node in enumerate(nodes) for name in node.output if name}
    deps = [{producer[n] for n in node.input if n in producer} for node in nodes]
    users: list[list[int]] = [[] for _ in nodes]
    for i, ds in enumerate(deps):
        for d in ds:
            users[d].append(i)
    waiting = [len(ds) for ds in deps]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    if done == len(nodes):
        return
    cycle = _one_cycle(deps, {i for i, w in enumerate(waiting) if w > 0})
    names = ", ".join(node_label(nodes[i], i) for i in cycle[:8]) + (" ..." if len(cycle) > 8 else "")
    raise BadInputError(f"{origin}: {where} has a cycle: {names} (each feeds the next, and the last feeds the first)")


def _one_cycle(deps: Sequence[set[int]], stuck: set[int]) -> list[int]:
    """A cycle among the nodes Kahn's algorithm could not order, in data-flow order."""
    start = min(stuck)
    seen: dict[int, int] = {}
    path: list[int] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(d for d in deps[node] if d in stuck)
    flow = list(reversed(path[seen[node]:]))  # producers first
    first = flow.index(min(flow))
    return flow[first:] + flow[:first]


_TYPED_FIELD = {
    onnx.TensorProto.FLOAT: "float_data",
    onnx.TensorProto.DOUBLE: "double_data",
    onnx.TensorProto.INT64: "int64_data",
    onnx.TensorProto.INT32: "int32_data",
}


def check_tensor_size(tensor: onnx.TensorProto, origin: str, what: str) -> None:
    """The bytes or values stored match the shape (external data is checked elsewhere, by file size)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.data_type == onnx.TensorProto.STRING:
        return
    elements = math.prod(tensor.dims)
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:  # noqa: BLE001 - an unknown or sub-byte dtype: not sized here
        return
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) or getattr(onnx.TensorProto, "FLOAT4E2M1", -1) == tensor.data_type:
        return
    shape = list(tensor.dims)
    if tensor.HasField("raw_data"):
        if len(tensor.raw_data) != elements * itemsize:
            raise BadInputError(
                f"{origin}: {what} holds {len(tensor.raw_data)} bytes, but its shape {shape} and dtype "
                f"{onnx.TensorProto.DataType.Name(tensor.data_type)} need {elements * itemsize}; the file is corrupt"
            )
        return
    field = _TYPED_FIELD.get(tensor.data_type)
    if field is not None and elements and len(getattr(tensor, field)) != elements:
        raise BadInputError(
            f"{origin}: {what} holds {len(getattr(tensor, field))} values, but its shape {shape} "
            f"needs {elements}; the file is corrupt"
        )


@functools.cache
def _schema_since(op_type: str, opset: int) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


@functools.cache
def _first_version(op_type: str) -> int | None:
    try:
        return onnx.defs.get_schema(op_type, onnx.defs.onnx_opset_version(), "").since_version
    except onnx.defs.SchemaError:
        return None


def check_default_domain_op(node: onnx.NodeProto, index: int, opset: int | None, origin: str, where: str) -> None:
    """A default-domain node names an op ONNX defines at the model's opset."""
    if opset is None or _schema_since(node.op_type, opset) is not None:
        return
    label = node_label(node, index)
    if _first_version(node.op_type) is None:
        raise BadInputError(f"{origin}: {label} in {where}: no such op in the ONNX standard (default domain)")
    raise BadInputError(
        f"{origin}: {label} in {where} does not exist at default-domain opset {opset}; "
        f"it is defined from a later opset"
    )
