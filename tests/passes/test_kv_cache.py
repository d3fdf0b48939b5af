"""The kv-cache pass on the tiny zoo: sequence equivalence with the no-cache export, both styles.

Each zoo decoder, exported by both exporters in both modes -- through
qgraph's wrapper (positions ``cumsum(mask) - 1`` given to the model) and as
a plain ``torch.onnx.export`` of the Hugging Face model (the model counts
positions itself: from column 0, or from the mask as OPT and BLOOM do) --
goes through ``--passes kv-cache`` exactly as a user runs it (the manager runs the attention pass,
and what it needs, as prerequisites). The property is docs/design.md's: replaying
any token sequence through the cached graph -- hypothesis draws the tokens,
the batch with left or right padding, the prefill chunk, later chunks and
single-token decode steps -- gives at every valid position the logits of the
no-cache graph (fp32, atol 1e-4 scaled by the logit magnitude) and the same
greedy token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qgraph import io as qio
from qgraph.export.zoo import TINY_ARCHS
from qgraph.manager import PassManager
from qgraph.pipeline import Pipeline
from qgraph.verify.sequence import check_sequence_equivalence

DECODERS = [name for name, arch in TINY_ARCHS.items() if arch.task == "causal-lm"]
EXPORTERS = ("dynamo", "torchscript")
# qgraph's wrapper passes position_ids = cumsum(mask) - 1; a plain export lets the model count them.
WRAPPERS = ("qgraph", "plain")
CTX_LEN = 12  # sequences of up to 11 tokens: longer than mistral's and gemma2's window of 4
EXAMPLES = 8


@dataclasses.dataclass
class Cached:
    path: Path
    reference: Path
    notes: list[str]
    model: ir.Model


class CachedZoo:
    """Pass outputs per (arch, exporter, options), made once per session."""

    def __init__(self, zoo, folder: Path) -> None:
        self.zoo, self.folder = zoo, folder
        self._done: dict[tuple, Cached] = {}

    def get(self, arch: str, exporter: str, source: Path | None = None, tag: str = "", wrapper: str = "qgraph",
            **options) -> Cached:
        key = (arch, exporter, str(source), tag, wrapper, tuple(sorted(options.items())))
        if key not in self._done:
            reference = Path(self.zoo.export(arch, exporter, wrapper=wrapper).model_path)
            model = qio.load(source or reference)
            report = PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
            tag = "-".join(f"{k}={v}" for k, v in sorted(options.items()))
            out = self.folder / f"{arch}-{exporter}-{wrapper}-{len(self._done)}-{tag}" / "model.onnx"
            out.parent.mkdir(parents=True)
            qio.save(model, out)
            notes = [n for record in report.passes if record.name == "kv-cache" for n in record.notes]
            self._done[key] = Cached(out, reference, notes, model)
        return self._done[key]


@pytest.fixture(scope="session")
def cached_zoo(tiny_zoo, tmp_path_factory) -> CachedZoo:
    return CachedZoo(tiny_zoo, tmp_path_factory.mktemp("kv-cache"))


def _assert_sequence_equivalent(cached: Cached, **kwargs) -> None:
    result = check_sequence_equivalence(
        cached.path, cached.reference, examples=EXAMPLES, require_greedy=True, **kwargs
    )
    assert result.equivalent, f"{result}\npass notes: {cached.notes}"


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", DECODERS)
def test_retained_cache_replays_like_the_no_cache_graph(cached_zoo: CachedZoo, arch: str, exporter: str,
                                                        wrapper: str) -> None:
    cached = cached_zoo.get(arch, exporter, wrapper=wrapper, style="retained", ctx_len=CTX_LEN, logits="all")
    _assert_sequence_equivalent(cached)


@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", DECODERS)
def test_concat_cache_replays_like_the_no_cache_graph(cached_zoo: CachedZoo, arch: str, exporter: str,
                                                      wrapper: str) -> None:
    cached = cached_zoo.get(arch, exporter, wrapper=wrapper, style="concat")
    _assert_sequence_equivalent(cached, max_len=CTX_LEN - 1)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["llama", "opt", "bloom", "gpt2"])
def test_plain_exports_say_how_they_count_positions(cached_zoo: CachedZoo, arch: str, exporter: str) -> None:
    """The report names what was rewired and how the export counted: from column 0, or from the mask."""
    notes = " ".join(cached_zoo.get(arch, exporter, wrapper="plain", style="concat").notes)
    if arch == "bloom":  # no position sites: ALiBi lives in the mask
        assert "key-position bias with 4 head slope(s)" in notes
        assert "rewired to position_ids" not in notes
    elif arch == "opt":  # OPT computes (cumsum(mask) * mask - 1) + 2 itself
        assert "computed from the attention mask rewired to position_ids" in notes and "+ 2" in notes
    else:
        assert "counted from the chunk start rewired to position_ids" in notes
        assert "a left-padded row of the no-cache graph is shifted" in notes


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_device_form_last_token_logits_with_ctx_scatter(cached_zoo: CachedZoo, arch: str, exporter: str) -> None:
    """The qaic form: CtxScatter writes, CtxGather reads, logits [batch, 1, vocab] at each row's last valid token."""
    cached = cached_zoo.get(arch, exporter, style="retained", ctx_len=CTX_LEN, scatter="ctx-scatter")
    _assert_sequence_equivalent(cached)
    graph = cached.model.graph
    scatters = [n for n in graph if n.op_type == "CtxScatter"]
    assert len(scatters) == 2 * 2 and all(n.domain == "com.qualcomm.cloud" for n in scatters)
    assert not any(n.op_type == "ScatterND" for n in graph)
    assert ("com.qualcomm.cloud", "CtxScatter", "") in cached.model.functions
    gathers = [n for n in graph if n.op_type == "CtxGather"]
    assert len(gathers) == 2 * 2 and ("com.qualcomm.cloud", "CtxGather", "") in cached.model.functions
    assert {n.inputs[0].producer() for n in gathers} == set(scatters)  # attention reads what was written
    logits = next(o for o in graph.outputs if o.name == "logits")
    assert list(logits.shape)[1] == 1


@pytest.mark.parametrize("options", [{"style": "concat"}, {"style": "retained", "ctx_len": CTX_LEN, "logits": "all"}])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_every_value_the_pass_adds_is_typed_as_onnx_infers_it(cached_zoo: CachedZoo, arch: str, options: dict) -> None:
    """Typed values keep later passes cheap (no re-inference); the types must be the ones onnx infers."""
    from qgraph.node_types import every_value_typed

    model = cached_zoo.get(arch, "dynamo", **options).model
    assert every_value_typed(model.graph)
    added = {v.name: v for n in model.graph for v in n.outputs if n.metadata_props.get("qgraph.pass") == "kv-cache"}
    assert added
    inferred = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True))
    by_name = {v.name: v for n in inferred.graph for v in n.outputs}
    for name, value in added.items():
        other = by_name[name]
        assert value.dtype == other.dtype, name
        assert len(value.shape) == len(other.shape), name
        for mine, theirs in zip(value.shape, other.shape):
            assert not (isinstance(mine, int) and isinstance(theirs, int) and mine != theirs), name


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_retained_signature_is_the_device_contract(cached_zoo: CachedZoo, exporter: str) -> None:
    cached = cached_zoo.get("llama", exporter, style="retained", ctx_len=CTX_LEN)
    graph = cached.model.graph
    config = TINY_ARCHS["llama"].make_config()
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layers = config.num_hidden_layers
    assert [v.name for v in graph.inputs] == ["input_ids", "position_ids"] + [
        f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")
    ]
    assert [v.name for v in graph.outputs] == ["logits"] + [
        f"past_{kind}.{i}_RetainedState" for i in range(layers) for kind in ("key", "value")
    ]
    for value in [*graph.inputs[2:], *graph.outputs[1:]]:  # ctx_len symbolic: one graph for every compiled length
        assert list(value.shape) == ["batch_size", kv_heads, "ctx_len", head_dim], value.name
        assert value.dtype == ir.DataType.FLOAT
    for value in graph.inputs[:2]:
        assert list(value.shape) == ["batch_size", "seq_len"] and value.dtype == ir.DataType.INT64
    assert list(graph.outputs[0].shape) == ["batch_size", 1, config.vocab_size]
    assert not any(n.op_type == "Trilu" for n in graph)


def test_concat_signature_uses_optimum_names(cached_zoo: CachedZoo) -> None:
    graph = cached_zoo.get("qwen2", "dynamo", style="concat").model.graph
    assert [v.name for v in graph.inputs] == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert [v.name for v in graph.outputs] == ["logits"] + [
        f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")
    ]
    assert list(graph.outputs[1].shape) == ["batch_size", 2, "total_sequence_length", 16]


@pytest.mark.parametrize(("arch", "exporter"), [("llama", "dynamo"), ("llama", "torchscript"), ("mistral", "dynamo")])
def test_concat_cache_graph_converts_to_retained(cached_zoo: CachedZoo, arch: str, exporter: str) -> None:
    """A graph that already has an optimum-style concat cache becomes the retained form."""
    concat = cached_zoo.get(arch, exporter, style="concat")
    converted = cached_zoo.get(arch, exporter, source=concat.path, style="retained", ctx_len=CTX_LEN, logits="all")
    names = {v.name for v in converted.model.graph.inputs}
    assert not any(n.startswith("past_key_values") for n in names) and "attention_mask" not in names
    _assert_sequence_equivalent(converted)


def test_a_wrong_window_is_caught_by_the_replay(cached_zoo: CachedZoo, monkeypatch: pytest.MonkeyPatch) -> None:
    """The property has teeth: forgetting mistral's sliding window makes the replay fail."""
    from qgraph_passes.kv_cache import analysis as kv_cache
    from qgraph_passes.kv_cache.probe import MaskMeaning

    monkeypatch.setattr(kv_cache, "mask_meaning", lambda *a, **k: MaskMeaning(None))
    cached = cached_zoo.get("mistral", "dynamo", tag="no-window", style="retained", ctx_len=CTX_LEN,
                            logits="all")
    result = check_sequence_equivalence(cached.path, cached.reference, examples=30, padding="none")
    assert not result.equivalent
    assert max(result.case.lengths) > 4  # the window of 4 must be exceeded to tell


def test_sliding_window_is_read_from_the_exporters_mask(cached_zoo: CachedZoo) -> None:
    notes = " ".join(cached_zoo.get("mistral", "dynamo", style="concat").notes)
    assert "sliding window 4" in notes


def test_positions_rewired_for_learned_position_tables(cached_zoo: CachedZoo) -> None:
    """OPT reads its table at position + 2: a decode step at position p must match column p of the reference."""
    cached = cached_zoo.get("opt", "dynamo", style="retained", ctx_len=CTX_LEN, logits="all")
    tokens = np.array([[5, 9, 17, 33, 65, 129, 3]])
    from qgraph.verify.sequence import replay_sequence

    result = replay_sequence(cached.path, cached.reference, tokens, split=[3, 1, 1, 2])
    assert result.passed, str(result)


def test_probing_reads_weights_kept_in_external_data(cached_zoo: CachedZoo, tmp_path: Path) -> None:
    """Real exports keep weights in model.onnx.data; the pass's onnxruntime probes must find them.

    The TorchScript export leaves head counts unknown, so the pass runs part of
    the graph to measure them; its weights are moved to external data in a
    folder of their own first (loaded lazily, as `qgraph optimize` loads them).
    """
    reference = cached_zoo.zoo.export("llama", "torchscript").model_path
    external = tmp_path / "external" / "model.onnx"
    external.parent.mkdir()
    qio.save(qio.load(reference), external, external_data=True)
    assert (external.parent / "model.onnx.data").stat().st_size > 0
    cached = cached_zoo.get("llama", "torchscript", source=external, tag="external", style="retained",
                            ctx_len=CTX_LEN, logits="all")
    _assert_sequence_equivalent(cached)


OTHERS = Path(__file__).resolve().parent.parent / "data" / "transformers-4.57"


@pytest.mark.parametrize("style", ["retained", "concat"])
@pytest.mark.parametrize("name", ["llama-dynamo", "opt-torchscript", "gemma2-dynamo", "bloom-torchscript"])
def test_exports_of_another_transformers_release_replay(tmp_path: Path, name: str, style: str) -> None:
    """Plain exports made with transformers 4.57 (tests/data): other rotary, mask and position code."""
    reference = OTHERS / f"{name}.onnx"
    model = qio.load(reference)
    options = {"style": style, **({"ctx_len": CTX_LEN, "logits": "all"} if style == "retained" else {})}
    PassManager(Pipeline([{"pass": "kv-cache", "options": options}])).run(model)
    out = tmp_path / "model.onnx"
    qio.save(model, out)
    result = check_sequence_equivalence(out, reference, examples=EXAMPLES, require_greedy=True, max_len=CTX_LEN - 1)
    assert result.equivalent, str(result)


# --- serving variants ----------------------------------------------------------------------------------
# One architecture per way of reading positions and masks: rotary with GQA (llama), a learned table
# (gpt2), ALiBi (bloom), a sliding window (mistral), OPT's offset positions, MQA (gpt_bigcode), and the
# table fallback (gptj). Every variant shares the analysis the full-zoo tests above exercise.
SERVING_ARCHS = ["llama", "gpt2", "bloom", "mistral", "opt", "gpt_bigcode", "gptj"]


@pytest.mark.parametrize("arch", SERVING_ARCHS)
def test_continuous_batching_serves_each_request_alone(cached_zoo: CachedZoo, arch: str) -> None:
    """Requests interleaved in the cache rows (a row reused while others decode) each give their logits alone;
    with compute-context lengths too, on the device's ops (CtxScatterCB / CtxGatherCB)."""
    from qgraph.verify.sequence import SequenceReplayer
    from qgraph.verify.slots import check_slots

    cached = cached_zoo.get(arch, "dynamo", style="retained", ctx_len=CTX_LEN, scatter="ctx-scatter",
                            full_batch_size=2, comp_ctx_lengths="6,12")
    with SequenceReplayer(cached.path, cached.reference) as replayer:
        replayer.compute_context_len = CTX_LEN
        failure = check_slots(replayer, examples=4, slots=2)
    assert failure is None, f"{failure}\npass notes: {cached.notes}"


@pytest.mark.parametrize("arch", ["llama", "bloom", "mistral"])
def test_compute_context_logits_equal_the_full_context(cached_zoo: CachedZoo, arch: str) -> None:
    cached = cached_zoo.get(arch, "torchscript", style="retained", ctx_len=CTX_LEN, comp_ctx_lengths="6,12",
                            logits="all")
    result = check_sequence_equivalence(cached.path, cached.reference, examples=4, require_greedy=True,
                                        compute_context_len=6, max_len=5)
    assert result.equivalent, f"{result}\npass notes: {cached.notes}"


def test_serving_signature_is_qefficients(cached_zoo: CachedZoo) -> None:
    """QEfficient's export order and dim names: input_ids, position_ids, the cache, comp_ctx_lengths, batch_index."""
    graph = cached_zoo.get("llama", "dynamo", style="retained", ctx_len=CTX_LEN, scatter="ctx-scatter",
                           full_batch_size=2, comp_ctx_lengths="6,12").model.graph
    layers = TINY_ARCHS["llama"].make_config().num_hidden_layers
    cache = [f"past_{kind}.{i}" for i in range(layers) for kind in ("key", "value")]
    assert [v.name for v in graph.inputs] == ["input_ids", "position_ids", *cache, "comp_ctx_lengths", "batch_index"]
    shapes = {v.name: list(v.shape) for v in graph.inputs}
    assert shapes["batch_index"] == ["batch_size", 1] and shapes["comp_ctx_lengths"] == ["comp_ctx_lengths"]
    assert all(shapes[name][0] == "full_batch_size" and shapes[name][2] == "ctx_len" for name in cache)
    assert [v.name for v in graph.outputs] == ["logits", *(f"{n}_RetainedState" for n in cache)]
    assert {n.op_type for n in graph if n.domain == "com.qualcomm.cloud"} == {"CtxScatterCB", "CtxGatherCB"}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "bloom"])
def test_continuous_batching_on_plain_exports(cached_zoo: CachedZoo, arch: str, exporter: str) -> None:
    """A plain torch.onnx.export of the Hugging Face model (no position_ids given; the model counts them from
    column 0, or from the mask as OPT and BLOOM do): served through the cache rows with a compute-context length,
    each request gives the logits it gives alone."""
    from qgraph.verify.sequence import SequenceReplayer
    from qgraph.verify.slots import check_slots

    cached = cached_zoo.get(arch, exporter, wrapper="plain", style="retained", ctx_len=CTX_LEN, scatter="ctx-scatter",
                            full_batch_size=2, comp_ctx_lengths="6,12")
    with SequenceReplayer(cached.path, cached.reference) as replayer:
        failure = check_slots(replayer, examples=4, slots=2)
    assert failure is None, f"{failure}\npass notes: {cached.notes}"
