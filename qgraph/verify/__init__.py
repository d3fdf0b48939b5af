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

# Each name is imported from its module on first use (PEP 562): a runtime that needs only the
# KV layout (qgraph.runtime.engines -> kv_contract) does not load hypothesis and the comparison code.
# One name is also a module's: importing qgraph.verify.localize (as equivalence does) would bind the
# module over a lazy name, so the function is bound now (localize imports no test libraries).
from qgraph.verify.localize import localize  # noqa: E402

_SOURCES = {
    "ComparisonReport": "compare",
    "OutputReport": "compare",
    "Tolerance": "compare",
    "compare_arrays": "compare",
    "compare_outputs": "compare",
    "default_tolerance": "compare",
    "Correspondence": "correspondence",
    "correspond": "correspondence",
    "EquivalenceResult": "equivalence",
    "NotEquivalentError": "equivalence",
    "check_equivalent": "equivalence",
    "load_inputs": "equivalence",
    "replay": "equivalence",
    "save_inputs": "equivalence",
    "step_verifier": "equivalence",
    "verify_step": "equivalence",
    "check_files": "files",
    "replay_files": "files",
    "KVLayout": "kv_contract",
    "KVLayoutError": "kv_contract",
    "detect_kv_layout": "kv_contract",
    "Divergence": "localize",
    "NodeRef": "localize",
    "shared_tensors": "localize",
    "InputSpec": "roles",
    "Role": "roles",
    "describe_inputs": "roles",
    "RuleCheck": "rule_check",
    "VariantCheck": "rule_check",
    "check_rule": "rule_check",
    "OrtRunner": "runner",
    "RunError": "runner",
    "ReplayCase": "sequence",
    "ReplayResult": "sequence",
    "SequenceCheckResult": "sequence",
    "check_sequence_equivalence": "sequence",
    "replay_cases": "sequence",
    "replay_sequence": "sequence",
    "Example": "strategies",
    "InputOptions": "strategies",
    "attention_masks": "strategies",
    "float_arrays": "strategies",
    "input_strategy": "strategies",
    "position_ids": "strategies",
    "positions_from_mask": "strategies",
    "token_ids": "strategies",
}

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


def __getattr__(name: str):
    module = _SOURCES.get(name)
    if module is None:
        raise AttributeError(f"module 'qgraph.verify' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f"qgraph.verify.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_SOURCES])
