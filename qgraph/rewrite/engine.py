"""Applying a rule set to a model: sweep, match, check, splice.

One sweep visits every node of the main graph and its subgraphs once, and at
each node tries only the rules indexed under its op. Bodies of model-local
functions are searched only for rules that set ``in_functions=True``: a
function body is usually the definition of a custom op a rule emits, and a
rule rewriting its own op's body into a call of that op would make a
function that calls itself (the invariants reject one).
A match is accepted after two checks, in order: no matched intermediate is
used outside the match (unless the rule keeps shared nodes), and the rule's
condition; a rejected match is skipped and shows in ``explain``. The
replacement is then built and its types checked: one that would change a
replaced value's dtype or rank is a bug in the rule, so it raises
``RewriteError`` naming the rule before the graph is touched. Sweeps repeat until nothing matches,
bounded; a rule that matches a subgraph made entirely of nodes it created
itself is re-creating its own pattern and is stopped with an error instead of
looping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx_ir as ir

from qgraph.custom_ops import attach_function
from qgraph.errors import RewriteError
from qgraph.node_types import infer_output_types
from qgraph.rewrite.matcher import Failure, PatternMatcher
from qgraph.rewrite.node_replacement import PASS_KEY, RULE_KEY, register_initializers, stamp
from qgraph.rewrite.replacement import ReplacementBuilder, type_change
from qgraph.rewrite.rule import Match, Rule, RuleSet, call_with_bindings
from qgraph.rewrite.schemas import RuleDefinitionError

# PASS_KEY / RULE_KEY live in node_replacement (shared with replace_node) and stay importable from here.
__all__ = ["PASS_KEY", "RULE_KEY", "Candidate", "RewriteStats", "apply_rules", "explain", "find_matches"]



@dataclasses.dataclass
class RewriteStats:
    """Matches per rule, sweeps run, and the near misses of the last sweep.

    A near miss is a candidate root at which a rule matched at least two
    pattern nodes (all of them, for a one-node pattern) and was then
    rejected: by a later pattern node, a shared intermediate or its
    condition. Only the final sweep's are kept -- it tried every candidate
    that is left and rewrote nothing -- so they cost no extra matching.
    """

    matches: dict[str, int] = dataclasses.field(default_factory=dict)
    sweeps: int = 0
    near_misses: dict[str, list[Failure]] = dataclasses.field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.matches.values())


@dataclasses.dataclass
class Candidate:
    """One root node a rule was tried at, and how it went (for ``--explain``)."""

    rule: str
    node: str
    op_type: str
    graph: str
    matched: bool
    nodes_matched: int
    nodes_total: int
    reason: str | None

    def __str__(self) -> str:
        where = f"{self.graph}/{self.node}" if self.graph else self.node
        if self.matched:
            return f"[match]    {self.rule} at {where} ({self.op_type}): all {self.nodes_total} pattern nodes matched"
        return (
            f"[no match] {self.rule} at {where} ({self.op_type}): "
            f"{self.nodes_matched}/{self.nodes_total} pattern nodes matched; {self.reason}"
        )


def _graphs(model: ir.Model, *, functions: bool = True) -> Iterator[ir.Graph]:
    """The main graph and its subgraphs, then (if ``functions``) function bodies and theirs."""
    def with_subgraphs(g: ir.Graph) -> Iterator[ir.Graph]:
        yield g
        for node in g:
            if not node.attributes:  # most nodes: no attribute can hold a subgraph
                continue
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    yield from with_subgraphs(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.value:
                        yield from with_subgraphs(sub)

    yield from with_subgraphs(model.graph)
    if not functions:
        return
    for function in model.functions.values():
        yield from with_subgraphs(function.graph)


def _searched(model: ir.Model, rules: RuleSet) -> Iterator[tuple[ir.Graph, RuleSet]]:
    """Each graph a sweep visits, with the rules allowed there (function bodies: opt-in rules)."""
    for graph in _graphs(model, functions=False):
        yield graph, rules
    inside = [rule for rule in rules if rule.in_functions]
    if not inside:
        return
    in_functions = rules if len(inside) == len(rules) else RuleSet(inside, name=rules.name)
    main = set(_graphs(model, functions=False))
    for graph in _graphs(model):
        if graph not in main:
            yield graph, in_functions


def _graph_label(g: ir.Graph, model: ir.Model) -> str:
    if g is model.graph:
        return ""
    for function in model.functions.values():
        if function.graph is g:
            return f"function {function.domain}::{function.name}"
    return f"subgraph {g.name}"


class _Matcher:
    """Finds accepted matches; shared by rewriting, match-only and explain."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.opset = model.opset_imports.get("", None)
        self._matchers: dict[int, PatternMatcher] = {}

    def matcher(self, rule: Rule) -> PatternMatcher:
        m = self._matchers.get(id(rule))
        if m is None:
            m = self._matchers[id(rule)] = PatternMatcher(rule.pattern_graph, self.opset)
        return m

    def try_rule(self, rule: Rule, root: ir.Node) -> tuple[Match | None, Failure]:
        """The first binding at ``root`` that passes every check, or the deepest failure."""
        pm = self.matcher(rule)
        total = rule.pattern_graph.count_nodes()
        last: Failure | None = None
        for binding in pm.bindings(root):
            match = Match(rule, binding, root)
            reason = _outside_use(match) if not rule.keep_shared else None
            if reason is None:
                reason = rule.check(match)
            if reason is None:
                return match, Failure("", total, total)
            last = Failure(reason, total, total)
        failure = last or pm.failure or Failure("no structural match", 0, total)
        return None, failure


def _outside_use(match: Match) -> str | None:
    """Why an intermediate of the match cannot be removed, if one cannot."""
    inside = set(match.nodes)
    replaced = set(match.outputs)
    for node in match.nodes:
        for out in node.outputs:
            if out in replaced:
                continue
            if out.is_graph_output():
                return f"intermediate '{out.name}' (from {node.op_type} '{node.name}') is a graph output"
            for user in out.consumers():
                if user not in inside:
                    return (
                        f"intermediate '{out.name}' (from {node.op_type} '{node.name}') is also used by "
                        f"{user.op_type} '{user.name}' outside the match"
                    )
    return None


def _replace(
    model: ir.Model,
    graph: ir.Graph,
    match: Match,
    pass_name: str | None,
    position: dict[ir.Node, int],
) -> tuple[bool, set[ir.Node]]:
    """Splice the replacement in; returns (graph needs a re-sort, nodes created)."""
    rule = match.rule
    builder = ReplacementBuilder(
        use_initializers=graph is model.graph,
        name_prefix=f"{rule.name}/{match.root.name or match.root.outputs[0].name}",
        opset=model.opset_imports.get(""),
    )
    try:
        result = call_with_bindings(rule.replacement, match, op=builder)
    except RuleDefinitionError as exc:
        raise RewriteError(f"rule '{rule.name}': {exc}", rule_name=rule.name, pass_name=pass_name) from exc
    new_values = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(new_values) != len(match.outputs):
        raise RewriteError(
            f"rule '{rule.name}': replacement returned {len(new_values)} value(s) for "
            f"{len(match.outputs)} pattern output(s)",
            rule_name=rule.name,
            pass_name=pass_name,
        )
    for domain in builder.domains:
        if domain not in ("", "ai.onnx") and domain not in model.opset_imports:
            model.opset_imports[domain] = rule.opsets.get(domain, 1)
    for domain, version in rule.opsets.items():
        model.opset_imports.setdefault(domain, version)
    for make_function in rule.functions:
        function = make_function()
        if function.identifier() not in model.functions:
            attach_function(model, function)
    if graph is not model.graph:
        # Function bodies import their own opsets; subgraphs share the model's.
        for domain in builder.domains:
            if graph.opset_imports and domain not in graph.opset_imports:
                graph.opset_imports[domain] = model.opset_imports.get(domain, 1)
    for node in builder.nodes:
        infer_output_types(node, model.opset_imports)
    for old, new in zip(match.outputs, new_values):
        if not isinstance(new, ir.Value):
            raise RewriteError(
                f"rule '{rule.name}': replacement returned {new!r}, not a graph value",
                rule_name=rule.name,
                pass_name=pass_name,
            )
        change = type_change(old, new)
        if change is not None:
            raise RewriteError(
                f"rule '{rule.name}' rejected at node '{match.root.name}': {change}",
                rule_name=rule.name,
                pass_name=pass_name,
            )
    stamp(builder.nodes, rule.name, pass_name)
    anchor = max(match.nodes, key=lambda n: position.get(n, -1))
    created = set(builder.nodes)
    register_initializers(graph, builder.initializers)
    graph.insert_before(anchor, builder.nodes)
    # Nodes made in this sweep sit just before their anchor: a later match in the same sweep that reads one of
    # them (a MatMul packed again with a sibling further down) must see it is earlier than its own anchor.
    made_at = position.get(anchor, 0) - 0.5
    for new_node in builder.nodes:
        position[new_node] = made_at

    needs_sort = False
    removable = set(match.nodes)
    renames: list[tuple[ir.Value, ir.Value, str | None, bool]] = []
    for old, new in zip(match.outputs, new_values):
        if new is old:
            continue
        was_output = old.is_graph_output()
        if was_output and (new.producer() not in created or new.is_graph_output()):
            # An existing value cannot take over the output's name: keep the
            # name stable for callers with an Identity.
            identity = ir.Node("", "Identity", [new], num_outputs=1, name=f"{rule.name}/output_identity")
            stamp([identity], rule.name, None)
            graph.insert_before(anchor, [identity])
            position[identity] = made_at
            created.add(identity)
            new = identity.outputs[0]
        if new.producer() in created:
            if new.type is None:
                new.type = old.type
            if old.shape is not None and (new.shape is None or len(new.shape) == len(old.shape)):
                new.shape = old.shape
        for user, _ in old.uses():
            if user not in removable and position.get(user, 1 << 62) < position.get(anchor, 0):
                needs_sort = True
        renames.append((old, new, old.name, was_output))
        old.replace_all_uses_with(new, replace_graph_outputs=True)

    # Remove matched nodes that nothing uses any more, consumers first, and
    # the initializers only they read (so no dead weights are left behind).
    # One graph.remove call for all of them: each call reads every graph output (a
    # decoder with a KV cache has two per layer), so a call per node grew with depth squared.
    gone: set[ir.Node] = set()
    for node in sorted(removable, key=lambda n: position.get(n, -1), reverse=True):
        if all(not out.is_graph_output() and all(user in gone for user, _ in out.uses()) for out in node.outputs):
            gone.add(node)
    freed = [v for node in gone for v in node.inputs if v is not None and v.is_initializer()]
    if gone:
        graph.remove(gone, safe=True)
    if graph is model.graph:
        for value in freed:
            if not value.uses() and not value.is_graph_input() and not value.is_graph_output():
                graph.initializers.pop(value.name, None)

    # A replacement value inherits the name of what it replaced, so graph
    # outputs keep their names and the verifier can line the graphs up.
    for old, new, name, was_output in renames:
        if new.producer() not in created or name is None:
            continue
        old_producer = old.producer()
        if old_producer is not None and old_producer.graph is not None:
            if not was_output:
                continue
            old.name = f"{name}__shared"
        else:
            old.name = None
        new.name = name
    return needs_sort, created


def apply_rules(
    model: ir.Model,
    rules: RuleSet,
    *,
    pass_name: str | None = None,
    max_sweeps: int = 32,
) -> RewriteStats:
    """Rewrite ``model`` in place until no rule matches (at most ``max_sweeps``)."""
    stats = RewriteStats()
    finder = _Matcher(model)
    created_by: dict[ir.Node, str] = {}
    required = {id(rule): rule.pattern_graph.required_ops() for rule in rules}
    for _ in range(max_sweeps):
        # A rule needing an op the model no longer has cannot match: after a
        # pass fused every instance, the sweep that confirms it is skipped.
        present = {(n.domain or "", n.op_type) for g, _ in _searched(model, rules) for n in g}
        viable = {id(rule) for rule in rules if required[id(rule)] <= present}
        if not viable:
            return stats
        stats.sweeps += 1
        changed = False
        misses: dict[str, list[Failure]] = {}
        for graph, allowed in list(_searched(model, rules)):
            nodes = list(graph)
            position = {n: i for i, n in enumerate(nodes)}
            needs_sort = False
            for node in nodes:
                if node.graph is not graph:
                    continue  # removed by an earlier rewrite in this sweep
                for rule in allowed.rules_for(node):
                    if id(rule) not in viable:
                        continue
                    match, failure = finder.try_rule(rule, node)
                    if match is None:
                        if failure.nodes_matched >= min(2, failure.nodes_total):
                            misses.setdefault(rule.name, []).append(failure)
                        continue
                    if all(created_by.get(n) == rule.name for n in match.nodes):
                        raise RewriteError(
                            f"rule '{rule.name}' matches its own replacement at node '{node.name}': "
                            "its replacement re-creates its pattern, so it would rewrite forever",
                            rule_name=rule.name,
                            pass_name=pass_name,
                        )
                    resort, created = _replace(model, graph, match, pass_name, position)
                    needs_sort |= resort
                    for new_node in created:
                        created_by[new_node] = rule.name
                    stats.matches[rule.name] = stats.matches.get(rule.name, 0) + 1
                    changed = True
                    break
            if needs_sort:
                graph.sort()
        if not changed:
            stats.near_misses = misses
            return stats
    still = sorted({r.name for g, allowed in _searched(model, rules) for n in g for r in allowed.rules_for(n)
                    if finder.try_rule(r, n)[0]})
    if still:
        raise RewriteError(
            f"rules {still} still match after {max_sweeps} sweeps; they rewrite each other's output",
            rule_name=still[0],
            pass_name=pass_name,
        )
    return stats


def find_matches(model: ir.Model, rules: RuleSet) -> list[Match]:
    """Match-only mode: every accepted match, without changing the model.

    Matches may overlap (a node can be part of matches of two rules); each
    root node reports its first accepted rule, as a sweep would try it.
    """
    finder = _Matcher(model)
    found: list[Match] = []
    for graph, allowed in _searched(model, rules):
        for node in graph:
            for rule in allowed.rules_for(node):
                match, _ = finder.try_rule(rule, node)
                if match is not None:
                    found.append(match)
                    break
    return found


def explain(model: ir.Model, rules: RuleSet | Rule) -> list[Candidate]:
    """Every candidate root of each rule, with how far it got and why it stopped."""
    rule_list = [rules] if isinstance(rules, Rule) else list(rules)
    ruleset = RuleSet(rule_list)
    finder = _Matcher(model)
    out: list[Candidate] = []
    for graph, allowed in _searched(model, ruleset):
        label = _graph_label(graph, model)
        for node in graph:
            for rule in allowed.rules_for(node):
                match, failure = finder.try_rule(rule, node)
                out.append(
                    Candidate(
                        rule=rule.name,
                        node=node.name or f"<producer of {node.outputs[0].name}>",
                        op_type=node.op_type,
                        graph=label,
                        matched=match is not None,
                        nodes_matched=failure.nodes_matched,
                        nodes_total=failure.nodes_total,
                        reason=None if match is not None else failure.reason,
                    )
                )
    return out
