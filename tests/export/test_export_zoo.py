"""The tiny zoo, exported by both exporters: onnxruntime must compute what torch computes.

Every architecture x exporter is checked on batch and sequence sizes other
than the traced one (2 x 16), including 1 x 1 and a sequence longer than the
sliding windows, with left padding for causal LMs and right padding for
encoders. The comparison here is written out in the test (onnxruntime
against the torch module) rather than taken from the library's own check.

Causal LMs are also exported in the ``plain`` wrapper mode (what a user's
plain ``torch.onnx.export(model, (input_ids, attention_mask))`` traces: the
model counts positions itself) and compared with that plain torch module.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from qgraph.export.exporters import EXPORTERS, sample_inputs
from qgraph.export.zoo import TINY_ARCHS, VOCAB

ZOO_CASES = [(arch, exporter) for arch in TINY_ARCHS for exporter in EXPORTERS]
CAUSAL_CASES = [(arch, exporter) for arch, exporter in ZOO_CASES if TINY_ARCHS[arch].task == "causal-lm"]
#: Architectures whose positions are absolute learned embeddings counted by the model from column 0 when it
#: is not given position_ids: under left padding their plain export means something else than the qgraph one.
ABSOLUTE_POSITIONS = ("gpt2", "gpt_bigcode", "gpt_neo")

#: (batch, seq, padding of row 0): none is the traced 2 x 16.
SIZES = [(1, 1, 0), (1, 5, 0), (3, 17, 0), (2, 8, 3), (4, 3, 2), (2, 24, 7)]
RTOL, ATOL = 1e-4, 1e-5


def _feeds(batch: int, seq: int, pad: int, side: str, seed: int) -> dict[str, np.ndarray]:
    return sample_inputs(VOCAB, batch, seq, pad=pad, side=side, seed=seed)


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch(module, feeds) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()


def _assert_close_at_valid_positions(session, module, causal: bool) -> None:
    for index, (batch, seq, pad) in enumerate(SIZES):
        feeds = _feeds(batch, seq, pad, "left" if causal else "right", seed=index)
        (got,) = session.run(None, feeds)
        expected = _torch(module, feeds)
        assert got.shape == expected.shape, (batch, seq)
        if causal:  # padded positions of a causal LM are undefined; the valid ones are not
            valid = feeds["attention_mask"].astype(bool)
            got, expected = got[valid], expected[valid]
        np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"batch={batch} seq={seq} pad={pad}")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), ZOO_CASES)
def test_onnxruntime_equals_torch_for_several_batch_and_sequence_sizes(tiny_zoo, arch, exporter):
    result = tiny_zoo.export(arch, exporter)
    module = tiny_zoo.torch_module(arch)
    _assert_close_at_valid_positions(_session(result.model_path), module, TINY_ARCHS[arch].task == "causal-lm")


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), CAUSAL_CASES)
def test_plain_export_equals_the_plain_torch_model_for_several_batch_and_sequence_sizes(tiny_zoo, arch, exporter):
    """wrapper="plain": the graph computes what the model computes when called with input_ids and mask only."""
    result = tiny_zoo.export(arch, exporter, wrapper="plain")
    assert result.manifest["wrapper"] == "plain"
    _assert_close_at_valid_positions(_session(result.model_path), tiny_zoo.torch_module(arch, wrapper="plain"), True)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), [(a, e) for a, e in CAUSAL_CASES if a in ABSOLUTE_POSITIONS])
def test_plain_export_counts_positions_from_column_0_under_left_padding(tiny_zoo, arch, exporter):
    """The plain mode is honoured: unpadded rows agree with the qgraph export, left-padded rows do not."""
    plain = _session(tiny_zoo.export(arch, exporter, wrapper="plain").model_path)
    qgraph = _session(tiny_zoo.export(arch, exporter).model_path)
    feeds = _feeds(2, 9, 4, "left", seed=11)
    (from_plain,), (from_qgraph,) = plain.run(None, feeds), qgraph.run(None, feeds)
    np.testing.assert_allclose(from_plain[1], from_qgraph[1], rtol=RTOL, atol=ATOL)  # row 1 has no padding
    valid = feeds["attention_mask"][0].astype(bool)
    assert np.abs(from_plain[0][valid] - from_qgraph[0][valid]).max() > 100 * (ATOL + RTOL * np.abs(from_qgraph).max())


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter", "wrapper"),
                         [(a, e, "qgraph") for a, e in ZOO_CASES] + [(a, e, "plain") for a, e in CAUSAL_CASES])
def test_interface_is_the_same_for_every_architecture_exporter_and_wrapper(tiny_zoo, arch, exporter, wrapper):
    result = tiny_zoo.export(arch, exporter, wrapper=wrapper)
    model = onnx.load(result.model_path, load_external_data=False)

    def signature(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    assert signature(model.graph.input) == [
        ("input_ids", onnx.TensorProto.INT64, ["batch", "seq"]),
        ("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"]),
    ]
    if TINY_ARCHS[arch].task == "causal-lm":
        assert signature(model.graph.output) == [("logits", onnx.TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    else:
        assert signature(model.graph.output) == [("sentence_embedding", onnx.TensorProto.FLOAT, ["batch", 64])]
    assert result.manifest["exporter"] == exporter
    assert result.manifest["wrapper"] == (wrapper if TINY_ARCHS[arch].task == "causal-lm" else None)
    assert result.manifest["nodes"] == len(model.graph.node)


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "exporter"), CAUSAL_CASES)
def test_left_padding_does_not_change_the_logits_of_valid_positions(tiny_zoo, arch, exporter):
    """Positions come from the mask: a left-padded row equals the same row unpadded (what a KV cache must reproduce)."""
    session = _session(tiny_zoo.export(arch, exporter).model_path)
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, VOCAB, size=(1, 9), dtype=np.int64)
    (alone,) = session.run(None, {"input_ids": tokens, "attention_mask": np.ones((1, 9), np.int64)})
    for pad in (1, 4):
        padded = np.concatenate([rng.integers(0, VOCAB, size=(1, pad), dtype=np.int64), tokens], axis=1)
        mask = np.concatenate([np.zeros((1, pad), np.int64), np.ones((1, 9), np.int64)], axis=1)
        (got,) = session.run(None, {"input_ids": padded, "attention_mask": mask})
        np.testing.assert_allclose(got[:, pad:], alone, rtol=RTOL, atol=ATOL, err_msg=f"pad={pad}")


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_the_attention_mask_matters_so_the_checks_can_fail(tiny_zoo, arch):
    """The comparisons above would catch a graph that ignores the mask: it changes outputs far beyond tolerance."""
    module = tiny_zoo.torch_module(arch)
    causal = TINY_ARCHS[arch].task == "causal-lm"
    feeds = _feeds(2, 8, 3, "left" if causal else "right", seed=3)
    unmasked = dict(feeds, attention_mask=np.ones_like(feeds["attention_mask"]))
    with_mask, without = _torch(module, feeds), _torch(module, unmasked)
    rows = feeds["attention_mask"].astype(bool)[0] if causal else slice(None)
    assert np.abs(with_mask[0][rows] - without[0][rows]).max() > 100 * (ATOL + RTOL * np.abs(with_mask).max())


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_the_two_exporters_really_produce_different_graphs(tiny_zoo, arch):
    """--exporter is honoured: TorchScript (opset 17) emits far more nodes than dynamo (opset 18)."""
    torchscript, dynamo = tiny_zoo.export(arch, "torchscript"), tiny_zoo.export(arch, "dynamo")
    ts_model = onnx.load(torchscript.model_path, load_external_data=False)
    dy_model = onnx.load(dynamo.model_path, load_external_data=False)
    assert {o.domain: o.version for o in ts_model.opset_import}[""] == 17
    assert {o.domain: o.version for o in dy_model.opset_import}[""] == 18
    assert len(ts_model.graph.node) > 1.5 * len(dy_model.graph.node)


@pytest.mark.slow
def test_the_tokenizer_is_saved_beside_the_model(tiny_zoo):
    from transformers import AutoTokenizer

    result = tiny_zoo.export("llama", "torchscript")
    tokenizer = AutoTokenizer.from_pretrained(result.output_dir, local_files_only=True)
    assert tokenizer("hé").input_ids == list("hé".encode())
    assert (result.output_dir / "config.json").is_file()
    assert result.manifest["tokenizer"] is True
