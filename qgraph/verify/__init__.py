"""Verification: prove a rewritten ONNX graph means what the original meant.

Both graphs run in onnxruntime (optimizations off) on inputs hypothesis
draws for the model (:mod:`.strategies`); outputs are compared with
dtype-dependent tolerances and reported the way Polygraphy does
(:mod:`.compare`); a failure is shrunk, saved and reproducible, and the
first diverging intermediate tensor is named (:mod:`.localize`).

Entry points: :func:`check_equivalent` (library), :func:`verify_step` and
:func:`step_verifier` (the pass manager's ``--verify``), :func:`check_files`
(``qgraph check``), :func:`replay` (a saved failing example).
"""

from qgraph.verify.compare import (
    ComparisonReport,
    OutputReport,
    Tolerance,
    compare_arrays,
    compare_outputs,
    default_tolerance,
)
from qgraph.verify.correspondence import Correspondence, correspond
from qgraph.verify.equivalence import (
    EquivalenceResult,
    NotEquivalentError,
    check_equivalent,
    load_inputs,
    replay,
    save_inputs,
    step_verifier,
    verify_step,
)
from qgraph.verify.files import check_files, replay_files
from qgraph.verify.kv_contract import KVLayout, KVLayoutError, detect_kv_layout
from qgraph.verify.localize import Divergence, NodeRef, localize, shared_tensors
from qgraph.verify.roles import InputSpec, Role, describe_inputs
from qgraph.verify.rule_check import RuleCheck, VariantCheck, check_rule
from qgraph.verify.runner import OrtRunner, RunError
from qgraph.verify.sequence import (
    ReplayCase,
    ReplayResult,
    SequenceCheckResult,
    check_sequence_equivalence,
    replay_cases,
    replay_sequence,
)
from qgraph.verify.strategies import (
    Example,
    InputOptions,
    attention_masks,
    float_arrays,
    input_strategy,
    position_ids,
    positions_from_mask,
    token_ids,
)

__all__ = [
    "KVLayout",
    "KVLayoutError",
    "ReplayCase",
    "ReplayResult",
    "SequenceCheckResult",
    "check_sequence_equivalence",
    "detect_kv_layout",
    "replay_cases",
    "replay_sequence",
    "ComparisonReport",
    "Correspondence",
    "Divergence",
    "EquivalenceResult",
    "Example",
    "InputOptions",
    "InputSpec",
    "NodeRef",
    "NotEquivalentError",
    "OrtRunner",
    "OutputReport",
    "Role",
    "RuleCheck",
    "RunError",
    "Tolerance",
    "VariantCheck",
    "attention_masks",
    "check_equivalent",
    "check_rule",
    "check_files",
    "compare_arrays",
    "compare_outputs",
    "correspond",
    "default_tolerance",
    "describe_inputs",
    "float_arrays",
    "input_strategy",
    "load_inputs",
    "localize",
    "position_ids",
    "positions_from_mask",
    "replay",
    "replay_files",
    "save_inputs",
    "shared_tensors",
    "step_verifier",
    "token_ids",
    "verify_step",
]
