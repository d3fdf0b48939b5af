"""The fuzz suite: every registered pass and preset, on random valid graphs, keeps the CLI's contract.

Either a clean refusal (exit 1/2 with a message, nothing written) or an
output onnxruntime loads that gives the input's outputs; never an internal
error, a wrong result or a changed input (issue 18). Sized to run in well
under a minute; benchmarks/fuzz_passes.py is the long run.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qgraph.verify.pipeline_contract import configurations, run_configuration, write_graph
from qgraph.verify.random_graphs import random_feeds, random_graphs

CONFIGURATIONS = configurations()


def test_every_preset_and_pass_is_fuzzed():
    assert {"preset cleanup", "preset ort", "preset qaic", "pass rmsnorm", "pass attention", "pass kv-cache",
            "pass opset-upgrade", "pass fp16-clip", "pass cse", "pass dce"} <= set(CONFIGURATIONS)


@given(graph=random_graphs(), label=st.sampled_from(sorted(CONFIGURATIONS)), data=st.data())
# nested_given: --verify (the lossy passes' contract) searches inputs with hypothesis inside the CLI.
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.nested_given])
def test_a_pass_refuses_cleanly_or_keeps_the_meaning(graph, label, data):
    feeds = [data.draw(random_feeds(graph), label="feeds") for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="qgraph-fuzz-") as folder:
        source = write_graph(graph.model, Path(folder))
        outcome = run_configuration(source, label, CONFIGURATIONS[label], feeds)
    assert outcome.ok, f"{outcome.verdict} ({label}, exit {outcome.exit_code}): {outcome.detail}"


def test_a_lossy_pass_is_judged_by_its_own_budget(tmp_path):
    """quantize changes a MatMul's numbers by design: within its --verify budget is the contract, not equality."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((2, 2)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [weight])
    source = write_graph(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path)
    feeds = [{"x": np.array([[1.0, -2.0]], np.float32)}]
    assert CONFIGURATIONS["pass quantize"][-1] == "--verify"
    assert CONFIGURATIONS["preset ort-int4"][-1] == "--verify" and "--verify" not in CONFIGURATIONS["preset ort"]
    assert run_configuration(source, "pass quantize", CONFIGURATIONS["pass quantize"], feeds).verdict == "equivalent"
    # Past its budget (no relative error allowed), --verify refuses and writes nothing: an acceptable outcome.
    strict = [*CONFIGURATIONS["pass quantize"], "--option", "quantize.budget_relative_error=0"]
    assert run_configuration(source, "pass quantize", strict, feeds).verdict == "refused"
