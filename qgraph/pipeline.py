"""Pipelines: an ordered list of passes with options, and fixpoint groups.

One data model, three spellings:

* Python: ``Pipeline(["cse", ("kv-cache", {"style": "retained"}),
  Fixpoint(["constant-folding", "dce"], max_iterations=4)])``;
* TOML (``--pipeline FILE``) and presets, the same structure as a mapping::

      [[steps]]
      pass = "rmsnorm"

      [[steps]]
      fixpoint = ["constant-folding", "cse", "dce"]
      max_iterations = 8

      [[steps]]
      pass = "kv-cache"
      options = { style = "retained", ctx_len = 128 }

* the command line: ``--passes a b c`` and ``--option PASS.KEY=VALUE``.

``Pipeline.instantiate`` creates every pass up front, so an unknown pass or
option is reported (exit 2) before the model is touched.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

from qgraph.errors import BadInputError
from qgraph.pass_base import Pass
from qgraph.registry import Registry, default_registry

__all__ = ["Fixpoint", "FixpointPasses", "PassStep", "Pipeline", "parse_option_assignments"]


@dataclasses.dataclass
class PassStep:
    """One pass by registry name with options, or a ready pass instance."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    instance: Pass | None = None

    def create(self, registry: Registry) -> Pass:
        if self.instance is not None:
            return self.instance
        return registry.create(self.name, self.options)


@dataclasses.dataclass
class Fixpoint:
    """Passes repeated in order until an iteration changes nothing."""

    steps: list[PassStep]
    max_iterations: int = 8

    def __init__(self, steps: Iterable[Any], max_iterations: int = 8) -> None:
        self.steps = [_as_step(s) for s in steps]
        if not self.steps:
            raise BadInputError("a fixpoint group needs at least one pass")
        if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
            raise BadInputError(f"fixpoint max_iterations must be a positive integer, got {max_iterations!r}")
        self.max_iterations = max_iterations


Step = Union[PassStep, Fixpoint]


@dataclasses.dataclass
class FixpointPasses:
    """A fixpoint group with its passes created."""

    passes: list[Pass]
    max_iterations: int


def _as_step(item: Any) -> PassStep:
    if isinstance(item, PassStep):
        return item
    if isinstance(item, Pass):
        return PassStep(item.name, dict(item.config), instance=item)
    if isinstance(item, str):
        return PassStep(item)
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], Mapping):
        return PassStep(item[0], dict(item[1]))
    if isinstance(item, Mapping) and "pass" in item:
        unknown = set(item) - {"pass", "options"}
        if unknown:
            raise BadInputError(f"pipeline step for '{item['pass']}' has unknown keys {sorted(unknown)}")
        options = item.get("options", {})
        if not isinstance(options, Mapping):
            raise BadInputError(f"options of pipeline step '{item['pass']}' must be a table")
        return PassStep(str(item["pass"]), dict(options))
    raise BadInputError(f"cannot read pipeline step {item!r}")


class Pipeline:
    """An ordered list of pass steps and fixpoint groups."""

    def __init__(self, steps: Iterable[Any], name: str = "") -> None:
        self.name = name
        self.steps: list[Step] = []
        for item in steps:
            if isinstance(item, Fixpoint):
                self.steps.append(item)
            elif isinstance(item, Mapping) and "fixpoint" in item:
                unknown = set(item) - {"fixpoint", "max_iterations"}
                if unknown:
                    raise BadInputError(f"fixpoint step has unknown keys {sorted(unknown)}")
                self.steps.append(Fixpoint(item["fixpoint"], item.get("max_iterations", 8)))
            else:
                self.steps.append(_as_step(item))

    # -- constructors ----------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], name: str = "") -> Pipeline:
        steps = spec.get("steps")
        if not isinstance(steps, list) or not steps:
            raise BadInputError(f"pipeline {name or ''} must have a non-empty 'steps' list".replace("  ", " "))
        return cls(steps, name=name)

    @classmethod
    def from_toml(cls, path: str | Path) -> Pipeline:
        path = Path(path)
        try:
            spec = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise BadInputError(f"pipeline file '{path}' does not exist") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise BadInputError(f"pipeline file '{path}' is not valid TOML: {exc}") from None
        try:
            return cls.from_spec(spec, name=str(path))
        except BadInputError as exc:
            raise BadInputError(f"pipeline file '{path}': {exc}") from None

    @classmethod
    def from_preset(cls, name: str, registry: Registry | None = None) -> Pipeline:
        return cls.from_spec((registry or default_registry()).preset(name), name=name)

    # -- options -------------------------------------------------------------
    def pass_steps(self) -> list[PassStep]:
        out: list[PassStep] = []
        for step in self.steps:
            out.extend(step.steps if isinstance(step, Fixpoint) else [step])
        return out

    def set_options(self, overrides: Mapping[str, Mapping[str, Any]]) -> Pipeline:
        """Apply ``{pass: {key: value}}`` to every step running that pass."""
        by_name: dict[str, list[PassStep]] = {}
        for step in self.pass_steps():
            by_name.setdefault(step.name, []).append(step)
        for pass_name, options in overrides.items():
            if pass_name not in by_name:
                present = ", ".join(dict.fromkeys(s.name for s in self.pass_steps()))
                raise BadInputError(
                    f"--option for pass '{pass_name}', which is not in the pipeline ({present})"
                )
            for step in by_name[pass_name]:
                if step.instance is not None:
                    raise BadInputError(f"pass '{pass_name}' was given as an instance; set its options there")
                step.options.update(options)
        return self

    def instantiate(self, registry: Registry | None = None) -> list[Pass | FixpointPasses]:
        """Create every pass now so bad names/options fail before any work."""
        registry = registry or default_registry()
        created: list[Pass | FixpointPasses] = []
        for step in self.steps:
            if isinstance(step, Fixpoint):
                created.append(FixpointPasses([s.create(registry) for s in step.steps], step.max_iterations))
            else:
                created.append(step.create(registry))
        return created

    def describe(self) -> str:
        parts = []
        for step in self.steps:
            if isinstance(step, Fixpoint):
                parts.append("fixpoint(" + ", ".join(s.name for s in step.steps) + f"; max {step.max_iterations})")
            else:
                parts.append(step.name)
        return " -> ".join(parts)


def parse_option_assignments(assignments: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["kv-cache.ctx_len=128"]`` -> ``{"kv-cache": {"ctx_len": "128"}}``."""
    out: dict[str, dict[str, str]] = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        pass_name, dot, option = key.rpartition(".")
        if not sep or not dot or not pass_name or not option:
            raise BadInputError(f"--option '{text}' must look like PASS.KEY=VALUE")
        out.setdefault(pass_name.strip(), {})[option.strip()] = value
    return out
