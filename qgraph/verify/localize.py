"""Find where a candidate graph first departs from the reference.

Given a failing input, the tensors both graphs share -- a node output with
the same name in both -- are exposed as extra graph outputs (on copies; the
caller's models are never modified), both graphs run, and the first shared
tensor, in the candidate's topological order, whose values differ beyond
the dtype's tolerance is reported together with the node producing it in
each graph, the ``qgraph.pass``/``qgraph.rule`` metadata the pass manager
stamps on nodes it creates, and how the two producing nodes differ
(attributes, constant inputs, inputs with no counterpart).

Search strategy (the decision, written down): a *chunked linear scan*, not a
bisection. Shared tensors are taken in topological order in chunks of
``chunk_size`` (default 4096); each chunk costs one run of each graph with
that chunk exposed, and the scan stops at the first chunk containing a
divergence. Bisection would need fewer runs only if "diverged" were
monotone along the order, and it is not: a wrong mask value is only visible
in the masked positions of some tensors, ReLU/argmax/comparison outputs
re-converge, a divergence in one branch leaves parallel branches equal. A
bisection can then stop at a later tensor and blame the wrong node; a scan
cannot. Exposing a chunk is cheap in onnxruntime (with optimizations off it
allocates every intermediate anyway; exposing only stops buffer reuse), and
the input being localized is the shrunk, small failing example. A 30-layer
decoder has a few thousand shared values, so a handful of runs.

A shared tensor diverges when it differs beyond the dtype's tolerance with
atol taken relative to the tensor's own range (not floored at 1 as for
outputs): intermediates are often tiny (a mean square, a variance) and a
wrong constant changes them by far more than rounding yet by less than an
absolute 1e-4, which would push the blame downstream.

Only values of the top-level graph take part; values inside If/Loop bodies
cannot be graph outputs. Tensors whose runtime dtype or shape differ between
the graphs are skipped: they are not the same tensor under the same name.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.verify.compare import (
    OutputReport,
    Tolerance,
    compare_arrays,
    default_tolerance,
)
from qgraph.verify.runner import OrtRunner

__all__ = ["Divergence", "NodeRef", "PASS_KEY", "RULE_KEY", "localize", "shared_tensors"]

PASS_KEY = "qgraph.pass"
RULE_KEY = "qgraph.rule"


@dataclasses.dataclass(frozen=True)
class NodeRef:
    """A node as a report names it, with the pass/rule that created it if known."""

    name: str | None
    op_type: str
    domain: str = ""
    pass_name: str | None = None
    rule_name: str | None = None

    @classmethod
    def of(cls, node: ir.Node) -> NodeRef:
        return cls(
            name=node.name,
            op_type=node.op_type,
            domain=node.domain,
            pass_name=node.metadata_props.get(PASS_KEY),
            rule_name=node.metadata_props.get(RULE_KEY),
        )

    def __str__(self) -> str:
        op = f"{self.domain}::{self.op_type}" if self.domain not in ("", "ai.onnx") else self.op_type
        text = f"{op} node {self.name!r}" if self.name else f"unnamed {op} node"
        made_by = [f"pass {self.pass_name!r}"] if self.pass_name else []
        if self.rule_name:
            made_by.append(f"rule {self.rule_name!r}")
        return f"{text} (created by {', '.join(made_by)})" if made_by else text


@dataclasses.dataclass
class Divergence:
    """The first shared tensor that differs, and what produces it on each side."""

    tensor: str
    report: OutputReport
    candidate_node: NodeRef | None
    reference_node: NodeRef | None
    differences: list[str]
    position: int  # index of the tensor among the shared tensors, in topological order
    shared_tensors: int
    runs: int  # onnxruntime runs per graph spent localizing

    def __str__(self) -> str:
        lines = [f"first diverging tensor: {self.tensor!r} ({self.position + 1} of {self.shared_tensors} shared)"]
        lines.append(f"    candidate: produced by {self.candidate_node}")
        lines.append(f"    reference: produced by {self.reference_node}")
        lines.extend(f"    differs: {d}" for d in self.differences)
        lines.extend("    " + line for line in str(self.report).splitlines())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor,
            "candidate_node": None if self.candidate_node is None else dataclasses.asdict(self.candidate_node),
            "reference_node": None if self.reference_node is None else dataclasses.asdict(self.reference_node),
            "differences": list(self.differences),
            "position": self.position,
            "shared_tensors": self.shared_tensors,
            "runs": self.runs,
            "report": self.report.to_dict(),
        }


def _producers(graph: ir.Graph) -> dict[str, ir.Node]:
    return {out.name: node for node in graph for out in node.outputs if out.name}


def _values_read(node: ir.Node) -> list[ir.Value]:
    """Inputs of the node and the outer-scope values its subgraphs read."""
    read = [v for v in node.inputs if v is not None]
    for attr in node.attributes.values():
        if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            graphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value)
            for graph in graphs:
                for inner in ir.traversal.RecursiveGraphIterator(graph):
                    read.extend(v for v in inner.inputs if v is not None)
    return read


def topological_order(graph: ir.Graph) -> list[ir.Node]:
    """The graph's nodes in a topological order, stable with respect to file order.

    Computed without touching the graph (``Graph.sort`` sorts in place, and
    ``clone`` refuses unsorted graphs, which onnxruntime accepts). Nodes on a
    cycle, if any, are appended in file order.
    """
    nodes = list(graph)
    index = {node: i for i, node in enumerate(nodes)}
    waiting_on: dict[ir.Node, int] = {}
    dependents: dict[ir.Node, list[ir.Node]] = {node: [] for node in nodes}
    for node in nodes:
        producers = {v.producer() for v in _values_read(node)}
        producers = {p for p in producers if p in index and p is not node}
        waiting_on[node] = len(producers)
        for producer in producers:
            dependents[producer].append(node)
    ready = [index[n] for n in nodes if waiting_on[n] == 0]
    heapq.heapify(ready)
    ordered: list[ir.Node] = []
    while ready:
        node = nodes[heapq.heappop(ready)]
        ordered.append(node)
        for dependent in dependents[node]:
            waiting_on[dependent] -= 1
            if waiting_on[dependent] == 0:
                heapq.heappush(ready, index[dependent])
    if len(ordered) < len(nodes):
        placed = set(ordered)
        ordered.extend(n for n in nodes if n not in placed)
    return ordered


def shared_tensors(reference: ir.Model, candidate: ir.Model) -> list[str]:
    """Node outputs present under the same name in both graphs, in the candidate's topological order.

    Values whose declared element types differ are left out.
    """
    ref_values = {out.name: out for node in reference.graph for out in node.outputs if out.name}
    graph_inputs = {v.name for v in reference.graph.inputs} | {v.name for v in candidate.graph.inputs}
    names: list[str] = []
    for node in topological_order(candidate.graph):
        for out in node.outputs:
            name = out.name
            if not name or name in graph_inputs or name not in ref_values:
                continue
            ref_dtype = ref_values[name].dtype
            if out.dtype is not None and ref_dtype is not None and out.dtype != ref_dtype:
                continue
            names.append(name)
    return names


# --- how two producing nodes differ -----------------------------------------


def _attr_default(node: ir.Node, name: str, opset: int | None) -> Any:
    if opset is None:
        return None
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        default = schema.attributes[name].default_value
    except Exception:  # noqa: BLE001 - no schema (custom op) or no such attribute
        return None
    return onnx.helper.get_attribute_value(default) if default.name else None


def _plain(value: Any) -> Any:
    if isinstance(value, ir.TensorProtocol):
        return value.numpy()
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        return a_arr.shape == b_arr.shape and bool(np.array_equal(a_arr, b_arr, equal_nan=a_arr.dtype.kind == "f"))
    if isinstance(a, float) and isinstance(b, float):
        return np.float32(a) == np.float32(b)  # attributes are stored as float32
    return a == b


def _show(value: Any) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 4:
            return np.array2string(value.reshape(-1) if value.ndim else value, precision=6)
        return f"<{value.dtype} {list(value.shape)}>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _const_difference(a: np.ndarray, b: np.ndarray) -> str:
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"{a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    if a.size <= 4:
        return f"{_show(a)} vs {_show(b)}"
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), a.shape))
    return (
        f"{int((diff > 0).sum())} of {a.size} values differ, largest at {idx}:"
        f" {_show(a[idx].item())} vs {_show(b[idx].item())}"
    )


def _opset(model: ir.Model, domain: str) -> int | None:
    for key in ((domain,) if domain not in ("", "ai.onnx") else ("", "ai.onnx")):
        if key in model.opset_imports:
            return model.opset_imports[key]
    return None


def node_differences(
    reference: ir.Node,
    candidate: ir.Node,
    *,
    reference_opset: int | None = None,
    candidate_opset: int | None = None,
    shared: frozenset[str] = frozenset(),
) -> list[str]:
    """What distinguishes two producing nodes: op, attributes, constant inputs, unmatched inputs."""
    found: list[str] = []
    if (reference.op_type, reference.domain) != (candidate.op_type, candidate.domain):
        found.append(f"op: {reference.op_type} in the reference, {candidate.op_type} in the candidate")
        return found
    for name in sorted(set(reference.attributes) | set(candidate.attributes)):
        ref_attr, cand_attr = reference.attributes.get(name), candidate.attributes.get(name)
        ref_value = _plain(ref_attr.value) if ref_attr is not None else _attr_default(reference, name, reference_opset)
        cand_value = _plain(cand_attr.value) if cand_attr is not None else _attr_default(candidate, name, candidate_opset)
        if not _same(ref_value, cand_value):
            found.append(f"attribute {name}: {_show(ref_value)} in the reference, {_show(cand_value)} in the candidate")
    for i in range(max(len(reference.inputs), len(candidate.inputs))):
        ref_in = reference.inputs[i] if i < len(reference.inputs) else None
        cand_in = candidate.inputs[i] if i < len(candidate.inputs) else None
        if ref_in is None or cand_in is None:
            if (ref_in is None) != (cand_in is None):
                found.append(f"input {i}: present in only one graph")
            continue
        ref_const, cand_const = ref_in.const_value, cand_in.const_value
        if ref_const is not None and cand_const is not None:
            a, b = ref_const.numpy(), cand_const.numpy()
            if not _same(a, b):
                found.append(f"input {i} ({cand_in.name!r}): constant differs: {_const_difference(a, b)}")
        elif (ref_const is None) != (cand_const is None):
            which = "reference" if ref_const is not None else "candidate"
            found.append(f"input {i} ({cand_in.name!r}): a constant only in the {which}")
        elif cand_in.name != ref_in.name:
            found.append(f"input {i}: {ref_in.name!r} in the reference, {cand_in.name!r} in the candidate")
        elif cand_in.name not in shared and not cand_in.is_graph_input():
            found.append(f"input {i} ({cand_in.name!r}): same name but not comparable (no checked counterpart)")
    return found


# --- the scan ---------------------------------------------------------------


def localize(
    reference: ir.Model,
    candidate: ir.Model,
    reference_feeds: Mapping[str, np.ndarray],
    candidate_feeds: Mapping[str, np.ndarray],
    *,
    chunk_size: int = 4096,
    tolerances: Mapping[str, Tolerance] | None = None,
    threads: int = 1,
) -> Divergence | None:
    """The first shared tensor that diverges on these feeds, or None if none does.

    None means every shared tensor agrees: the difference arises in nodes
    whose outputs have no counterpart in the other graph.
    """
    tolerances = tolerances or {}
    names = shared_tensors(reference, candidate)
    shared = frozenset(names)
    runs = 0
    for start in range(0, len(names), max(1, chunk_size)):
        chunk: Sequence[str] = names[start : start + chunk_size]
        with OrtRunner(reference, extra_outputs=chunk, threads=threads, label="the reference") as runner:
            ref_out = runner.run(reference_feeds)
        with OrtRunner(candidate, extra_outputs=chunk, threads=threads, label="the candidate") as runner:
            cand_out = runner.run(candidate_feeds)
        runs += 1
        for offset, name in enumerate(chunk):
            a, b = ref_out[name], cand_out[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                continue
            tolerance = tolerances.get(name) or default_tolerance(a.dtype).relative_to_range()
            report = compare_arrays(name, a, b, tolerance)
            if report.passed:
                continue
            ref_node = _producers(reference.graph)[name]
            cand_node = _producers(candidate.graph)[name]
            return Divergence(
                tensor=name,
                report=report,
                candidate_node=NodeRef.of(cand_node),
                reference_node=NodeRef.of(ref_node),
                differences=node_differences(
                    ref_node,
                    cand_node,
                    reference_opset=_opset(reference, ref_node.domain),
                    candidate_opset=_opset(candidate, cand_node.domain),
                    shared=shared,
                ),
                position=start + offset,
                shared_tensors=len(names),
                runs=runs,
            )
    return None
