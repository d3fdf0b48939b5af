"""A pass made of declarative rules: the usual shape of a fusion pass.

A model engineer subclasses ``RewritePass``, names it, and gives it a
``RuleSet`` (or builds one from options in ``rule_set``); the engine does the
matching, checking and splicing, and the match counts per rule land in the
pass report. ``near_miss_notes`` turns explain() output into report notes
for the candidates that got far but were rejected, so a pattern that did not
match is reported, not silently skipped.
"""

from __future__ import annotations

import collections
import re
from typing import ClassVar

import onnx_ir as ir

from qgraph.pass_base import Pass
from qgraph.rewrite import Failure, RuleSet, apply_rules

__all__ = ["RewritePass", "summarize_near_misses"]

_QUOTED = re.compile(r"'[^']*'")


def summarize_near_misses(near_misses: dict[str, list[Failure]]) -> dict[str, dict[str, object]]:
    """Per rule: how many candidates were near misses and the most common failed check.

    Checks are grouped with the names of values and nodes blanked out
    (``'…'``), so forty layers failing the same check count as one reason.
    """
    summary: dict[str, dict[str, object]] = {}
    for rule, failures in near_misses.items():
        reasons = collections.Counter(_QUOTED.sub("'…'", f.reason) for f in failures)
        reason, times = reasons.most_common(1)[0]
        summary[rule] = {"candidates": len(failures), "most_common_check": reason, "times": times}
    return summary


class RewritePass(Pass):
    """Applies ``rules`` until none matches; subclasses set ``name`` and ``rules``."""

    rules: ClassVar[RuleSet | None] = None
    max_sweeps: ClassVar[int] = 32
    # A pass that writes its own note per rejected candidate (rmsnorm names
    # every unfused norm) sets this False; the summary still reaches the
    # report's ``near_misses`` and the table.
    near_miss_notes: ClassVar[bool] = True

    def rule_set(self) -> RuleSet:
        if self.rules is None:
            raise NotImplementedError(f"pass '{self.name}' defines no rules")
        return self.rules

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = self.rule_set()
        stats = apply_rules(model, rules, pass_name=self.name, max_sweeps=self.max_sweeps)
        for rule_name, n in stats.matches.items():
            self.report.count(rule_name, n)
        self.report.near_misses = summarize_near_misses(stats.near_misses)
        for rule_name, miss in self.report.near_misses.items() if self.near_miss_notes else ():
            self.report.notes.append(
                f"near miss: rule '{rule_name}': {miss['candidates']} candidate(s) got past the first pattern "
                f"nodes and were rejected; most common check ({miss['times']}x): {miss['most_common_check']} "
                f"(--explain {rule_name} lists them)"
            )
        return ir.passes.PassResult(model, stats.total > 0)
