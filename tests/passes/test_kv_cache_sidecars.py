"""Sidecar files (``qgraph.io``): what a pass leaves in metadata is written beside the saved model.

The KV-cache pass relies on this for ``specializations.json`` and
``custom_io.yaml``; the promises are those of ``qgraph.io.save``: atomic,
nothing written on failure, inputs never overwritten.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from qgraph import io as qio
from qgraph.errors import BadInputError


def _model(**sidecars: str) -> ir.Model:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
    )
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    model.metadata_props["keep.me"] = "yes"
    for name, text in sidecars.items():
        model.metadata_props[qio.SIDECAR_PREFIX + name.replace("_", ".")] = text
    return model


def test_sidecars_are_written_beside_the_model_and_left_out_of_it(tmp_path: Path) -> None:
    model = _model(spec_json='{"a": 1}\n', io_yaml=" - IOName: x\n")
    out = qio.save(model, tmp_path / "m.onnx")
    assert (tmp_path / "spec.json").read_text() == '{"a": 1}\n'
    assert (tmp_path / "io.yaml").read_text() == " - IOName: x\n"
    saved = onnx.load(out)
    assert {p.key for p in saved.metadata_props} == {"keep.me"}
    assert qio.sidecar_files(model) == {"spec.json": '{"a": 1}\n', "io.yaml": " - IOName: x\n"}  # in memory: kept


def test_a_resave_replaces_the_sidecars(tmp_path: Path) -> None:
    qio.save(_model(spec_json="old"), tmp_path / "m.onnx")
    qio.save(_model(spec_json="new"), tmp_path / "m.onnx")
    assert (tmp_path / "spec.json").read_text() == "new"


@pytest.mark.parametrize("name", ["../escape.json", "sub/dir.json", "", "..", "m.onnx", "m.onnx.data"])
def test_a_sidecar_name_that_is_not_a_plain_new_file_is_refused(tmp_path: Path, name: str) -> None:
    model = _model()
    model.metadata_props[qio.SIDECAR_PREFIX + name] = "x"
    with pytest.raises(BadInputError, match="sidecar file"):
        qio.save(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_sidecar_never_overwrites_an_input(tmp_path: Path) -> None:
    precious = tmp_path / "spec.json"
    precious.write_text("input")
    with pytest.raises(BadInputError, match="sidecar"):
        qio.save(_model(spec_json="x"), tmp_path / "m.onnx", protect=[precious])
    assert precious.read_text() == "input" and not (tmp_path / "m.onnx").exists()


def test_a_failed_model_write_leaves_no_sidecar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = qio.os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("m.onnx"):
            raise OSError("disk full")
        return real_replace(src, dst)

    (tmp_path / "spec.json").write_text("previous")
    monkeypatch.setattr(qio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        qio.save(_model(spec_json="new", other_json="new"), tmp_path / "m.onnx")
    assert (tmp_path / "spec.json").read_text() == "previous"  # rolled back
    assert not (tmp_path / "other.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json"]
