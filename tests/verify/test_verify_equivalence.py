"""check_equivalent around the comparison: reproduction, pass hooks, models, robustness."""

from __future__ import annotations

import json
import subprocess
import sys

import ml_dtypes
import mutants
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as T
from onnx import helper as oh

from qgraph.errors import BadInputError, PassFailure
from qgraph.verify import (
    NotEquivalentError,
    OrtRunner,
    check_equivalent,
    load_inputs,
    replay,
    step_verifier,
    verify_step,
)


def _softmax_mutant() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    return mutants.attention_probs(), mutants.attention_probs(axis=1)


# --- reproduction -----------------------------------------------------------------


def test_failure_saves_the_shrunk_inputs_and_replay_reproduces_it(tmp_path) -> None:
    reference, candidate = _softmax_mutant()
    result = check_equivalent(reference, candidate, examples=20, seed=3, artifacts_dir=tmp_path)
    assert not result.equivalent
    feeds = load_inputs(result.inputs_path)
    assert {n: a.shape for n, a in feeds.items()} == result.shapes
    assert result.shapes["q"] == (result.dims["batch"], result.dims["seq"], 4)
    assert result.seed == 3

    again = replay(reference, candidate, result.inputs_path)
    assert not again.equivalent
    assert again.divergence is not None and again.divergence.candidate_node.name == "attn/softmax"
    assert again.report.outputs[0].max_abs_error == pytest.approx(result.report.outputs[0].max_abs_error)
    assert replay(reference, reference, result.inputs_path).equivalent


def test_the_printed_reproduction_command_fails_the_same_way(tmp_path) -> None:
    reference, candidate = _softmax_mutant()
    result = check_equivalent(reference, candidate, examples=20, artifacts_dir=tmp_path)
    command = result.reproduction
    assert command is not None and command.startswith("python -m qgraph.verify ")
    assert f"reproduce: {command}" in str(result)
    argv = [sys.executable, *command.split()[1:]]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "attn/softmax" in proc.stdout


def test_same_seed_same_failing_example(tmp_path) -> None:
    reference, candidate = mutants.masked_attention(), mutants.masked_attention(off_by_one=True)
    first = check_equivalent(reference, candidate, examples=20, seed=11, artifacts_dir=tmp_path / "a")
    second = check_equivalent(reference, candidate, examples=20, seed=11, artifacts_dir=tmp_path / "b")
    a, b = load_inputs(first.inputs_path), load_inputs(second.inputs_path)
    assert first.dims == second.dims
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_a_random_seed_is_reported(tmp_path) -> None:
    result = check_equivalent(*_softmax_mutant(), examples=10, seed=None, artifacts_dir=tmp_path)
    assert isinstance(result.seed, int)
    assert f"seed {result.seed}" in str(result)


def test_nothing_is_printed(tmp_path, capfd) -> None:
    check_equivalent(*_softmax_mutant(), examples=20, artifacts_dir=tmp_path)
    check_equivalent(mutants.rms_norm(), mutants.rms_norm_fused(), examples=10)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_result_serializes_to_strict_json(tmp_path) -> None:
    result = check_equivalent(*_softmax_mutant(), examples=20, artifacts_dir=tmp_path)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["equivalent"] is False
    assert data["divergence"]["candidate_node"]["name"] == "attn/softmax"
    assert data["report"]["outputs"][0]["status"] == "FAILED"


# --- the caller's models ------------------------------------------------------------


def test_models_given_are_not_modified(tmp_path) -> None:
    reference = ir.from_proto(mutants.masked_attention())
    candidate = ir.from_proto(mutants.masked_attention(off_by_one=True))
    before = [ir.to_proto(m).SerializeToString() for m in (reference, candidate)]
    result = check_equivalent(reference, candidate, examples=20, artifacts_dir=tmp_path)
    assert result.divergence is not None  # localization (which adds outputs) did run
    assert [ir.to_proto(m).SerializeToString() for m in (reference, candidate)] == before
    assert [v.name for v in candidate.graph.outputs] == ["out"]


def test_models_with_external_data_are_read_lazily(tmp_path) -> None:
    ref = ir.from_proto(mutants.projection())
    ir.save(ref, tmp_path / "ref.onnx", external_data="ref.onnx.data", size_threshold_bytes=0)
    loaded = ir.load(tmp_path / "ref.onnx")
    assert isinstance(loaded.graph.initializers["W"].const_value, ir.ExternalTensor)
    assert check_equivalent(loaded, mutants.projection(), examples=10).equivalent
    result = check_equivalent(
        tmp_path / "ref.onnx", mutants.projection_column_shifted(), examples=10, artifacts_dir=tmp_path / "art"
    )
    assert not result.equivalent and result.divergence.candidate_node.name == "proj/matmul"


# --- the pass manager's hook ----------------------------------------------------------


def _stamped(proto: onnx.ModelProto, pass_name: str, rule_name: str) -> ir.Model:
    model = ir.from_proto(proto)
    for node in model.graph:
        if node.op_type == "RMSNormalization":
            node.metadata_props["qgraph.pass"] = pass_name
            node.metadata_props["qgraph.rule"] = rule_name
    return model


def test_verify_step_names_the_pass_and_the_rule(tmp_path) -> None:
    before = ir.from_proto(mutants.rms_norm())
    after = _stamped(mutants.rms_norm_fused(epsilon=1e-3), "rmsnorm", "fuse_pow_mean_rsqrt")
    result = verify_step(before, after, examples=10, pass_name="rmsnorm", artifacts_dir=tmp_path)
    assert not result.equivalent
    assert result.pass_name == "rmsnorm"
    assert result.rule_name == "fuse_pow_mean_rsqrt"
    node = result.divergence.candidate_node
    assert (node.pass_name, node.rule_name) == ("rmsnorm", "fuse_pow_mean_rsqrt")
    assert "pass 'rmsnorm'" in result.headline()
    assert "rule 'fuse_pow_mean_rsqrt'" in str(result)


def test_step_verifier_raises_a_pass_failure_only_on_a_mismatch(tmp_path) -> None:
    verify = step_verifier(examples=10, artifacts_dir=tmp_path)
    before = ir.from_proto(mutants.rms_norm())
    verify(before, ir.from_proto(mutants.rms_norm_fused()), "rmsnorm")  # equivalent: no error
    with pytest.raises(NotEquivalentError) as caught:
        verify(before, ir.from_proto(mutants.rms_norm_fused(epsilon=1e-3)), "rmsnorm")
    assert isinstance(caught.value, PassFailure)
    assert caught.value.pass_name == "rmsnorm"
    assert caught.value.result.divergence.candidate_node.name == "rms/fused"


def test_verify_step_is_fast_for_small_models() -> None:
    result = verify_step(mutants.rms_norm(), mutants.rms_norm_fused(), examples=10, pass_name="rmsnorm")
    assert result.equivalent
    assert result.seconds < 2.0


# --- what counts as a failure and what as bad input --------------------------------------


def _reshape_model(target: list[int]) -> onnx.ModelProto:
    graph = oh.make_graph(
        [oh.make_node("Reshape", ["x", "shape"], ["y"], name="reshape")],
        "g",
        [oh.make_tensor_value_info("x", T.FLOAT, ["batch", 4])],
        [oh.make_tensor_value_info("y", T.FLOAT, None)],
        [onnx.numpy_helper.from_array(np.array(target, np.int64), "shape")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def test_a_candidate_that_raises_where_the_reference_runs_is_a_failure(tmp_path) -> None:
    # [3, -1] needs a batch divisible by 3; the reference ([-1]) takes any.
    result = check_equivalent(_reshape_model([-1]), _reshape_model([3, -1]), examples=20, artifacts_dir=tmp_path)
    assert not result.equivalent
    assert result.error is not None and "reshape" in result.error.lower()
    assert result.dims == {"batch": 1}  # shrunk to the smallest input it fails on
    assert result.inputs_path is not None


def test_a_candidate_onnxruntime_cannot_load_is_a_failure() -> None:
    broken = mutants.projection()
    # an ONNX op, so the model is well formed, but one onnxruntime has no kernel for at opset 23
    broken.graph.node[2].op_type = "RandomNormalLike"
    result = check_equivalent(mutants.projection(), broken, examples=5)
    assert not result.equivalent
    assert "cannot load" in result.error


def test_inputs_the_reference_rejects_are_skipped() -> None:
    # [2, -1] needs an even batch: odd batches are invalid inputs, not failures.
    result = check_equivalent(_reshape_model([2, -1]), _reshape_model([2, -1]), examples=10)
    assert result.equivalent and result.examples >= 5


def test_a_reference_that_rejects_every_input_is_bad_input(capfd) -> None:
    with pytest.raises(BadInputError, match="rejected every drawn input"):
        check_equivalent(_reshape_model([7, -1]), _reshape_model([7, -1]), examples=5)
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # onnxruntime's own error log is silenced


def test_outputs_that_do_not_correspond_are_bad_input() -> None:
    two_outputs = mutants.embedding_model()
    one_output = mutants.embedding_model()
    del one_output.graph.output[1:]
    with pytest.raises(BadInputError, match="outputs do not correspond"):
        check_equivalent(two_outputs, one_output, examples=5)


def test_an_input_the_reference_lacks_is_bad_input() -> None:
    extra = mutants.projection()
    extra.graph.input.append(oh.make_tensor_value_info("extra", T.FLOAT, [1]))
    with pytest.raises(BadInputError, match="'extra'"):
        check_equivalent(mutants.projection(), extra, examples=5)


def test_renamed_outputs_are_matched_by_position() -> None:
    renamed = mutants.projection()
    renamed.graph.node[-1].output[0] = "logits"
    renamed.graph.output[0].name = "logits"
    result = check_equivalent(mutants.projection(), renamed, examples=5)
    assert result.equivalent
    wrong = mutants.projection_column_shifted()
    wrong.graph.node[-1].output[0] = "logits"
    wrong.graph.output[0].name = "logits"
    failed = check_equivalent(mutants.projection(), wrong, examples=5, save_models=False, localize_divergence=False)
    assert failed.report.matched_by == "position"
    assert failed.report.outputs[0].candidate_name == "logits"
    assert "replay(" in failed.reproduction  # in-memory models not saved: the API call is printed


# --- dtypes numpy's binding in onnxruntime lacks ------------------------------------------


def _bf16_model(factor: float) -> onnx.ModelProto:
    graph = oh.make_graph(
        [
            oh.make_node("Cast", ["x"], ["x32"], to=T.FLOAT),
            oh.make_node("Mul", ["x32", "k"], ["y32"]),
            oh.make_node("Cast", ["y32"], ["y"], to=T.BFLOAT16),
        ],
        "g",
        [oh.make_tensor_value_info("x", T.BFLOAT16, ["batch", 4])],
        [oh.make_tensor_value_info("y", T.BFLOAT16, ["batch", 4])],
        [onnx.numpy_helper.from_array(np.array(factor, np.float32), "k")],
    )
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)])


def test_bfloat16_inputs_and_outputs_run_and_compare(tmp_path) -> None:
    runner = OrtRunner(ir.from_proto(_bf16_model(2.0)))
    x = np.array([[1.5, -2.0, 0.25, 3.0]], ml_dtypes.bfloat16)
    y = runner.run({"x": x})["y"]
    assert y.dtype == ml_dtypes.bfloat16
    assert np.array_equal(y.astype(np.float32), x.astype(np.float32) * 2)
    assert check_equivalent(_bf16_model(2.0), _bf16_model(2.0), examples=10).equivalent
    result = check_equivalent(_bf16_model(2.0), _bf16_model(2.5), examples=10, artifacts_dir=tmp_path)
    assert not result.equivalent
    assert load_inputs(result.inputs_path)["x"].dtype == ml_dtypes.bfloat16


def test_sessions_run_without_onnxruntime_graph_optimizations() -> None:
    runner = OrtRunner(ir.from_proto(mutants.rms_norm()))
    options = runner.session.get_session_options()
    import onnxruntime as ort

    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1


def test_save_artifacts_false_writes_nothing(tmp_path) -> None:
    result = check_equivalent(*_softmax_mutant(), examples=10, artifacts_dir=tmp_path / "art", save_artifacts=False)
    assert not result.equivalent and result.divergence is not None
    assert result.inputs_path is None and result.reproduction is None
    assert not (tmp_path / "art").exists()
