"""Graph invariants checked between passes.

A pass that leaves a dangling value or an out-of-order node usually produces
a model that fails much later, in the device compiler, far from the cause.
The manager runs these checks after every pass so the failure names the pass
that broke the graph. The structural checks walk the IR once (O(nodes));
the onnx checker runs on a serialization with large initializers left out,
so weights are not read.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common

__all__ = ["find_violations"]


def _check_graph(
    graph: ir.Graph, outer: set[ir.Value], names: dict[str, str], where: str, problems: list[str]
) -> None:
    defined: set[ir.Value] = set(outer)
    own_nodes = set(graph)

    def claim(value: ir.Value, owner: str) -> None:
        if not value.name:
            problems.append(f"{where}: a value produced by {owner} has no name")
            return
        previous = names.get(value.name)
        if previous is not None:
            problems.append(f"{where}: value name '{value.name}' is used twice ({previous} and {owner})")
        else:
            names[value.name] = owner

    for value in graph.inputs:
        claim(value, "a graph input")
        defined.add(value)
    for value in graph.initializers.values():
        if value not in defined:
            claim(value, "an initializer")
        defined.add(value)
    for node in graph:
        label = f"{node.op_type} '{node.name}'"
        for i, value in enumerate(node.inputs):
            if value is None or value in defined:
                continue
            producer = value.producer()
            if producer is not None and producer in own_nodes:
                problems.append(
                    f"{where}: {label} reads '{value.name}' (input {i}) before {producer.op_type} "
                    f"'{producer.name}' produces it (nodes are not in topological order)"
                )
            else:
                origin = "a removed node" if producer is not None else "nothing in the graph"
                problems.append(f"{where}: {label} reads '{value.name}' (input {i}), produced by {origin} (dangling value)")
        for attr in node.attributes.values():
            subgraphs = [attr.value] if attr.type == ir.AttributeType.GRAPH else list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []
            for sub in subgraphs:
                _check_graph(sub, defined, names, f"{where} > {label}.{attr.name}", problems)
        for out in node.outputs:
            claim(out, label)
            defined.add(out)
    for i, value in enumerate(graph.outputs):
        if value not in defined:
            producer = value.producer()
            origin = f"removed {producer.op_type} '{producer.name}'" if producer is not None else "nothing"
            problems.append(f"{where}: graph output {i} '{value.name}' is no longer produced (by {origin})")


def find_violations(model: ir.Model, *, run_onnx_checker: bool = True) -> list[str]:
    """Every invariant violation in ``model``, as readable sentences."""
    problems: list[str] = []
    _check_graph(model.graph, set(), {}, "main graph", problems)
    for function in model.functions.values():
        fgraph_problems: list[str] = []
        defined = set(function.inputs)
        for node in function:
            for value in node.inputs:
                if value is not None and value not in defined:
                    fgraph_problems.append(
                        f"function {function.domain}::{function.name}: {node.op_type} '{node.name}' reads "
                        f"'{value.name}' before it is produced or from outside the function"
                    )
            defined.update(node.outputs)
        for value in function.outputs:
            if value not in defined:
                fgraph_problems.append(f"function {function.domain}::{function.name}: output '{value.name}' is not produced")
        problems.extend(fgraph_problems)
    if run_onnx_checker and not problems:
        try:
            ir.passes.common.CheckerPass(full_check=False)(model)
        except Exception as exc:  # noqa: BLE001 - the checker's own message is the diagnosis
            cause = exc.__cause__ or exc
            problems.append(f"onnx checker: {str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}")
    return problems
