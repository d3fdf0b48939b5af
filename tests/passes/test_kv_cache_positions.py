"""The position analysis of the kv-cache pass: every spelling of positions, found by what it computes.

Hypothesis draws how a decoder computes positions -- counted from the chunk
start or from the mask (with OPT's ``* mask``), an offset, int or float, the
broadcast layout ([B, S], [S], [1, S, 1], [1, 1, S]) and whether a
table or a sinusoid reads them -- and the property is the pass's: the
analysis names the value that holds the positions with its count and
offset, and the cached graph (both styles) replays every drawn sequence,
padded on either side, like the no-cache graph.
"""

from __future__ import annotations

import kv_cache_graphs as graphs
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qgraph_passes.kv_cache import KVCachePass
from qgraph_passes.kv_cache.positions import MASK, SHAPE, TOKENS, analyze_positions, dependencies

from qgraph.verify.sequence import check_sequence_equivalence

CTX_LEN = 12


@st.composite
def spellings(draw) -> graphs.PositionSpelling:
    layout = draw(st.sampled_from(["BS", "S", "1S1", "11S"]))
    counts = ["column"] if layout == "S" else ["column", "mask", "mask-times-mask"]
    return graphs.PositionSpelling(
        count=draw(st.sampled_from(counts)),
        offset=draw(st.integers(0, 3)),
        layout=layout,
        dtype=draw(st.sampled_from(["int", "float"])),
        embedding=draw(st.sampled_from(["table", "sinusoid"])),
    )


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.nested_given])
@given(spelling=spellings(), style=st.sampled_from(["retained", "concat"]))
def test_every_spelling_of_positions_is_found_and_replays(spelling: graphs.PositionSpelling, style: str) -> None:
    reference = graphs.decoder(spelling=spelling, layers=1)
    model = ir.from_proto(reference)
    kv = KVCachePass(style=style, ctx_len=CTX_LEN, logits="all")
    kv(model)
    counted = "counted from the chunk start" if spelling.count == "column" else "computed from the attention mask"
    notes = " ".join(kv.report.notes)
    assert f"positions {counted} rewired to position_ids" in notes, notes
    result = check_sequence_equivalence(ir.to_proto(model), reference, examples=6, max_len=CTX_LEN - 1,
                                        require_greedy=True)
    assert result.equivalent, f"{spelling}\n{result}\n{notes}"


def test_the_site_carries_count_offset_and_layout() -> None:
    """OPT's spelling: (cumsum(mask) * mask - 1) + 2, read as a [B, S] table index."""
    spelling = graphs.PositionSpelling(count="mask-times-mask", offset=2, layout="BS", embedding="table")
    model = ir.from_proto(graphs.decoder(spelling=spelling, layers=1))
    inputs = {v.name: v for v in model.graph.inputs}
    analysis = analyze_positions(model, inputs["input_ids"], inputs["attention_mask"])
    assert [(s.semantics, s.offset, s.rank, s.seq_axis, s.batch_axis) for s in analysis.sites] == [("mask", 2, 2, 1, 0)]


def test_dependencies_separate_tokens_mask_values_and_shapes() -> None:
    model = ir.from_proto(graphs.decoder(positions="range", layers=1))
    inputs = {v.name: v for v in model.graph.inputs}
    deps = dependencies(model.graph, inputs["input_ids"], inputs["attention_mask"])
    by_op: dict[str, set[int]] = {}
    for node in model.graph:
        by_op.setdefault(node.op_type, set()).add(deps[node.outputs[0]])
    assert by_op["Shape"] == {SHAPE}  # reads only the size of input_ids
    assert by_op["Range"] == {SHAPE}
    assert by_op["Cast"] == {MASK}  # the mask's values, cast to bool for the attention mask
    assert TOKENS in {deps[o] & TOKENS for o in model.graph.outputs}


@pytest.mark.parametrize("style", ["retained", "concat"])
def test_a_value_computed_from_mask_values_is_refused_naming_it(style: str) -> None:
    from qgraph.errors import PassFailure

    model = ir.from_proto(graphs.decoder(mask_scales_logits=True))
    with pytest.raises(PassFailure, match=r"\(read by Mul 'n\d+_Mul'\) is computed from the attention mask's values"):
        KVCachePass(style=style, ctx_len=CTX_LEN)(model)


@pytest.mark.parametrize("style", ["retained", "concat"])
def test_positions_that_cannot_take_a_batch_axis_become_a_table(style: str) -> None:
    """[S, 1] squeezed back to [S, H]: per-row positions cannot flow through it, so the value is tabulated.

    The sites are restored and the position embedding becomes
    Gather(table, position_ids); the replay proves the table right.
    """
    spelling = graphs.PositionSpelling(count="column", layout="S1", embedding="table")
    reference = graphs.decoder(spelling=spelling, layers=1)
    model = ir.from_proto(reference)
    kv = KVCachePass(style=style, ctx_len=CTX_LEN, logits="all")
    kv(model)
    notes = " ".join(kv.report.notes)
    rows = CTX_LEN if style == "retained" else graphs.POSITIONS  # concat: as many as the graph's table runs
    assert f"became tables of {rows} positions read at position_ids" in notes, notes
    assert "laid out without a batch axis were given one" in notes
    result = check_sequence_equivalence(ir.to_proto(model), reference, examples=10, max_len=CTX_LEN - 1,
                                        require_greedy=True)
    assert result.equivalent, f"{result}\n{notes}"
