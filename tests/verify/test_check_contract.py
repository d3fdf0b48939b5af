"""`qgraph check` and `--verify`: interface mismatches are exit 2, notes on matching and rejections,
nothing left in the working directory or in temporary folders unless kept (issue 18: 8)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from qgraph.cli import main


def unary(tmp_path: Path, name: str, op: str = "Relu", shape=(2, 3), dtype=TensorProto.FLOAT,
          inp: str = "x", out: str = "y") -> Path:
    graph = helper.make_graph(
        [helper.make_node(op, [inp], [out])], "g",
        [helper.make_tensor_value_info(inp, dtype, list(shape))],
        [helper.make_tensor_value_info(out, dtype, list(shape))],
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def check(*argv) -> tuple[int, str]:
    out = io.StringIO()
    code = main(["check", *map(str, argv)], out=out)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("change", "fragment"),
    [({"shape": (2, 4)}, "shape [2, 4]"), ({"dtype": TensorProto.DOUBLE}, "DOUBLE")],
    ids=["shape", "dtype"],
)
def test_an_input_interface_mismatch_is_bad_input_either_way(tmp_path, capsys, change, fragment):
    a, b = unary(tmp_path, "a"), unary(tmp_path, "b", **change)
    code, _ = check(a, b)
    err = capsys.readouterr().err
    assert code == 2 and "'x'" in err and fragment in err and "ONNXRuntimeError" not in err


def test_matching_by_position_is_said(tmp_path):
    a, b = unary(tmp_path, "a"), unary(tmp_path, "b", inp="q", out="z")
    code, out = check(a, b, "--examples", "3")
    assert code == 0
    assert "inputs matched by position: 'q' <- 'x'" in out
    assert "outputs matched by position: 'y' ~ 'z'" in out


def test_examples_the_reference_rejects_are_counted_with_the_reason(tmp_path):
    # Reshape to [3, -1] rejects every length that is not a multiple of 3
    shape = helper.make_tensor("s", TensorProto.INT64, [2], [3, -1])
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "s"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, None])], [shape],
    )
    a = tmp_path / "a.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), a)
    code, out = check(a, a, "--examples", "20")
    assert code == 0
    headline, *notes = out.strip().splitlines()
    ran = int(headline.split(" on ")[1].split()[0])
    rejected = next(n for n in notes if "rejected by the reference" in n)
    assert int(rejected.split()[0]) > 0 and "reshape" in rejected.lower()
    assert ran >= 1


def _scratch(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("qgraph-verify-", ".hypothesis")))


def test_a_failed_check_leaves_nothing_unless_kept(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    a, b = unary(work, "a"), unary(work, "b", op="Neg")
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code, out = check(a, b, "--examples", "3")
    assert code == 1 and "NOT EQUIVALENT" in out
    assert "--keep" in out and "inputs saved" not in out
    assert _scratch(tmp_path) == [] and sorted(os.listdir(work)) == ["a.onnx", "b.onnx"]

    kept = tmp_path / "kept"
    code, out = check(a, b, "--examples", "3", "--keep", kept)
    assert code == 1
    assert f"--inputs {kept / 'inputs.npz'}" in out and (kept / "inputs.npz").exists()
    assert sorted(os.listdir(work)) == ["a.onnx", "b.onnx"]


def test_a_failed_verify_leaves_nothing_unless_kept(tmp_path, monkeypatch):
    import qgraph.registry
    from framework_passes import registry_with_test_passes, relu_neg_model

    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry_with_test_passes())
    work = tmp_path / "work"
    work.mkdir()
    relu_neg_model(17, work / "in.onnx")
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    code = main(["optimize", "in.onnx", "-o", "out.onnx", "--passes", "wrong-scale", "--verify"], out=io.StringIO())
    assert code == 1
    assert _scratch(tmp_path) == [] and sorted(os.listdir(work)) == ["in.onnx"]


def test_verify_keeps_hypothesis_state_out_of_the_working_directory(tmp_path):
    # hypothesis 6.1xx writes .hypothesis/constants under the cwd on its first search
    import shutil
    import subprocess
    import sys

    a = unary(tmp_path, "a")
    exe = shutil.which("qgraph", path=str(Path(sys.executable).parent))
    run = subprocess.run([exe, "optimize", str(a), "-o", "out.onnx", "--passes", "dce", "opset-upgrade", "--verify"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(tmp_path)) == ["a.onnx", "out.onnx"]


def _decoder_like(tmp_path: Path, name: str, padded_offset: float, valid_offset: float = 0.0) -> Path:
    """logits[b, s, 0] = input_ids (as float) + offsets where the query's own mask entry is 0 / 1."""
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids_f"], to=TensorProto.FLOAT),
        helper.make_node("Shape", ["input_ids"], ["ids_shape"]),
        helper.make_node("Gather", ["ids_shape", "one"], ["seq"], axis=0),
        helper.make_node("Neg", ["seq"], ["neg_seq"]),
        helper.make_node("Slice", ["attention_mask", "neg_seq", "big", "one"], ["own"]),
        helper.make_node("Cast", ["own"], ["own_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["onef", "own_f"], ["pad_f"]),
        helper.make_node("Mul", ["pad_f", "padded_offset"], ["pad_shift"]),
        helper.make_node("Mul", ["own_f", "valid_offset"], ["valid_shift"]),
        helper.make_node("Sum", ["ids_f", "pad_shift", "valid_shift"], ["shifted"]),
        helper.make_node("Unsqueeze", ["shifted", "two"], ["logits"]),
    ]
    inits = [
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("two", TensorProto.INT64, [1], [2]),
        helper.make_tensor("big", TensorProto.INT64, [1], [2**62]),
        helper.make_tensor("onef", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("padded_offset", TensorProto.FLOAT, [], [padded_offset]),
        helper.make_tensor("valid_offset", TensorProto.FLOAT, [], [valid_offset]),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 1])], inits,
    )
    path = tmp_path / f"{name}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_rows_at_padding_queries_are_not_compared_and_the_report_says_so(tmp_path):
    a = _decoder_like(tmp_path, "a", padded_offset=0.0)
    b = _decoder_like(tmp_path, "b", padded_offset=7.0)  # differs only where the query is padding
    code, out = check(a, b, "--examples", "20")
    assert code == 0, out
    note = next(line for line in out.splitlines() if "padding query positions" in line)
    assert int(note.split()[0]) > 0


def test_a_difference_at_a_valid_query_row_is_still_found(tmp_path):
    a = _decoder_like(tmp_path, "a", padded_offset=0.0)
    b = _decoder_like(tmp_path, "b", padded_offset=0.0, valid_offset=0.5)
    code, out = check(a, b, "--examples", "20")
    assert code == 1 and "NOT EQUIVALENT" in out
