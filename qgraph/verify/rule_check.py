"""Rule self-check: build the graph a rule's pattern describes, rewrite it, compare.

A declarative rule claims "wherever this pattern occurs, the replacement
computes the same thing". That claim can be checked without any model: the
pattern itself is a small graph. For every combination of its alternatives
(each ``a | b``, each optional node present or absent; a pattern with more
combinations than the budget gets a set covering every pair of
alternatives, and says so) this module builds
that graph — variables become graph inputs, constants initializers holding a
value that satisfies the pattern, attributes the values the pattern asks for
— then checks that the rule matches it (a pattern that cannot match its own
instance is a bug too) and that the rewritten graph is equivalent in
onnxruntime on hypothesis-drawn inputs and shapes.

Rules whose variables need particular dtypes or shapes (a MatMul weight, a
1-D scale) say so with ``Rule(example_inputs={"w": (FLOAT, ("H", "H"))})``;
constants and attributes tested only by a predicate, and attributes the
pattern captures that have no schema default (a Cast's ``to``), get a value
from ``example_values``. Everything else defaults to float32 ``[B, S, H]``.

A condition may look behind a variable (a key that must come out of a
Transpose, a repeat_kv in front of an operand). Such a variable's entry in
``example_values`` is then a function written like a pattern --
``lambda op, k: op.Transpose(k, perm=[0, 1, 3, 2])`` -- and the check builds
that subgraph in front of the pattern; its parameters are further graph
inputs (shaped by ``example_inputs``), alternatives in it take their first
branch. A weight (``op.weight``) becomes an initializer of random values;
its symbolic dims are fixed to concrete sizes, and the graph inputs that
share a dim name take the same size.

How strong the check is (``RULE_CHECK_INPUTS``): every symbolic dim is drawn
in 4..8, so a ``[B, S, H]`` input has at least 64 elements, and each float
element's magnitude is drawn log-uniformly over 1e-3..1e2 with either sign
(``spread_float_arrays``), so every decade of that range is visited by every
example. Outputs are compared element by element against the dtype's
tolerance (float32: ``|b - a| <= 1e-4 + 1e-4 * |a|``), not against the
output's range, so a large element elsewhere in the array cannot hide a
difference among small ones. A difference of 1e-3 anywhere in that range is
then met in almost every example: exact-erf ``Gelu`` in place of the tanh
approximation (at most 4.7e-4 apart, above 1e-4 only for 1.6 < |x| < 3.8,
about 7% of the draws) is caught in the first examples at the default 8.

A failing variant keeps the whole ``EquivalenceResult``: the worst element
of each output, the shrunk inputs saved as ``inputs.npz`` beside copies of
both models, and the ``python -m qgraph.verify`` command that replays them.
A replacement (or condition) that raises is reported as an ``error`` of the
rule with its traceback, not as a difference.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from qgraph.invariants import find_violations
from qgraph.rewrite import Rule, RuleSet, apply_rules, explain, find_matches
from qgraph.rewrite.matcher import _MISSING, _schema_default
from qgraph.rewrite.pattern import (
    AnyOf,
    AttrCapture,
    AttrPredicate,
    ConstPattern,
    NodeOutput,
    NodePattern,
    PatternGraph,
    ValuePattern,
    Var,
    WeightPattern,
    build_pattern,
)
from qgraph.verify.compare import elementwise_tolerances
from qgraph.verify.strategies import InputOptions

__all__ = ["RULE_CHECK_INPUTS", "RuleCheck", "VariantCheck", "check_rule", "pattern_variants"]

# How the self-check draws inputs (see the module docstring).
RULE_CHECK_INPUTS = InputOptions(dim_range=(4, 8), float_exponents=(-3, 2), spread_magnitudes=True)
_WEIGHT_DIM_SIZES = (6, 5, 7, 4, 8)  # concrete sizes given to a weight's dim names, in order of appearance

DEFAULT_SHAPE = ("B", "S", "H")
_OPSETS = (23, 18, 17, 13)  # tried in order until the variant is a valid model
_ENUMERATION_LIMIT = 4096  # combinations of alternatives enumerated (and pairs covered among)
_CANDIDATE_CONSTANTS = (1e-6, 1e-5, 1.0, 0.5, 2.0, -1.0, 0.0, [-1], [1], 1, -1, 0, 2)


def _ir_dtype(dtype: Any) -> ir.DataType:
    """An ``example_inputs`` dtype: an ``ir.DataType``, or anything numpy reads as a dtype."""
    if isinstance(dtype, ir.DataType):
        return dtype
    try:
        return ir.DataType.from_numpy(np.dtype(dtype))
    except TypeError as exc:
        raise CannotBuild(f"example dtype {dtype!r} is neither an onnx_ir DataType nor a numpy dtype") from exc


class CannotBuild(Exception):
    """The pattern variant cannot be turned into a concrete graph."""


@dataclasses.dataclass
class VariantCheck:
    """The outcome for one combination of alternatives."""

    description: str
    status: str  # "ok", "no-match", "not-equivalent", "error" (the rule raised), "cannot-build"
    detail: str = ""
    equivalence: Any = None  # the EquivalenceResult of the comparison, when one ran

    def __str__(self) -> str:
        text = f"{self.status:<14} {self.description}"
        if not self.detail:
            return text
        first, *rest = self.detail.splitlines()
        return "\n".join([f"{text}: {first}", *(f"        {line}" for line in rest)])


@dataclasses.dataclass
class RuleCheck:
    """The outcome for one rule.

    ``total_variants`` is how many combinations of alternatives the pattern
    has; when they were more than the check's budget, ``variants`` holds a
    pairwise cover of them and ``pairs`` says how many of the pairs of
    alternatives it covers, out of how many.
    """

    rule: str
    variants: list[VariantCheck]
    total_variants: int = 0
    pairs: tuple[int, int] | None = None
    truncated: bool = False  # the pattern has more combinations than were enumerated
    examples: int = 0
    seed: int | None = None

    @property
    def ok(self) -> bool:
        return bool(self.variants) and all(v.status == "ok" for v in self.variants)

    def _coverage(self) -> str:
        checked = len(self.variants)
        of = f"more than {self.total_variants}" if self.truncated else str(self.total_variants)
        if self.pairs is None:
            return f"{checked} of {of} variants" if self.truncated else f"{checked} variant(s)"
        covered, total = self.pairs
        how = "covering every pair of alternatives" if covered == total else f"covering {covered} of {total} pairs of alternatives"
        return f"{checked} of {of} variants, {how}" + (" among those enumerated" if self.truncated else "")

    def __str__(self) -> str:
        head = f"{'PASS' if self.ok else 'FAIL'} {self.rule} ({self._coverage()}; {self.examples} examples, seed {self.seed})"
        lines = [head]
        lines.extend(f"    {v}" for v in self.variants if v.status != "ok" or not self.ok)
        return "\n".join(lines)


def _reachable_alternatives(outputs: Sequence[ValuePattern], choices: dict[int, int]) -> Iterator[AnyOf]:
    """Alternative points reachable from the outputs, following the branches chosen so far."""
    seen: set[int] = set()
    stack = list(reversed(outputs))
    while stack:
        vp = stack.pop()
        if vp.id in seen:
            continue
        seen.add(vp.id)
        if isinstance(vp, AnyOf):
            yield vp
            if vp.id in choices:
                stack.append(vp.alternatives[choices[vp.id]])
        elif isinstance(vp, NodeOutput):
            stack.extend(reversed([x for x in vp.node.inputs if x is not None]))


def pattern_variants(rule: Rule, limit: int = 4096) -> list[dict[int, int]]:
    """Every combination of alternatives (``AnyOf.id -> index``), at most ``limit``."""
    outputs = rule.pattern_graph.outputs
    done: list[dict[int, int]] = []
    pending = [dict[int, int]()]
    while pending and len(done) < limit:
        choices = pending.pop(0)
        point = next((p for p in _reachable_alternatives(outputs, choices) if p.id not in choices), None)
        if point is None:
            done.append(choices)
            continue
        pending.extend({**choices, point.id: i} for i in range(len(point.alternatives)))
    return done


def _pairs(choices: dict[int, int]) -> set[tuple[tuple[int, int], ...]]:
    """The choices of a variant, alone and two by two."""
    items = sorted(choices.items())
    singles = {(item,) for item in items}
    return singles | {(a, b) for i, a in enumerate(items) for b in items[i + 1:]}


def pairwise_cover(variants: list[dict[int, int]], limit: int) -> tuple[list[dict[int, int]], int, int]:
    """Variants in which every two alternatives that can occur together do (greedy).

    Bugs in a rule almost always need at most two of its alternatives to
    show (a cast here *and* a mask there), so covering every pair checks a
    pattern with hundreds of combinations in a few dozen. Returns the chosen
    variants (at most ``limit``), the pairs they cover and the pairs there are.
    """
    covers = [_pairs(v) for v in variants]
    wanted = set().union(*covers) if covers else set()
    missing = set(wanted)
    chosen: list[dict[int, int]] = []
    while missing and len(chosen) < limit:
        best = max(range(len(variants)), key=lambda i: len(covers[i] & missing))
        chosen.append(variants[best])
        missing -= covers[best]
    return chosen, len(wanted) - len(missing), len(wanted)


def _choice_text(point: AnyOf, index: int) -> str:
    alt, first = point.alternatives[index], point.alternatives[0]
    if index == 1 and len(point.alternatives) == 2 and isinstance(first, NodeOutput) and alt in first.node.inputs:
        text = f"no {first.node.describe()}"  # the bypass of op.optional()
    elif isinstance(alt, AnyOf):
        text = f"skip to {alt.name}" if alt.name else "a nested choice"
    else:
        text = alt.describe()
    return f"{point.name}={text}" if point.name else text


def _describe(rule: Rule, choices: dict[int, int]) -> str:
    points = _reachable_alternatives(rule.pattern_graph.outputs, choices)
    parts = [_choice_text(p, choices[p.id]) for p in points]
    return "variant [" + "; ".join(parts) + "]" if parts else "the pattern"


class _Builder:
    """Turns one variant of a pattern into an onnx_ir graph."""

    def __init__(self, rule: Rule, choices: dict[int, int], opset: int) -> None:
        self.rule = rule
        self.choices = choices
        self.opset = opset
        self.inputs: dict[str, ir.Value] = {}
        self.initializers: list[ir.Value] = []
        self.nodes: list[ir.Node] = []
        self.node_values: dict[int, Sequence[ir.Value]] = {}
        self.const_values: dict[str, ir.Value] = {}
        self.var_values: dict[str, ir.Value] = {}
        self.computing: set[str] = set()
        self.fixed_dims = self._weight_dims()

    def _weight_dims(self) -> dict[str, int]:
        """Concrete sizes for the dim names of weights (initializers cannot be symbolic)."""
        fixed: dict[str, int] = {}
        for node in self.rule.pattern_graph.nodes:
            for vp in node.inputs:
                if not isinstance(vp, WeightPattern):
                    continue
                spec = self.rule.example_inputs.get(vp.name)
                for dim in (spec[1] if spec is not None else vp.shape or ()):
                    if isinstance(dim, str) and dim not in fixed:
                        fixed[dim] = _WEIGHT_DIM_SIZES[len(fixed) % len(_WEIGHT_DIM_SIZES)]
        return fixed

    def _weight(self, vp: WeightPattern) -> ir.Value:
        spec = self.rule.example_inputs.get(vp.name)
        dtype = spec[0] if spec is not None else vp.dtype if isinstance(vp.dtype, ir.DataType) else (
            vp.dtype[0] if vp.dtype else ir.DataType.FLOAT)
        dims = spec[1] if spec is not None else vp.shape
        if dims is None:
            raise CannotBuild(f"{vp.describe()} has no shape; give it in the pattern or Rule(example_inputs=...)")
        shape = [self.fixed_dims.get(d, d) if isinstance(d, str) else 4 if d is None else d for d in dims]
        rng = np.random.default_rng(len(self.initializers))
        array = rng.uniform(-1.0, 1.0, shape).astype(_ir_dtype(dtype).numpy())
        if vp.pred is not None and not vp.pred(array):
            raise CannotBuild(f"random values do not satisfy the predicate of {vp.describe()}; "
                              "give its value in Rule(example_values=...)")
        return self._initializer(vp.name, array)

    def value(self, vp: ValuePattern) -> ir.Value:
        if isinstance(vp, AnyOf):
            # Alternatives of an example subgraph are not variants: first branch.
            return self.value(vp.alternatives[self.choices.get(vp.id, 0)])
        if isinstance(vp, Var):
            return self._var(vp)
        if isinstance(vp, ConstPattern):
            return self._const(vp)
        if isinstance(vp, NodeOutput):
            return self._node(vp.node)[vp.index]
        raise CannotBuild(f"unsupported pattern element {vp!r}")

    def _var(self, vp: Var) -> ir.Value:
        if vp.name in self.inputs:
            return self.inputs[vp.name]
        if vp.name in self.var_values:
            return self.var_values[vp.name]
        spec = self.rule.example_inputs.get(vp.name)
        if vp.name in self.rule.example_values:
            example = self.rule.example_values[vp.name]
            if callable(example):
                value = self._computed(vp.name, example)
            else:
                # A variable the rule wants to be a constant (e.g. a weight
                # whose values its condition reads).
                value = self._initializer(vp.name, np.asarray(example))
            self.var_values[vp.name] = value
            return value
        if isinstance(vp, WeightPattern):
            self.var_values[vp.name] = self._weight(vp)
            return self.var_values[vp.name]
        constraint = vp.constraint
        if spec is not None:
            dtype, shape = spec
        else:
            dtype = ir.DataType.FLOAT
            if constraint is not None and constraint.dtype is not None:
                dtype = constraint.dtype if isinstance(constraint.dtype, ir.DataType) else constraint.dtype[0]
            shape = DEFAULT_SHAPE
            if constraint is not None and constraint.shape is not None:
                shape = tuple(d if d not in (None, Ellipsis) else f"{vp.name}_d{i}" for i, d in enumerate(constraint.shape))
            elif constraint is not None and constraint.rank is not None:
                shape = DEFAULT_SHAPE[-constraint.rank:] if constraint.rank <= 3 else tuple(f"d{i}" for i in range(constraint.rank))
        shape = [self.fixed_dims.get(d, d) if isinstance(d, str) else d for d in shape]
        value = ir.val(vp.name, _ir_dtype(dtype), ir.Shape(list(shape)))
        self.inputs[vp.name] = value
        return value

    def _computed(self, name: str, fn: Any) -> ir.Value:
        """The value of variable ``name`` computed by its example subgraph."""
        if name in self.computing:
            raise CannotBuild(f"the example subgraph of '{name}' depends on '{name}' itself")
        self.computing.add(name)
        try:
            sub: PatternGraph = build_pattern(fn)
        except Exception as exc:  # noqa: BLE001 - an authoring error in the example
            raise CannotBuild(f"example_values['{name}'] is not a pattern-style function: {exc}") from None
        if len(sub.outputs) != 1:
            raise CannotBuild(f"the example subgraph of '{name}' returns {len(sub.outputs)} values, not one")
        value = self.value(sub.outputs[0])
        self.computing.discard(name)
        return value

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        if array.dtype == np.float64:
            array = array.astype(np.float32)
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, type=ir.TensorType(tensor.dtype), shape=ir.Shape(tensor.shape), const_value=tensor)
        self.initializers.append(value)
        return value

    def _const(self, vp: ConstPattern) -> ir.Value:
        if vp.name is not None and vp.name in self.const_values:
            return self.const_values[vp.name]
        array = self._const_array(vp)
        name = vp.name or f"const_{len(self.initializers)}"
        value = self._initializer(name, array)
        if vp.name is not None:
            self.const_values[vp.name] = value
        return value

    def _const_array(self, vp: ConstPattern) -> np.ndarray:
        if vp.name is not None and vp.name in self.rule.example_values:
            return np.asarray(self.rule.example_values[vp.name])
        if vp.value is not None:
            return vp.value.copy()
        if vp.pred is None:
            return np.asarray(1.0, dtype=np.float32)
        for candidate in _CANDIDATE_CONSTANTS:
            arr = np.asarray(candidate)
            arr = arr.astype(np.float32) if arr.dtype == np.float64 else arr
            try:
                if vp.pred(arr):
                    return arr
            except Exception:  # noqa: BLE001 - a predicate may not accept every shape
                continue
        raise CannotBuild(f"no value found for {vp.describe()}; give it in Rule(example_values=...)")

    def _attributes(self, pn: NodePattern) -> dict[str, Any]:
        attrs: dict[str, Any] = {}
        for name, expected in pn.attributes.items():
            if isinstance(expected, (AttrCapture, AttrPredicate)):
                key = expected.name
                if key is not None and key in self.rule.example_values:
                    attrs[name] = self.rule.example_values[key]
                    continue
                default = _schema_default(pn.op_type, pn.domain, name, self.opset)
                if default is _MISSING and isinstance(expected, AttrCapture):
                    raise CannotBuild(
                        f"attribute {name} of {pn.describe()} is captured as '{key}' and has no schema "
                        "default; give its value in Rule(example_values=...)"
                    )
                if isinstance(expected, AttrPredicate) and not expected.pred(None if default is _MISSING else default):
                    raise CannotBuild(
                        f"attribute {name} of {pn.describe()} is tested by a predicate the schema default "
                        "does not satisfy; give it in Rule(example_values=...)"
                    )
                continue  # omitted: the schema default applies
            attrs[name] = list(expected) if isinstance(expected, tuple) else expected
        return attrs

    def _node(self, pn: NodePattern) -> Sequence[ir.Value]:
        if pn.id in self.node_values:
            return self.node_values[pn.id]
        inputs = [None if x is None else self.value(x) for x in pn.inputs]
        node = ir.node(pn.op_type, inputs, attributes=self._attributes(pn), domain=pn.domain, num_outputs=len(pn.outputs))
        self.nodes.append(node)
        self.node_values[pn.id] = node.outputs
        return node.outputs

    def model(self) -> ir.Model:
        outputs = [self.value(o) for o in self.rule.pattern_graph.outputs]
        for i, out in enumerate(outputs):
            out.name = f"out{i}"
        domains = {"": self.opset}
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx"):
                domains.setdefault(node.domain, self.rule.opsets.get(node.domain, 1))
        graph = ir.Graph(list(self.inputs.values()), outputs, nodes=self.nodes, initializers=self.initializers,
                         opset_imports=domains, name=f"selfcheck_{self.rule.name}")
        model = ir.Model(graph, ir_version=10)
        ir.passes.common.ShapeInferencePass()(model)
        return model


def _build(rule: Rule, choices: dict[int, int]) -> ir.Model:
    last_problem = "no opset accepted it"
    for opset in _OPSETS:
        try:
            model = _Builder(rule, choices, opset).model()
        except CannotBuild:
            raise
        except Exception as exc:  # noqa: BLE001 - try the next opset
            last_problem = f"{type(exc).__name__}: {exc}"
            continue
        problems = find_violations(model)
        if not problems:
            return model
        last_problem = problems[0]
    raise CannotBuild(last_problem)


def _rule_traceback(exc: BaseException) -> str:
    """The traceback from the rule's own code on (the engine's frames above it left out)."""
    frames = traceback.extract_tb(exc.__traceback__)
    qgraph_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first_own = next((i for i, f in enumerate(frames) if not f.filename.startswith(qgraph_root)), 0)
    lines = ["Traceback (most recent call last):", *traceback.format_list(frames[first_own:])]
    lines.extend(traceback.format_exception_only(type(exc), exc))
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines).rstrip()


def check_rule(
    rule: Rule,
    *,
    examples: int = 8,
    max_variants: int = 64,
    seed: int = 0,
    artifacts_dir: str | os.PathLike[str] | None = None,
) -> RuleCheck:
    """Check every variant of ``rule`` (see the module docstring).

    A pattern with more than ``max_variants`` combinations of alternatives is
    checked on a pairwise cover of them (``pairwise_cover``), at most
    ``max_variants``; the result says which. ``examples`` inputs are drawn
    per variant from ``seed``; a failing variant's inputs and models go to
    ``artifacts_dir/<rule>/variant-<i>`` (a new temporary folder by default).
    """
    from qgraph.verify.equivalence import check_equivalent

    results: list[VariantCheck] = []
    single = RuleSet([rule])
    variants = pattern_variants(rule, _ENUMERATION_LIMIT + 1)
    truncated = len(variants) > _ENUMERATION_LIMIT
    variants = variants[:_ENUMERATION_LIMIT]
    selected, pairs = variants, None
    if len(variants) > max_variants:
        selected, covered, total = pairwise_cover(variants, max_variants)
        pairs = (covered, total)
    for index, choices in enumerate(selected):
        description = _describe(rule, choices)
        try:
            model = _build(rule, choices)
        except CannotBuild as exc:
            results.append(VariantCheck(description, "cannot-build", str(exc)))
            continue
        missing = rule.pattern_graph.required_ops() - {(n.domain or "", n.op_type) for n in model.graph}
        if missing:  # the engine would skip the rule on this graph
            names = ", ".join(f"{d}::{o}" if d else o for d, o in sorted(missing))
            results.append(VariantCheck(description, "no-match", f"required ops {names} are not in its instance"))
            continue
        roots = {o.producer() for o in model.graph.outputs}
        try:
            matched = any(m.root in roots for m in find_matches(model, single))
        except Exception as exc:  # noqa: BLE001 - the rule's condition raised
            results.append(VariantCheck(description, "error", f"the condition raised\n{_rule_traceback(exc)}"))
            continue
        if not matched:
            reasons = [str(c) for c in explain(model, single) if c.node in {r.name for r in roots}]
            results.append(VariantCheck(description, "no-match", "; ".join(reasons) or "no candidate root"))
            continue
        candidate = model.clone()
        try:
            apply_rules(candidate, single)
        except Exception as exc:  # noqa: BLE001 - report it as an error of the rule
            results.append(VariantCheck(description, "error", f"the rewrite raised\n{_rule_traceback(exc)}"))
            continue
        folder = None
        if artifacts_dir is not None:
            folder = Path(artifacts_dir) / rule.name.replace("/", "_") / f"variant-{index}"
        verdict = check_equivalent(
            model, candidate, examples=examples, seed=seed, options=RULE_CHECK_INPUTS,
            tolerances=elementwise_tolerances(model), artifacts_dir=folder,
            reference_label="the pattern", candidate_label="the replacement",
        )
        if verdict.reproduction and verdict.reproduction.startswith("python -m qgraph.verify"):
            verdict.reproduction += " --elementwise"  # the tolerance the check used
        if verdict.equivalent:
            results.append(VariantCheck(description, "ok", equivalence=verdict))
        else:
            results.append(VariantCheck(description, "not-equivalent", str(verdict), equivalence=verdict))
    return RuleCheck(rule.name, results, total_variants=len(variants), pairs=pairs, truncated=truncated,
                     examples=examples, seed=seed)
