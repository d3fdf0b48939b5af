"""The sampler on graphs the kv-cache pass makes: a pipeline step, --verify, the CLI, generate.

``kv_cache_graphs.decoder()`` (a canonical no-cache decoder) goes through
``kv-cache style=retained`` and then ``sampler``, under the pass manager
with invariants and the step verifier on; the verifier's "sampling"
meaning must accept the pass and reject a sampler whose greedy token is not
the argmax.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import kv_cache_graphs as graphs
import onnx
import onnx_ir as ir
import pytest

from qgraph.cli import main
from qgraph.errors import PassFailure
from qgraph.manager import PassManager
from qgraph.runtime.engines import make_engine
from qgraph.runtime.generate import Generator
from qgraph.runtime.sampling import DeviceSamplingEngine
from qgraph.verify.equivalence import step_verifier
from qgraph_passes.sampler import graph as sampler_graph

CTX_LEN = 16
PIPELINE = [{"pass": "kv-cache", "options": {"style": "retained", "ctx_len": CTX_LEN}},
            {"pass": "sampler", "options": {"max_top_k_ids": 16}}]


def _pipeline(**kwargs):
    model = ir.from_proto(graphs.decoder())
    report = PassManager(PIPELINE, verifier=step_verifier(examples=3), **kwargs).run(model)
    return model, report


def test_kv_cache_then_sampler_is_verified_and_keeps_the_device_signature() -> None:
    model, report = _pipeline()
    record = report.passes[-1]
    assert record.name == "sampler" and record.verified, record
    assert "argmax" in record.verification
    outputs = [v.name for v in model.graph.outputs]
    assert outputs[0] == "next_tokens" and outputs[-2:] == ["past_repetition_penalty_buffer_RetainedState",
                                                            "past_presence_penalty_buffer_RetainedState"]
    assert all(n.endswith("_RetainedState") for n in outputs[1:])
    assert [v.name for v in model.graph.inputs][:2] == ["input_ids", "position_ids"]


def test_the_verifier_rejects_a_sampler_whose_greedy_token_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    original = sampler_graph.apply_penalties

    def shifted(o, logits, repetition, presence, v):  # a penalty bug: every logit gets its token id added
        out = original(o, logits, repetition, presence, v)
        return o.op("Add", out, o.op("Cast", o.op("Range", o.const(0), o.const(48), o.const(1)), to=1))

    monkeypatch.setattr(sampler_graph, "apply_penalties", shifted)
    with pytest.raises(PassFailure, match="not the argmax"):
        _pipeline()


def test_generate_on_the_pipelines_graph_gives_the_plain_graphs_tokens() -> None:
    sampled, _ = _pipeline()
    plain = ir.from_proto(graphs.decoder())
    PassManager(PIPELINE[:1]).run(plain)
    device = make_engine(ir.to_proto(sampled), threads=1, ctx_len=CTX_LEN)
    assert isinstance(device, DeviceSamplingEngine)
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6]]
    want = Generator(make_engine(ir.to_proto(plain), threads=1, ctx_len=CTX_LEN)).generate_ids(prompts, max_new_tokens=6)
    got = Generator(device).generate_ids(prompts, max_new_tokens=6)
    assert got.token_ids == want.token_ids


def test_the_cli_runs_the_sampler_with_its_options(tmp_path: Path) -> None:
    source = tmp_path / "decoder.onnx"
    onnx.save(graphs.decoder(), source)
    out = tmp_path / "sampled.onnx"
    report = tmp_path / "report.json"
    args = ["optimize", str(source), "-o", str(out), "--passes", "kv-cache", "sampler", "--verify",
            "--option", f"kv-cache.ctx_len={CTX_LEN}", "--option", "sampler.max_top_k_ids=8",
            "--option", "sampler.return_pdfs=true", "--report", str(report)]
    text = io.StringIO()
    assert main(args, out=text) == 0, text.getvalue()
    model = onnx.load(out, load_external_data=False)
    outputs = [o.name for o in model.graph.output]
    assert outputs[:2] == ["probs", "next_tokens"]
    random_numbers = next(i for i in model.graph.input if i.name == "random_numbers")
    assert random_numbers.type.tensor_type.shape.dim[1].dim_value == 8
    passes = json.loads(report.read_text())["passes"]
    assert passes[-1]["name"] == "sampler"


@pytest.mark.parametrize(("rp", "pp"), [(3.0, 0.0), (1.0, 50.0)], ids=["repetition", "presence"])
def test_continuous_batching_slots_keep_their_own_penalty_buffers(rp: float, pp: float) -> None:
    """kv-cache full_batch_size=3 -> sampler: buffers of full_batch_size rows, addressed by batch_index.

    Requests are prefilled into slots one at a time between decode steps of
    the others; with repetition and presence penalties on, each slot's tokens
    must be those of a host loop applying the numpy reference to the plain
    continuous-batching graph's logits with that slot's own seen-token sets.
    A prefill clearing every row's presence buffer (as QEfficient's export
    does) or writing the wrong row would change the tokens.
    """
    import numpy as np
    import sampler_reference as ref

    from qgraph.runtime.sampling import DevicePenalties

    pipeline = [{"pass": "kv-cache", "options": {"style": "retained", "ctx_len": CTX_LEN, "full_batch_size": 3}},
                {"pass": "sampler", "options": {"max_top_k_ids": 16}}]
    sampled, plain = ir.from_proto(graphs.decoder()), ir.from_proto(graphs.decoder())
    PassManager(pipeline).run(sampled)
    PassManager(pipeline[:1]).run(plain)
    host = make_engine(ir.to_proto(plain), threads=1, ctx_len=CTX_LEN)
    device = make_engine(ir.to_proto(sampled), threads=1, ctx_len=CTX_LEN)
    device.penalties = DevicePenalties(repetition_penalty=rp, presence_penalty=pp)
    prompts = {0: [3, 1, 4, 1, 5], 2: [9, 2, 6], 1: [7]}
    seen = {s: set(p) for s, p in prompts.items()}
    generated: dict[int, set[int]] = {s: set() for s in prompts}
    want: dict[int, list[int]] = {s: [] for s in prompts}
    got: dict[int, list[int]] = {s: [] for s in prompts}

    def host_pick(slot: int, logits) -> int:
        token = int(ref.penalize(logits, seen[slot], generated[slot], rp, pp).argmax())
        seen[slot].add(token)
        generated[slot].add(token)
        return token

    host.start_slots(3)
    device.start_slots(3)
    active = np.zeros(3, bool)
    for slot in [0, None, None, 2, None, None, 1, None, None]:
        if slot is not None:  # a new request in its slot
            want[slot].append(host_pick(slot, host.prefill_slot(slot, prompts[slot])))
            got[slot].append(int(device.prefill_slot(slot, prompts[slot])))
            active[slot] = True
        else:
            feed = np.array([want[s][-1] if active[s] else 0 for s in range(3)])
            logits = host.decode(feed, active)
            tokens = device.decode(np.array([got[s][-1] if active[s] else 0 for s in range(3)]), active)
            for s in np.flatnonzero(active):
                want[s].append(host_pick(s, logits[s]))
                got[s].append(int(tokens[s]))
    assert got == want


def test_serving_a_sampler_graph_through_its_rows_gives_each_request_alone() -> None:
    """``serve()`` (``generate --full-batch-size``) on kv-cache full_batch_size=3 -> sampler: more requests than
    rows, a row reused while others decode; with a repetition penalty, each request's tokens are those the
    same graph gives it alone -- so a row's penalty buffer holds that request's tokens only."""
    from qgraph.runtime.batching import serve
    from qgraph.runtime.sampling import DevicePenalties

    pipeline = [{"pass": "kv-cache", "options": {"style": "retained", "ctx_len": CTX_LEN, "full_batch_size": 3}},
                {"pass": "sampler", "options": {"max_top_k_ids": 16}}]
    model = ir.from_proto(graphs.decoder())
    PassManager(pipeline).run(model)
    engine = make_engine(ir.to_proto(model), threads=1, ctx_len=CTX_LEN)
    assert isinstance(engine, DeviceSamplingEngine)
    engine.penalties = DevicePenalties(repetition_penalty=3.0)
    generator = Generator(engine)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [7], [8, 8, 2], [5, 3]]
    served = serve(generator, prompts, slots=3, max_new_tokens=6)
    alone = [serve(generator, [p], slots=3, max_new_tokens=6).token_ids[0] for p in prompts]
    assert served.token_ids == alone
    assert served.stats.decode_steps < sum(len(t) - 1 for t in alone)  # the rows did run together
