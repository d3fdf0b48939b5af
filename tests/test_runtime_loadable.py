"""qgraph.runtime_loadable: the nodes an opset change leaves without an onnxruntime kernel, found with few sessions."""

from __future__ import annotations

import functools
import re

import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph import runtime_loadable
from qgraph.io import load
from qgraph.runtime_loadable import lost_kernels

# One line per node kind; every one reads X float[2, 3] or S int64[2] and writes its own output.
# (node, its output's type)
KINDS = {
    "Cast": ("A = Cast<to = 1>(X)", "float[2, 3] A"),
    "Reshape": ("B = Reshape(X, S)", "float[?, ?] B"),
    "Shape": ("C = Shape(X)", "int64[2] C"),
    "Transpose": ("D = Transpose<perm = [1, 0]>(X)", "float[3, 2] D"),
    "Identity": ("E = Identity(X)", "float[2, 3] E"),
    "Abs": ("F = Abs(X)", "float[2, 3] F"),
    "RandomNormal": ("G = RandomNormal<shape = [2, 3], seed = 1.0>()", "float[2, 3] G"),
    "RandomUniform": ("H = RandomUniform<shape = [2, 3], seed = 2.0>()", "float[2, 3] H"),
}


def _text(kinds: list[str], opset: int) -> str:
    outputs = ", ".join(KINDS[k][1] for k in kinds)
    body = "\n".join(f"  {KINDS[k][0]}" for k in kinds)
    return f"<ir_version: 8, opset_import: [\"\" : {opset}]>\ng (float[2, 3] X, int64[2] S) => ({outputs}) {{\n{body}\n}}\n"


@functools.cache
def _loads_alone(kind: str, opset: int) -> bool:
    """The reference: onnxruntime's verdict on a model holding only this node."""
    try:
        ort.InferenceSession(onnx.parser.parse_model(_text([kind], opset)).SerializeToString(),
                             providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001
        return False
    return True


def _model(kinds: list[str], opset: int, tmp_path):
    path = tmp_path / f"m{abs(hash(tuple(kinds)))}.onnx"
    onnx.save(onnx.parser.parse_model(_text(kinds, opset)), path)
    return load(path)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.sampled_from(sorted(KINDS)), min_size=1, max_size=5, unique=True))
def test_the_nodes_reported_are_those_that_load_at_17_and_not_at_23(tmp_path_factory, kinds):
    model = _model(kinds, 23, tmp_path_factory.mktemp("m"))
    reported = {re.search(r"reads as (\w+)\(", line).group(1) for line in lost_kernels(model, 17)}
    assert reported == {k for k in kinds if _loads_alone(k, 17) and not _loads_alone(k, 23)}


def test_the_reference_sees_a_lost_kernel_among_the_kinds():
    # Without one, the property above would hold for a checker that reports nothing.
    assert _loads_alone("RandomNormal", 17) and not _loads_alone("RandomNormal", 23)


def test_kinds_that_all_load_cost_one_session(tmp_path, monkeypatch):
    runtime_loadable._all_load.cache_clear()
    runtime_loadable._loads.cache_clear()
    sessions = []
    real = ort.InferenceSession

    def counting(*args, **kwargs):
        sessions.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", counting)
    model = _model(["Cast", "Reshape", "Shape", "Transpose", "Identity"], 23, tmp_path)
    assert lost_kernels(model, 17) == []
    assert len(sessions) == 1


@pytest.mark.parametrize("previous", [None, 23])
def test_no_opset_change_no_sessions(tmp_path, monkeypatch, previous):
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: pytest.fail("a session was built"))
    assert lost_kernels(_model(["RandomNormal"], 23, tmp_path), previous) == []
