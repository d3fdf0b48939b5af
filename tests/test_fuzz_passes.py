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
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_a_pass_refuses_cleanly_or_keeps_the_meaning(graph, label, data):
    feeds = [data.draw(random_feeds(graph), label="feeds") for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="qgraph-fuzz-") as folder:
        source = write_graph(graph.model, Path(folder))
        outcome = run_configuration(source, label, CONFIGURATIONS[label], feeds)
    assert outcome.ok, f"{outcome.verdict} ({label}, exit {outcome.exit_code}): {outcome.detail}"
