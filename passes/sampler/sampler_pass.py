"""The ``sampler`` pass: the next token is chosen inside the graph, with QEfficient's sampler I/O.

It runs on the retained-state graph the ``kv-cache`` pass makes (inputs
``input_ids``, ``position_ids``, ``past_*``; output ``logits`` [B, S, V] with
S = 1 for last-token logits or K+1 for a speculative target) and moves the
host's sampling into the graph, so a device returns one token id per
position instead of B*S*V floats. The contract is QEfficient's
(``qaic_config={"include_sampler": True, ...}``), docs/sampler.md:

inputs added, after the graph's own (``batch_index`` [B, 1] present means
continuous batching: the buffers then have ``full_batch_size`` rows):
``last_accepted_output_tokens`` int64 [batch_size, seq_len],
``past_repetition_penalty_buffer`` bool [batch_size | full_batch_size, V],
``repetition_penalties`` float [batch_size, 1],
``past_presence_penalty_buffer`` bool [batch_size | full_batch_size, V],
``presence_penalties``, ``temperatures`` float [batch_size, 1],
``top_ks`` int32 [batch_size, 1], ``top_ps``, ``min_ps`` float
[batch_size, 1], ``random_numbers`` float [batch_size, max_top_k_ids]
(and ``token_bitmasks`` bool [batch_size, V] with ``include_guided_decoding``);
outputs: ``logits`` is replaced by ``next_tokens`` int64 [B, S, 1] (with
``probs`` float [B, S, V] before it when ``return_pdfs``), and
``past_repetition_penalty_buffer_RetainedState`` and
``past_presence_penalty_buffer_RetainedState`` come last.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.errors import PassFailure
from qgraph.pass_base import Option, Pass, default_opset
from qgraph_passes.sampler.graph import SamplerValues, build_sampler
from qgraph_passes.sampler.ops import Ops

__all__ = ["SAMPLER_INPUTS", "SamplerPass"]

#: The inputs the pass adds, in QEfficient's order.
SAMPLER_INPUTS = (
    "last_accepted_output_tokens", "past_repetition_penalty_buffer", "repetition_penalties",
    "past_presence_penalty_buffer", "presence_penalties", "temperatures", "top_ks", "top_ps", "min_ps",
    "random_numbers",
)
BUFFERS = ("past_repetition_penalty_buffer", "past_presence_penalty_buffer")
_MIN_OPSET = 16  # ScatterElements(reduction="add")


def _fail(message: str) -> PassFailure:
    return PassFailure(f"pass 'sampler': {message}", pass_name="sampler")


class SamplerPass(Pass):
    """Sample the next token inside a retained-state graph (QEfficient's on-device sampler I/O: next_tokens)."""

    name = "sampler"
    # The graph's outputs change (logits -> next_tokens); --verify checks that greedy settings give
    # the argmax of the logits before the pass, and that the KV outputs are unchanged.
    meaning = "sampling"
    options = {
        "max_top_k_ids": Option(int, 512, "largest top-k a request may ask for: the random branch works on this many "
                                "of the largest logits (capped at the vocabulary); random_numbers has this many columns"),
        "return_pdfs": Option(bool, False, "also output probs [B, S, V], the distribution the token is drawn from"),
        "include_guided_decoding": Option(bool, False, "add input token_bitmasks [B, V] bool: only tokens marked "
                                          "True may be chosen"),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        outputs = {v.name: v for v in graph.outputs}
        if "next_tokens" in outputs:
            raise _fail("the graph already outputs 'next_tokens' (the sampler ran on it before)")
        if "logits" not in outputs:
            raise _fail(f"the graph has no output 'logits' to sample from (outputs: {', '.join(outputs) or 'none'})")
        missing = [n for n in ("input_ids", "position_ids") if n not in inputs]
        if missing:
            raise _fail(f"input(s) {', '.join(map(repr, missing))} missing: the sampler runs on the retained-state "
                        "graph of the kv-cache pass (style=retained)")
        logits = outputs["logits"]
        shape = logits.shape
        if shape is None or shape.rank() != 3:
            raise _fail(f"'logits' has shape {shape}; the sampler needs [batch, positions, vocab]")
        vocab = shape[2]
        if not isinstance(vocab, int):
            raise _fail(f"the vocabulary dim of 'logits' is symbolic ({vocab}); the penalty buffers need its size")
        if logits.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            raise _fail(f"'logits' has dtype {logits.dtype}; expected a float type")
        opset = default_opset(model) or 0
        if opset < _MIN_OPSET:
            raise _fail(f"the default-domain opset is {opset}; the sampler needs >= {_MIN_OPSET}")
        taken = sorted({*SAMPLER_INPUTS, "token_bitmasks"} & set(inputs))
        if taken:
            raise _fail(f"input(s) {', '.join(map(repr, taken))} already exist")

        max_top_k = self.config["max_top_k_ids"]
        if max_top_k < 1:
            raise _fail(f"max_top_k_ids must be at least 1, got {max_top_k}")
        if max_top_k > vocab:
            self.report.notes.append(f"max_top_k_ids {max_top_k} capped at the vocabulary size {vocab}")
            max_top_k = vocab
        batch_index = inputs.get("batch_index")
        batch = shape[0] if shape[0] is not None else "batch_size"
        rows = "full_batch_size" if batch_index is not None else batch
        seq = inputs["input_ids"].shape[1] if inputs["input_ids"].shape is not None else "seq_len"

        def new_input(name: str, dtype: ir.DataType, dims: list) -> ir.Value:
            value = ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(dims))
            graph.inputs.append(value)
            return value

        f32 = ir.DataType.FLOAT
        values = SamplerValues(
            logits=logits, input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], batch_index=batch_index,
            last_accepted_output_tokens=new_input("last_accepted_output_tokens", ir.DataType.INT64, [batch, seq]),
            repetition_buffer=new_input(BUFFERS[0], ir.DataType.BOOL, [rows, vocab]),
            repetition_penalties=new_input("repetition_penalties", f32, [batch, 1]),
            presence_buffer=new_input(BUFFERS[1], ir.DataType.BOOL, [rows, vocab]),
            presence_penalties=new_input("presence_penalties", f32, [batch, 1]),
            temperatures=new_input("temperatures", f32, [batch, 1]),
            top_ks=new_input("top_ks", ir.DataType.INT32, [batch, 1]),
            top_ps=new_input("top_ps", f32, [batch, 1]),
            min_ps=new_input("min_ps", f32, [batch, 1]),
            random_numbers=new_input("random_numbers", f32, [batch, max_top_k]),
        )
        if self.config["include_guided_decoding"]:
            values.token_bitmasks = new_input("token_bitmasks", ir.DataType.BOOL, [batch, vocab])
        o = Ops(graph, opset)
        next_tokens, probs, repetition, presence = build_sampler(
            o, values, max_top_k=max_top_k, return_pdfs=self.config["return_pdfs"])

        index = list(graph.outputs).index(logits)
        logits.name = o.fresh("logits")
        renamed = [(next_tokens, "next_tokens", ir.DataType.INT64, [shape[0], shape[1], 1])]
        if probs is not None:
            renamed.append((probs, "probs", f32, [shape[0], shape[1], vocab]))
        renamed += [(repetition, f"{BUFFERS[0]}_RetainedState", ir.DataType.BOOL, [rows, vocab]),
                    (presence, f"{BUFFERS[1]}_RetainedState", ir.DataType.BOOL, [rows, vocab])]
        for value, name, dtype, dims in renamed:
            value.name, value.type, value.shape = name, ir.TensorType(dtype), ir.Shape(dims)
        new_outputs = [v for v in graph.outputs if v is not logits]
        head = [probs, next_tokens] if probs is not None else [next_tokens]
        new_outputs[index:index] = head
        new_outputs += [repetition, presence]
        graph.outputs.clear()
        graph.outputs.extend(new_outputs)

        kind = f"{shape[1]} positions" if shape[1] != 1 else "the last token"
        if not isinstance(shape[1], int) and str(shape[1]) == str(seq):
            self.report.notes.append("logits at every token: every step has as many columns as positions, so the "
                                     "buffers read it as decode (the prompt counts as generated for presence)")
        cb = ", buffers indexed by batch_index (continuous batching)" if batch_index is not None else ""
        self.report.count("sampler")
        self.report.notes.append(f"sampling at {kind} of each row, top-k window {max_top_k}{cb}")
        return ir.passes.PassResult(model, modified=True)
