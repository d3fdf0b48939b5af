"""Attention lowered to onnxruntime's MultiHeadAttention where GroupQueryAttention does not apply (``ort`` target).

``lower-gqa`` takes a cached layer whose q, k, v ``attention-io`` packed
(``[B, S, H*D]``) and whose rotary, if any, it can fuse; what it refuses
(4-D ``[B, H, S, D]`` operands: TorchScript's split heads, and the dynamo
exports of GPT-2, Bloom, Phi, GPT-J, GPT-Neo, ...; interleaved or partial
rotary; softcap) stays a standard ``Attention`` (opset 23) with the concat
cache as its past inputs. This pass gives such a layer
onnxruntime's ``com.microsoft::MultiHeadAttention``, which takes the same
cache in the same layout::

    y, present_k, present_v = Attention(q, k, v, mask, past_k, past_v)          # q, k, v [B, H, S, D] or [B, S, H*D]

becomes::

    y3, present_k, present_v = com.microsoft::MultiHeadAttention(
        q3, k3, v3, , , attention_bias, past_k, past_v, num_heads=H, scale)

where ``x3 = Reshape(x, [0, 0, H*D])`` of the model's own ``[B, S, H, D]``
tensor when a 4-D operand is its ``Transpose(perm=[0, 2, 1, 3])`` (else the
Transpose is added), the output goes back the same way (a consumer's
``Transpose(perm=[0, 2, 1, 3])`` becomes a Reshape), and
``attention_bias = Where(mask, 0, lowest)`` for a boolean mask (the mask
itself when it is already additive, e.g. ALiBi folded in), one for all
layers that share the mask. ``present = concat(past, new)`` and the graph's
inputs and outputs are unchanged: it is still the concat contract, for any
batch and any padding, prefill or chunk after a past.

**Not in the ort presets.** Measured on onnxruntime 1.32's CPU kernels
(benchmarks/RESULTS.md, "MultiHeadAttention lowering"), MultiHeadAttention
prefills long prompts faster than Attention (about 0.9x at 512-2048 tokens)
but is slower on short contexts (1.04-1.21x at 16 tokens, prefill and
decode, in each of six runs); decode steps at longer contexts were within the
shared machine's noise. On a whole GPT-2-small-shaped model ("... whole model")
prefills took 1.00-1.16x and decode steps 0.91-1.00x. Not slower anywhere was the bar, so the presets keep
Attention and the pass is there for a pipeline that asks for it
(``--passes ... lower-gqa lower-mha``), e.g. for long-prompt work.

**Why not a rule table.** The rewrite reads what no single match shows:
the head counts of 4-D operands (a TorchScript export leaves q's shape
unknown; they are read by running the graph, :mod:`qgraph_passes.attention_heads`,
all layers in one session), whether the past and present are the graph's
cache I/O, and one bias shared by every layer.

**Only what MultiHeadAttention computes is lowered.** Per layer: q, k and v
with the same number of heads H (the kernel has one ``num_heads``; a layer
with grouped KV heads keeps the contract's fewer KV heads in its cache, so
no repeat can make it fit: it stays as it is), the same head size for all
three; a mask input of rank 4 whose head dim is 1 or H (the bias's
broadcast); no softcap, no ``is_causal`` (kv-cache writes an explicit mask),
no qk output in use; float32. A layer that fails a check is left as it
was, and the report names the layer and the check (a near miss).
"""

from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_contract import attribute as _attr
from qgraph_passes.attention_contract import concat_cache_reason
from qgraph_passes.attention_contract import remove_dead as _remove_dead
from qgraph_passes.attention_heads import HeadLayout, probe_head_layouts

from qgraph import Pass
from qgraph.pass_base import Prerequisite
from qgraph.rewrite_pass import summarize_near_misses

__all__ = ["LowerMHAPass"]

MS_DOMAIN = "com.microsoft"
_HEADS_PERM = [0, 2, 1, 3]
_RULE = "multi-head-attention"


def _static(shape: ir.Shape | None, index: int) -> int | None:
    if shape is None or len(shape) <= index:
        return None
    dim = shape[index]
    return dim if isinstance(dim, int) else None


def _contract_reason(node: ir.Node, graph_inputs: set[ir.Value], graph_outputs: set[ir.Value]) -> str | None:
    """Why the Attention is not a concat-cache layer MultiHeadAttention can stand in for (before heads are known)."""
    reason = concat_cache_reason(node, graph_inputs, graph_outputs,
                                 softcap_note="MultiHeadAttention has no soft-capping")
    if reason is not None:
        return reason
    q, k, v, mask, past_k, past_v = node.inputs
    if q.dtype != ir.DataType.FLOAT:
        return f"q is {q.dtype}; the pass lowers float32 layers only (onnxruntime's CPU MultiHeadAttention)"
    ranks = {len(x.shape) if x.shape is not None else None for x in (q, k, v)}
    if ranks not in ({3}, {4}):
        return f"q, k, v are not all 3-D or all 4-D (ranks {sorted(map(str, ranks))})"
    for past in (past_k, past_v):
        if _static(past.shape, 1) is None or _static(past.shape, 3) is None:
            return f"the heads and head size of '{past.name}' are not static ({past.shape})"
    if mask.shape is None or len(mask.shape) != 4:
        return f"the mask '{mask.name}' is not 4-D ({mask.shape}); attention_bias is [B or 1, H or 1, S, T]"
    if mask.dtype not in (ir.DataType.BOOL, q.dtype):
        return f"the mask '{mask.name}' is {mask.dtype}, neither bool nor the model's dtype"
    return None


def _packed_layout(node: ir.Node) -> HeadLayout | str:
    """3-D operands (attention-io's packed heads): the layout from the attributes and the past's head size."""
    q, k, v, _, past_k, past_v = node.inputs
    hq, hkv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
    if not hq or not hkv:
        return "3-D operands without q_num_heads / kv_num_heads"
    dk, dv = _static(past_k.shape, 3), _static(past_v.shape, 3)
    widths = [_static(x.shape, 2) for x in (q, k, v)]
    if widths[1] != hkv * dk or widths[2] != hkv * dv or widths[0] is None or widths[0] % hq:
        return f"q, k, v widths {widths} are not {hq} / {hkv} heads of {dk} (values {dv})"
    return HeadLayout(hq, hkv, hkv, widths[0] // hq, dk, dv)


def _layout_reason(node: ir.Node, layout: HeadLayout) -> str | None:
    past_k, past_v = node.inputs[4], node.inputs[5]
    if not layout.q_heads == layout.k_heads == layout.v_heads:
        return (f"q has {layout.q_heads} heads, k {layout.k_heads}, v {layout.v_heads}: MultiHeadAttention takes one "
                "num_heads (grouped KV heads are GroupQueryAttention's; the cache keeps the fewer KV heads, so no "
                "repeat can make the layer fit)")
    if not layout.q_size == layout.k_size == layout.v_size:
        return f"head sizes q {layout.q_size}, k {layout.k_size}, v {layout.v_size} differ"
    if (_static(past_k.shape, 1), _static(past_k.shape, 3)) != (layout.k_heads, layout.k_size) or (
            _static(past_v.shape, 1), _static(past_v.shape, 3)) != (layout.v_heads, layout.v_size):
        return f"the past inputs {past_k.shape}, {past_v.shape} are not the operands' {layout.k_heads} heads of {layout.k_size}"
    mask_heads = node.inputs[3].shape[1]
    if mask_heads != 1 and mask_heads != layout.q_heads:
        return f"the mask's head dim is {mask_heads}, neither 1 nor {layout.q_heads} (attention_bias broadcasts only those)"
    return None


class LowerMHAPass(Pass):
    """Lower each concat-cache Attention that lower-gqa left to com.microsoft::MultiHeadAttention (same contract).

    The module docstring gives the rewrite and the checks; refused layers are
    listed in the report notes with the check that failed, and summarized as
    near misses.
    """

    name = "lower-mha"
    meaning = "sequence"  # a cached graph against the cached graph before it, replayed on the same tokens
    prerequisites = (
        Prerequisite("a concat-style KV cache (past_key_values.* inputs)",
                     lambda m: any((v.name or "").startswith("past_key_values.") for v in m.graph.inputs)),
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        graph_inputs, graph_outputs = set(graph.inputs), set(graph.outputs)
        refused: list[types.SimpleNamespace] = []
        candidates: list[ir.Node] = []
        for node in list(graph):
            if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
                continue
            reason = _contract_reason(node, graph_inputs, graph_outputs)
            if reason is None:
                candidates.append(node)
            else:
                self._refuse(node, reason, refused)
        layouts = self._layouts(model, candidates, refused)
        shared = _Shared(graph)
        for node, layout in layouts.items():
            self._lower(graph, node, layout, shared)
        if refused:  # the table's "near miss in lower-mha" line: how many layers, the most common check
            self.report.near_misses = summarize_near_misses({_RULE: refused})
        if not layouts:
            return ir.passes.PassResult(model, False)
        self.report.count(_RULE, len(layouts))
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, True)

    def _refuse(self, node: ir.Node, reason: str, refused: list) -> None:
        self.report.notes.append(f"lower-mha: Attention '{node.name}' not lowered: {reason}")
        refused.append(types.SimpleNamespace(reason=reason))

    def _layouts(self, model: ir.Model, candidates: list[ir.Node], refused: list) -> dict[ir.Node, HeadLayout]:
        """The head layout of each candidate that MultiHeadAttention can take (the others refused)."""
        found: dict[ir.Node, HeadLayout | str] = {}
        four_d = {n: tuple(n.inputs[:3]) for n in candidates if len(n.inputs[0].shape) == 4}
        probed = probe_head_layouts(model, four_d)
        for node in candidates:
            if node not in four_d:
                found[node] = _packed_layout(node)
            else:
                found[node] = probed if isinstance(probed, str) else probed[node]
        layouts = {}
        for node, layout in found.items():
            reason = layout if isinstance(layout, str) else _layout_reason(node, layout)
            if reason is None:
                layouts[node] = layout
            else:
                self._refuse(node, reason, refused)
        return layouts

    def _lower(self, graph: ir.Graph, node: ir.Node, layout: HeadLayout, shared: _Shared) -> None:
        heads, size = layout.q_heads, layout.q_size
        q, k, v, mask, past_k, past_v = node.inputs
        packed = [shared.packed(x, heads, size, node) for x in (q, k, v)]
        attributes = {"num_heads": heads}
        if "scale" in node.attributes:
            attributes["scale"] = float(_attr(node, "scale"))
        inputs = [*packed, None, None, shared.bias(mask, q.dtype, node), past_k, past_v]
        mha = ir.node("MultiHeadAttention", inputs, attributes=attributes, domain=MS_DOMAIN, num_outputs=3,
                      name=f"{node.name}/mha")
        graph.insert_before(node, mha)
        y, present_k, present_v = node.outputs[:3]
        y3 = mha.outputs[0]
        y3.name, y3.dtype = f"{node.name}/mha_output", y.dtype
        if len(q.shape) == 3:  # Attention's output has q's rank
            y3.shape = y.shape
            rest = [y3]
        else:  # [B, S, H*D] back to [B, H, S, D]; a consumer that transposes back to [B, S, H, D] gets a Reshape
            rest = shared.heads_back(y, y3, heads, size, node)
        for new, old in ((mha.outputs[1], present_k), (mha.outputs[2], present_v)):
            new.dtype, new.shape, name = old.dtype, old.shape, old.name
            old.replace_all_uses_with(new, replace_graph_outputs=True)
            old.name, new.name = None, name  # the cache outputs keep their contract names
        if rest:
            y.replace_all_uses_with(rest[0])
        _remove_dead(graph, [*shared.dead, node])
        shared.dead.clear()


class _Shared:
    """What a layer's lowering adds around the MultiHeadAttention node: reshapes, transposes, the shared bias."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.dead: list[ir.Node] = []  # consumers made redundant, removed with the layer's Attention
        self._made = 0

    def _node(self, op: str, inputs, before: ir.Node, shape=None, dtype=None, **attributes) -> ir.Value:
        self._made += 1
        node = ir.node(op, inputs, attributes=attributes, name=f"{before.name}/mha_{op.lower()}_{self._made}")
        node.outputs[0].name = node.name
        node.outputs[0].dtype = dtype if dtype is not None else inputs[0].dtype
        if shape is not None:
            node.outputs[0].shape = shape
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def _const(self, array: np.ndarray, name: str) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype, value.shape = value.const_value.dtype, value.const_value.shape
        if name not in self.graph.initializers:
            self.graph.register_initializer(value)
            return value
        return self.graph.initializers[name]

    def packed(self, x: ir.Value, heads: int, size: int, before: ir.Node) -> ir.Value:
        """``x`` as ``[B, S, heads*size]``: as it is (3-D), the model's own [B, S, H, D] reshaped, or transposed first."""
        if len(x.shape) == 3:
            return x
        producer = x.producer()
        if (producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx")
                and list(_attr(producer, "perm", [])) == _HEADS_PERM):
            bshd = producer.inputs[0]
        else:
            bshd = self._node("Transpose", [x], before, perm=_HEADS_PERM)
        shape = ir.Shape([x.shape[0], x.shape[2], heads * size]) if x.shape is not None else None
        target = self._const(np.array([0, 0, heads * size], np.int64), f"lower_mha/packed_{heads}x{size}")
        return self._node("Reshape", [bshd, target], before, shape=shape)

    def heads_back(self, y: ir.Value, y3: ir.Value, heads: int, size: int, before: ir.Node) -> list[ir.Value]:
        """MultiHeadAttention's [B, S, H*D] output split into heads; a consumer's transpose back becomes that split.

        Returns ``[value]`` standing for the Attention's [B, H, S, D] ``y`` when something else reads it, else ``[]``.
        """
        target = self._const(np.array([0, 0, heads, size], np.int64), f"lower_mha/heads_{heads}x{size}")
        split = self._node("Reshape", [y3, target], before)
        transposes = [u.node for u in y.uses() if u.node.op_type == "Transpose" and u.node.domain in ("", "ai.onnx")
                      and list(_attr(u.node, "perm", [])) == _HEADS_PERM and not u.node.outputs[0].is_graph_output()]
        for transpose in transposes:
            split.shape = transpose.outputs[0].shape
            transpose.outputs[0].replace_all_uses_with(split)
            self.dead.append(transpose)
        if not y.is_graph_output() and all(u.node in transposes for u in y.uses()):
            return []
        return [self._node("Transpose", [split], before, shape=y.shape, perm=_HEADS_PERM)]

    def bias(self, mask: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        """attention_bias from the Attention's mask: 0 where a bool mask shows a key, the dtype's lowest value where
        it hides it -- not -inf: a query that sees no key at all would get NaN from MultiHeadAttention (Attention
        gives zeros), and a padded row's NaN reaches valid rows through the cache (0 x NaN). With a finite fill
        such a row averages, and a partly hidden row is unchanged (its hidden scores still underflow to 0)."""
        if mask.dtype != ir.DataType.BOOL:
            return mask  # already additive, in the model's dtype (Attention requires it)
        for node in mask.uses():
            user = node.node
            if user.name and user.name.startswith("lower_mha/bias") and user.graph is self.graph:
                return user.outputs[0]
        zero = self._const(np.array(0, dtype.numpy()), "lower_mha/zero")
        hidden = self._const(np.array(np.finfo(dtype.numpy()).min, dtype.numpy()), "lower_mha/hidden")
        node = ir.node("Where", [mask, zero, hidden], name=f"lower_mha/bias_{mask.name}")
        node.outputs[0].name = node.name
        node.outputs[0].dtype, node.outputs[0].shape = dtype, mask.shape
        producer = mask.producer()
        if producer is not None:
            self.graph.insert_after(producer, node)
        else:
            self.graph.insert_before(before, node)
        return node.outputs[0]


