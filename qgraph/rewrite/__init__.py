"""The declarative rewrite engine model engineers write passes with.

Write a pattern the way the model computes it, a replacement the same way,
and put the rules in a table::

    from qgraph.rewrite import Rule, RuleSet

    def mul_by_one(op, x):
        return op.Mul(x, 1.0, _commute=True)

    RULES = RuleSet([Rule("mul-one", mul_by_one, lambda op, x: op.Identity(x), doc="x*1 -> x")])

Then ``apply_rules(model, RULES)`` rewrites, ``find_matches`` only matches,
and ``explain`` lists every candidate root with the first check that failed.
A pass that decides node by node splices its replacement with
``replace_node``, exactly as a rule's replacement is spliced.
"""

from qgraph.rewrite.engine import (
    Candidate,
    RewriteStats,
    apply_rules,
    explain,
    find_matches,
)
from qgraph.rewrite.matcher import Failure
from qgraph.rewrite.node_replacement import replace_node
from qgraph.rewrite.pattern import PatternBuilder, PatternGraph, build_pattern
from qgraph.rewrite.replacement import ReplacementBuilder
from qgraph.rewrite.rule import Match, Rule, RuleSet
from qgraph.rewrite.schemas import RuleDefinitionError

__all__ = [
    "Candidate",
    "Failure",
    "Match",
    "PatternBuilder",
    "PatternGraph",
    "ReplacementBuilder",
    "RewriteStats",
    "Rule",
    "RuleDefinitionError",
    "RuleSet",
    "apply_rules",
    "build_pattern",
    "explain",
    "find_matches",
    "replace_node",
]
