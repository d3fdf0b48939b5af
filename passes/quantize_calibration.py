"""The calibration half of ``quantize method=gptq``: the Hessian of each quantized MatMul's input over a fixed text.

GPTQ needs, for every weight it quantizes, ``H = 2 X^T X / T`` of the
activations ``X`` that reach that MatMul on representative inputs. The pass
sees only a graph, with no tokenizer, so the text is seeded token ids:
segments of :data:`SEGMENT_TOKENS` ids drawn uniformly below the vocabulary
(as ``qgraph.verify.budget`` draws the prompt of its own text), seeds 1, 2,
... -- the budget's text starts from seed 0 and is the float graph's greedy
continuation, so a GPTQ result is never judged on the text it was fitted to.
Why not the model's own greedy text, like the budget's: GPTQ needs more rows
than the widest K (1536 on SmolLM2's down projections) for a Hessian of full
rank, and a graph without a KV cache pays one whole forward run per generated
token; random ids cost one run per segment. What it buys on SmolLM2-135M
(int4, blocks of 32; benchmarks/RESULTS.md, "quantize methods"): each
layer's output error on unseen English falls for Q/K/V and O (to 0.45-0.85x
round to nearest's), is mixed for gate/up and rises for the down
projections, whose 1536-wide inputs 4096 tokens underdetermine
(1.1-1.9x); and the model's perplexity rises more than with round to
nearest, also with 8x the tokens of English calibration text (Python's
docstrings). Fitted to the very texts it is judged on, it does fall below
round to nearest's: GPTQ there does not carry from its calibration text to
other text, so ``method=rtn`` stays the default.
Everything is seeded: the same graph gives the same text and the same weights.

The activations are read by running the float graph once per segment in
onnxruntime with every MatMul input exposed as an extra output; only the
K x K sums are kept, never the activations.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qgraph.errors import BadInputError, PassFailure
from qgraph.quant_gptq import hessian
from qgraph.verify import RunError
from qgraph.verify.budget import Decoder, decoder_vocab, fixed_text, is_decoder

__all__ = ["SEGMENT_TOKENS", "calibration_text", "collect_hessians"]

SEGMENT_TOKENS = 64  # tokens per calibration segment (one onnxruntime run each)


def require_decoder(model: ir.Model, pass_name: str) -> None:
    """Calibration needs token ids to feed: refuse (naming the pass and option) any graph that is not a decoder."""
    if not is_decoder(model):
        inputs = [v.name for v in model.graph.inputs]
        outputs = [v.name for v in model.graph.outputs]
        raise BadInputError(
            f"{pass_name}: method=gptq needs a decoder graph to make its calibration text (an 'input_ids' input "
            f"and a 'logits' output; other inputs only attention_mask, position_ids or empty-able "
            f"past_key_values.*); this graph has inputs {inputs} and outputs {outputs}: use method=rtn"
        )


def calibration_text(model: ir.Model, tokens: int, pass_name: str) -> list[np.ndarray]:
    """Segments of at most :data:`SEGMENT_TOKENS` seeded token ids (seeds 1, 2, ...), ``tokens`` in all."""
    if tokens < 2:
        raise BadInputError(f"{pass_name}: calibration_tokens must be at least 2, got {tokens}")
    vocab = decoder_vocab(model)
    lengths = [SEGMENT_TOKENS] * (tokens // SEGMENT_TOKENS) + ([tokens % SEGMENT_TOKENS] if tokens % SEGMENT_TOKENS
                                                               else [])
    return [fixed_text(vocab, prompt=length, seed=seed) for seed, length in enumerate(lengths, start=1)]


def collect_hessians(model: ir.Model, activations: Sequence[str], segments: Sequence[np.ndarray],
                     pass_name: str) -> dict[str, np.ndarray]:
    """``H = 2 X^T X / T`` (float64 [K, K]) of each named activation over every position of every segment."""
    names = tuple(dict.fromkeys(activations))
    decoder = _decoder(model, pass_name, names)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    try:
        for segment in segments:
            outputs = _run(pass_name, decoder.outputs, segment)
            for name in names:
                x = np.asarray(outputs[name], np.float64)
                x = x.reshape(-1, x.shape[-1])  # every position (a last-token LM head sees one per segment)
                # hessian() averages; sum here and divide once, so every row weighs the same.
                sums[name] = sums.get(name, 0.0) + hessian(x) * len(x)
                rows[name] = rows.get(name, 0) + len(x)
    finally:
        decoder.close()
    return {name: total / max(rows[name], 1) for name, total in sums.items()}


def _decoder(model: ir.Model, pass_name: str, extra_outputs: tuple[str, ...] = ()) -> Decoder:
    try:
        return Decoder(model, "the float graph being calibrated", extra_outputs)
    except RunError as exc:
        raise PassFailure(f"{pass_name}: calibration cannot load the float graph: {exc}",
                          pass_name=pass_name) from None


def _run(pass_name: str, function, *args):
    try:
        return function(*args)
    except RunError as exc:
        raise PassFailure(f"{pass_name}: calibration run failed: {exc}", pass_name=pass_name) from None
