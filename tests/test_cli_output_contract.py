"""Every path `qgraph optimize` writes is checked up front and committed together (issue 18: 1, 2, 3, 11)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_cli import model_path, run, test_registry  # noqa: F401 - the CLI tests' fixtures and runner

import qgraph.io
from qgraph.errors import BadInputError


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("report", ["in.onnx", "out.onnx", "out.onnx.data", "./out.onnx"])
def test_report_on_the_input_or_an_output_is_refused_before_anything_runs(model_path, tmp_path, capsys, report):
    before = snapshot(tmp_path)
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg",
                  "--external-data", "yes", "--report", tmp_path / report)
    assert code == 2
    err = capsys.readouterr().err
    assert "--report" in err and report.lstrip("./") in err
    assert snapshot(tmp_path) == before  # the input is intact and nothing was written


def test_report_on_a_hard_link_of_the_input_is_refused(model_path, tmp_path, capsys):
    os.link(model_path, tmp_path / "alias.json")
    before = snapshot(tmp_path)
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--report", tmp_path / "alias.json")
    assert code == 2 and "alias.json" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["missing-folder", "a-folder"])
def test_a_report_that_cannot_be_written_writes_no_model(model_path, tmp_path, capsys, where):
    (tmp_path / "a-folder").mkdir()
    report = tmp_path / "missing" / "r.json" if where == "missing-folder" else tmp_path / "a-folder"
    before = snapshot(tmp_path)
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg", "--report", report)
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err and str(report) in err
    assert snapshot(tmp_path) == before


def test_report_failing_at_commit_time_rolls_the_model_back(model_path, tmp_path, monkeypatch, capsys):
    out_path, report = tmp_path / "out.onnx", tmp_path / "r.json"
    out_path.write_bytes(b"previous model")
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst) == report:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    code, _ = run("optimize", model_path, "-o", out_path, "--passes", "double-neg", "--report", report)
    assert code == 2
    assert str(report) in capsys.readouterr().err
    assert out_path.read_bytes() == b"previous model"
    assert not report.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "out.onnx"]


def test_model_and_report_are_written_together(model_path, tmp_path):
    (tmp_path / "reports").mkdir()
    code, text = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg",
                     "--report", tmp_path / "reports" / "r.json")
    assert code == 0, text
    assert json.loads((tmp_path / "reports" / "r.json").read_text())["passes"][0]["name"] == "double-neg"
    assert onnx.load(tmp_path / "out.onnx").graph.node
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["r.json"]


@pytest.mark.parametrize("target", ["-o", "--report"])
def test_a_missing_output_folder_is_refused_before_any_pass_runs(model_path, tmp_path, capsys, target):
    paths = {"-o": tmp_path / "out.onnx", "--report": tmp_path / "r.json"}
    paths[target] = tmp_path / "missing" / paths[target].name
    # 'crash' would fail the run with exit 1 if it ever ran
    code, _ = run("optimize", model_path, "-o", paths["-o"], "--report", paths["--report"], "--passes", "crash")
    err = capsys.readouterr().err
    assert code == 2 and f"{target} {paths[target]}" in err and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_unwritable_output_folder_is_bad_input_naming_it(model_path, tmp_path, monkeypatch, capsys):
    # Tests run as root here, where a read-only folder is still writable:
    # the refusal the kernel gives a user is simulated at the first write.
    import tempfile

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "Permission denied" in err and "out.onnx" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_output_under_a_file_is_bad_input(model_path, tmp_path, capsys):
    code, _ = run("optimize", model_path, "-o", model_path / "out.onnx", "--passes", "double-neg")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "in.onnx" in err


def test_output_in_proc_is_bad_input(model_path, capsys):
    code, _ = run("optimize", model_path, "-o", "/proc/qgraph-out.onnx", "--passes", "double-neg")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "/proc/qgraph-out.onnx" in err


def test_oserror_while_writing_is_bad_input_naming_the_path(model_path, tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qgraph.io, "_write_model_file", full_disk)
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg")
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "out.onnx" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


# ----------------------------------------------------------- item 11: the model/data pair


def _external_model(tmp_path: Path, scale: float) -> qgraph.io.ir.Model:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 512])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 512])
    w = onnx.numpy_helper.from_array(np.full([512], scale, np.float32), "w")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Mul", ["x", "w"], ["y"])], "g", [x], [y], [w])
    return qgraph.io.load(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def test_a_data_file_from_another_write_is_refused_at_load(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    qgraph.io.save(_external_model(tmp_path, 1.0), first / "m.onnx", external_data=True)
    qgraph.io.save(_external_model(tmp_path, 2.0), second / "m.onnx", external_data=True)
    qgraph.io.load(first / "m.onnx")  # a matching pair loads
    # What two interleaved writers could leave: the model of one, the data of the other.
    os.replace(second / "m.onnx.data", first / "m.onnx.data")
    with pytest.raises(BadInputError, match=r"m\.onnx\.data.*not the one written with"):
        qgraph.io.load(first / "m.onnx")


def test_a_pair_another_tool_rewrote_loads(tmp_path):
    """onnx keeps qgraph's metadata when it loads and saves a pair again; its data file has no marker to check."""
    qgraph.io.save(_external_model(tmp_path, 1.0), tmp_path / "m.onnx", external_data=True)
    proto = onnx.load(tmp_path / "m.onnx")
    assert any(p.key == qgraph.io.PAIR_KEY for p in proto.metadata_props)
    proto.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.full([512], 5.0, np.float32), "w"))
    (tmp_path / "edited").mkdir()
    onnx.save(proto, tmp_path / "edited" / "m.onnx", save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    model = qgraph.io.load(tmp_path / "edited" / "m.onnx")
    assert np.all(model.graph.initializers["w"].const_value.numpy() == 5.0)


def test_the_pair_marker_does_not_leak_into_the_loaded_model(tmp_path):
    qgraph.io.save(_external_model(tmp_path, 1.0), tmp_path / "m.onnx", external_data=True)
    model = qgraph.io.load(tmp_path / "m.onnx")
    assert not any(k.startswith("qgraph.") for k in model.metadata_props)
    qgraph.io.save(model, tmp_path / "inline.onnx", external_data=False)
    assert not [p.key for p in onnx.load(tmp_path / "inline.onnx").metadata_props]


def test_onnxruntime_still_runs_a_marked_pair(tmp_path):
    import onnxruntime as ort

    qgraph.io.save(_external_model(tmp_path, 3.0), tmp_path / "m.onnx", external_data=True)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"x": np.ones([4, 512], np.float32)})
    assert np.all(y == 3.0)


def test_commits_into_one_folder_are_serialized(tmp_path, monkeypatch):
    """While one save is between its data-file and model-file renames, another cannot commit."""
    import threading

    model_a, model_b = _external_model(tmp_path, 1.0), _external_model(tmp_path, 2.0)
    destination = tmp_path / "m.onnx"
    real_replace = os.replace
    a_between = threading.Event()
    b_committed = threading.Event()

    def observed_replace(src, dst):
        real_replace(src, dst)
        name = threading.current_thread().name
        final = Path(dst).parent == tmp_path  # not a rename inside a staging folder
        if name == "a" and final and Path(dst).name == "m.onnx.data":
            a_between.set()
            # Without a lock B commits both files now, and A's model then
            # lands on B's data; with it, B waits and this times out.
            b_committed.wait(timeout=3)
        if name == "b" and final and Path(dst).name == "m.onnx":
            b_committed.set()

    monkeypatch.setattr(os, "replace", observed_replace)

    def save_a():
        qgraph.io.save(model_a, destination, external_data=True)

    def save_b():
        assert a_between.wait(timeout=120)
        qgraph.io.save(model_b, destination, external_data=True)

    threads = [threading.Thread(target=save_a, name="a"), threading.Thread(target=save_b, name="b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert b_committed.is_set()
    result = qgraph.io.load(destination)  # a consistent pair: B's model with B's data
    assert float(result.graph.initializers["w"].const_value.numpy()[0]) == 2.0
