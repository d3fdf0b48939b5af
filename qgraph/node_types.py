"""Types for the values a pass creates, from onnx's inference of that one node.

The rewrite engine types every replacement node this way, and so do passes
that build nodes themselves. A pass that appends nodes without typing their
outputs leaves work for
every later pass: onnxscript's constant folder then runs node-level
inference over the whole graph (ten times the cost of folding a typed one),
and the preset's final shape inference has to run at all. Inferring the few
new nodes as they are made costs a fraction of a millisecond each.
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx
import onnx_ir as ir

from qgraph.graph_stats import iter_nodes

__all__ = ["every_value_typed", "infer_output_types"]

# Constant inputs up to this many elements are handed to onnx as data, so
# shape arithmetic (a Reshape's target, a Range's bounds) gives concrete dims.
_DATA_LIMIT = 64


def _type_proto(value: ir.Value) -> onnx.TypeProto:
    proto = ir.serde.serialize_type(value.type)
    if value.shape is not None:
        ir.serde.serialize_shape_into(proto, value.shape)
    return proto


def _opset_of(node: ir.Node, domain: str, opset_imports: Mapping[str, int]) -> int | None:
    if node.version is not None:
        return node.version
    if domain in opset_imports:
        return opset_imports[domain]
    # A node built before its graph imports the default domain (a rewrite's replacement).
    return onnx.defs.onnx_opset_version() if domain == "" else None


def infer_output_types(node: ir.Node, opset_imports: Mapping[str, int]) -> bool:
    """Fill in the dtype and shape onnx infers for ``node``'s outputs where they have none.

    Constant inputs are given to onnx as data; values computed from other
    shapes are not (no data propagation), so a Reshape to a computed shape
    gets its rank but not its dims. Values not yet in a graph may be
    unnamed (a rewrite's replacement): they get temporary names for the
    call. Best effort, and says so: returns False (and leaves the outputs
    as they are) when an input is untyped, the op has no onnx schema (a
    custom op; the rewrite engine then carries the replaced value's type
    over), or onnx's inference rejects the node; later shape inference is
    then still the place that types them.
    """
    if all(v.dtype is not None and v.shape is not None for v in node.outputs):
        return True
    domain = "" if node.domain == "ai.onnx" else node.domain
    if domain == "" and node.op_type == "Constant" and _type_constant(node):
        return True
    return _infer_with_onnx(node, domain, opset_imports)


# Constant's one attribute -> (dtype, shape from the value): ONNX's own inference rule for Constant.
_CONSTANT_KINDS = {
    "value_int": (ir.DataType.INT64, lambda v: []),
    "value_ints": (ir.DataType.INT64, lambda v: [len(v)]),
    "value_float": (ir.DataType.FLOAT, lambda v: []),
    "value_floats": (ir.DataType.FLOAT, lambda v: [len(v)]),
    "value_string": (ir.DataType.STRING, lambda v: []),
    "value_strings": (ir.DataType.STRING, lambda v: [len(v)]),
}


def _type_constant(node: ir.Node) -> bool:
    """Type a Constant from its attribute without a round trip through onnx; False if it is not plain.

    Replacements make many small Constants (a rotary fusion four per layer), and
    serializing each for onnx's inference cost more than the rest of the rewrite.
    """
    if len(node.attributes) != 1 or len(node.outputs) != 1:
        return False
    (name, attr), = node.attributes.items()
    if attr.is_ref() or attr.value is None:
        return False
    if name == "value" and attr.type == ir.AttributeType.TENSOR:
        dtype, dims = attr.value.dtype, list(attr.value.shape)
    elif name in _CONSTANT_KINDS:
        dtype, dims_of = _CONSTANT_KINDS[name]
        dims = dims_of(attr.value)
    else:
        return False  # sparse_value: left to onnx
    out = node.outputs[0]
    if out.dtype is None:
        out.type = ir.TensorType(dtype)
    if out.shape is None:
        out.shape = ir.Shape(dims)
    return out.dtype == dtype


def _infer_with_onnx(node: ir.Node, domain: str, opset_imports: Mapping[str, int]) -> bool:
    """onnx's inference of ``node`` alone (what :func:`infer_output_types` does for every op but Constant)."""
    version = _opset_of(node, domain, opset_imports)
    if version is None or not onnx.defs.has(node.op_type, domain):
        return False
    inputs = [v for v in node.inputs if v is not None]
    if any(v.type is None for v in inputs):
        return False
    unnamed = [v for v in [*inputs, *node.outputs] if not v.name]
    for i, value in enumerate(unnamed):
        value.name = f"__qgraph_tmp{i}"
    try:
        types = {v.name: _type_proto(v) for v in inputs}
        data = {
            v.name: ir.serde.serialize_tensor(v.const_value)
            for v in inputs
            if v.const_value is not None and v.const_value.size <= _DATA_LIMIT
        }
        proto = ir.serde.serialize_node(node)
        names = [v.name for v in node.outputs]
    finally:
        for value in unnamed:
            value.name = None
    try:
        schema = onnx.defs.get_schema(node.op_type, version, domain)
        inferred = onnx.shape_inference.infer_node_outputs(schema, proto, types, data)
    except Exception:  # noqa: BLE001 - best effort: onnx raises several kinds, and unknown stays unknown
        return False
    for name, value in zip(names, node.outputs):
        proto_type = inferred.get(name)
        if proto_type is None:
            continue
        if value.dtype is None:
            value.type = ir.serde.deserialize_type_proto_for_type(proto_type)
        if value.shape is None:
            value.shape = ir.serde.deserialize_type_proto_for_shape(proto_type)
    return all(v.dtype is not None and v.shape is not None for v in node.outputs)


def every_value_typed(graph: ir.Graph) -> bool:
    """Whether every input and node output of ``graph`` and its subgraphs has a dtype and a shape."""
    values = [*graph.inputs, *(v for node in iter_nodes(graph) for v in node.outputs)]
    return all(v.dtype is not None and v.shape is not None for v in values)
