"""Opset changes never change meaning silently and never make a loadable model unloadable (issue 18: 4, 5)."""

from __future__ import annotations

import io

import onnx
import onnxruntime as ort
import pytest
from builders import assert_equivalent, parse, proto_of
from hypothesis import given, settings
from hypothesis import strategies as st
from qgraph_passes.opset_upgrade import OpsetUpgradePass

from qgraph.cli import main
from qgraph.errors import BadInputError
from qgraph.manager import PassManager
from qgraph.pass_base import default_opset

SOFTMAX_AXIS_1 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] X) => (float[2, 3, 4] Y) {
  Y = Softmax<axis = 1>(X)
}
"""

SOFTMAX_LAST_AXIS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] X) => (float[2, 3, 4] Y, float[2, 3, 4] Z) {
  Y = Softmax<axis = -1>(X)
  Z = LogSoftmax<axis = 2>(X)
}
"""

RANDOM_NORMAL_17 = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] X) => (float[2, 3] Y) {
  R = RandomNormal<shape = [2, 3], seed = 1.0>()
  Z = Mul(R, X)
  Y = Sub(Z, Z)
}
"""


def loads_in_onnxruntime(model) -> bool:
    try:
        ort.InferenceSession(proto_of(model).SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - any refusal means "does not load"
        return False
    return True


# ------------------------------------------------------------------ item 4: downgrades


@pytest.mark.parametrize("target", [12, 10])
def test_downgrade_across_a_meaning_change_is_refused_naming_the_node(target):
    model = parse(SOFTMAX_AXIS_1)
    with pytest.raises(BadInputError, match=r"Softmax.*axis 1.*opset 13"):
        OpsetUpgradePass(target=target)(model)
    assert default_opset(model) == 17


def test_downgrade_of_a_last_axis_softmax_keeps_the_meaning():
    model = parse(SOFTMAX_LAST_AXIS)
    OpsetUpgradePass(target=12)(model)
    assert default_opset(model) == 12
    assert_equivalent(parse(SOFTMAX_LAST_AXIS), model)


@given(axis=st.integers(-3, 2), target=st.integers(1, 12), data=st.data())
@settings(max_examples=12, deadline=None)
def test_a_softmax_downgrade_is_either_refused_or_equivalent(axis, target, data):
    text = SOFTMAX_AXIS_1.replace("axis = 1", f"axis = {axis}")
    model = parse(text)
    try:
        OpsetUpgradePass(target=target)(model)
    except BadInputError:
        assert default_opset(model) == 17
        return
    assert axis in (-1, 2)
    assert_equivalent(parse(text), model, data=data)


def test_cli_downgrade_across_softmax_13_exits_2(tmp_path, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(proto_of(parse(SOFTMAX_AXIS_1)), path)
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(path), "-o", str(out), "--passes", "opset-upgrade", "--option",
                 "opset-upgrade.target=12"], out=io.StringIO())
    assert code == 2 and "Softmax" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------ item 5: nothing rewritten, opset kept


def test_a_pass_that_rewrites_nothing_leaves_the_opset_alone():
    model = parse(RANDOM_NORMAL_17)
    report = PassManager(["rmsnorm"]).run(model)
    assert default_opset(model) == 17
    assert loads_in_onnxruntime(model)
    upgrade = report.passes[0]
    assert upgrade.name == "opset-upgrade" and upgrade.prerequisite_of == "rmsnorm"
    assert not upgrade.changed and any("undone" in note for note in upgrade.notes)


def test_an_upgrade_that_onnxruntime_cannot_load_is_an_invariant_failure(tmp_path, capsys):
    path = tmp_path / "in.onnx"
    onnx.save(proto_of(parse(RANDOM_NORMAL_17)), path)
    assert loads_in_onnxruntime(parse(RANDOM_NORMAL_17))
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(path), "-o", str(out), "--passes", "opset-upgrade"], out=io.StringIO())
    err = capsys.readouterr().err
    assert code == 1
    assert "pass 'opset-upgrade'" in err and "RandomNormal" in err and "onnxruntime" in err
    assert not out.exists()


def test_an_upgrade_that_still_loads_passes_the_invariant():
    model = parse(SOFTMAX_LAST_AXIS)
    PassManager([OpsetUpgradePass(target=23)]).run(model)
    assert default_opset(model) == 23 and loads_in_onnxruntime(model)
