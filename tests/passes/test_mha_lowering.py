"""lower-mha: each concat-cache Attention lower-gqa leaves becomes one com.microsoft::MultiHeadAttention.

The meaning kept is the cached graph's own (``meaning = "sequence"``): the
lowered graph, replayed on token sequences hypothesis draws (padded batches
of several rows, left and right padding, a prefill then chunks and decode
steps after a past), gives the logits of the graph it came from. Inputs are
the ``ort-attention`` preset's graphs of the zoo; the pipeline under test is
``lower-gqa`` then ``lower-mha``, so the layers lower-mha sees are exactly
those lower-gqa refused. lower-gqa takes every layer of the zoo with its
default ``mask=bias``; with ``mask=none`` (no attention_bias) it refuses
Bloom's ALiBi, which lower-mha then takes -- that is the pipeline here. Where
a test needs a layer lower-gqa takes either way (GPT-Neo's unscaled scores,
GPT-J's rotations, packed heads), lower-mha runs alone. A lowering broken on
purpose (wrong num_heads, bias dropped, scale wrong) fails ``qgraph optimize
--verify`` with exit code 1; layers that cannot be lowered are named in the
report with the check that failed.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from qgraph_passes.attention_heads import probe_head_layouts

from qgraph import io
from qgraph.cli import main
from qgraph.demo import run_preset
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.registry import default_registry
from qgraph.verify.sequence import ReplayCase, SequenceReplayer, check_sequence_equivalence

# (arch, exporter): MultiHeadAttention nodes after lower-gqa + lower-mha (the zoo's models have 2 layers)
# (GPT-2, OPT, GPT-Neo and GPT-J pack their heads on both exporters: lower-gqa takes every layer, and they
# are lower-mha's cases only alone, in PACKED.)
LOWERED = {
    ("gpt2", "dynamo"): 0,                                       # no rotary; the heads pack: lower-gqa's
    ("phi", "dynamo"): 0, ("phi", "torchscript"): 0,            # partial rotary: lower-gqa takes them, rotary kept
    ("bloom", "dynamo"): 2, ("bloom", "torchscript"): 2,        # ALiBi: lower-gqa's only with mask=bias
    ("gptj", "dynamo"): 0, ("gptj", "torchscript"): 0,          # interleaved partial rotary, packed: lower-gqa's
    ("gemma2", "dynamo"): 0,                                     # soft-capped: lower-gqa takes both layers
}
# (arch, exporter): what the report says of each refused layer. lower-mha runs alone here: GPT-BigCode's
# multi-query layers go to lower-gqa (kv_num_heads 1) when it runs first, as in the ort target.
REFUSED = {
    ("gpt_bigcode", "dynamo"): "q has 4 heads, k 1, v 1",      # multi-query: the cache keeps 1 KV head
    ("gpt_bigcode", "torchscript"): "q has 4 heads, k 1, v 1",  # split heads, read by running the graph
}


# attention-io packed their heads ([B, S, H*D], q_num_heads / kv_num_heads); lower-gqa would take them, lower-mha
# alone takes those whose KV heads are the query heads
PACKED = {("opt", "dynamo"): 2, ("llama", "dynamo"): 0, ("gpt2", "dynamo"): 2, ("gpt2", "torchscript"): 2,
          ("opt", "torchscript"): 2, ("gpt_neo", "dynamo"): 2, ("gpt_neo", "torchscript"): 2,
          ("gptj", "dynamo"): 2, ("gptj", "torchscript"): 2}


@pytest.fixture(scope="module")
def attention_graphs(tiny_zoo, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """The ort-attention preset's graph of each case (what lower-gqa, then lower-mha, take), made once."""
    out = tmp_path_factory.mktemp("ort-attention-graphs")
    graphs = {}
    for arch, exporter in [*LOWERED, *REFUSED, *PACKED]:
        run = run_preset("ort-attention", tiny_zoo.export(arch, exporter).output_dir, out / f"{arch}-{exporter}",
                         default_registry())
        graphs[(arch, exporter)] = run.folder / "model.onnx"
    return graphs


def _lower(path: Path) -> tuple[ir.Model, object]:
    model = io.load(path)
    report = PassManager([("lower-gqa", {"mask": "none"}), "lower-mha"]).run(model)
    return model, report


def _lower_alone(path: Path) -> tuple[ir.Model, object]:
    """lower-mha without lower-gqa in front: it then also sees the layers lower-gqa would take."""
    model = io.load(path)
    report = PassManager(["lower-mha"]).run(model)
    return model, report


def _mha_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if (n.domain, n.op_type) == ("com.microsoft", "MultiHeadAttention")]


@pytest.mark.parametrize(("arch", "exporter"), sorted(LOWERED))
def test_lowered_graph_replays_the_concat_graph(attention_graphs, arch, exporter) -> None:
    source = attention_graphs[(arch, exporter)]
    model, _ = _lower(source)
    mha = _mha_nodes(model)
    assert len(mha) == LOWERED[(arch, exporter)]
    assert not [n for n in model.graph if n.op_type == "Attention"]  # every layer is one fused node now
    names = {v.name for v in model.graph.outputs}
    assert {o.name for n in mha for o in n.outputs[1:3]} <= names  # present.* are the kernel's own outputs
    assert {n.inputs[6].name for n in mha} | {n.inputs[7].name for n in mha} <= {v.name for v in model.graph.inputs}
    result = check_sequence_equivalence(model, source, examples=12, seed=3, max_len=10)
    assert result.equivalent, str(result)


@pytest.mark.parametrize(("arch", "exporter", "alone"), [("bloom", "dynamo", False), ("bloom", "torchscript", False),
                                                         ("gptj", "torchscript", True)])
def test_padded_batch_and_chunks_after_a_past(attention_graphs, arch, exporter, alone) -> None:
    """A left-padded batch of two, a prefill of 3, a chunk of 3 after it, then single-token decode steps (GPT-J's
    rotated layers go to lower-gqa in the presets; lower-mha alone takes them here)."""
    source = attention_graphs[(arch, exporter)]
    model, _ = (_lower_alone if alone else _lower)(source)
    assert len(_mha_nodes(model)) == 2
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 256, size=(2, 8))
    valid = np.ones((2, 8), bool)
    valid[1, :3] = False  # row 1 starts 3 tokens later: its padding sits in the prefill's columns
    with SequenceReplayer(model, source) as replayer:
        result = replayer.run(ReplayCase(tokens, valid, (3, 3, 1, 1), "left"))
    assert [s.kind for s in result.steps] == ["prefill", "chunk", "decode", "decode"]
    assert result.passed, str(result)


def test_one_bias_for_all_layers_and_the_models_own_heads(attention_graphs) -> None:
    """gpt-neo (torchscript, unscaled attention; lower-mha alone, lower-gqa would take it): each bool mask
    becomes one additive bias, shared by the layers that read it (a global and a local one here); the
    packed heads go in as they are, and no head transpose is added."""
    before = io.load(attention_graphs[("gpt_neo", "torchscript")])
    masks = {n.inputs[3].name for n in before.graph if n.op_type == "Attention"}
    operands = [[x.name for x in n.inputs[:3]] for n in before.graph if n.op_type == "Attention"]
    model, _ = _lower_alone(attention_graphs[("gpt_neo", "torchscript")])
    mha = _mha_nodes(model)
    biases = {n.inputs[5] for n in mha}
    assert len(masks) == 2 and len(biases) == len(masks)
    assert all(b.producer().op_type == "Where" for b in biases)
    assert [[x.name for x in n.inputs[:3]] for n in mha] == operands
    for node in mha:
        assert node.attributes["num_heads"].value == 4 and node.attributes["scale"].value == 1.0
        assert [u.node.op_type for u in node.outputs[0].uses()] == ["MatMul"]  # the output projection
    heads = [n for n in model.graph if n.op_type == "Transpose" and list(n.attributes["perm"].value) == [0, 2, 1, 3]]
    assert not heads


def test_an_additive_mask_goes_in_as_it_is(attention_graphs) -> None:
    """bloom: the mask already carries ALiBi's per-head slopes (float [B, H, S, T]); it is the bias itself."""
    before = io.load(attention_graphs[("bloom", "dynamo")])
    masks = {n.inputs[3].name for n in before.graph if n.op_type == "Attention"}
    model, _ = _lower(attention_graphs[("bloom", "dynamo")])
    assert {n.inputs[5].name for n in _mha_nodes(model)} == masks
    assert not [n for n in model.graph if n.op_type == "Where" and n.name.startswith("lower_mha")]


@pytest.mark.parametrize(("arch", "exporter"), sorted(REFUSED))
def test_layers_not_lowered_are_reported(attention_graphs, arch, exporter) -> None:
    model = io.load(attention_graphs[(arch, exporter)])
    report = PassManager(["lower-mha"]).run(model)
    record = next(r for r in report.passes if r.name == "lower-mha")
    assert not record.changed and not _mha_nodes(model)
    attentions = [n.name for n in model.graph if n.op_type == "Attention"]
    notes = [n for n in record.notes if "not lowered" in n]
    assert len(notes) == len(attentions) == 2
    why = REFUSED[(arch, exporter)]
    assert all(why in note for note in notes) and all(any(a in note for note in notes) for a in attentions)
    assert record.near_misses["multi-head-attention"]["candidates"] == 2  # the table's "near miss" line


def test_a_soft_capped_layer_is_refused(attention_graphs) -> None:
    """MultiHeadAttention has no softcap: GPT-2's TorchScript layers (which it lowers alone) soft-capped stay
    Attention."""
    model = io.load(attention_graphs[("gpt2", "torchscript")])
    for node in model.graph:
        if node.op_type == "Attention":
            node.attributes["softcap"] = ir.AttrFloat32("softcap", 30.0)
    report = PassManager(["lower-mha"]).run(model)
    record = next(r for r in report.passes if r.name == "lower-mha")
    assert not record.changed and not _mha_nodes(model)
    notes = [n for n in record.notes if "not lowered" in n]
    assert len(notes) == 2 and all("softcap 30.0 (MultiHeadAttention has no soft-capping)" in n for n in notes), notes


def test_heads_of_split_operands_are_read_by_running(tiny_zoo) -> None:
    """TorchScript's heads before attention-io packs them (it now packs every zoo row's, so this stops in front
    of it): running the graph tells 4 query heads from 1 KV head (gpt_bigcode, multi-query), 4 / 4 (bloom, whose
    q shape is not declared at all)."""
    steps = Pipeline.from_preset("ort-attention", default_registry()).steps
    before_io = steps[: [getattr(step, "name", None) for step in steps].index("attention-io")]
    for arch, heads in (("gpt_bigcode", (4, 1, 1)), ("bloom", (4, 4, 4))):
        model = io.load(tiny_zoo.export(arch, "torchscript").model_path)
        PassManager(before_io).run(model)
        attentions = [n for n in model.graph if n.op_type == "Attention"]
        q_shape = attentions[0].inputs[0].shape
        if arch == "bloom":  # what the declared shape does not say
            assert not (isinstance(q_shape[1], int) and isinstance(q_shape[3], int))
        layouts = probe_head_layouts(model, {n: tuple(n.inputs[:3]) for n in attentions})
        assert not isinstance(layouts, str), layouts
        assert {(lay.q_heads, lay.k_heads, lay.v_heads, lay.q_size) for lay in layouts.values()} == {(*heads, 16)}


# Bloom, the architecture lower-gqa leaves to lower-mha, both exporters; GPT-J's rotated layers with lower-mha alone
@pytest.mark.parametrize(("arch", "exporter"), [("bloom", "torchscript"), ("bloom", "dynamo"), ("gptj", "torchscript"),
                                                ("gptj", "dynamo")])
def test_optimize_verify_passes(attention_graphs, tmp_path, capsys, arch, exporter) -> None:
    """``qgraph optimize --passes [lower-gqa] lower-mha --verify`` exits 0 and says what it proved."""
    out = tmp_path / "mha.onnx"
    alone = (arch, exporter) in PACKED
    passes = ["lower-mha"] if alone else ["lower-gqa", "lower-mha", "--option", "lower-gqa.mask=none"]
    args = ["optimize", str(attention_graphs[(arch, exporter)]), "-o", str(out), "--passes", *passes, "--verify"]
    assert main(args) == 0
    table = capsys.readouterr().out
    line = next(line for line in table.splitlines() if line.startswith("lower-mha"))
    assert "cached replay gives the logits of the input's own cache" in line, table
    assert len(_mha_nodes(io.load(out))) == (PACKED if alone else LOWERED)[(arch, exporter)] == 2


_BROKEN = """
import onnx_ir as ir
from qgraph_passes.mha_lowering import LowerMHAPass


class BrokenMHA(LowerMHAPass):
    '''lower-mha with one thing wrong on purpose (tests only).'''

    name = "{name}"

    def call(self, model):
        result = super().call(model)
        for node in model.graph:
            if node.op_type == "MultiHeadAttention":
                {mutation}
        return result
"""

MUTATIONS = {  # the zoo case, the change, and the passes in front of lower-mha
    # GPT-J's layers go to lower-gqa when it runs: lower-mha alone
    # (the tiny GPT-J has 2 heads of 32)
    "wrong num_heads": (("gptj", "torchscript"), 'node.attributes["num_heads"] = ir.AttrInt64("num_heads", 4)', []),
    # no causal mask, no padding mask, no ALiBi (lower-gqa would take Bloom's layers with its default mask=bias)
    "bias dropped": (("bloom", "torchscript"), "node.replace_input_with(5, None)", []),
    # gpt-neo's attention is unscaled (scale 1.0); the kernel's default would be 1/sqrt(head size). lower-gqa
    # would take its layers, so lower-mha runs alone.
    "scale dropped": (("gpt_neo", "torchscript"), 'node.attributes.pop("scale")', []),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_verify_fails_on_a_broken_lowering(attention_graphs, tmp_path, mutation) -> None:
    case, code, before = MUTATIONS[mutation]
    plugin = tmp_path / "broken.py"
    name = "lower-mha-" + mutation.replace(" ", "-")  # plugin pass names are process-wide: one per mutation
    plugin.write_text(textwrap.dedent(_BROKEN).replace("{mutation}", code).replace("{name}", name))
    source = attention_graphs[case]
    args = [str(source), "--plugin", str(plugin), "--verify", "--passes", *before]
    assert main(["optimize", "-o", str(tmp_path / "good.onnx"), *args, "lower-mha"]) == 0
    assert main(["optimize", "-o", str(tmp_path / "broken.onnx"), *args, name]) == 1
    assert not (tmp_path / "broken.onnx").exists()


def test_the_scale_kept_is_the_models(attention_graphs) -> None:
    """gpt-neo does not scale its scores: the lowered node says 1.0, not the kernel's 1/sqrt(16) default."""
    model, _ = _lower_alone(attention_graphs[("gpt_neo", "torchscript")])
    assert {n.attributes["scale"].value for n in _mha_nodes(model)} == {1.0}


def test_generate_runs_the_lowered_graph(attention_graphs, tmp_path) -> None:
    """``qgraph generate``'s engine drives the lowered graph (concat engine: no shared buffer without GQA on
    every past) and gives the source graph's greedy tokens on a left-padded batch of two."""
    from qgraph.runtime.engines import make_engine

    source = attention_graphs[("gptj", "torchscript")]
    model, _ = _lower_alone(source)  # lower-gqa would take GPT-J's layers
    assert len(_mha_nodes(model)) == 2
    lowered = tmp_path / "mha.onnx"
    io.save(model, lowered)
    engines = [make_engine(path, threads=1) for path in (source, lowered)]
    assert engines[1].kind == engines[0].kind == "concat KV cache"
    prompt = np.array([[0, 0, 7, 8, 9], [4, 5, 6, 7, 8]])
    valid = prompt > 0
    tokens = []
    for engine in engines:
        engine.start(2)
        logits = engine.prefill(prompt, valid)
        steps = []
        for _ in range(6):
            token = np.argmax(logits, axis=-1)
            steps.append(token)
            logits = engine.decode(token, np.ones(2, bool))
        tokens.append(np.stack(steps, axis=1))
        assert np.all(np.isfinite(logits))
    np.testing.assert_array_equal(tokens[1], tokens[0])


def _hide_padded_queries(model: ir.Model) -> None:
    """Every layer's bool mask AND "this query is a valid token": a padded query row then sees no key at all."""
    attention = next(n for n in model.graph if n.op_type == "Attention")
    mask = attention.inputs[3]
    inputs = {v.name: v for v in model.graph.inputs}
    length = ir.node("Shape", [inputs["input_ids"]], attributes={"start": 1, "end": 2})
    start = ir.node("Neg", [length.outputs[0]])
    end = ir.Value(name="hide/end", const_value=ir.tensor(np.array([2**62], np.int64)))
    axis = ir.Value(name="hide/axis", const_value=ir.tensor(np.array([1], np.int64)))
    axes = ir.Value(name="hide/axes", const_value=ir.tensor(np.array([1, 3], np.int64)))
    for value in (end, axis, axes):
        model.graph.register_initializer(value)
    columns = ir.node("Slice", [inputs["attention_mask"], start.outputs[0], end, axis])
    valid = ir.node("Cast", [columns.outputs[0]], attributes={"to": ir.DataType.BOOL})
    rows = ir.node("Unsqueeze", [valid.outputs[0], axes])
    hidden = ir.node("And", [mask, rows.outputs[0]])
    hidden.outputs[0].dtype, hidden.outputs[0].shape = ir.DataType.BOOL, mask.shape
    model.graph.insert_after(mask.producer(), [length, start, columns, valid, rows, hidden])
    for node in model.graph:
        if node.op_type == "Attention" and node.inputs[3] is mask:
            node.replace_input_with(3, hidden.outputs[0])


def test_a_row_with_every_key_hidden_stays_finite(attention_graphs, tmp_path) -> None:
    """A query that sees no key: Attention gives zeros, MultiHeadAttention NaN with a -inf bias -- which would reach
    valid rows through the cache (0 x NaN). The bias hides keys with the lowest finite value instead."""
    model = io.load(attention_graphs[("gpt2", "torchscript")])
    _hide_padded_queries(model)
    source = tmp_path / "hidden-rows.onnx"
    io.save(model, source)
    lowered, _ = _lower_alone(source)
    assert len(_mha_nodes(lowered)) == 2
    tokens = np.random.default_rng(1).integers(3, 256, size=(2, 6))
    valid = np.ones((2, 6), bool)
    valid[0, :2] = False  # row 0's first two queries are padding: in layer 0 they see nothing
    with SequenceReplayer(lowered, source) as replayer:
        result = replayer.run(ReplayCase(tokens, valid, (4, 1, 1), "left"))
    assert result.passed, str(result)


@pytest.mark.parametrize(("arch", "exporter"), sorted(PACKED))
def test_packed_heads_go_in_as_they_are(attention_graphs, arch, exporter) -> None:
    """lower-mha alone on attention-io's packed form: q, k, v are already [B, S, H*D] (nothing added around the
    kernel); grouped KV heads (llama's 4 / 2) are refused by their attributes, without running anything."""
    source = attention_graphs[(arch, exporter)]
    model = io.load(source)
    before = {n.op_type for n in model.graph}
    operands = [[x.name for x in n.inputs[:3]] for n in model.graph if n.op_type == "Attention"]
    report = PassManager(["lower-mha"]).run(model)
    mha = _mha_nodes(model)
    assert len(mha) == PACKED[(arch, exporter)]
    if not mha:
        record = next(r for r in report.passes if r.name == "lower-mha")
        assert all("q has 4 heads, k 2, v 2" in note for note in record.notes) and len(record.notes) == 2
        return
    assert {n.op_type for n in model.graph} - before == {"MultiHeadAttention", "Where"}  # no Reshape, no Transpose
    assert [[x.name for x in n.inputs[:3]] for n in mha] == operands  # the very values the Attention read
    result = check_sequence_equivalence(model, source, examples=10, seed=5, max_len=10)
    assert result.equivalent, str(result)
