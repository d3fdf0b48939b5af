"""Attention layers in onnxruntime (CPU): the standard ``Attention`` (opset 23) against ``com.microsoft::MultiHeadAttention``.

    .venv/bin/python benchmarks/mha_lowering.py [--contexts 16,512,2048] [--heads 12] [--head-size 64]
                                               [--layers 4] [--runs 20] [--threads 2] [--write] [--note TEXT]

Whether ``lower-mha`` is worth having, measured before it was written: the
layers ``lower-gqa`` refuses (no rotary, interleaved or partial rotary,
TorchScript's split heads) reach the ``ort`` preset's end as an ``Attention``
on 4-D ``[B, H, S, D]`` q, k, v with the concat cache as its past inputs and
a boolean mask. A graph of ``--layers`` such layers sharing one mask (a
model's layers share theirs) is built three ways, all from the model's
own ``[B, S, H, D]`` projections to its ``[B, S, H, D]`` output:

* **attention 4-D** -- what those layers are today: a Transpose into
  ``[B, H, S, D]`` on each of q, k, v, ``Attention(q, k, v, mask, past_k,
  past_v)``, and the Transpose back;
* **attention 3-D** -- the packed-heads form ``attention-io`` makes where it
  can (``q_num_heads`` / ``kv_num_heads``, Reshapes only): the best the
  standard op does;
* **MultiHeadAttention** -- what ``lower-mha`` writes: Reshapes only,
  ``past_key`` / ``past_value`` in ``[B, H, P, D]``, the boolean mask turned
  into an additive ``attention_bias`` once, inside the timed graph (``Where``).

For each context c: a prefill of c tokens (no past) and a decode step of one
token after c cached ones, batch 1, random float32 inputs; the three graphs'
outputs and presents must agree (the benchmark fails otherwise). The graphs
run in one process with ``--threads`` intra-op threads, alternating run by
run so that load on a shared machine reaches all alike; the table gives the
median and the fastest of ``--runs`` runs each (on a shared machine the
fastest is the steadier figure), and MultiHeadAttention's ratio to each
Attention form.
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnx
from harness import benchmark_parser
from onnx import TensorProto, helper
from results_file import machine_description, publish

SECTION = "MultiHeadAttention lowering"
FORMS = ("attention 4-D", "attention 3-D", "MultiHeadAttention")


def _graph(form: str, heads: int, size: int, layers: int) -> onnx.ModelProto:
    """``layers`` independent layers sharing one mask (as a model's layers do): per layer i, inputs q{i}, k{i}, v{i}
    [B, S, H, D] and past_k{i}, past_v{i} [B, H, P, D]; outputs y{i} [B, S, H, D], present_k{i}, present_v{i}."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["B", 1, "S", "T"])]
    outputs = []
    packed = helper.make_tensor("packed", TensorProto.INT64, [3], [0, 0, heads * size])
    split = helper.make_tensor("split", TensorProto.INT64, [4], [0, 0, heads, size])
    nodes, opsets = [], [helper.make_opsetid("", 23)]
    inits = [] if form == "attention 4-D" else [packed, split]  # Reshapes only in the other two
    if form == "MultiHeadAttention":  # once for all layers, as lower-mha writes it
        lowest = float(np.finfo(np.float32).min)
        inits += [helper.make_tensor("zero", f, [], [0.0]), helper.make_tensor("hidden", f, [], [lowest])]
        nodes.append(helper.make_node("Where", ["mask", "zero", "hidden"], ["bias"]))
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    for i in range(layers):
        q, k, v, pk, pv, y, ck, cv = (f"{n}{i}" for n in ("q", "k", "v", "past_k", "past_v", "y", "present_k",
                                                          "present_v"))
        inputs += [helper.make_tensor_value_info(n, f, ["B", "S", heads, size]) for n in (q, k, v)]
        inputs += [helper.make_tensor_value_info(n, f, ["B", heads, "P", size]) for n in (pk, pv)]
        outputs += [helper.make_tensor_value_info(y, f, ["B", "S", heads, size]),
                    *(helper.make_tensor_value_info(n, f, ["B", heads, "T", size]) for n in (ck, cv))]
        if form == "attention 4-D":
            nodes += [helper.make_node("Transpose", [n], [n + "_4"], perm=[0, 2, 1, 3]) for n in (q, k, v)]
            nodes.append(helper.make_node("Attention", [q + "_4", k + "_4", v + "_4", "mask", pk, pv],
                                          [y + "_4", ck, cv]))
            nodes.append(helper.make_node("Transpose", [y + "_4"], [y], perm=[0, 2, 1, 3]))
            continue
        nodes += [helper.make_node("Reshape", [n, "packed"], [n + "_3"]) for n in (q, k, v)]
        if form == "attention 3-D":
            nodes.append(helper.make_node("Attention", [q + "_3", k + "_3", v + "_3", "mask", pk, pv],
                                          [y + "_3", ck, cv], q_num_heads=heads, kv_num_heads=heads))
        else:
            nodes.append(helper.make_node("MultiHeadAttention", [q + "_3", k + "_3", v + "_3", "", "", "bias", pk, pv],
                                          [y + "_3", ck, cv], domain="com.microsoft", num_heads=heads))
        nodes.append(helper.make_node("Reshape", [y + "_3", "split"], [y]))
    graph = helper.make_graph(nodes, form.replace(" ", "_"), inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=opsets)


def _feeds(rng: np.random.Generator, heads: int, size: int, layers: int, past: int, seq: int) -> dict[str, np.ndarray]:
    total = past + seq
    causal = np.arange(total)[None, :] <= (past + np.arange(seq))[:, None]
    feeds = {"mask": causal[None, None]}
    for i in range(layers):
        feeds |= {f"{n}{i}": rng.standard_normal((1, seq, heads, size), dtype=np.float32) for n in ("q", "k", "v")}
        feeds |= {f"{n}{i}": rng.standard_normal((1, heads, past, size), dtype=np.float32)
                  for n in ("past_k", "past_v")}
    return feeds


def _time(sessions: dict, feeds: dict, runs: int) -> dict[str, tuple[float, float]]:
    """(median, fastest) ms per run of each session, runs alternating between them (after one warm-up run each)."""
    outs = {name: s.run(None, feeds) for name, s in sessions.items()}
    reference = outs[FORMS[0]]
    for name, got in outs.items():
        for a, b in zip(reference, got, strict=True):
            if not np.allclose(a, b, atol=1e-4, rtol=1e-4):
                raise SystemExit(f"{name} differs from {FORMS[0]}: max abs {np.abs(a - b).max()}")
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for i in range(runs):
        for name in (list(sessions) if i % 2 == 0 else list(sessions)[::-1]):
            started = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - started)
    return {n: (1000 * statistics.median(t), 1000 * min(t)) for n, t in times.items()}


def _verdict(rows: list) -> str:
    """Whether lower-mha may join the ort presets: only if MultiHeadAttention is nowhere slower than today's form."""
    slower = [f"{step} at {context} ({ms[FORMS[2]][0] / ms[FORMS[0]][0]:.2f}x)" for context, step, ms in rows
              if ms[FORMS[2]][0] > ms[FORMS[0]][0] and ms[FORMS[2]][1] > ms[FORMS[0]][1]]
    if not slower:
        return "Verdict: MultiHeadAttention is nowhere slower than attention 4-D (median and fastest run)."
    return ("Verdict: MultiHeadAttention is slower than attention 4-D (median and fastest run both) in "
            f"{', '.join(slower)}; lower-mha stays out of the ort presets (available as a pass).")


def main(argv: list[str] | None = None) -> int:
    import onnxruntime as ort

    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--contexts", default="16,512,2048")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4, help="layers in the graph, sharing one mask")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    sessions = {form: ort.InferenceSession(_graph(form, args.heads, args.head_size, args.layers).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"]) for form in FORMS}
    rng = np.random.default_rng(0)
    rows = []
    for context in (int(c) for c in args.contexts.split(",")):
        for step, past, seq in (("prefill", 0, context), ("decode", context, 1)):
            print(f"context {context}, {step} ...", file=sys.stderr)
            ms = _time(sessions, _feeds(rng, args.heads, args.head_size, args.layers, past, seq), args.runs)
            rows.append((context, step, ms))
    lines = [
        f"Command: `.venv/bin/python benchmarks/mha_lowering.py --contexts {args.contexts} --heads {args.heads} "
        f"--head-size {args.head_size} --layers {args.layers} --runs {args.runs} --threads {args.threads} --write`",
        "",
        f"Machine: {machine_description(('onnx', 'onnxruntime'))}.",
        "",
        (f"{args.layers} attention layers sharing one mask, batch 1, {args.heads} heads of {args.head_size} (GPT-2 small's), float32, "
         f"{args.threads} threads, onnxruntime CPU; from the model's [B, S, H, D] q/k/v to its [B, S, H, D] output "
         "(*attention 4-D*: what layers lower-gqa refuses run today, Transposes around an Attention on "
         "[B, H, S, D]; *attention 3-D*: packed heads, the standard op's best form; *MultiHeadAttention*: what "
         "lower-mha writes, the boolean mask made additive once, inside the timed graph). Prefill: c tokens, no past; "
         f"decode: 1 token after c cached. Median / fastest of {args.runs} alternating runs each, ratios of medians "
         "(of the fastest runs in brackets); outputs and presents of the three agree (checked)."),
        "",
        "| context c | step | attention 4-D ms | attention 3-D ms | MultiHeadAttention ms | MHA / attention 4-D "
        "| MHA / attention 3-D |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for context, step, ms in rows:
        (a4, b4), (a3, b3), (mha, best) = (ms[f] for f in FORMS)
        lines.append(f"| {context} | {step} | {a4:.3f} / {b4:.3f} | {a3:.3f} / {b3:.3f} | {mha:.3f} / {best:.3f} "
                     f"| {mha / a4:.2f}x ({best / b4:.2f}x) | {mha / a3:.2f}x ({best / b3:.2f}x) |")
    lines += ["", _verdict(rows)]
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
