"""A pass made of declarative rules: the usual shape of a fusion pass.

A model engineer subclasses ``RewritePass``, names it, and gives it a
``RuleSet`` (or builds one from options in ``rule_set``); the engine does the
matching, checking and splicing, and the match counts per rule land in the
pass report. ``near_miss_notes`` turns explain() output into report notes
for the candidates that got far but were rejected, so a pattern that did not
match is reported, not silently skipped.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from qgraph.pass_base import Pass
from qgraph.rewrite import RuleSet, apply_rules, explain

__all__ = ["RewritePass"]


class RewritePass(Pass):
    """Applies ``rules`` until none matches; subclasses set ``name`` and ``rules``."""

    rules: ClassVar[RuleSet | None] = None
    max_sweeps: ClassVar[int] = 32
    # Report candidates that matched at least this many pattern nodes
    # before failing (0 disables the near-miss report).
    near_miss_min_nodes: ClassVar[int] = 0

    def rule_set(self) -> RuleSet:
        if self.rules is None:
            raise NotImplementedError(f"pass '{self.name}' defines no rules")
        return self.rules

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = self.rule_set()
        stats = apply_rules(model, rules, pass_name=self.name, max_sweeps=self.max_sweeps)
        for rule_name, n in stats.matches.items():
            self.report.count(rule_name, n)
        if self.near_miss_min_nodes:
            self.report.notes.extend(self.near_miss_notes(model, rules))
        return ir.passes.PassResult(model, stats.total > 0)

    def near_miss_notes(self, model: ir.Model, rules: RuleSet) -> list[str]:
        """Candidates that got at least ``near_miss_min_nodes`` deep and failed."""
        notes = []
        for cand in explain(model, rules):
            if not cand.matched and cand.nodes_matched >= self.near_miss_min_nodes:
                notes.append(f"not rewritten: {cand}")
        return notes
