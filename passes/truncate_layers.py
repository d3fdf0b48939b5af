"""A draft model from a decoder: its first N layers, then its own final norm and LM head.

Speculative decoding needs a cheaper model over the same vocabulary, and the
first layers of the target itself are one that needs no second export: the
residual stream after layer N goes straight into the final norm and head
(early exit). This is a different model on purpose (``meaning = "draft"``:
``--verify`` refuses it); its use is to propose tokens the target checks.

Where the residual stream is found, on the canonical graph (Attention nodes,
no cache yet), without knowing the architecture:

* ``h_N``, the stream entering layer N: among the values every path from
  Attention N-1 to Attention N's query passes through (its dominators), the
  last one that also reaches the logits around Attention N (the residual
  connection) and is not a normalization's output (a parallel-attention
  block normalizes once for attention and MLP, so its norm output reaches
  the logits through the MLP too);
* ``h_L``, the stream entering the final norm: among the dominators of the
  logits after the last Attention, the last one made by the same op as
  ``h_N`` and followed by the op that follows ``h_N`` on its way to the
  query (the norm's first). A decoder that normalizes after each block
  instead (OLMo2) has no norm between the stream and the next layer's
  projections; there it is the last such op whose two inputs are both
  computed (a norm's bias Add has a constant one).

The final norm then reads ``h_N`` instead of ``h_L``, and the unused layers
are removed. Anything that does not line up (no such value, other shapes)
stops the pass with what was not found.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qgraph.errors import BadInputError, PassFailure
from qgraph.pass_base import Option, Pass, Prerequisite

__all__ = ["TruncateLayersPass"]

_NORMS = {"LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
          "SkipSimplifiedLayerNormalization", "CustomRMSNorm"}


def _attention_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")]


def _has_attention(model: ir.Model) -> bool:
    return bool(_attention_nodes(model.graph))


def _reaches(starts: list[ir.Value], goal: ir.Value, *, blocked_value: ir.Value | None = None,
             blocked_node: ir.Node | None = None) -> bool:
    """Whether ``goal`` is reachable forward from ``starts`` without passing the blocked value or node."""
    stack, seen = [v for v in starts if v is not blocked_value], set()
    while stack:
        value = stack.pop()
        if value is goal:
            return True
        if value in seen:
            continue
        seen.add(value)
        for node in value.consumers():
            if node is blocked_node:
                continue
            stack.extend(o for o in node.outputs if o is not blocked_value)
    return False


def _ancestors(value: ir.Value) -> set[ir.Value]:
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if (node := v.producer()) is not None:
            stack.extend(x for x in node.inputs if x is not None)
    return seen


def _dominators(after: ir.Node, goal: ir.Value, order: dict[ir.Node, int]) -> list[ir.Value]:
    """Values downstream of ``after`` that every path from it to ``goal`` passes through, in graph order."""
    ancestors = _ancestors(goal)
    candidates = [v for v in ancestors if (p := v.producer()) is not None and order[p] > order[after]]
    candidates.sort(key=lambda v: (order[v.producer()], v.producer().outputs.index(v)))
    starts = list(after.outputs)
    return [v for v in candidates if v is goal or not _reaches(starts, goal, blocked_value=v)]


def _chain(values: list[ir.Value]) -> list[str]:
    return [v.producer().op_type for v in values]


def _computed(value: ir.Value | None) -> bool:
    """Made at run time: neither an initializer nor a Constant's output (a norm's bias is one of those)."""
    if value is None or value.const_value is not None:
        return False
    producer = value.producer()
    return producer is not None and producer.op_type != "Constant"


def _fail(message: str) -> PassFailure:
    return PassFailure(f"pass 'truncate-layers': {message}", pass_name="truncate-layers")


class TruncateLayersPass(Pass):
    """Keep a decoder's first N layers and its final norm and head: a draft model for speculative decoding."""

    name = "truncate-layers"
    meaning = "draft"
    options = {"layers": Option(int, 1, "decoder layers kept (1 .. layers - 1)")}
    prerequisites = (Prerequisite("the graph has Attention nodes", _has_attention, satisfied_by="attention"),)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graph.sort()
        order = {node: i for i, node in enumerate(graph)}
        attentions = _attention_nodes(graph)
        keep = self.config["layers"]
        if not 1 <= keep < len(attentions):
            raise BadInputError(f"option 'truncate-layers.layers': {keep} is not in 1 .. {len(attentions) - 1} "
                                f"(the graph has {len(attentions)} Attention layer(s))")
        logits = next((o for o in graph.outputs if o.name == "logits"), None)
        if logits is None:
            raise _fail("the graph has no output 'logits'")
        stream = self._stream_into(attentions[keep - 1], attentions[keep], logits, order)
        final = self._final_stream(attentions[-1], logits, stream, order)
        dims = [None if v.shape is None else v.shape[-1] for v in (stream.value, final)]
        if dims[0] != dims[1] or (stream.value.shape is not None and final.shape is not None
                                  and stream.value.shape.rank() != final.shape.rank()):
            raise _fail(f"the stream after layer {keep} ({stream.value.name!r}, {stream.value.shape}) and the final "
                        f"norm's input ({final.name!r}, {final.shape}) differ in shape")
        final.replace_all_uses_with(stream.value)
        RemoveUnusedNodesPass()(model)
        self.report.notes.append(f"kept {keep} of {len(attentions)} layers: the final norm reads {stream.value.name!r} "
                                 f"(was {final.name!r})")
        self.report.count("layers removed", len(attentions) - keep)
        return ir.passes.PassResult(model, modified=True)

    class _Stream:
        def __init__(self, value: ir.Value, follow: list[str]) -> None:
            self.value, self.follow = value, follow

    def _stream_into(self, previous: ir.Node, attention: ir.Node, logits: ir.Value,
                     order: dict[ir.Node, int]) -> _Stream:
        query = attention.inputs[0]
        chain = _dominators(previous, query, order)
        for i in range(len(chain) - 1, -1, -1):
            v = chain[i]
            if v.producer().op_type in _NORMS:
                continue
            if _reaches([v], logits, blocked_node=attention):
                return self._Stream(v, _chain(chain[i + 1:]))
        raise _fail(f"no residual stream found between Attention {previous.name!r} and {attention.name!r}: no value "
                    "every path to the query passes that also reaches the logits around the attention")

    @staticmethod
    def _final_stream(last: ir.Node, logits: ir.Value, stream: _Stream, order: dict[ir.Node, int]) -> ir.Value:
        chain = _dominators(last, logits, order)
        ops, want = _chain(chain), stream.follow
        kind = stream.value.producer().op_type
        for i in range(len(chain) - 2, -1, -1):
            if ops[i] == kind and ops[i + 1] == want[0]:
                return chain[i]
        # A decoder that normalizes after each block (OLMo2) feeds the stream to the next layer's projections
        # directly, so no norm follows it there; its last sum of two computed values is the stream.
        for i in range(len(chain) - 2, -1, -1):
            if ops[i] == kind and len(inputs := chain[i].producer().inputs) == 2 and all(map(_computed, inputs)):
                return chain[i]
        raise _fail(f"the final norm was not found: after the last Attention, no {kind} followed by {want[0]} (as "
                    f"the stream into a layer is followed) and no {kind} of two computed values among the values "
                    f"leading to the logits: {ops}")
