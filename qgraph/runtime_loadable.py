"""Does onnxruntime still have a kernel for a node after its opset changed?

An opset import is a promise about every node in the graph, not only the
ones a pass rewrote: raising the default opset from 17 to 23 makes an
untouched ``RandomNormal`` read as ``RandomNormal(22)``, which onnxruntime
1.32 has no kernel for, so a model that loaded no longer does. The onnx
checker accepts it (the schema exists), and the kernel listing onnxruntime
exports does not say it either, so the question is put to onnxruntime
itself: each distinct kind of node whose schema version moved is built as a
one-node model and loaded, at the new opset and, if that fails, at the old
one. Only "loaded before, not now" is reported, so ops onnxruntime never
knew (device custom ops) are not flagged. All the kinds are first loaded
together as one model of side-by-side nodes: if that loads, every one of
them does, and an 18 -> 23 upgrade of a 2000-node export costs one session
instead of a few dozen (~0.1 s of ``qgraph optimize --preset ort``). Only
when it does not are the kinds loaded one by one to name the culprits.
Sessions are cached by node kind.
"""

from __future__ import annotations

import functools

import onnx
import onnx_ir as ir

from qgraph.graph_stats import iter_nodes

__all__ = ["lost_kernels"]

_DEFAULT = ("", "ai.onnx")


@functools.lru_cache(maxsize=4096)
def _since(op_type: str, opset: int | None) -> int | None:
    if opset is None:
        return None
    try:
        return onnx.defs.get_schema(op_type, opset, "").since_version
    except onnx.defs.SchemaError:
        return None


def _probe(node: ir.Node) -> tuple[bytes, tuple[int, ...]] | None:
    """The node as a standalone NodeProto (inputs i0.., outputs o0..) and its input dtypes, if it can be built."""
    dtypes: list[int] = []
    for value in node.inputs:
        if value is None:
            dtypes.append(0)
            continue
        if not isinstance(value.type, ir.TensorType):
            return None
        dtypes.append(value.type.dtype.value)
    for attr in node.attributes.values():
        if attr.is_ref() or attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return None
    proto = ir.serde.serialize_node(node)
    proto.name = ""
    proto.domain = ""
    proto.ClearField("metadata_props")
    for i in range(len(proto.input)):
        proto.input[i] = f"i{i}" if proto.input[i] else ""
    for i in range(len(proto.output)):
        proto.output[i] = f"o{i}" if proto.output[i] else ""
    # Tensor values (a Constant's payload) do not decide whether a kernel
    # exists; only their dtype does, so they are shrunk to one element.
    for attr in proto.attribute:
        if attr.HasField("t"):
            attr.t.CopyFrom(_one_element(attr.t))
    return proto.SerializeToString(deterministic=True), tuple(dtypes)


def _one_element(tensor: onnx.TensorProto) -> onnx.TensorProto:
    import numpy as np

    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return onnx.numpy_helper.from_array(np.zeros([1], dtype=dtype))


@functools.lru_cache(maxsize=4096)
def _loads(node_bytes: bytes, dtypes: tuple[int, ...], opset: int, ir_version: int) -> bool:
    return _all_load(((node_bytes, dtypes),), opset, ir_version)


@functools.lru_cache(maxsize=64)
def _all_load(probes: tuple[tuple[bytes, tuple[int, ...]], ...], opset: int, ir_version: int) -> bool:
    """Whether onnxruntime loads one model holding every probe node, each on inputs of its own."""
    import onnxruntime as ort

    nodes, inputs, outputs = [], [], []
    for k, (node_bytes, dtypes) in enumerate(probes):
        node = onnx.NodeProto()
        node.ParseFromString(node_bytes)
        prefix = f"p{k}_" if len(probes) > 1 else ""
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name:
                    names[i] = prefix + name
        inputs += [onnx.helper.make_tensor_value_info(f"{prefix}i{i}", t, None) for i, t in enumerate(dtypes) if t]
        outputs += [onnx.ValueInfoProto(name=name) for name in node.output if name]
        nodes.append(node)
    graph = onnx.helper.make_graph(nodes, "probe", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal means "does not load"
        return False
    return True


def lost_kernels(model: ir.Model, previous_opset: int | None) -> list[str]:
    """Nodes onnxruntime could load at ``previous_opset`` but cannot at the model's default opset."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is None or previous_opset is None or opset == previous_opset:
        return []
    # The first node of each kind whose schema moved, in graph order.
    kinds: dict[tuple[bytes, tuple[int, ...]], tuple[ir.Node, int]] = {}
    for node in iter_nodes(model.graph):
        if node.domain not in _DEFAULT:
            continue
        now = _since(node.op_type, opset)
        if now is None or now == _since(node.op_type, previous_opset):
            continue
        probe = _probe(node)
        if probe is not None and probe not in kinds:
            kinds[probe] = (node, now)
    if not kinds or _all_load(tuple(kinds), opset, model.ir_version):
        return []
    problems: list[str] = []
    reported: set[tuple[str, int | None]] = set()
    for probe, (node, now) in kinds.items():
        if (node.op_type, now) in reported or _loads(*probe, opset, model.ir_version):
            continue
        if _loads(*probe, previous_opset, model.ir_version):
            reported.add((node.op_type, now))
            label = f"{node.op_type} '{node.name}'" if node.name else f"a {node.op_type} node"
            problems.append(
                f"onnxruntime cannot load {label} at default-domain opset {opset} (it reads as "
                f"{node.op_type}({now}), which has no kernel; at opset {previous_opset} it loaded)"
            )
    return problems
