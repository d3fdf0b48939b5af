"""Replacing one node by new ones, spliced exactly as a rule's replacement is.

Most passes are rule tables. A lowering that decides node by node what to
emit (many optional inputs and outputs, choices computed from attributes)
is clearer as a loop over nodes -- but it should not re-implement the
splice: building nodes with the replacement builder, inferring their types,
rejecting a dtype or rank change, stamping ``qgraph.pass`` / ``qgraph.rule``
so verification can name the culprit, registering new initializers under
unused names, and handing the old outputs' names (graph outputs included)
to the new values. ``replace_node`` is that splice, public; the rewrite
engine uses the same helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import onnx_ir as ir

from qgraph.errors import RewriteError
from qgraph.node_types import infer_output_types
from qgraph.rewrite.replacement import ReplacementBuilder, type_change
from qgraph.rewrite.schemas import RuleDefinitionError

__all__ = ["PASS_KEY", "RULE_KEY", "replace_node"]

# Metadata keys stamped on every node a rewrite creates: the verifier uses
# them to name the pass and rule behind a diverging tensor.
RULE_KEY = "qgraph.rule"
PASS_KEY = "qgraph.pass"


def stamp(nodes: Iterable[ir.Node], rule_name: str, pass_name: str | None) -> None:
    """Mark nodes as made by ``rule_name`` (and ``pass_name``)."""
    for node in nodes:
        node.metadata_props[RULE_KEY] = rule_name
        if pass_name:
            node.metadata_props[PASS_KEY] = pass_name


def register_initializers(graph: ir.Graph, initializers: Iterable[ir.Value]) -> None:
    """Add new initializers to ``graph``, renaming any whose name is taken."""
    for init in initializers:
        base, i = init.name, 0
        while init.name in graph.initializers:
            i += 1
            init.name = f"{base}_{i}"
        graph.register_initializer(init)


def replace_node(
    model: ir.Model,
    node: ir.Node,
    build: Callable[[ReplacementBuilder], Sequence[ir.Value | None]],
    *,
    rule_name: str,
    pass_name: str | None = None,
    keep_metadata: Sequence[str] = ("qgraph.layer", "qgraph.scope"),
    name_prefix: str | None = None,
) -> list[ir.Node]:
    """Replace ``node`` by the nodes ``build(op)`` creates; returns them.

    ``build`` receives a ``ReplacementBuilder`` (``op.MatMul(a, b)``,
    ``op.const(array)``, ``_domain=``, ``_outputs=``) and returns one value
    per output of ``node``, in order (``None`` for an output nothing uses);
    values beyond the node's outputs are ignored, so a builder may be
    written for every optional output the op can have.
    A returned value may be an existing one (an input of ``node``); an output
    that is a graph output then keeps its name through an ``Identity``.
    The new nodes are typed, stamped with ``rule_name``/``pass_name`` and the
    ``keep_metadata`` entries of ``node``, and inserted where ``node`` was;
    each used output's name moves to its replacement, and ``node`` is removed.

    Raises:
        RewriteError: ``build`` used an op or attribute that does not exist,
            returned the wrong number of values, left a used output without
            a value, or would change a used output's dtype or rank. The graph
            is untouched when it raises.
    """
    graph = node.graph
    if graph is None:
        raise ValueError(f"node '{node.name}' is not in a graph")
    op = ReplacementBuilder(
        use_initializers=graph is model.graph,
        name_prefix=name_prefix or f"{rule_name}/{node.name}",
        opset=model.opset_imports.get(""),
    )

    def fail(message: str) -> RewriteError:
        return RewriteError(f"rule '{rule_name}' at node '{node.name}': {message}", rule_name=rule_name,
                            pass_name=pass_name)

    try:
        new_values = list(build(op))
    except RuleDefinitionError as exc:
        raise fail(str(exc)) from exc
    if len(new_values) < len(node.outputs):
        raise fail(f"returned {len(new_values)} value(s) for {len(node.outputs)} output(s)")
    for new in op.nodes:
        infer_output_types(new, model.opset_imports)
    used = [(old, new) for old, new in zip(node.outputs, new_values) if old.uses() or old.is_graph_output()]
    for old, new in used:
        if new is None:
            raise fail(f"output '{old.name}' is used but the replacement gives no value for it")
        change = type_change(old, new)
        if change is not None:
            raise fail(change)
    stamp(op.nodes, rule_name, pass_name)
    for new in op.nodes:
        for key in keep_metadata:
            if key in node.metadata_props:
                new.metadata_props[key] = node.metadata_props[key]
    register_initializers(graph, op.initializers)
    graph.insert_before(node, op.nodes)
    created = list(op.nodes)
    for old, new in used:
        assert new is not None
        if new.producer() not in created:
            # An existing value cannot take over the output's name: keep it with an Identity.
            identity = ir.Node("", "Identity", [new], name=f"{op.fresh_name('output')}")
            stamp([identity], rule_name, pass_name)
            graph.insert_before(node, [identity])
            created.append(identity)
            new = identity.outputs[0]
        name = old.name
        new.type = old.type or new.type
        new.shape = old.shape if old.shape is not None else new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if name is not None:
            old.name = None
            new.name = name
    graph.remove(node, safe=True)
    return created
