"""qgraph optimize --precision: the ort preset at fp32, int8 or int4 (its ort-int8 / ort-int4 forms)."""
from __future__ import annotations

import io

import onnx
import pytest

from qgraph.cli import _preset_at_precision, main
from qgraph.errors import BadInputError


@pytest.mark.parametrize("preset, precision, chosen", [
    ("ort", None, "ort"), (None, None, "cleanup"), ("qaic", None, "qaic"),
    ("ort", "fp32", "ort"), ("ort", "int8", "ort-int8"), ("ort", "int4", "ort-int4"),
    ("ort-int4", "int4", "ort-int4"),
    ("ort-attention", "int4", "ort-int4-attention"), ("ort-attention", "fp32", "ort-attention"),
    ("ort-int8-attention", "int8", "ort-int8-attention"),
])
def test_precision_picks_the_form_of_the_ort_preset(preset, precision, chosen):
    assert _preset_at_precision(preset, precision) == chosen


@pytest.mark.parametrize("preset, precision", [(None, "int4"), ("qaic", "int8"), ("cleanup", "fp32"),
                                               ("ort-int8", "int4"), ("ort-int4", "fp32"),
                                               ("ort-int4-attention", "int8"), ("qaic-attention", "int4")])
def test_precision_outside_the_ort_preset_or_against_it_is_refused(preset, precision):
    with pytest.raises(BadInputError, match="--precision|disagree"):
        _preset_at_precision(preset, precision)


def test_optimize_with_precision_int8_writes_matmul_nbits(tiny_zoo, tmp_path):
    source = tiny_zoo.export("llama", "dynamo").model_path
    out = io.StringIO()
    code = main(["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--preset", "ort", "--precision", "int8"],
                out=out)
    assert code == 0, out.getvalue()
    ops = {n.op_type for n in onnx.load(tmp_path / "q.onnx", load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops


def test_precision_with_a_pass_list_is_bad_usage_and_writes_nothing(tiny_zoo, tmp_path):
    source = tiny_zoo.export("llama", "dynamo").model_path
    code = main(["optimize", str(source), "-o", str(tmp_path / "q.onnx"), "--passes", "cse", "--precision", "int4"],
                out=io.StringIO())
    assert code == 2 and not (tmp_path / "q.onnx").exists()


def test_precision_gguf_needs_the_gguf_file():
    from qgraph.bundle import CompileOptions

    with pytest.raises(BadInputError, match="GGUF"):
        CompileOptions(target="ort", precision="gguf")
    options = CompileOptions(target="ort", precision="gguf", pass_options={"quantize": {"gguf": "/m.gguf"}})
    assert options.preset == "ort-int4"
    assert CompileOptions(target="ort", precision="int8").preset == "ort-int8"
    assert CompileOptions(target="ort").preset == "ort" and CompileOptions(target="qaic").preset == "qaic"
