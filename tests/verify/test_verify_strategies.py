"""The input strategies draw what a transformer graph accepts, and shrink."""

from __future__ import annotations

import mutants
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, find, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as T
from onnx import helper as oh

from qgraph.verify import InputOptions, Role, describe_inputs, input_strategy

FAST = settings(max_examples=60, database=None, deadline=None, suppress_health_check=list(HealthCheck))
FIND = settings(max_examples=300, database=None, deadline=None, suppress_health_check=list(HealthCheck))


def passthrough(*inputs: onnx.ValueInfoProto) -> ir.Model:
    """A model that outputs each input through Identity, for inputs of any signature."""
    nodes = [oh.make_node("Identity", [i.name], [f"{i.name}_out"]) for i in inputs]
    outputs = [oh.make_tensor_value_info(f"{i.name}_out", i.type.tensor_type.elem_type, None) for i in inputs]
    graph = oh.make_graph(nodes, "g", list(inputs), outputs)
    return ir.from_proto(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21)]))


def vi(name: str, elem: int, dims: list) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem, dims)


# --- dims ----------------------------------------------------------------------


def test_a_dim_name_shared_by_inputs_is_drawn_once() -> None:
    model = passthrough(
        vi("a", T.FLOAT, ["batch", "seq"]), vi("b", T.FLOAT, ["batch", 3]), vi("c", T.FLOAT, ["seq", "batch", 2])
    )

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        a, b, c = (example.feeds[n] for n in "abc")
        assert a.shape[0] == b.shape[0] == c.shape[1] == example.dims["batch"]
        assert a.shape[1] == c.shape[0] == example.dims["seq"]
        assert b.shape[1] == 3 and c.shape[2] == 2

    check()


def test_unnamed_dims_are_drawn_independently() -> None:
    model = passthrough(vi("u", T.FLOAT, [None, None]))
    example = find(input_strategy(model), lambda e: e.feeds["u"].shape[0] != e.feeds["u"].shape[1], settings=FIND)
    assert example.feeds["u"].shape[0] != example.feeds["u"].shape[1]


def test_dim_expressions_are_evaluated_from_their_names() -> None:
    model = ir.from_proto(mutants.embedding_model())

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        past, seq = example.dims["past"], example.dims["seq"]
        assert example.feeds["attention_mask"].shape[1] == past + seq
        assert example.feeds["input_ids"].shape[1] == seq

    check()


def test_dims_can_be_fixed_or_bounded_by_name() -> None:
    model = passthrough(vi("a", T.FLOAT, ["batch", "seq"]), vi("z", T.FLOAT, [None]))
    options = InputOptions(dims={"batch": 2, "seq": (3, 4)}, dim_range=(5, 5))

    @FAST
    @given(input_strategy(model, options=options))
    def check(example) -> None:
        assert example.feeds["a"].shape[0] == 2
        assert example.feeds["a"].shape[1] in (3, 4)
        assert example.feeds["z"].shape == (5,)

    check()


# --- token ids -----------------------------------------------------------------


def test_token_ids_stay_below_the_embedding_table_rows() -> None:
    model = ir.from_proto(mutants.embedding_model())
    spec = next(s for s in describe_inputs(model) if s.name == "input_ids")
    assert spec.role is Role.TOKEN_IDS
    assert spec.vocab_size == mutants.VOCAB
    assert "embed_tokens" in spec.vocab_source

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        ids = example.feeds["input_ids"]
        assert ids.dtype == np.int64
        assert ids.min() >= 0 and ids.max() < mutants.VOCAB

    check()
    # The bound is the table's, not a smaller fallback: ids near the top are drawn.
    top = find(input_strategy(model), lambda e: e.feeds["input_ids"].max() == mutants.VOCAB - 1, settings=FIND)
    assert top.feeds["input_ids"].max() == mutants.VOCAB - 1


def test_token_ids_without_a_table_use_the_fallback_or_given_bound() -> None:
    model = passthrough(vi("input_ids", T.INT64, ["batch", "seq"]))
    (spec,) = describe_inputs(model, fallback_vocab_size=7)
    assert spec.role is Role.TOKEN_IDS and spec.vocab_size == 7 and "fallback" in spec.vocab_source

    @FAST
    @given(input_strategy(model, options=InputOptions(vocab_size=3)))
    def check(example) -> None:
        assert example.feeds["input_ids"].max() < 3

    check()


# --- masks and positions ---------------------------------------------------------


def _valid_block_ok(row: np.ndarray, padding: str) -> bool:
    """A row is 0...0 1...1 (left padding) or 1...1 0...0 (right padding)."""
    ones = int(row.sum())
    expected = np.zeros_like(row)
    if padding == "left":
        expected[len(row) - ones :] = 1
    else:
        expected[:ones] = 1
    return bool(np.array_equal(row, expected))


def test_masks_keep_a_valid_token_in_every_row_and_pad_on_one_side() -> None:
    model = ir.from_proto(mutants.embedding_model())

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        mask = example.feeds["attention_mask"]
        assert set(np.unique(mask)) <= {0, 1}
        assert (mask.sum(axis=-1) >= 1).all()
        assert example.padding in ("left", "right")
        for row in mask:
            assert _valid_block_ok(row, example.padding)

    check()


@pytest.mark.parametrize("side, column", [("left", 0), ("right", -1)])
def test_masks_are_drawn_with_left_and_right_padding(side: str, column: int) -> None:
    model = ir.from_proto(mutants.embedding_model())
    example = find(
        input_strategy(model),
        lambda e: e.padding == side and (e.feeds["attention_mask"][:, column] == 0).any(),
        settings=FIND,
    )
    assert example.padding == side
    assert (example.feeds["attention_mask"][:, column] == 0).any()


def test_padding_option_fixes_the_side() -> None:
    model = ir.from_proto(mutants.embedding_model())

    @FAST
    @given(input_strategy(model, options=InputOptions(padding="left")))
    def check(example) -> None:
        assert example.padding == "left"
        assert (example.feeds["attention_mask"][:, -1] == 1).all()

    check()


def test_position_ids_follow_the_mask_like_hugging_face() -> None:
    model = ir.from_proto(mutants.embedding_model())

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        mask = example.feeds["attention_mask"]
        pos = example.feeds["position_ids"]
        seq = pos.shape[1]
        tail = mask[:, -seq:]
        full = np.cumsum(mask, axis=-1) - 1
        assert np.array_equal(pos[tail == 1], full[:, -seq:][tail == 1])
        assert (pos[tail == 0] == 1).all()

    check()


def test_position_ids_without_a_mask_count_valid_tokens_and_mark_padding() -> None:
    model = ir.from_proto(mutants.kv_cache_write())
    spec = next(s for s in describe_inputs(model) if s.name == "position_ids")
    assert spec.role is Role.POSITION_IDS

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        for row in example.feeds["position_ids"]:
            valid = row[row >= 0]
            assert valid.size >= 1
            assert np.array_equal(valid, np.arange(valid.size))
            assert (row[row < 0] == -1).all()
            assert _valid_block_ok((row >= 0).astype(np.int64), example.padding)

    check()
    padded = find(input_strategy(model), lambda e: (e.feeds["position_ids"] == -1).any(), settings=FIND)
    assert (padded.feeds["position_ids"] == -1).any()


# --- floats ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "condition",
    [lambda a: 0 < np.abs(a).max() < 1e-2, lambda a: np.abs(a).max() > 10.0],
    ids=["small", "large"],
)
def test_floats_are_drawn_across_magnitudes(condition) -> None:
    model = passthrough(vi("x", T.FLOAT, ["batch", 8]))
    example = find(input_strategy(model), lambda e: bool(condition(e.feeds["x"])), settings=FIND)
    assert condition(example.feeds["x"])


def test_large_magnitudes_reach_the_fp16_range_and_stay_finite() -> None:
    model = passthrough(vi("h", T.FLOAT16, ["batch", 8]))
    strategy = input_strategy(model, options=InputOptions(large_magnitudes=True))
    example = find(strategy, lambda e: np.abs(e.feeds["h"].astype(np.float32)).max() > 1e4, settings=FIND)
    assert example.feeds["h"].dtype == np.float16
    assert np.isfinite(example.feeds["h"]).all()

    @FAST
    @given(strategy)
    def check(e) -> None:
        assert np.isfinite(e.feeds["h"]).all()

    check()


def test_default_floats_are_not_near_constant() -> None:
    model = passthrough(vi("x", T.FLOAT, [4, 8]))

    @FAST
    @given(input_strategy(model))
    def check(example) -> None:
        assert len(np.unique(example.feeds["x"])) > 8

    check()


# --- overrides ------------------------------------------------------------------


def test_an_input_strategy_can_be_overridden_by_name() -> None:
    model = passthrough(vi("x", T.FLOAT, ["batch", 8]), vi("y", T.FLOAT, ["batch", 2]))
    overrides = {
        "x": lambda shape: st.just(np.full(shape, 7.0)),
        "y": st.just(np.zeros((1, 2), np.float64)),
    }

    @FAST
    @given(input_strategy(model, strategies=overrides))
    def check(example) -> None:
        assert (example.feeds["x"] == 7.0).all() and example.feeds["x"].shape[1] == 8
        assert example.feeds["y"].dtype == np.float32  # coerced to the input's dtype

    check()


def test_overriding_an_unknown_input_is_an_error() -> None:
    model = passthrough(vi("x", T.FLOAT, [2]))
    with pytest.raises(ValueError, match="nope"):
        input_strategy(model, strategies={"nope": st.just(np.zeros(2))})
