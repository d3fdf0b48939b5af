"""The acceptance test: wrong rewrites are caught and localized, right ones pass.

Each mutant changes one thing the way a wrong pass would. The checker must
report the models as different, shrink the failing input, and name the
node where the graphs first part ways.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import mutants
import numpy as np
import onnx
import onnx_ir as ir
import onnxscript.optimizer
import pytest

from qgraph.verify import InputOptions, check_equivalent, load_inputs

EXAMPLES = 30


@dataclasses.dataclass(frozen=True)
class Mutant:
    reference: Callable[[], onnx.ModelProto]
    candidate: Callable[[], onnx.ModelProto]
    tensor: str  # first diverging shared tensor
    node: str  # its producer in the candidate
    op_type: str
    difference: str  # expected in the description of how the producers differ
    max_dims: dict[str, int]  # the shrunk example is at most this large


MUTANTS = {
    "rmsnorm-epsilon-1e-3": Mutant(
        mutants.rms_norm, lambda: mutants.rms_norm(epsilon=1e-3),
        "rms/mean_eps", "rms/add_eps", "Add", "constant differs: 1.e-06 vs 0.001",
        {"batch": 1, "seq": 1},
    ),
    "rmsnorm-epsilon-1e-5": Mutant(  # only visible at small input magnitudes
        mutants.rms_norm, lambda: mutants.rms_norm(epsilon=1e-5),
        "rms/mean_eps", "rms/add_eps", "Add", "constant differs: 1.e-06 vs 1.e-05",
        {"batch": 1, "seq": 1},
    ),
    "fused-rmsnorm-epsilon-1e-3": Mutant(
        mutants.rms_norm, lambda: mutants.rms_norm_fused(epsilon=1e-3),
        "rms/out", "rms/fused", "RMSNormalization", "op: Mul in the reference, RMSNormalization",
        {"batch": 1, "seq": 1},
    ),
    "softmax-wrong-axis": Mutant(
        mutants.attention_probs, lambda: mutants.attention_probs(axis=1),
        "attn/probs", "attn/softmax", "Softmax", "attribute axis: -1 in the reference, 1 in the candidate",
        {"batch": 1, "seq": 2},
    ),
    "weight-column-shifted": Mutant(
        mutants.projection, mutants.projection_column_shifted,
        "proj/xw", "proj/matmul", "MatMul", "input 1 ('W'): constant differs",
        {"batch": 1},
    ),
    "mask-off-by-one": Mutant(
        mutants.masked_attention, lambda: mutants.masked_attention(off_by_one=True),
        "mask/causal", "mask/causal", "LessOrEqual", "'mask/pos_q' in the reference, 'mask/pos_q_next'",
        {"batch": 1, "seq": 2},
    ),
    "kv-slot-one-late": Mutant(
        mutants.kv_cache_write, lambda: mutants.kv_cache_write(late=True),
        "kv/updated", "kv/scatter", "ScatterND", "'kv/indices' in the reference, 'kv/indices_late'",
        {"batch": 1, "seq": 1},
    ),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_wrong_rewrite_is_caught_shrunk_and_localized(name: str, tmp_path) -> None:
    m = MUTANTS[name]
    result = check_equivalent(m.reference(), m.candidate(), examples=EXAMPLES, artifacts_dir=tmp_path)

    assert not result.equivalent, str(result)
    assert result.report is not None and not result.report.passed
    for dim, limit in m.max_dims.items():
        assert result.dims[dim] <= limit, f"not shrunk: {result.dims}"

    divergence = result.divergence
    assert divergence is not None, str(result)
    assert divergence.tensor == m.tensor
    assert divergence.candidate_node is not None
    assert divergence.candidate_node.name == m.node
    assert divergence.candidate_node.op_type == m.op_type
    assert any(m.difference in d for d in divergence.differences), divergence.differences
    assert f"'{m.tensor}'" in str(result) and m.node in str(result)


def test_a_small_epsilon_change_needs_inputs_drawn_across_magnitudes(tmp_path) -> None:
    # At magnitude 1 the mean square dwarfs both epsilons (relative change
    # ~1e-5, below fp32's 1e-4 tolerance); at 1e-1 and below it does not.
    # This is why the float strategy draws a magnitude per input.
    reference, candidate = mutants.rms_norm(), mutants.rms_norm(epsilon=1e-5)
    unit_only = check_equivalent(
        reference, candidate, examples=50, options=InputOptions(float_exponents=(0, 0))
    )
    assert unit_only.equivalent
    default = check_equivalent(reference, candidate, examples=EXAMPLES, artifacts_dir=tmp_path)
    assert not default.equivalent
    assert np.abs(load_inputs(default.inputs_path)["x"]).max() < 1.0


def _fold_with_onnxscript(proto: onnx.ModelProto) -> ir.Model:
    model = ir.from_proto(proto)
    onnxscript.optimizer.fold_constants(model)
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return model


EQUIVALENTS = {
    "rmsnorm-fused-to-RMSNormalization": (mutants.rms_norm, mutants.rms_norm_fused),
    "softmax-decomposed": (mutants.attention_probs, mutants.attention_probs_decomposed),
    "constant-folding-by-hand": (mutants.projection_prefolded, mutants.projection),
    "constant-folding-onnxscript": (
        mutants.projection_prefolded,
        lambda: _fold_with_onnxscript(mutants.projection_prefolded()),
    ),
}


@pytest.mark.parametrize("name", list(EQUIVALENTS))
def test_structure_changing_equivalent_rewrite_passes(name: str) -> None:
    reference, candidate = EQUIVALENTS[name]
    cand = candidate()
    if isinstance(cand, ir.Model):  # the rewrite really changed the structure
        assert [n.op_type for n in cand.graph] != [n.op_type for n in ir.from_proto(reference()).graph]
    result = check_equivalent(reference(), cand, examples=EXAMPLES)
    assert result.equivalent, str(result)
    assert result.examples >= EXAMPLES // 2
