"""check_files: the body of ``qgraph check A B`` and its exit-code contract."""

from __future__ import annotations

import io

import mutants
import onnx
import pytest

from qgraph.verify import check_files, replay_files
from qgraph.verify.__main__ import main


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, proto in {
        "ref": mutants.masked_attention(),
        "same": mutants.masked_attention(),
        "wrong": mutants.masked_attention(off_by_one=True),
        "other": mutants.projection(),
    }.items():
        paths[name] = tmp_path / f"{name}.onnx"
        onnx.save(proto, paths[name])
    (tmp_path / "notes.onnx").write_text("this is not a model\n")
    paths["text"] = tmp_path / "notes.onnx"
    return paths


def _run(a, b, examples: int = 10) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_files(a, b, examples, out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_equivalent_files_exit_0(files) -> None:
    code, out, err = _run(files["ref"], files["same"])
    assert code == 0
    assert out.startswith("EQUIVALENT") and err == ""


def test_different_files_exit_1_with_report_and_reproduction(files, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # keep the saved inputs inside the test folder
    code, out, err = _run(files["ref"], files["wrong"])
    assert code == 1 and err == ""
    assert "NOT EQUIVALENT" in out
    assert "comparison FAILED" in out
    assert "first diverging tensor: 'mask/causal'" in out
    assert "reproduce: python -m qgraph.verify" in out and str(files["wrong"]) in out
    inputs = next(line.split("inputs saved to ")[1] for line in out.splitlines() if "inputs saved to" in line)
    replay_out = io.StringIO()
    assert replay_files(files["ref"], files["wrong"], inputs, replay_out) == 1
    assert "mask/causal" in replay_out.getvalue()


@pytest.mark.parametrize(
    "a, b, fragment",
    [
        ("missing", "ref", "missing.onnx: no such file"),
        ("ref", "text", "notes.onnx"),
        ("ref", "other", "ref.onnx"),
    ],
    ids=["missing-file", "not-onnx", "inputs-do-not-correspond"],
)
def test_bad_input_exits_2_naming_the_file(files, tmp_path, a, b, fragment) -> None:
    path_a = files.get(a, tmp_path / f"{a}.onnx")
    path_b = files.get(b, tmp_path / f"{b}.onnx")
    code, out, err = _run(path_a, path_b)
    assert code == 2
    assert out == ""
    assert err.startswith("qgraph check: ") and fragment in err


def test_module_entry_point_has_the_same_exit_codes(files, tmp_path, capsys) -> None:
    assert main([str(files["ref"]), str(files["same"]), "--examples", "5"]) == 0
    assert main([str(files["ref"]), str(tmp_path / "nope.onnx")]) == 2
    assert "nope.onnx" in capsys.readouterr().err
