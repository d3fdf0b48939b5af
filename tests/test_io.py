"""Tests of qgraph.io: every input kind, every bad input, atomic and safe saving, laziness."""

from __future__ import annotations

import builtins
import io as pyio
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnx_ir as ir
import onnxruntime as ort
import pytest
from model_builders import (
    initializer_arrays,
    mlp_model,
    model_with_external_data,
    model_with_function,
    model_with_subgraph,
    save_with_external_data,
)
from onnx import TensorProto, helper, numpy_helper

from qgraph import io as qio
from qgraph.errors import BadInputError

# ---------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_symlink()
    }


def values(model: ir.Model) -> dict[str, np.ndarray]:
    """Initializer values of every graph, keyed by name (reads external data)."""
    return {
        name: np.array(value.const_value.numpy())
        for graph in model.graphs()
        for name, value in graph.initializers.items()
    }


def assert_same_model(a: ir.Model, b: ir.Model) -> None:
    assert [(n.domain, n.op_type, n.name) for n in a.graph] == [
        (n.domain, n.op_type, n.name) for n in b.graph
    ]
    assert [v.name for v in a.graph.inputs] == [v.name for v in b.graph.inputs]
    assert [v.name for v in a.graph.outputs] == [v.name for v in b.graph.outputs]
    va, vb = values(a), values(b)
    assert va.keys() == vb.keys()
    for name in va:
        assert va[name].dtype == vb[name].dtype
        np.testing.assert_array_equal(va[name], vb[name], err_msg=name)


def rewrite_external(path: Path, tensor: str, **fields: object) -> None:
    """Change the external-data entries (location/offset/length) of one initializer."""
    proto = onnx.load(str(path), load_external_data=False)
    for init in proto.graph.initializer:
        if init.name == tensor:
            entries = {e.key: e.value for e in init.external_data}
            entries.update({k: str(v) for k, v in fields.items()})
            del init.external_data[:]
            for key, value in entries.items():
                entry = init.external_data.add()
                entry.key, entry.value = key, value
    path.write_bytes(proto.SerializeToString())


def big_mlp() -> onnx.ModelProto:
    """Weights above EXTERNAL_TENSOR_THRESHOLD_BYTES (W1, W2) and below it (b1, b2)."""
    return mlp_model(in_features=32, hidden=64, out_features=16)


def run(model_path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


# ------------------------------------------------------------------ input kinds


def test_load_path_str_and_pathlike(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp_model(), str(path))
    for source in (str(path), path):
        model = qio.load(source)
        assert isinstance(model, ir.Model)
        assert [n.op_type for n in model.graph] == ["MatMul", "Add", "Relu", "MatMul", "Add"]
        for name, expected in initializer_arrays(mlp_model()).items():
            np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), expected)


def test_ir_model_is_returned_as_is() -> None:
    model = ir.serde.deserialize_model(mlp_model())
    assert qio.load(model) is model
    other = ir.serde.deserialize_model(mlp_model(seed=5))
    assert qio.to_kind_of(other, model) is other


@pytest.mark.parametrize("kind", ["bytes", "proto", "ir", "gs", "path"])
def test_round_trip_gives_back_the_same_kind(kind: str, tmp_path: Path) -> None:
    proto = big_mlp()
    reference = ir.serde.deserialize_model(proto)
    if kind == "bytes":
        source: object = proto.SerializeToString()
    elif kind == "proto":
        source = proto
    elif kind == "ir":
        source = ir.serde.deserialize_model(proto)
    elif kind == "gs":
        source = gs.import_onnx(proto)
    else:
        source = tmp_path / "in.onnx"
        onnx.save(proto, str(source))

    model = qio.load(source)
    assert_same_model(model, reference)
    output = tmp_path / "out.onnx"
    result = qio.to_kind_of(model, source, output=output)

    expected_type = {"bytes": bytes, "proto": onnx.ModelProto, "ir": ir.Model, "gs": gs.Graph, "path": Path}
    assert isinstance(result, expected_type[kind])
    if kind == "path":
        assert result == output.resolve() and output.exists()
    assert_same_model(qio.load(result), reference)


def test_gs_graph_round_trip_keeps_values() -> None:
    graph = gs.import_onnx(mlp_model())
    back = qio.to_kind_of(qio.load(graph), graph)
    assert isinstance(back, gs.Graph)
    assert [n.op for n in back.nodes] == [n.op for n in graph.nodes]
    original = {name: t.values for name, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    returned = {name: t.values for name, t in back.tensors().items() if isinstance(t, gs.Constant)}
    assert original.keys() == returned.keys()
    for name in original:
        np.testing.assert_array_equal(original[name], returned[name])


def test_bytes_and_proto_results_carry_external_data_inline(tmp_path: Path) -> None:
    model = qio.load(model_with_external_data(tmp_path))
    for like in (b"", onnx.ModelProto()):
        result = qio.to_kind_of(model, like)
        proto = result if isinstance(result, onnx.ModelProto) else onnx.load_from_string(result)
        assert all(t.data_location != TensorProto.EXTERNAL for t in proto.graph.initializer)
        assert_same_model(qio.load(result), model)
    # ...and the model itself is still lazily backed afterwards
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def test_to_bytes_refuses_a_model_over_the_protobuf_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qio, "_PROTOBUF_LIMIT_BYTES", 100)
    with pytest.raises(BadInputError, match="2 GiB"):
        qio.to_bytes(qio.load(mlp_model()))


def test_path_result_requires_output_and_protects_the_input(tmp_path: Path) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(mlp_model(), str(path))
    model = qio.load(path)
    with pytest.raises(ValueError, match="output="):
        qio.to_kind_of(model, path)
    before = snapshot(tmp_path)
    # the model came in from bytes, so only `protect` knows the input path
    from_bytes = qio.load(path.read_bytes())
    with pytest.raises(BadInputError, match="in.onnx"):
        qio.to_kind_of(from_bytes, str(path), output=tmp_path / "." / "in.onnx")
    assert snapshot(tmp_path) == before


def test_unsupported_source_type_is_bad_input() -> None:
    with pytest.raises(BadInputError, match="dict"):
        qio.load({"not": "a model"})  # type: ignore[arg-type]


# ------------------------------------------------------------- bad input files


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(BadInputError, match="nope.onnx: no such file"):
        qio.load(missing)
    assert snapshot(tmp_path) == {}


def test_folder_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(BadInputError, match="is a folder"):
        qio.load(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, this is not an onnx file\n" * 4, *(np.random.default_rng(s).bytes(256) for s in range(8))],
    ids=["empty", "text", *(f"random{s}" for s in range(8))],
)
def test_non_onnx_files_are_rejected(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="junk.onnx"):
        qio.load(path)
    assert snapshot(tmp_path) == {"junk.onnx": content}


@pytest.mark.parametrize("builder", [mlp_model, model_with_subgraph], ids=["mlp", "subgraph"])
def test_every_truncation_is_rejected(builder, tmp_path: Path) -> None:
    """Every strict prefix of a model file, including those protobuf parses
    without complaint (cuts that drop the opset imports or the graph)."""
    data = builder().SerializeToString()
    path = tmp_path / "cut.onnx"
    silently_parsed = 0
    for cut in range(len(data)):
        try:
            onnx.ModelProto.FromString(data[:cut])
            silently_parsed += 1
        except Exception:
            pass
        path.write_bytes(data[:cut])
        with pytest.raises(BadInputError, match="cut.onnx"):
            qio.load(path)
        with pytest.raises(BadInputError, match="the given bytes"):
            qio.load(data[:cut])
    # the test is only meaningful if some prefixes do fool protobuf
    assert silently_parsed >= 3
    path.write_bytes(data)
    qio.load(path)  # the whole file is fine


def test_truncation_that_drops_functions_never_passes_silently(tmp_path: Path) -> None:
    """Functions come last in the file; a cut that drops all of them leaves a
    node calling an op nobody defines -- legitimate for device custom ops,
    so it is a warning, but never silence."""
    data = model_with_function().SerializeToString()
    loaded_with_warning = 0
    for cut in range(len(data)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                qio.load(data[:cut])
            except BadInputError:
                continue
        assert any("ScaledAdd" in str(w.message) for w in caught), f"cut at {cut} loaded silently"
        loaded_with_warning += 1
    assert loaded_with_warning == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qio.load(data)  # the whole model resolves its function: no warning


def test_model_without_graph_or_opsets_is_rejected() -> None:
    no_graph = onnx.ModelProto(ir_version=8, opset_import=[helper.make_opsetid("", 17)])
    with pytest.raises(BadInputError, match="has no graph"):
        qio.load(no_graph)
    no_opsets = mlp_model()
    del no_opsets.opset_import[:]
    with pytest.raises(BadInputError, match="imports no opset"):
        qio.load(no_opsets.SerializeToString())


def test_runtime_ops_load_quietly_and_bare_custom_ops_warn() -> None:
    def single_op_model(domain: str, op: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node(op, ["x"], ["y"], domain=domain)],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
        )

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qio.load(single_op_model("com.microsoft", "FastGelu"))  # onnxruntime implements it
    with pytest.warns(UserWarning, match="com.qti.aisw.onnx::CustomRMSNorm"):
        model = qio.load(single_op_model("com.qti.aisw.onnx", "CustomRMSNorm"))
    assert [n.op_type for n in model.graph] == ["CustomRMSNorm"]


def test_undefined_name_is_rejected_naming_it() -> None:
    proto = mlp_model()
    proto.graph.node[2].input[0] = "ghost"
    with pytest.raises(BadInputError, match="'ghost'"):
        qio.load(proto)


def test_undefined_graph_output_is_rejected() -> None:
    proto = mlp_model()
    proto.graph.output[0].name = "nowhere"
    with pytest.raises(BadInputError, match="'nowhere'"):
        qio.load(proto)


def test_node_in_unimported_domain_is_rejected() -> None:
    proto = model_with_function()
    del proto.opset_import[1]
    with pytest.raises(BadInputError, match="com.example.qgraph"):
        qio.load(proto)


# ------------------------------------------------------------ bad external data


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    (tmp_path / "model.onnx.data").unlink()
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError) as error:
        qio.load(path)
    message = str(error.value)
    assert "model.onnx" in message and "'W1'" in message and "model.onnx.data" in message
    assert "does not exist" in message
    assert snapshot(tmp_path) == before


def test_missing_external_data_in_a_subgraph_names_the_tensor(tmp_path: Path) -> None:
    path = save_with_external_data(model_with_subgraph(), tmp_path / "sub.onnx")
    (tmp_path / "sub.onnx.data").unlink()
    with pytest.raises(BadInputError, match=r"initializer '[TE]' of subgraph '(then|else)'.*sub\.onnx\.data"):
        qio.load(path)


def test_external_data_in_a_tensor_attribute_is_checked(tmp_path: Path) -> None:
    weights = numpy_helper.from_array(np.arange(512, dtype=np.float32), "k")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value=weights, name="const"),
         helper.make_node("Add", ["x", "c"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "attr.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="attr.data",
                    size_threshold=0, convert_attribute=True)
    model = qio.load(path)
    attr = next(iter(model.graph)).attributes["value"].value
    assert isinstance(attr, ir.ExternalTensor)

    # saved elsewhere, in either mode, the attribute's data travels with it
    other = tmp_path / "elsewhere"
    other.mkdir()
    x = np.ones(512, dtype=np.float32)
    for mode in (False, True):
        saved = qio.save(model, other / f"out{int(mode)}.onnx", external_data=mode)
        np.testing.assert_array_equal(run(saved, x), x + np.arange(512, dtype=np.float32))

    (tmp_path / "attr.data").unlink()
    with pytest.raises(BadInputError, match="attribute 'value' of node 'const'"):
        qio.load(path)


@pytest.mark.parametrize(
    "location, reason",
    [
        ("/etc/passwd", "an absolute path"),
        ("../outside.data", "it points outside the model's folder"),
        ("sub/../../outside.data", "it points outside the model's folder"),
    ],
    ids=["absolute", "dotdot", "nested-dotdot"],
)
def test_external_data_outside_the_model_folder(location: str, reason: str, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = model_with_external_data(folder)
    (tmp_path / "outside.data").write_bytes((folder / "model.onnx.data").read_bytes())
    rewrite_external(path, "W1", location=location)
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match=rf"model\.onnx: initializer 'W1' .*: {reason}"):
        qio.load(path)
    assert snapshot(tmp_path) == before


def test_external_data_symlink_escaping_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    path = model_with_external_data(folder)
    outside = tmp_path / "real.data"
    (folder / "model.onnx.data").rename(outside)
    (folder / "model.onnx.data").symlink_to(outside)
    with pytest.raises(BadInputError, match="symbolic link"):
        qio.load(path)


def test_subfolder_location_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "weights").mkdir()
    path = save_with_external_data(mlp_model(), tmp_path / "m.onnx", location="weights/m.data")
    model = qio.load(path)
    assert_same_model(model, ir.serde.deserialize_model(mlp_model()))


def test_external_data_beyond_the_end_of_the_file(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    data = tmp_path / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-4])  # the last tensor loses one float
    with pytest.raises(BadInputError, match=r"'b2'.*beyond the end"):
        qio.load(path)


def test_external_offset_beyond_the_file(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    size = (tmp_path / "model.onnx.data").stat().st_size
    rewrite_external(path, "b1", offset=size)
    with pytest.raises(BadInputError, match=r"'b1'.*beyond the end"):
        qio.load(path)


def test_external_length_too_small_for_the_shape(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    rewrite_external(path, "W1", length=4)
    with pytest.raises(BadInputError, match=r"'W1'.*length 4 is smaller"):
        qio.load(path)


def test_hard_linked_data_file_is_reported_at_load(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    os.link(tmp_path / "model.onnx.data", tmp_path / "copy.data")
    with pytest.raises(BadInputError, match="hard links"):
        qio.load(path)


def test_in_memory_model_with_external_data_needs_base_dir(tmp_path: Path) -> None:
    path = model_with_external_data(tmp_path)
    data = path.read_bytes()
    with pytest.raises(BadInputError, match=r"'W1'.*base_dir"):
        qio.load(data)
    model = qio.load(data, base_dir=tmp_path)
    assert_same_model(model, ir.serde.deserialize_model(mlp_model()))


# ----------------------------------------------------------------------- laziness


def test_loading_does_not_read_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_with_external_data(tmp_path)
    data_file = os.path.realpath(tmp_path / "model.onnx.data")
    opened: list[str] = []

    def spy(original):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.path.realpath(file) == data_file:
                opened.append(os.fspath(file))
            return original(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(pyio, "open", spy(pyio.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    model = qio.load(path)
    assert opened == []
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    assert all(t.raw is None for t in tensors)  # nothing mapped yet

    # the values come from disk when first used: change the file after loading
    w1 = model.graph.initializers["W1"].const_value
    raw = bytearray(Path(data_file).read_bytes())
    raw[w1.offset : w1.offset + 4] = np.float32(1234.5).tobytes()
    monkeypatch.undo()
    Path(data_file).write_bytes(bytes(raw))
    assert w1.numpy().flat[0] == np.float32(1234.5)


def test_relative_load_survives_a_change_of_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_with_external_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = qio.load("model.onnx")
    monkeypatch.chdir("/")
    assert_same_model(model, ir.serde.deserialize_model(mlp_model()))


def test_files_read_by(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = model_with_external_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = qio.load("./model.onnx")
    real = Path(os.path.realpath(tmp_path))
    assert qio.files_read_by(model) == {real / "model.onnx", real / "model.onnx.data"}
    assert qio.files_read_by(qio.load(mlp_model())) == set()
    assert path.exists()


# --------------------------------------------------------------------------- save


def external_locations(path: Path) -> dict[str, str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {
        t.name: {e.key: e.value for e in t.external_data}["location"]
        for t in proto.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def test_save_inline_from_a_lazily_backed_model(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    model = qio.load(save_with_external_data(big_mlp(), source / "m.onnx"))
    out = tmp_path / "out.onnx"
    assert qio.save(model, out, external_data=False) == out.resolve()
    assert external_locations(out) == {}
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "src"]
    assert_same_model(qio.load(out), model)


def test_save_with_external_data_records_the_final_name(tmp_path: Path) -> None:
    model = qio.load(big_mlp())
    out = tmp_path / "out.onnx"
    qio.save(model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    # large tensors go to the data file under its bare final name; small ones stay inline
    assert external_locations(out) == {"W1": "out.onnx.data", "W2": "out.onnx.data"}
    loaded = qio.load(out)
    assert isinstance(loaded.graph.initializers["W1"].const_value, ir.ExternalTensor)
    assert_same_model(loaded, model)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    reference = tmp_path / "reference.onnx"
    onnx.save(big_mlp(), str(reference))
    np.testing.assert_array_equal(run(out, x), run(reference, x))


def test_lazy_model_saved_elsewhere_stays_valid(tmp_path: Path) -> None:
    """ir.save swaps initializers for external tensors pointing at the data it
    writes -- here inside the temporary folder -- then restores the originals;
    the in-memory model must not be left pointing at a moved or deleted file."""
    source = tmp_path / "src"
    source.mkdir()
    model = qio.load(save_with_external_data(big_mlp(), source / "m.onnx"))
    before = {name: v.const_value for name, v in model.graph.initializers.items()}
    expected = values(model)
    out_folder = tmp_path / "out"
    out_folder.mkdir()
    qio.save(model, out_folder / "m.onnx", external_data=True)
    after = {name: v.const_value for name, v in model.graph.initializers.items()}
    assert all(after[name] is before[name] for name in before)
    for tensor in after.values():
        assert isinstance(tensor, ir.ExternalTensor)
        assert Path(tensor.path).resolve() == (source / "m.onnx.data").resolve()
    for name, array in values(model).items():
        np.testing.assert_array_equal(array, expected[name])
    # save -> load round-trips the values exactly
    assert_same_model(qio.load(out_folder / "m.onnx"), model)


def test_no_empty_data_file_when_every_tensor_is_small(tmp_path: Path) -> None:
    qio.save(qio.load(mlp_model()), tmp_path / "small.onnx", external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]
    assert_same_model(qio.load(tmp_path / "small.onnx"), qio.load(mlp_model()))


@pytest.mark.parametrize("threshold, expect_data", [(10, True), (10**9, False)])
def test_automatic_external_data_threshold(
    threshold: int, expect_data: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qio, "AUTO_EXTERNAL_DATA_BYTES", threshold)
    model = qio.load(big_mlp())
    out = qio.save(model, tmp_path / "auto.onnx")
    assert (tmp_path / "auto.onnx.data").exists() == expect_data
    assert bool(external_locations(out)) == expect_data
    assert_same_model(qio.load(out), model)


def test_inline_save_refuses_a_model_too_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qio, "AUTO_EXTERNAL_DATA_BYTES", 10)
    with pytest.raises(BadInputError, match="external data"):
        qio.save(qio.load(big_mlp()), tmp_path / "x.onnx", external_data=False)
    assert snapshot(tmp_path) == {}


def test_save_into_a_missing_folder_or_onto_a_folder(tmp_path: Path) -> None:
    model = qio.load(mlp_model())
    with pytest.raises(BadInputError, match="does not exist"):
        qio.save(model, tmp_path / "no" / "such" / "m.onnx")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(BadInputError, match="is a folder"):
        qio.save(model, tmp_path / "dir.onnx")
    assert snapshot(tmp_path) == {}


def _existing_destination(tmp_path: Path) -> tuple[ir.Model, Path, dict[str, bytes]]:
    out = tmp_path / "out.onnx"
    qio.save(qio.load(mlp_model(in_features=32, hidden=64, seed=7)), out, external_data=True)
    return qio.load(big_mlp()), out, snapshot(tmp_path)


@pytest.mark.parametrize("external", [False, True])
def test_failed_save_leaves_destination_unchanged(
    external: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, out, before = _existing_destination(tmp_path)
    # ir.save writes external data, qgraph's own streaming writer inline files
    for module, name in ((ir, "save"), (qio, "write_streamed")):
        def save_then_fail(*args, real=getattr(module, name), **kwargs):
            real(*args, **kwargs)  # files fully written in the staging folder...
            raise OSError("disk full")  # ...then the write "fails"

        monkeypatch.setattr(module, name, save_then_fail)
    with pytest.raises(BadInputError, match=r"out\.onnx: cannot write it \(disk full\)"):
        qio.save(model, out, external_data=external)
    assert snapshot(tmp_path) == before  # same files, same bytes, no temporaries


def test_failure_between_data_and_model_replace_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, out, before = _existing_destination(tmp_path)
    real_replace = os.replace

    def fail_on_model(src, dst):
        if Path(dst) == out.resolve():
            raise OSError("cannot replace model")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_model)
    with pytest.raises(BadInputError, match=r"out\.onnx: cannot write it \(cannot replace model\)"):
        qio.save(model, out, external_data=True)
    monkeypatch.undo()
    assert snapshot(tmp_path) == before


def test_failed_first_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def fail_on_model(src, dst):
        if str(dst).endswith("new.onnx"):
            raise OSError("boom")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_model)
    with pytest.raises(BadInputError, match=r"new\.onnx: cannot write it \(boom\)"):
        qio.save(qio.load(big_mlp()), tmp_path / "new.onnx", external_data=True)
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize(
    "spelling",
    ["same", "dot", "dotdot", "symlink"],
)
def test_refuses_to_overwrite_the_input(
    spelling: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = model_with_external_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = qio.load("model.onnx")
    (tmp_path / "sub").mkdir()
    if spelling == "symlink":
        (tmp_path / "link.onnx").symlink_to(path)
    before = snapshot(tmp_path)
    target = {
        "same": "model.onnx",
        "dot": "./model.onnx",
        "dotdot": "sub/../model.onnx",
        "symlink": "link.onnx",
    }[spelling]
    for external in (False, True, None):
        with pytest.raises(BadInputError, match="refusing to write"):
            qio.save(model, target, external_data=external)
    assert snapshot(tmp_path) == before


def test_protect_catches_inputs_the_model_does_not_remember(tmp_path: Path) -> None:
    path = tmp_path / "in.onnx"
    onnx.save(mlp_model(), str(path))
    model = qio.load(path.read_bytes())  # no path recorded
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match="in.onnx"):
        qio.save(model, tmp_path / "x" / ".." / "in.onnx", protect=[str(path)])
    hard = tmp_path / "hard.onnx"
    os.link(path, hard)
    with pytest.raises(BadInputError, match="an input of this run"):
        qio.save(model, hard, protect=[path])
    hard.unlink()
    assert snapshot(tmp_path) == before


def test_refuses_to_overwrite_a_data_file_the_model_reads(tmp_path: Path) -> None:
    # the model's weights live in "out.onnx.data", which is exactly the data
    # file a save to out.onnx with external data would write
    save_with_external_data(big_mlp(), tmp_path / "in.onnx", location="out.onnx.data")
    model = qio.load(tmp_path / "in.onnx")
    before = snapshot(tmp_path)
    with pytest.raises(BadInputError, match="external data file"):
        qio.save(model, tmp_path / "out.onnx", external_data=True)
    assert snapshot(tmp_path) == before
    # an inline save does not touch the data file, so it is allowed
    qio.save(model, tmp_path / "out.onnx", external_data=False)
    assert (tmp_path / "out.onnx.data").read_bytes() == before["out.onnx.data"]
    assert_same_model(qio.load(tmp_path / "out.onnx"), model)


def test_resave_over_previous_output(tmp_path: Path) -> None:
    """Overwriting an earlier output (not an input) is allowed and consistent."""
    model, out, _ = _existing_destination(tmp_path)
    qio.save(model, out, external_data=True)
    assert sorted(os.listdir(tmp_path)) == ["out.onnx", "out.onnx.data"]
    assert_same_model(qio.load(out), model)
