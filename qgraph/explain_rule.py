"""``--explain RULE``: every candidate of one rule, at the point its pass runs.

The candidates are listed on the model exactly as the owning pass sees it
(after the passes before it and its prerequisites), so what is explained is
what the pass will do. A pass that is not a table of rules explains the
rules it names in ``explained_rules`` itself (``Pass.explain``). Without
``-o`` the run stops there: match-only mode, nothing is rewritten or
written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TextIO

import onnx_ir as ir

from qgraph.errors import BadInputError
from qgraph.pass_base import Pass
from qgraph.pipeline import FixpointPasses
from qgraph.rewrite import Rule, explain
from qgraph.rewrite_pass import RewritePass

if TYPE_CHECKING:
    from qgraph.manager import PassManager

__all__ = ["ExplainHook"]


def _rule_of(p: Pass, rule_name: str) -> Rule | None:
    if not isinstance(p, RewritePass):
        return None
    for rule in p.rule_set():
        if rule.name == rule_name:
            return rule
    return None


def _rule_names(p: Pass) -> list[str]:
    names = [r.name for r in p.rule_set()] if isinstance(p, RewritePass) else []
    return names + list(p.explained_rules)


class ExplainHook:
    """A ``before_pass`` hook for the PassManager."""

    def __init__(self, rule_name: str, out: TextIO, *, stop_after: bool) -> None:
        self.rule_name = rule_name
        self.out = out
        self.stop_after = stop_after
        self.explained = False

    def validate(self, manager: PassManager) -> None:
        passes: list[Pass] = []
        for step in manager._instances:
            passes.extend(step.passes if isinstance(step, FixpointPasses) else [step])
        if any(self.rule_name in _rule_names(p) for p in passes):
            return
        known = sorted({name for p in passes for name in _rule_names(p)})
        listing = ", ".join(known) if known else "none (no rule-based pass in it)"
        raise BadInputError(f"--explain: no pass in the pipeline has a rule '{self.rule_name}' (its rules: {listing})")

    def __call__(self, p: Pass, model: ir.Model) -> bool | None:
        if not self.explained and self.rule_name in p.explained_rules:
            lines = p.explain(model, self.rule_name)
            matched = sum(done for done, _ in lines)
            print(f"rule '{self.rule_name}' of pass '{p.name}': {len(lines)} candidate(s), {matched} rewritten",
                  file=self.out)
            for _, line in lines:
                print(f"  {line}", file=self.out)
            self.explained = True
            return False if self.stop_after else None
        rule = None if self.explained else _rule_of(p, self.rule_name)
        if rule is None:
            return None
        candidates = explain(model, rule)
        matched = sum(c.matched for c in candidates)
        print(f"rule '{rule.name}' of pass '{p.name}': {len(candidates)} candidate root(s), {matched} match(es)", file=self.out)
        for cand in candidates:
            print(f"  {cand}", file=self.out)
        self.explained = True
        return False if self.stop_after else None

    def finish(self) -> None:
        if not self.explained:
            print(f"rule '{self.rule_name}': its pass did not run", file=self.out)
