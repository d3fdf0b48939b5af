"""Pair the inputs and outputs of two models before comparing them.

Rules (the decision, written down):

* Inputs: every input the candidate needs is fed the reference's input of
  the same name. A candidate may need fewer inputs than the reference (a
  pass removed an unused one), never one the reference lacks. If no names
  match at all but both need the same number of inputs, they are paired by
  position. Paired inputs must agree on element type, rank and every dim
  both fix to a number (a mismatch is bad input, exit 2, not a difference).
  A pairing by position is said in the report.
* Outputs: when both models have the same output names they are paired by
  name; otherwise, when they have the same number of outputs, by position
  (the report says so). Any other difference means the models do not
  correspond, and that is bad input, not a mismatch.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from qgraph.errors import BadInputError
from qgraph.verify.roles import feedable_inputs

__all__ = ["Correspondence", "correspond", "matching_notes"]


@dataclasses.dataclass(frozen=True)
class Correspondence:
    """How the candidate's inputs are fed and its outputs compared."""

    inputs: dict[str, str]  # candidate input name -> reference input name
    outputs: list[tuple[str, str]]  # (reference output name, candidate output name)
    inputs_by: str = "name"
    outputs_by: str = "name"


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _check_pair(ref: ir.Value, cand: ir.Value, ref_label: str, cand_label: str) -> None:
    if ref.dtype is not None and cand.dtype is not None and ref.dtype != cand.dtype:
        raise BadInputError(
            f"input {cand.name!r} of {cand_label} is {cand.dtype.name} but its counterpart "
            f"{ref.name!r} in {ref_label} is {ref.dtype.name}"
        )
    ref_rank, cand_rank = _rank(ref), _rank(cand)
    if ref_rank is not None and cand_rank is not None and ref_rank != cand_rank:
        raise BadInputError(
            f"input {cand.name!r} of {cand_label} has rank {cand_rank} but its counterpart "
            f"{ref.name!r} in {ref_label} has rank {ref_rank}"
        )
    if ref_rank is not None and ref_rank == cand_rank:
        fixed = [
            (i, r, c) for i, (r, c) in enumerate(zip(ref.shape, cand.shape))
            if isinstance(r, int) and isinstance(c, int) and r != c
        ]
        if fixed:
            axis, r, c = fixed[0]
            raise BadInputError(
                f"input {cand.name!r} of {cand_label} has shape {_shape(cand)} but its counterpart "
                f"{ref.name!r} in {ref_label} has shape {_shape(ref)} (dim {axis}: {c} vs {r})"
            )


def _shape(value: ir.Value) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) else str(d.value or "?") for d in value.shape) + "]"


def matching_notes(corr: Correspondence) -> list[str]:
    """What a report says when inputs or outputs were paired by position (names differ)."""
    notes = []
    if corr.inputs_by == "position":
        pairs = ", ".join(f"{c!r} <- {r!r}" for c, r in corr.inputs.items())
        notes.append(f"inputs matched by position: {pairs}")
    if corr.outputs_by == "position":
        pairs = ", ".join(f"{r!r} ~ {c!r}" for r, c in corr.outputs)
        notes.append(f"outputs matched by position: {pairs}")
    return notes


def correspond(
    reference: ir.Model,
    candidate: ir.Model,
    *,
    reference_label: str = "the reference",
    candidate_label: str = "the candidate",
) -> Correspondence:
    """Pair inputs and outputs, or raise BadInputError saying what does not correspond."""
    ref_inputs = {v.name: v for v in feedable_inputs(reference.graph)}
    cand_inputs = {v.name: v for v in feedable_inputs(candidate.graph)}
    inputs_by = "name"
    if set(cand_inputs) <= set(ref_inputs):
        input_pairs = {name: name for name in cand_inputs}
    elif not set(cand_inputs) & set(ref_inputs) and len(cand_inputs) == len(ref_inputs):
        input_pairs = dict(zip(cand_inputs, ref_inputs, strict=True))
        inputs_by = "position"
    else:
        missing = sorted(set(cand_inputs) - set(ref_inputs))
        raise BadInputError(
            f"{candidate_label} takes input(s) {', '.join(map(repr, missing))} that "
            f"{reference_label} does not have (its inputs: {', '.join(map(repr, ref_inputs)) or 'none'})"
        )
    for cand_name, ref_name in input_pairs.items():
        _check_pair(ref_inputs[ref_name], cand_inputs[cand_name], reference_label, candidate_label)

    ref_outputs = [v.name or "" for v in reference.graph.outputs]
    cand_outputs = [v.name or "" for v in candidate.graph.outputs]
    if sorted(ref_outputs) == sorted(cand_outputs):
        output_pairs = [(name, name) for name in ref_outputs]
        outputs_by = "name"
    elif len(ref_outputs) == len(cand_outputs):
        output_pairs = list(zip(ref_outputs, cand_outputs, strict=True))
        outputs_by = "position"
    else:
        only_ref = sorted(set(ref_outputs) - set(cand_outputs))
        only_cand = sorted(set(cand_outputs) - set(ref_outputs))
        detail = []
        if only_ref:
            detail.append(f"only {reference_label} outputs {', '.join(map(repr, only_ref))}")
        if only_cand:
            detail.append(f"only {candidate_label} outputs {', '.join(map(repr, only_cand))}")
        raise BadInputError(
            f"the outputs do not correspond: {reference_label} has {len(ref_outputs)}, "
            f"{candidate_label} has {len(cand_outputs)}; " + "; ".join(detail)
        )
    return Correspondence(input_pairs, output_pairs, inputs_by, outputs_by)
