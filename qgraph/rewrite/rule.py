"""Rules (pattern + condition + replacement) and rule sets compiled for dispatch.

A rule is data: a table of rules is one screen of a pass module. The
condition and the replacement receive the match's bindings as keyword
arguments by name (variables, captured constants/attributes/dims/nodes, and
whatever the condition stored on the match), so a reader sees what each one
uses. A condition returns ``None``/``True`` to accept, or a string saying why
it rejects (``False`` rejects with a generic reason); it hands what it
computed to the replacement by assigning ``match["key"] = value`` — never
through attributes on the rule object, which would leak between matches.
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx_ir as ir

from qgraph.rewrite.matcher import Binding
from qgraph.rewrite.pattern import PatternGraph, build_pattern
from qgraph.rewrite.schemas import RuleDefinitionError, op_problem

__all__ = ["Match", "Rule", "RuleSet", "call_with_bindings"]


class Match(Mapping[str, Any]):
    """A successful match: bound values, matched nodes, and computed extras.

    Lookup order for ``match[name]``: extras set by the condition, variables,
    constants, attributes, symbolic dims, captured nodes.
    """

    def __init__(self, rule: Rule, binding: Binding, root: ir.Node) -> None:
        self.rule = rule
        self.root = root
        self.binding = binding
        self.extras: dict[str, Any] = {}

    @property
    def nodes(self) -> list[ir.Node]:
        return list(self.binding.nodes.values())

    @property
    def outputs(self) -> list[ir.Value]:
        return self.binding.outputs

    @property
    def values(self) -> dict[str, ir.Value]:
        return self.binding.values

    def _tables(self) -> tuple[Mapping[str, Any], ...]:
        b = self.binding
        return (self.extras, b.values, b.consts, b.attrs, b.dims, b.named_nodes, b.alternatives)

    def __getitem__(self, key: str) -> Any:
        for table in self._tables():
            if key in table:
                return table[key]
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.extras[key] = value

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        for table in self._tables():
            for key in table:
                if key not in seen:
                    seen.add(key)
                    yield key

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"Match(rule={self.rule.name!r}, root={self.root.name!r}, nodes={len(self.nodes)})"


# Weak keys: rules made on the fly (tests, notebooks) do not accumulate here.
_SIGNATURES: weakref.WeakKeyDictionary[Any, Mapping[str, inspect.Parameter]] = weakref.WeakKeyDictionary()


def _parameters(fn: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    """``inspect.signature(fn).parameters``, once per function: it was read at every match."""
    try:
        return _SIGNATURES[fn]
    except KeyError:
        params = _SIGNATURES[fn] = inspect.signature(fn).parameters
        return params
    except TypeError:  # a callable object that is unhashable or takes no weak reference
        return inspect.signature(fn).parameters


def call_with_bindings(fn: Callable[..., Any], match: Match, **fixed: Any) -> Any:
    """Call ``fn`` with the match bindings its signature asks for.

    ``match`` is passed as ``match`` if requested; ``fixed`` (e.g. ``op``)
    fills reserved parameters. A parameter with no binding and no default is
    an authoring error, reported with the rule's name.
    """
    kwargs: dict[str, Any] = {}
    params = _parameters(fn)
    for name, param in params.items():
        if param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        if name in fixed:
            kwargs[name] = fixed[name]
        elif name == "match":
            kwargs[name] = match
        elif name in match:
            kwargs[name] = match[name]
        elif param.default is inspect.Parameter.empty:
            raise TypeError(
                f"rule '{match.rule.name}': {fn.__name__}() asks for '{name}', "
                f"which the match does not bind (bound: {sorted(match)})"
            )
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        for key in match:
            kwargs.setdefault(key, match[key])
    return fn(**kwargs)


@dataclasses.dataclass(eq=False)
class Rule:
    """A declarative rewrite rule.

    Attributes:
        name: unique within its rule set; shown in reports and ``--explain``.
        pattern: ``fn(op, *vars)`` returning the value(s) to replace.
        replacement: ``fn(op, **bindings)`` returning the new value(s), as many
            as the pattern returns (an existing bound value is allowed).
        condition: optional ``fn(**bindings) -> None | True | False | str``.
        commute: match every commutative op of the pattern in both input orders.
        keep_shared: matched intermediates used outside the match do not block
            the rewrite; the nodes that produce them stay in the graph.
        opsets: domains (and versions) the replacement needs imported.
        doc: one line on what the rule does (the algebra, e.g. ``x*1 -> x``).
        example_inputs: for the rule self-check, ``{var: (dtype, shape)}`` of
            variables that need a particular dtype or shape; dtype is an
            ``onnx_ir.DataType`` or a numpy dtype (``np.float32``).
        example_values: for the rule self-check, values of constants,
            captured attributes, or variables that must be constants; a
            variable's entry may also be a pattern-style function
            (``lambda op, k: op.Transpose(k, perm=[0, 1, 3, 2])``) that
            builds what a condition expects to find behind the variable.
        functions: factories of the function bodies of the custom ops the
            replacement emits; each is attached to the model
            (``qgraph.custom_ops.attach_function``) when the rule fires, so
            the rewritten model -- and the rule self-check -- still runs in
            onnxruntime.
        in_functions: also rewrite the bodies of model-local functions. Off
            by default: a body is usually the definition of a custom op, and
            a rule that emits that op would turn its body into a call of
            itself.
        opset: the default-domain opset the pattern's op types and attribute
            names are checked against when the rule is defined (None: the
            newest onnx knows; see ``qgraph.rewrite.schemas``). A typo raises
            ``RuleDefinitionError`` naming the rule.
        check_tolerance: for the rule self-check, the elementwise atol and
            rtol (float outputs) when the replacement regroups float
            arithmetic the pattern does in another order -- a scale folded
            into a sum before a softmax, whose exp amplifies the last bit of
            scores as large as the self-check's inputs (up to 1e2) make
            them. None: the dtype's default. Say why where it is set.
    """

    name: str
    pattern: Callable[..., Any]
    replacement: Callable[..., Any]
    condition: Callable[..., Any] | None = None
    commute: bool = False
    keep_shared: bool = False
    opsets: Mapping[str, int] = dataclasses.field(default_factory=dict)
    doc: str = ""
    example_inputs: Mapping[str, tuple[Any, Any]] = dataclasses.field(default_factory=dict)
    example_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    functions: tuple[Callable[[], ir.Function], ...] = ()
    in_functions: bool = False
    opset: int | None = None
    check_tolerance: float | None = None
    _graph: PatternGraph | None = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        for node in self.pattern_graph.nodes:
            problem = op_problem(node.domain, node.op_type, node.attributes, self.opset)
            if problem is not None:
                raise RuleDefinitionError(f"rule '{self.name}': pattern {problem}")

    @property
    def pattern_graph(self) -> PatternGraph:
        if self._graph is None:
            self._graph = build_pattern(self.pattern, commute=self.commute)
        return self._graph

    def check(self, match: Match) -> str | None:
        """Run the condition: None when accepted, the reason when rejected."""
        if self.condition is None:
            return None
        verdict = call_with_bindings(self.condition, match)
        if verdict is None or verdict is True:
            return None
        if verdict is False:
            return f"condition {self.condition.__name__}() rejected the match"
        if isinstance(verdict, str):
            return verdict
        if isinstance(verdict, (bool, np.bool_)):
            return None if verdict else f"condition {self.condition.__name__}() rejected the match"
        raise TypeError(
            f"rule '{self.name}': condition must return None, a bool or a reason string, got {verdict!r}"
        )


class RuleSet:
    """Rules compiled once into a dispatch table indexed by root op.

    A sweep looks up each node's ``(domain, op_type)`` and tries only the
    rules whose pattern can be rooted there, in the order they were given,
    so its cost is proportional to the number of nodes, not nodes x rules.
    Rule sets compose with ``+``.
    """

    def __init__(self, rules: Iterable[Rule], name: str = "") -> None:
        self.name = name
        self.rules = list(rules)
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule set '{name}': duplicate rule names {dupes}")
        self.dispatch: dict[tuple[str, str], list[Rule]] = {}
        for rule in self.rules:
            for key in sorted(rule.pattern_graph.root_ops()):
                self.dispatch.setdefault(key, []).append(rule)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet([*self.rules, *other.rules], name=f"{self.name}+{other.name}")

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def rules_for(self, node: ir.Node) -> list[Rule]:
        return self.dispatch.get((node.domain or "", node.op_type), [])

    def get(self, name: str) -> Rule:
        for rule in self.rules:
            if rule.name == name:
                return rule
        raise KeyError(name)
