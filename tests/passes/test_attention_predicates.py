"""The named predicates behind the batched-heads and position-bias checks, each on its own."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from builders import parse
from qgraph_passes.attention_batched import (
    merges_batch_and_heads,
    pins_element_count,
    splits_batch_and_heads,
    unmerge_heads,
)
from qgraph_passes.attention_bias import bias_broadcasts, data_sources, reads_only_mask_and_shapes
from qgraph_passes.attention_dims import elements, product, traced_dim, traced_entry

HEADER = '<ir_version: 11, opset_import: ["" : 23]>\n'


def _model(body: str, inputs: str, outputs: str) -> tuple[ir.Model, dict[str, ir.Value]]:
    model = parse(HEADER + f"g ({inputs}) => ({outputs}) {{\n{body}\n}}")
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for node in model.graph for v in node.outputs})
    return model, values


def _producer(values, name) -> ir.Node:
    return values[name].producer()


def test_traced_dim_reads_reshape_targets_transposes_gathers_and_scalar_factors():
    _, v = _model(
        """
        s = Shape <start = 0, end = 2> (x)
        hd = Constant <value = int64[3] {3, 2, 8}> ()
        t = Concat <axis = 0> (s, hd)
        r = Reshape (x, t)
        i = Constant <value = int64 {0}> ()
        g = Gather <axis = 3> (r, i)
        p = Transpose <perm = [0, 2, 1, 3]> (g)
        c = Constant <value = float {2.0}> ()
        m = Mul (p, c)
        """,
        "float[B, S, 48] x", "float[B, 3, S, 8] m")
    # What onnx shape inference says of a TorchScript export's intermediate values: fresh names.
    v["r"].shape = ir.Shape(["unk__3", "unk__4", 3, 2, 8])
    v["g"].shape = ir.Shape(["unk__3", "unk__4", 3, 8])
    m = v["m"]
    m.shape = ir.Shape(["unk__1", 3, "unk__2", 8])
    assert [traced_dim(m, i) for i in range(4)] == ["B", 3, "S", 8]


def test_traced_dim_falls_back_to_the_inferred_shape():
    _, v = _model("y = Relu (x)", "float[B, 4] x", "float[B, 4] y")
    v["y"].shape = ir.Shape(["N", 4])
    assert traced_dim(v["y"], 0) == "B" and traced_dim(v["x"], 1) == 4


def test_traced_dim_names_a_cache_concat_off_its_axis_as_the_new_part_does():
    """BLOOM through optimum: a later layer's K = Concat(past, new) is named as the new part is, not as the past
    input declares it, so it compares with the query's dims read from the same hidden state's Shape."""
    _, v = _model(
        """
        s = Shape <start = 0, end = 1> (h)
        four = Constant <value = int64[3] {4, -1, 8}> ()
        t = Concat <axis = 0> (s, four)
        r = Reshape (h, t)
        new = Transpose <perm = [0, 2, 1, 3]> (r)
        k = Concat <axis = 2> (past, new)
        """,
        "float[batch, 4, P, 8] past, float[N, S, 32] h", "float[batch, 4, T, 8] k")
    v["h"].shape = ir.Shape(["unk__80", "S", 32])  # a later layer's hidden state, as shape inference names it
    k = v["k"]
    assert [traced_dim(k, i) for i in (0, 1, 3)] == ["unk__80", 4, 8]
    assert traced_dim(k, 2) == "T"  # along the concat axis: the declared length


def test_traced_dim_names_a_reshape_target_read_off_a_projection_as_its_input():
    """BLOOM's fused QKV view reads its batch off the projection's output, whose inferred dims say nothing after
    cleanup; traced through the bias Add and the 2-D weight MatMul it is the hidden state's, as the query's
    merge target reads it (``traced_entry``)."""
    _, v = _model(
        """
        w = Constant <value = float[32, 48] {0.0}> ()
        m = MatMul (h, w)
        bias = Constant <value = float[48] {0.0}> ()
        a = Add (bias, m)
        s = Shape <start = 0, end = 1> (a)
        rest = Constant <value = int64[3] {-1, 3, 16}> ()
        t = Concat <axis = 0> (s, rest)
        r = Reshape (a, t)
        hs = Shape <start = 0, end = 1> (h)
        four = Constant <value = int64[1] {4}> ()
        bh = Mul (hs, four)
        """,
        "float[N, S, 32] h", "float[N, S, 3, 16] r, int64[1] bh")
    for name, rest in (("h", [32]), ("m", [48]), ("a", [48]), ("r", [3, 16])):
        v[name].shape = ir.Shape([None, None, *rest])  # no inferred dims, as after cleanup
    assert traced_dim(v["r"], 0) == (v["h"], 0)
    assert traced_entry(elements(v["bh"])[0]) == product((v["h"], 0), 4)


BHSD = "float[B, 4, S, 8] q"


@pytest.mark.parametrize(("target", "merges"), [
    ("t = Concat <axis = 0> (bh, sd)", True),                       # [B*4, S, 8]
    ("t = Concat <axis = 0> (bh, m1, d)", True),                    # [B*4, -1, 8]
    ("t = Concat <axis = 0> (m1, sd)", True),                       # [-1, S, 8]
    ("t = Concat <axis = 0> (b, h4s, d)", False),                   # [B, 4*S... wrong merge
    ("t = Concat <axis = 0> (bh, d, m1)", False),                   # [B*4, 8, -1]: a transpose by view
])
def test_unmerge_heads_accepts_only_views_that_merge_batch_and_heads(target, merges):
    _, v = _model(
        f"""
        b = Shape <start = 0, end = 1> (q)
        four = Constant <value = int64[1] {{4}}> ()
        bh = Mul (b, four)
        sd = Shape <start = 2, end = 4> (q)
        d = Constant <value = int64[1] {{8}}> ()
        m1 = Constant <value = int64[1] {{-1}}> ()
        s = Shape <start = 2, end = 3> (q)
        h4s = Mul (s, four)
        {target}
        q3 = Reshape (q, t)
        """, BHSD, "float[N, L, E] q3")
    result = unmerge_heads(v["q3"], "query")
    assert (result is v["q"]) == merges, result


def test_unmerge_heads_names_a_non_reshape_producer():
    _, v = _model("q3 = Relu (q)", "float[N, S, 8] q", "float[N, S, 8] q3")
    assert "not a Reshape" in unmerge_heads(v["q3"], "query")


def _view(dims: str, name: str = "v") -> tuple[ir.Node, dict]:
    model, v = _model(f"t = Constant <value = int64[{dims.count(',') + 1}] {{{dims}}}> ()\n{name} = Reshape (x, t)",
                      "float[N, 3, 5] x", f"float[M] {name}")
    return _producer(v, name), v


def test_scores_and_probabilities_views_split_and_merge_batch_then_heads():
    b, h, s, t = 2, 4, 3, 5
    assert splits_batch_and_heads(_view("2, 4, 3, -1")[0], b, h, s, t) is None
    assert splits_batch_and_heads(_view("-1, 4, 3, 5")[0], b, h, s, t) is None
    assert "does not split" in splits_batch_and_heads(_view("4, 2, 3, 5")[0], b, h, s, t)
    assert "does not split" in splits_batch_and_heads(_view("2, 4, -1, -1")[0], b, h, s, t)
    assert merges_batch_and_heads(_view("8, 3, -1")[0], b, h, s, t) is None
    assert merges_batch_and_heads(_view("-1, 3, 5")[0], b, h, s, t) is None
    assert "does not merge" in merges_batch_and_heads(_view("8, 5, 3")[0], b, h, s, t)


def test_only_a_view_with_its_wildcard_on_the_keys_pins_the_element_count():
    assert pins_element_count(_view("8, 3, -1")[0])
    assert pins_element_count(_view("8, 3, 5")[0])
    assert not pins_element_count(_view("-1, 3, 5")[0])
    assert not pins_element_count(_view("8, -1, 5")[0])


POSITIONS = """
    mf = Cast <to = 1> (attention_mask)
    one = Constant <value = int64 {1}> ()
    c = CumSum (mf, one)
    keep = Cast <to = 9> (attention_mask)
    ids = Cast <to = 1> (input_ids)
    n = Shape (q)
    nf = Cast <to = 1> (n)
    from_shape = Mul (nf, nf)
    from_q = ReduceMean (q)
    mixed = Add (c, ids)
    y = Identity (q)
"""
INPUTS = "int64[B, T] attention_mask, int64[B, T] input_ids, float[B, 4, S, 8] q"


def test_data_sources_stop_at_shapes_and_constants():
    _, v = _model(POSITIONS, INPUTS, "float[B, 4, S, 8] y")
    assert data_sources([v["c"]]) == {v["attention_mask"]}
    assert data_sources([v["from_shape"]]) == set()
    assert data_sources([v["mixed"]]) == {v["attention_mask"], v["input_ids"]}


@pytest.mark.parametrize(("bias", "mask", "why"), [
    ("c", "keep", None),                        # ALiBi positions from the mask the exporter's mask reads
    ("from_shape", None, None),                 # shapes only: fine even without a mask
    ("c", None, "which the attention mask does not read"),
    ("ids", "keep", "input_ids"),               # token data
    ("mixed", "keep", "input_ids"),
    ("from_q", "keep", "reads float data"),     # hidden states / Q
])
def test_a_position_bias_reads_only_the_mask_and_shapes(bias, mask, why):
    _, v = _model(POSITIONS, INPUTS, "float[B, 4, S, 8] y")
    reason = reads_only_mask_and_shapes(v[bias], v[mask] if mask else None)
    assert (reason is None) if why is None else (why in reason), reason


def test_a_bias_may_not_stretch_the_scores_unless_the_graph_pins_their_size():
    _, v = _model("y = Identity (x)", "float[N, 1, T] x, float[N, 7, T] wide", "float[N, 1, T] y")
    scores = [product("B", 4), "S", "T"]
    assert bias_broadcasts(v["x"], ["N", "S", "T"]) is None
    assert "dim 0" in bias_broadcasts(v["x"], ["M", "S", "T"])
    # 4*B is provably above 1: an Add with N there keeps it or fails, it never stretches it.
    assert bias_broadcasts(v["x"], [product("B", 4), "S", "T"]) is None
    assert bias_broadcasts(v["x"], ["N", 1, "T"]) is None
    assert "dim 1" in bias_broadcasts(v["wide"], ["N", "S", "T"])
    assert bias_broadcasts(v["wide"], scores, count_pinned=True) is None
    assert "more than" in bias_broadcasts(v["wide"], scores[1:])


def test_a_bias_may_differ_on_the_keys_axis_only_when_the_keys_are_contracted_next():
    _, v = _model("y = Identity (x)", "float[B, 4, 1, L] x", "float[B, 4, 1, L] y")
    scores = ["B", 4, "S", "T"]
    assert "dim 3" in bias_broadcasts(v["x"], scores)
    assert bias_broadcasts(v["x"], scores, keys_contracted=True) is None
    assert "dim 0" in bias_broadcasts(v["x"], ["N", 4, "S", "T"], keys_contracted=True)
