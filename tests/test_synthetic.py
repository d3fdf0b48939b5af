"""The synthetic decoder runs in onnxruntime and grows linearly with its layers."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qgraph.synthetic import main, synthetic_decoder, write_synthetic_model

VOCAB = 64


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, options, providers=["CPUExecutionProvider"])
    return session.run(["logits"], feeds)[0]


def token_ids(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int64)


@pytest.mark.parametrize("opset", [18, 23])
def test_two_layers_run_with_finite_logits_of_the_right_shape(opset):
    model = synthetic_decoder(2, vocab=VOCAB, opset=opset)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for batch, seq in [(1, 1), (2, 7)]:  # symbolic dims take any size
        logits = run(model, {"input_ids": token_ids(batch, seq)})
        assert logits.shape == (batch, seq, VOCAB)
        assert np.isfinite(logits).all()
    assert [d if isinstance(d, int) else d.value for d in model.graph.outputs[0].shape] == ["batch", "seq", VOCAB]


def test_causal_mask_hides_later_tokens():
    model = synthetic_decoder(2, vocab=VOCAB)
    ids = token_ids(2, 6)
    changed = ids.copy()
    changed[:, 4:] = (changed[:, 4:] + 1) % VOCAB
    a = run(model, {"input_ids": ids})
    b = run(model, {"input_ids": changed})
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert not np.allclose(a[:, 4:], b[:, 4:])


def test_additive_mask_input_without_casts_and_without_gqa():
    model = synthetic_decoder(2, vocab=VOCAB, mask="additive", casts=False, kv_heads=4)
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Cast"] == 1 and ops["Expand"] == 1  # only the positions' Cast/Expand remain
    causal = np.triu(np.full((5, 5), np.finfo(np.float32).min, np.float32), 1)[None, None]
    logits = run(model, {"input_ids": token_ids(2, 5), "attention_mask": np.repeat(causal, 2, axis=0)})
    assert logits.shape == (2, 5, VOCAB) and np.isfinite(logits).all()


def test_node_count_grows_linearly_with_layers():
    counts = [len(synthetic_decoder(n, vocab=VOCAB).graph) for n in range(4)]
    per_layer = counts[1] - counts[0]
    assert per_layer > 0
    assert [b - a for a, b in itertools.pairwise(counts)] == [per_layer] * 3
    ops = collections.Counter(n.op_type for n in synthetic_decoder(3).graph)
    assert ops["ReduceMean"] == 2 * 3 + 1 and ops["Softmax"] == 3 and ops["Sigmoid"] == 3


def test_same_seed_same_weights_and_command_line_writes_a_loadable_model(tmp_path):
    a, b = synthetic_decoder(1, seed=3), synthetic_decoder(1, seed=3)
    for name, value in a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), b.graph.initializers[name].const_value.numpy())
    path = write_synthetic_model(tmp_path / "api.onnx", layers=1, vocab=VOCAB)
    assert len(onnx.load(path).graph.node) == len(synthetic_decoder(1).graph)
    assert main([str(tmp_path / "cli.onnx"), "--layers", "3", "--vocab", str(VOCAB), "--opset", "23"]) == 0
    loaded = onnx.load(tmp_path / "cli.onnx")
    assert loaded.opset_import[0].version == 23
    assert sum(n.op_type == "Softmax" for n in loaded.graph.node) == 3


def test_padding_mask_takes_an_attention_mask_the_kv_cache_pass_can_read():
    """mask="padding": a [batch, seq] attention_mask hides padded keys, and kv-cache caches the graph exactly."""
    from qgraph.manager import PassManager
    from qgraph.verify.sequence import check_sequence_equivalence

    model = synthetic_decoder(2, opset=23, mask="padding")
    assert [v.name for v in model.graph.inputs] == ["input_ids", "attention_mask"]
    reference = ir.to_proto(model)
    cached = ir.from_proto(reference)
    PassManager([{"pass": "kv-cache", "options": {"style": "concat"}}]).run(cached)  # attention first
    result = check_sequence_equivalence(ir.to_proto(cached), reference, examples=8, require_greedy=True)
    assert result.equivalent, str(result)
