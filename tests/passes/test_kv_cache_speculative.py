"""kv-cache's speculative-decoding target (``num_speculative_tokens=K``) on the tiny zoo.

The property (issue 15, section 3): replaying any token sequence through the
target graph -- hypothesis draws tokens, batch, padding side and the split
into chunks -- with ``num_logits_to_keep`` of length n gives, at each of the n
kept columns that holds a valid token, the no-cache graph's logits at that
column. Which columns are kept is QEfficient's rule
(:func:`qgraph.verify.sequence.kept_columns`). Mutants of the gather (no
offset, one column early) must fail the same check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from qgraph import io as qio
from qgraph.errors import BadInputError, QGraphError
from qgraph.export.zoo import TINY_ARCHS
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.verify.sequence import check_sequence_equivalence, kept_columns

DECODERS = [name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"]
CTX_LEN = 12
K = 3
EXAMPLES = 8
MUTANT_EXAMPLES = 60

_made: dict[tuple, tuple[Path, Path, ir.Model]] = {}


def _target(tiny_zoo, tmp_path_factory, arch: str, exporter: str = "dynamo", **options) -> tuple[Path, Path, ir.Model]:
    options = {"style": "retained", "ctx_len": CTX_LEN, "num_speculative_tokens": K, **options}
    key = (arch, exporter, tuple(sorted(options.items())))
    if key not in _made:
        reference = Path(tiny_zoo.export(arch, exporter).model_path)
        model = qio.load(reference)
        PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
        out = tmp_path_factory.mktemp(f"spec-{arch}") / "model.onnx"
        qio.save(model, out)
        _made[key] = (out, reference, model)
    return _made[key]


@pytest.mark.parametrize("arch", DECODERS)
def test_kept_logits_equal_the_no_cache_logits_at_those_positions(tiny_zoo, tmp_path_factory, arch: str) -> None:
    path, reference, _ = _target(tiny_zoo, tmp_path_factory, arch)
    result = check_sequence_equivalence(path, reference, examples=EXAMPLES, require_greedy=True,
                                        logits_to_keep=K + 1)
    assert result.equivalent, str(result)


@pytest.mark.parametrize("n", [1, 2, 6])
def test_one_graph_serves_every_number_of_kept_logits(tiny_zoo, tmp_path_factory, n: int) -> None:
    """Prefill keeps 1, decode K+1; a length beyond the chunk repeats its last column (onnxruntime only)."""
    path, reference, _ = _target(tiny_zoo, tmp_path_factory, "llama")
    result = check_sequence_equivalence(path, reference, examples=EXAMPLES, require_greedy=True, logits_to_keep=n)
    assert result.equivalent, str(result)


def _mutant(model: ir.Model, how: str, folder: Path) -> Path:
    """The target with its kept columns computed wrongly: no offset at all, or one column early."""
    mutant = model.clone()
    (clamp,) = [n for n in mutant.graph if n.outputs[0].name.startswith("kv_cache/kept_columns")]
    columns = clamp.inputs[0].producer()  # Add(lower, steps)
    if how == "no-offset":
        zero = ir.Value(name="mutant_zero", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 1]),
                        const_value=ir.tensor(np.zeros((1, 1), np.int64)))
        mutant.graph.register_initializer(zero)
        columns.replace_input_with(0, zero)
    else:
        one = ir.Value(name="mutant_one", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]),
                       const_value=ir.tensor(np.array(1, np.int64)))
        mutant.graph.register_initializer(one)
        early = ir.node("Sub", [columns.outputs[0], one])
        mutant.graph.insert_after(columns, early)
        clamp.replace_input_with(0, early.outputs[0])
    path = folder / f"mutant-{how}.onnx"
    qio.save(mutant, path)
    return path


@pytest.mark.parametrize("how", ["no-offset", "one-early"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_wrong_gather_fails_the_replay(tiny_zoo, tmp_path_factory, tmp_path, arch: str, how: str) -> None:
    _, reference, model = _target(tiny_zoo, tmp_path_factory, arch)
    path = _mutant(model, how, tmp_path)
    # A wrong offset only shows once a chunk reaches past n columns: more draws than the equivalence tests.
    result = check_sequence_equivalence(path, reference, examples=MUTANT_EXAMPLES, logits_to_keep=K + 1)
    assert not result.equivalent
    assert result.case is not None and result.result is not None and not result.result.passed


def test_interface_and_specializations(tiny_zoo, tmp_path_factory) -> None:
    _, _, model = _target(tiny_zoo, tmp_path_factory, "llama", prefill_len=8)
    keep = next(v for v in model.graph.inputs if v.name == "num_logits_to_keep")
    assert keep.dtype == ir.DataType.INT64 and [str(d) for d in keep.shape] == ["num_logits_to_keep", "1"]
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert [str(d) for d in logits.shape][:2] == ["batch_size", "num_logits_to_keep"]
    specs = json.loads(model.metadata_props[qio.SIDECAR_PREFIX + "specializations.json"])["specializations"]
    assert [s["name"] for s in specs] == ["Prefill", "Decode"]
    prefill, decode = (s["symbols"] for s in specs)
    assert prefill["seq_len"] == "8" and prefill["num_logits_to_keep"] == "1"
    assert decode["seq_len"] == str(K + 1) and decode["num_logits_to_keep"] == str(K + 1)


def test_without_the_option_nothing_changes(tiny_zoo, tmp_path_factory) -> None:
    _, _, model = _target(tiny_zoo, tmp_path_factory, "llama", num_speculative_tokens=0)
    assert "num_logits_to_keep" not in {v.name for v in model.graph.inputs}
    specs = json.loads(model.metadata_props[qio.SIDECAR_PREFIX + "specializations.json"])["specializations"]
    assert all("num_logits_to_keep" not in s["symbols"] for s in specs) and specs[1]["symbols"]["seq_len"] == "1"


@pytest.mark.parametrize(("options", "named"), [
    ({"style": "concat"}, "num_speculative_tokens"),
    ({"logits": "all"}, "num_speculative_tokens"),
    ({"prefill_len": 2}, "prefill_len"),
    ({"num_speculative_tokens": -1}, "num_speculative_tokens"),
    ({"num_speculative_tokens": CTX_LEN}, "num_speculative_tokens"),
])
def test_bad_options_name_the_option(tiny_zoo, options: dict, named: str) -> None:
    model = qio.load(Path(tiny_zoo.export("llama", "dynamo").model_path))
    options = {"style": "retained", "ctx_len": CTX_LEN, "num_speculative_tokens": K, **options}
    with pytest.raises((BadInputError, QGraphError), match=named):
        PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)


def test_kept_columns_rule() -> None:
    """QEfficient's rule on hand-made positions: right padding, left padding, a short row, n past the chunk."""
    positions = np.array([[5, 6, 7, -1], [-1, 0, 1, 2], [0, -1, -1, -1]])
    assert kept_columns(positions, 2).tolist() == [[1, 2], [2, 3], [0, 1]]
    assert kept_columns(positions, 3).tolist() == [[0, 1, 2], [1, 2, 3], [0, 1, 2]]
    assert kept_columns(positions, 6).tolist() == [[0, 1, 2, 3, 3, 3]] * 3
