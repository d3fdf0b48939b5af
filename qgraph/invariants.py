"""Graph invariants checked between passes.

A pass that leaves a dangling value or an out-of-order node usually produces
a model that fails much later, in the device compiler, far from the cause.
The manager runs these checks after every pass so the failure names the pass
that broke the graph. The structural checks walk the IR once (O(nodes)).

The onnx checker is the expensive part: serializing a 2000-node export for
it took longer than most passes. ``find_violations`` runs it on the whole
model (large initializers left out, so weights are not read);
``InvariantChecker``, which the manager keeps for one run, hands onnx only
the nodes the passes made or changed (and those an opset change makes read
as another schema), the graph's inputs and outputs, and the model-local
functions. With the structural checks, that covers what
``onnx.checker.check_model`` checks of what a pass wrote, except the
value_info of intermediate values and the contents of initializers, which
no pass writes by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from qgraph.graph_stats import iter_nodes
from qgraph.runtime_loadable import lost_kernels

__all__ = ["InvariantChecker", "find_violations"]


def _label(node: ir.Node) -> str:
    return f"{node.op_type} '{node.name}'"


def _check_graph(
    graph: ir.Graph, outer: set[ir.Value], names: dict[str, str | ir.Node], where: str, problems: list[str]
) -> None:
    # Runs after every pass that changed the model: labels are formatted, and the set of the
    # graph's own nodes built, only when there is a problem to describe.
    defined: set[ir.Value] = set(outer)
    own_nodes: set[ir.Node] | None = None

    def claim(value: ir.Value, owner: str | ir.Node) -> None:
        if not value.name:
            problems.append(f"{where}: a value produced by {_owner(owner)} has no name")
            return
        previous = names.get(value.name)
        if previous is not None:
            problems.append(f"{where}: value name '{value.name}' is used twice ({_owner(previous)} and {_owner(owner)})")
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
        for i, value in enumerate(node.inputs):
            if value is None or value in defined:
                continue
            if own_nodes is None:
                own_nodes = set(graph)
            producer = value.producer()
            if producer is not None and producer in own_nodes:
                problems.append(
                    f"{where}: {_label(node)} reads '{value.name}' (input {i}) before {producer.op_type} "
                    f"'{producer.name}' produces it (nodes are not in topological order)"
                )
            else:
                origin = "a removed node" if producer is not None else "nothing in the graph"
                problems.append(f"{where}: {_label(node)} reads '{value.name}' (input {i}), produced by {origin} (dangling value)")
        if node.attributes:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    subgraphs = [attr.value]
                elif attr.type == ir.AttributeType.GRAPHS:
                    subgraphs = list(attr.value)
                else:
                    continue
                for sub in subgraphs:
                    _check_graph(sub, defined, names, f"{where} > {_label(node)}.{attr.name}", problems)
        for out in node.outputs:
            claim(out, node)
            defined.add(out)
    for i, value in enumerate(graph.outputs):
        if value not in defined:
            producer = value.producer()
            origin = f"removed {producer.op_type} '{producer.name}'" if producer is not None else "nothing"
            problems.append(f"{where}: graph output {i} '{value.name}' is no longer produced (by {origin})")


def _owner(owner: str | ir.Node) -> str:
    return owner if isinstance(owner, str) else _label(owner)


def _structural_violations(model: ir.Model) -> list[str]:
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
    problems.extend(_call_cycles(model))
    return problems


def _call_cycles(model: ir.Model) -> list[str]:
    """Model-local functions that call themselves, directly or through others.

    ONNX forbids recursion (a function body is inlined by runtimes, so a
    cycle never ends); onnxruntime fails on such a model at load time, far
    from the pass that wrote it.
    """
    calls: dict[tuple[str, str, str], list[tuple[str, str, str]]] = {}
    for key, function in model.functions.items():
        callees = []
        for node in iter_nodes(function.graph):
            callee = (node.domain, node.op_type, node.overload)
            if callee in model.functions and callee not in callees:
                callees.append(callee)
        calls[key] = callees
    problems: list[str] = []
    state: dict[tuple[str, str, str], int] = {}  # 1 on the current path, 2 finished
    path: list[tuple[str, str, str]] = []

    def visit(key: tuple[str, str, str]) -> None:
        state[key] = 1
        path.append(key)
        for callee in calls[key]:
            if state.get(callee) == 1:
                cycle = path[path.index(callee):] + [callee]
                names = " -> ".join(f"{d}::{n}" for d, n, _ in cycle)
                problems.append(f"function {callee[0]}::{callee[1]} calls itself ({names})")
            elif callee not in state:
                visit(callee)
        path.pop()
        state[key] = 2

    for key in calls:
        if key not in state:
            visit(key)
    return problems


def find_violations(model: ir.Model, *, run_onnx_checker: bool = True) -> list[str]:
    """Every invariant violation in ``model``, as readable sentences (the whole onnx checker included)."""
    problems = _structural_violations(model)
    if run_onnx_checker and not problems:
        try:
            ir.passes.common.CheckerPass(full_check=False)(model)
        except Exception as exc:  # noqa: BLE001 - the checker's own message is the diagnosis
            cause = exc.__cause__ or exc
            problems.append(f"onnx checker: {str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__}")
    return problems


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _has_subgraph(node: ir.Node) -> bool:
    return any(
        attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) and not attr.is_ref()
        for attr in node.attributes.values()
    )


def _fingerprint(node: ir.Node) -> tuple:
    """What the onnx checker reads of a node: op, version, attributes, which inputs and outputs exist.

    Attributes are compared by identity: onnx_ir attributes are replaced,
    not edited, when a pass changes one.
    """
    attributes = node.attributes
    return (
        node.domain,
        node.op_type,
        node.overload,
        node.version,
        tuple((name, id(attr)) for name, attr in attributes.items()) if attributes else (),
        tuple(v is not None for v in node.inputs),
        len(node.outputs),
    )


def _schema_version(domain: str, op_type: str, opset: int | None) -> int | None:
    """The since_version of the schema ``op_type`` resolves to at ``opset``, None without one."""
    if opset is None:
        return None
    try:
        return onnx.defs.get_schema(op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return None


class InvariantChecker:
    """The invariant checks of one pipeline run, onnx-checking only what the passes changed.

    ``baseline`` takes the model as given; after every pass that changed it,
    calling the checker returns the same kind of sentences as
    ``find_violations``. The structural checks cover the whole graph each
    time; the onnx checker sees the nodes that are new or changed since the
    baseline or the last check, plus the unchanged nodes whose op now
    resolves to another schema because an opset import changed, and the
    graph's inputs and outputs and model-local functions. Nodes as the input
    model had them are the input's, not a pass's, and are not onnx-checked
    (``find_violations`` checks a whole model). A changed node with a
    subgraph (If, Loop, Scan) is checked against its outer scope by the
    whole-model checker. Raising the IR version (the only direction passes
    take it) invalidates no node.
    """

    def __init__(self, *, run_onnx_checker: bool = True) -> None:
        self.run_onnx_checker = run_onnx_checker
        self._known: dict[ir.Node, tuple] = {}
        self._imports: dict[str, int] | None = None
        self._context = onnx.checker.C.CheckerContext()

    def baseline(self, model: ir.Model) -> None:
        """Take ``model`` as the input of the run: its nodes count as checked."""
        self._known = {node: _fingerprint(node) for node in iter_nodes(model.graph)}
        self._imports = dict(model.opset_imports)

    def _reread(self, imports: dict[str, int]) -> Callable[[ir.Node], bool]:
        """Whether an unchanged node reads differently under ``imports`` than under the last ones."""
        old = self._imports
        if old is None:
            return lambda node: True
        moved = {d for d in set(old) | set(imports) if old.get(d) != imports.get(d)}
        cache: dict[tuple[str, str], bool] = {}

        def reread(node: ir.Node) -> bool:
            domain = "" if node.domain == "ai.onnx" else node.domain
            if domain not in moved or node.version is not None:
                return False
            key = (domain, node.op_type)
            if key not in cache:
                before = _schema_version(domain, node.op_type, old.get(domain))
                cache[key] = before is None or before != _schema_version(domain, node.op_type, imports.get(domain))
            return cache[key]

        return reread

    def __call__(self, model: ir.Model) -> list[str]:
        problems = _structural_violations(model)
        if not problems and self._imports is not None:
            previous = self._imports.get("", self._imports.get("ai.onnx"))
            problems = lost_kernels(model, previous)
        if problems or not self.run_onnx_checker:
            return problems
        imports = dict(model.opset_imports)
        reread = self._reread(imports)
        self._imports = imports
        self._context.ir_version = model.ir_version
        self._context.opset_imports = imports
        changed = [
            (node, fingerprint)
            for node in iter_nodes(model.graph)
            if self._known.get(node) != (fingerprint := _fingerprint(node)) or reread(node)
        ]
        if any(_has_subgraph(node) for node, _ in changed):
            problems = find_violations(model)
            if not problems:
                self._known.update(changed)
            return problems
        for node, fingerprint in changed:
            try:
                onnx.checker.check_node(ir.serde.serialize_node(node), self._context)
            except (onnx.checker.ValidationError, ValueError, TypeError) as error:
                problems.append(f"onnx checker: {node.op_type} '{node.name}': {_first_line(error)}")
                self._known.pop(node, None)
            else:
                self._known[node] = fingerprint
        for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
            for value in values:
                try:
                    onnx.checker.check_value_info(ir.serde.serialize_value(value), self._context)
                except (onnx.checker.ValidationError, ValueError, TypeError) as error:
                    problems.append(f"onnx checker: graph {kind} '{value.name}': {_first_line(error)}")
        for function in model.functions.values():
            try:
                onnx.checker.check_function(ir.serde.serialize_function(function), self._context)
            except (onnx.checker.ValidationError, ValueError, TypeError) as error:
                problems.append(
                    f"onnx checker: function {function.domain}::{function.name}: {_first_line(error)}"
                )
        return problems
