"""The contract every qgraph pass follows, built on ``onnx_ir.passes``.

A qgraph pass is an ``onnx_ir.passes.InPlacePass`` with three additions the
pass manager relies on:

* a registry ``name`` and typed ``options``, so a pipeline can be written in
  Python, TOML or on the command line and a wrong option is reported before
  anything runs;
* ``prerequisites``: conditions on the model (for example "default-domain
  opset >= 23") together with the pass that establishes them, so the manager
  can run that pass first or say exactly what is missing;
* a ``PassReport`` filled during ``call`` (matches per rule, notes such as
  patterns that did not match and why), which ends up in ``--report``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = [
    "Option",
    "Pass",
    "PassReport",
    "Prerequisite",
    "default_opset",
    "parse_option_value",
]


@dataclasses.dataclass(frozen=True)
class Option:
    """A typed, documented pass option."""

    type: type
    default: Any
    doc: str
    choices: tuple[Any, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Prerequisite:
    """A condition a pass needs on its input, and the pass that provides it.

    ``check`` returns True when the model already satisfies the condition.
    When it does not, the manager runs ``satisfied_by`` (with ``options``)
    before the pass; if ``satisfied_by`` is None or not registered, the
    manager stops and names the missing condition.
    """

    description: str
    check: Callable[[ir.Model], bool]
    satisfied_by: str | None = None
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassReport:
    """What one run of a pass did, beyond changing the model."""

    rule_matches: dict[str, int] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
    # rule -> {"candidates": n, "most_common_check": reason, "times": m}
    near_misses: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def count(self, rule_name: str, n: int = 1) -> None:
        self.rule_matches[rule_name] = self.rule_matches.get(rule_name, 0) + n


def default_opset(model: ir.Model) -> int | None:
    """The model's default-domain (ai.onnx) opset version, if imported."""
    for domain in ("", "ai.onnx"):
        if domain in model.opset_imports:
            return model.opset_imports[domain]
    return None


def parse_option_value(pass_name: str, key: str, option: Option, raw: Any) -> Any:
    """Convert a raw option value (a CLI string or a TOML value) to its type."""
    value = raw
    if isinstance(raw, str) and option.type is not str:
        text = raw.strip()
        try:
            if option.type is bool:
                lowered = text.lower()
                if lowered not in {"1", "0", "true", "false", "yes", "no", "on", "off"}:
                    raise ValueError(text)
                value = lowered in {"1", "true", "yes", "on"}
            elif option.type is int:
                value = int(text, 0)
            else:
                value = option.type(text)
        except ValueError:
            raise BadInputError(
                f"option '{pass_name}.{key}': cannot read {raw!r} as {option.type.__name__}"
            ) from None
    elif option.type is float and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    elif not isinstance(raw, option.type) or (option.type is int and isinstance(raw, bool)):
        raise BadInputError(
            f"option '{pass_name}.{key}': expected {option.type.__name__}, got {raw!r}"
        )
    if option.choices is not None and value not in option.choices:
        choices = ", ".join(str(c) for c in option.choices)
        raise BadInputError(
            f"option '{pass_name}.{key}': {value!r} is not one of {choices}"
        )
    return value


class Pass(ir.passes.InPlacePass):
    """Base class of qgraph passes; subclasses implement ``call``.

    Subclasses set ``name`` (the registry name, e.g. ``"rmsnorm"``), may
    declare ``options`` and ``prerequisites``, and record what they did in
    ``self.report`` during ``call``. The first line of the class docstring is
    what ``qgraph passes`` shows.
    """

    name: ClassVar[str] = ""
    options: ClassVar[Mapping[str, Option]] = {}
    prerequisites: ClassVar[tuple[Prerequisite, ...]] = ()
    # What "this pass kept the meaning" means, for --verify: "outputs" (same
    # inputs give the same outputs), "fp16" (the output, run as an fp16
    # device runs it, gives the input's fp32 outputs: clipping -3.4e38 to
    # -65504 changes fp32 results where fp16 could not represent them anyway)
    # or "sequence" (a KV-cached graph replays the no-cache graph's logits),
    # or "approximate" (a lossy pass, e.g. quantization: the output stays
    # within the budget ``verification_budget()`` states, see
    # qgraph.verify.budget).
    meaning: ClassVar[str] = "outputs"
    # Near-miss rules of a pass that is not a RewritePass which ``--explain RULE`` can list (see explain()).
    explained_rules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options: Any) -> None:
        super().__init__()
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise BadInputError(
                f"pass '{self.name}' has no option {', '.join(map(repr, unknown))} "
                f"(its options: {known})"
            )
        self.config: dict[str, Any] = {
            key: parse_option_value(self.name, key, opt, options[key]) if key in options else opt.default
            for key, opt in self.options.items()
        }
        self.report = PassReport()

    def verification_budget(self) -> Any:
        """For ``meaning = "approximate"``: the ``qgraph.verify.budget.Budget`` --verify holds the step to."""
        return None

    def undo_for(self, model: ir.Model) -> Callable[[], None] | None:
        """Before this pass runs as another pass's prerequisite: a function that takes back what it will do.

        The manager undoes a prerequisite when the pass it ran for rewrites
        nothing. Without this (None, the default) it keeps a copy of the
        whole model for that -- on a 2000-node export, more than some passes
        cost. A pass that knows it will only change a few model-level fields
        returns a function restoring them.
        """
        return None

    def explain(self, model: ir.Model, rule: str) -> list[tuple[bool, str]]:
        """For ``--explain RULE`` (RULE in ``explained_rules``): each candidate as (rewritten?, one line naming it).

        The model is the one the pass is about to see; it must not be changed.
        """
        raise NotImplementedError(f"pass '{self.name}' explains no rule '{rule}'")

    @classmethod
    def summary(cls) -> str:
        """The first line of the pass's docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def missing_prerequisites(self, model: ir.Model) -> list[Prerequisite]:
        return [p for p in self.prerequisites if not p.check(model)]

    def requires(self, model: ir.Model) -> None:
        missing = self.missing_prerequisites(model)
        if missing:
            reasons = "; ".join(
                p.description + (f" (run pass '{p.satisfied_by}' first)" if p.satisfied_by else "")
                for p in missing
            )
            raise ir.passes.PreconditionError(f"pass '{self.name}' requires {reasons}")

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        self.report = PassReport()
        return super().__call__(model_or_result)
