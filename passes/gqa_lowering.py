"""Attention lowered to onnxruntime's GroupQueryAttention, rotary and cache write included (``ort`` target).

After ``kv-cache`` (concat style), ``pack-matmuls``, ``rotary`` and
``attention-io`` a layer reads::

    q3, k3, v3 = Split(qkv, [Hq*D, Hkv*D, Hkv*D], axis=-1)           # qkv = x @ [Wq | Wk | Wv] (or apart)
    q = RotaryEmbedding(q3, cos, sin, num_heads=Hq)                   # k likewise, same tables
    y, present_k, present_v = Attention(q, k, v3, mask, past_k, past_v, q_num_heads=Hq, kv_num_heads=Hkv)

and becomes one node::

    y, present_k, present_v = com.microsoft::GroupQueryAttention(
        qkv, , , past_k, past_v, seqlens_k, total_sequence_length, cos_cache, sin_cache, position_ids,
        num_heads=Hq, kv_num_heads=Hkv, do_rotary=1, scale, local_window_size)

with ``seqlens_k = ReduceSum(attention_mask) - 1`` (int32) and
``total_sequence_length = attention_mask``'s length, built once for all
layers. onnxruntime-genai's model builder emits the same node; what it buys
is one kernel instead of a Split, two rotations and an attention, and above
all a cache the runtime can keep in one buffer: bound as both ``past`` and
``present`` (docs/design.md, *Lowering for onnxruntime*), the kernel writes
the new keys in place and nothing is concatenated per step.

**Padding: the graph's own mask as the bias (``mask=bias``, the default).**
GroupQueryAttention computes the causal mask itself and takes each row's
keys to be ``[0, seqlens_k]``; it knows nothing of padding. With
``mask=bias`` the Attention's own mask (bool, or already additive) goes in
as ``attention_bias`` (0 / -inf, one tensor for all layers),
``seqlens_k = total - 1`` for every row (every column is a cache slot, as
in the concat contract) and ``query_seqlens = S`` for every row -- which
also lifts onnxruntime's CPU refusal of batch > 1 for a chunk after a past
-- and ``position_ids`` go to the rotation. The graph then computes the
concat graph's logits for any batch and any padding; its inputs and outputs
are unchanged. (Checked on onnxruntime 1.32: left- and right-padded batches,
first prompts and chunks after a past.)

**``mask=none``: onnxruntime-genai's narrower form.** No bias and
``seqlens_k = ReduceSum(attention_mask) - 1``, as onnxruntime-genai's
builder writes it: equal to the concat graph only for batch 1 with an
all-ones mask. The pass then fixes the batch dim of every input and output
to 1 and writes the metadata key ``qgraph.kv.masks = all-ones``, which the
sequence replay, the input strategies and ``qgraph generate`` honour
(generate runs several prompts one after another).

Either way ``qgraph.kv.max_positions`` records how many rotary rows the
caches hold: a longer sequence is refused by the runtime, where the concat
graph would have gone on. The rows are the model's own bound
(:mod:`qgraph_passes.position_bound`: a bound already in the graph's
metadata, else ``max_position_embeddings`` of the ``config.json`` beside
the model), 8192 when it declares none, or option ``max_positions``.

**Only what the graph proves is lowered.** Per layer: q, k, v as
``[B, S, H * D]`` (packed heads, ``attention-io``), taken whole from the
packed projection when they are its Split in the order q, k, v, else
apart (GroupQueryAttention's unpacked form: biased projections that
``pack-matmuls`` leaves apart); a mask that is causal (with a sliding
window at most) on all-ones masks, probed; no qk output. A mask that also
adds a bias to the scores it shows (Bloom's ALiBi, slope_h * key position)
is lowered only with ``mask=bias``, which passes it in whole; ``mask=none``
would drop the bias, so it refuses the layer. A
soft-capped layer (Gemma 2) keeps its cap as the kernel's ``softcap``
(the two kernels cap alike: tests/passes/test_gqa_lowering.py replays a cap
that bends every score, padded rows and a sliding window included). A layer
that fails a check is left as it was, and the report names the layer and
the check.

**Rotary in the kernel where it can be, else kept.** The rotations go into
the kernel (``do_rotary``) when q and k are turned by the same tables, alike
(both half-rotated or both in interleaved pairs: ``rotary_interleaved``) and
over the same channels, and those tables are a per-position function of
``position_ids`` (probed, :mod:`qgraph_passes.gqa_probes`: the caches are
the graph's own numbers, not a re-derived formula). A partial rotation (Phi,
GPT-J, GPT-NeoX, StableLM) goes in too: the kernel turns the first
``2 x cos_cache width`` channels of each head and keeps the rest, as
RotaryEmbedding's ``rotary_embedding_dim`` does. onnxruntime's CPU kernel
takes heads of a multiple of 16 channels and turns a multiple of 16 of them
(checked on onnxruntime 1.32: heads of 16 to 80, whole and partial, both
forms). Otherwise -- a tiny model's 4 or 8 rotated channels -- the layer is
lowered all the same: its RotaryEmbedding nodes stay, q and k enter the
kernel turned and apart, and the report says why the rotations stayed. The
shared cache buffer is what such a layer gains; the rotation was already
one node.
"""

from __future__ import annotations

import types

import numpy as np
import onnx_ir as ir
from qgraph_passes.attention_contract import attribute as _attr
from qgraph_passes.attention_contract import concat_cache_reason
from qgraph_passes.attention_contract import remove_dead as _remove_dead
from qgraph_passes.gqa_probes import causal_window, rotary_cache
from qgraph_passes.position_bound import declared_max_positions

from qgraph import Option, Pass
from qgraph.errors import BadInputError
from qgraph.pass_base import Prerequisite
from qgraph.rewrite_pass import summarize_near_misses
from qgraph.verify.kv_contract import MASKS_KEY, MAX_POSITIONS_KEY

__all__ = ["LowerGQAPass", "kernel_rotary_reason"]

MS_DOMAIN = "com.microsoft"
# The rows of the rotary caches when neither the option nor the model says how many positions it takes.
FALLBACK_POSITIONS = 8192
_BATCH_NAMES = ("input_ids", "attention_mask", "position_ids")


def _const_ints(value: ir.Value | None) -> list[int] | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else [int(x) for x in tensor.numpy().reshape(-1)]


class _Layer:
    """One Attention the pass may lower, with what the checks found."""

    def __init__(self, attention: ir.Node) -> None:
        self.attention = attention
        self.split: ir.Node | None = None  # the packed projection's Split, when q, k, v come from one
        self.qkv: tuple[ir.Value, ir.Value, ir.Value] | None = None
        self.rotaries: list[ir.Node] = []  # the rotations the kernel takes in (do_rotary)
        self.kept_rotary: str | None = None  # why the rotations stay RotaryEmbedding nodes instead, if they do
        self.window: int | None = None
        self.tables: tuple[ir.Value, ir.Value] | None = None
        self.rotary_dim = 0  # the channels of each head the rotations turn (the whole head, or fewer)
        self.interleaved = 0  # rotary_interleaved: the rotations turn pairs (x0, x1), (x2, x3), ...


def _live(node: ir.Node, depth: int = 0) -> bool:
    """Whether anything the graph returns depends on ``node`` (dead leftovers of earlier rewrites do not count)."""
    if depth > 32:
        return True
    return any(o.is_graph_output() or any(_live(u.node, depth + 1) for u in o.uses()) for o in node.outputs)


def _layer_reason(layer: _Layer, graph_inputs: set[ir.Value], graph_outputs: set[ir.Value]) -> str | None:
    """Why the layer's Attention is not the packed, rotated, cached one GroupQueryAttention computes, if it is not."""
    node = layer.attention
    reason = concat_cache_reason(node, graph_inputs, graph_outputs, softcap_note=None)
    if reason is not None:
        return reason
    q, k, v, _mask, past_k, _past_v = node.inputs
    hq, hkv = _attr(node, "q_num_heads"), _attr(node, "kv_num_heads")
    if not hq or not hkv:
        return "q_num_heads / kv_num_heads are not set (Q/K/V are not packed heads; run attention-io)"
    rotaries = [x.producer() for x in (q, k)]
    rotated = [r is not None and r.op_type == "RotaryEmbedding" and r.domain in ("", "ai.onnx") for r in rotaries]
    if rotated[0] != rotated[1]:
        return "only one of q and k is rotated"
    q3, k3 = (rotaries[0].inputs[0], rotaries[1].inputs[0]) if rotated[0] else (q, k)
    head_dim = past_k.shape[3] if past_k.shape is not None and len(past_k.shape) == 4 else None
    if not isinstance(head_dim, int):
        return f"the head size of '{past_k.name}' is not static"
    for x, heads, what in ((q3, hq, "q"), (k3, hkv, "k"), (v, hkv, "v")):
        if x.shape is None or len(x.shape) != 3 or x.shape[2] != heads * head_dim:
            return f"{what} '{x.name}' is not known to be [B, S, {heads} x {head_dim}]"
    split = v.producer()
    packed = (split is not None and split.op_type == "Split" and split.domain in ("", "ai.onnx")
              and len(split.outputs) == 3 and list(split.outputs) == [q3, k3, v]
              and _attr(split, "axis", 0) in (-1, 2)
              and _const_ints(split.inputs[1] if len(split.inputs) > 1 else None) == [hq * head_dim, hkv * head_dim,
                                                                                      hkv * head_dim])
    # packed: the projection's one output goes in whole; otherwise q, k and v go in apart (GroupQueryAttention
    # takes both forms), e.g. Qwen2's biased projections, which pack-matmuls leaves apart
    layer.split = split if packed else None
    layer.qkv = (q3, k3, v)
    if rotated[0]:
        kept = _rotary_kept_reason(rotaries, (hq, hkv), node, head_dim)
        if kept is None:
            layer.rotaries = rotaries
            layer.tables = (rotaries[0].inputs[1], rotaries[0].inputs[2])
            layer.rotary_dim = _attr(rotaries[0], "rotary_embedding_dim", 0) or head_dim
            layer.interleaved = _attr(rotaries[0], "interleaved", 0)
        else:  # the rotations stay RotaryEmbedding nodes; GroupQueryAttention takes q and k rotated, apart
            layer.kept_rotary = kept
            layer.split = None
            layer.qkv = (q, k, v)
    return None


def kernel_rotary_reason(head_dim: int, rotary_dim: int) -> str | None:
    """Why onnxruntime's CPU GroupQueryAttention cannot turn ``rotary_dim`` of each head's ``head_dim`` channels.

    The kernel reads the turned width from its cos cache (twice the cache's width) and keeps the rest of the
    head; it requires heads of a multiple of 16 channels and turns a multiple of 16 of them (onnxruntime 1.32;
    tests/passes/test_gqa_rotary_kernel.py checks every accepted pair against RotaryEmbedding)."""
    if head_dim % 16:
        return f"head size {head_dim}: onnxruntime's CPU GroupQueryAttention rotates only heads of a multiple of 16"
    if rotary_dim % 16 or not 0 < rotary_dim <= head_dim:
        return (f"partial rotary (rotary_embedding_dim {rotary_dim} of {head_dim}): onnxruntime's CPU "
                "GroupQueryAttention turns only a multiple of 16 channels")
    return None


def _rotary_kept_reason(rotaries: list[ir.Node], heads: tuple[int, int], attention: ir.Node,
                        head_dim: int) -> str | None:
    """Why GroupQueryAttention cannot take the rotations into the kernel (do_rotary), if it cannot.

    Such a layer is lowered all the same: its RotaryEmbedding nodes stay and
    feed the kernel q and k already turned, as the concat graph does."""
    for r, count in zip(rotaries, heads, strict=True):
        if _attr(r, "num_heads", 0) != count:
            return f"RotaryEmbedding '{r.name}' rotates {_attr(r, 'num_heads')} packed heads, the Attention has {count}"
        if len(r.inputs) > 3 and r.inputs[3] is not None:
            return f"RotaryEmbedding '{r.name}' reads position_ids itself"
    if rotaries[0].inputs[1] is not rotaries[1].inputs[1] or rotaries[0].inputs[2] is not rotaries[1].inputs[2]:
        return "q and k are rotated with different tables"
    forms = [(_attr(r, "interleaved", 0), _attr(r, "rotary_embedding_dim", 0) or head_dim) for r in rotaries]
    if forms[0] != forms[1]:
        return (f"q and k are rotated differently (interleaved, channels: {forms[0]} and {forms[1]}); "
                "the kernel turns both alike")
    reason = kernel_rotary_reason(head_dim, forms[0][1])
    if reason is not None:
        return reason
    for r in rotaries:
        rotated = r.outputs[0]
        if rotated.is_graph_output() or any(u.node is not attention and _live(u.node) for u in rotated.uses()):
            return f"RotaryEmbedding '{r.name}' is read outside the attention"
    return None


class LowerGQAPass(Pass):
    """Lower each layer's Split + RotaryEmbedding + Attention to com.microsoft::GroupQueryAttention.

    The module docstring gives the rewrite, how padding is kept (the mask as
    attention_bias) or the domain narrowed (``mask=none``: batch 1, all-ones
    masks), and the checks; refused layers are listed in the report notes
    with the check that failed.
    """

    name = "lower-gqa"
    meaning = "sequence"  # a cached graph against the cached graph before it, replayed on the same tokens
    options = {
        "max_positions": Option(int, 0, "rows of the rotary cos/sin caches: the longest sequence the graph takes; "
                                "0: the model's own bound (metadata qgraph.kv.max_positions, else max_position_embeddings "
                                f"in the config.json beside the model), else {FALLBACK_POSITIONS}"),
        "mask": Option(str, "bias", "bias: the graph's own mask goes in as attention_bias (any batch, any padding); "
                       "none: no mask input, the graph then takes batch 1 with all-ones masks only",
                       choices=("bias", "none")),
    }
    prerequisites = (
        Prerequisite("a concat-style KV cache (past_key_values.* inputs)",
                     lambda m: any((v.name or "").startswith("past_key_values.") for v in m.graph.inputs)),
    )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        names = {v.name for v in graph.inputs}
        if not {"attention_mask", "input_ids"} <= names:
            self.report.notes.append("lower-gqa: no input_ids / attention_mask inputs; nothing lowered")
            return ir.passes.PassResult(model, False)
        self._rows = self._max_positions(model)
        graph_inputs, graph_outputs = set(graph.inputs), set(graph.outputs)
        layers, refused = [], []
        for node in list(graph):
            if node.op_type != "Attention" or node.domain not in ("", "ai.onnx"):
                continue
            layer = _Layer(node)
            reason = _layer_reason(layer, graph_inputs, graph_outputs)
            if reason is None:
                reason = self._probe(model, layer)
            if reason is not None:
                self.report.notes.append(f"lower-gqa: Attention '{node.name}' not lowered: {reason}")
                refused.append(types.SimpleNamespace(reason=reason))
                continue
            if layer.kept_rotary is not None:
                self.report.notes.append(f"lower-gqa: Attention '{node.name}' lowered with its rotations kept as "
                                         f"RotaryEmbedding: {layer.kept_rotary}")
            layers.append(layer)
        if refused:  # the table's "near miss in lower-gqa" line: how many layers, the most common check
            self.report.near_misses = summarize_near_misses({"group-query-attention": refused})
        if not layers:
            return ir.passes.PassResult(model, False)
        shared = _Shared(graph, {v.name: v for v in graph.inputs})
        for layer in layers:
            self._lower(model, layer, shared)
        self.report.count("group-query-attention", len(layers))
        if shared.rows:
            model.metadata_props[MAX_POSITIONS_KEY] = str(shared.rows)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        if self.config["mask"] == "none":
            _narrow_to_batch_one(graph)
            model.metadata_props[MASKS_KEY] = "all-ones"
            self.report.notes.append("lower-gqa: the graph now takes batch 1 with all-ones attention masks "
                                     f"(metadata {MASKS_KEY}); several prompts run one after another")
        return ir.passes.PassResult(model, True)

    # -- per layer ---------------------------------------------------------------------

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self._windows: dict[ir.Value, int | None | str] = {}
        self._caches: dict[tuple[ir.Value, ir.Value], tuple | str] = {}

    def _max_positions(self, model: ir.Model) -> int:
        """The option's bound, else the model's own (:mod:`qgraph_passes.position_bound`), else the fallback."""
        rows = self.config["max_positions"]
        if rows < 0:
            raise BadInputError(f"pass '{self.name}': option max_positions must be >= 0 (0: the model's own bound), "
                                f"got {rows}")
        if rows:
            return rows
        declared = declared_max_positions(model)
        rows, where = declared if declared is not None else (FALLBACK_POSITIONS, "the model declares no bound")
        self.report.notes.append(f"lower-gqa: rotary caches for {rows} positions ({where}; "
                                 "option max_positions sets another)")
        return rows

    def _probe(self, model: ir.Model, layer: _Layer) -> str | None:
        mask = layer.attention.inputs[3]
        if mask not in self._windows:
            self._windows[mask] = causal_window(model, mask, bias_goes_in=self.config["mask"] == "bias")
        window = self._windows[mask]
        if isinstance(window, str):
            return window
        layer.window = window
        if layer.tables is not None:
            if layer.tables not in self._caches:
                self._caches[layer.tables] = rotary_cache(model, *layer.tables, self._rows)
            cache = self._caches[layer.tables]
            if isinstance(cache, str):
                return cache
            if 2 * cache[0].shape[1] != layer.rotary_dim:  # the kernel turns 2 x the cache's width of channels
                return (f"the rotary tables are {cache[0].shape[1]} wide for {layer.rotary_dim} rotated channels "
                        f"(the kernel turns twice the tables' width)")
        return None

    def _lower(self, model: ir.Model, layer: _Layer, shared: _Shared) -> None:
        node, split = layer.attention, layer.split
        assert layer.qkv is not None
        qkv: list[ir.Value | None] = [split.inputs[0], None, None] if split is not None else list(layer.qkv)
        biased = self.config["mask"] == "bias"
        seqlens = shared.all_rows_full() if biased else shared.seqlens_k()
        inputs = [*qkv, node.inputs[4], node.inputs[5], seqlens, shared.total_length()]
        attributes = {"num_heads": _attr(node, "q_num_heads"), "kv_num_heads": _attr(node, "kv_num_heads")}
        if "scale" in node.attributes:
            attributes["scale"] = float(_attr(node, "scale"))
        if layer.window is not None:
            attributes["local_window_size"] = int(layer.window)
        if _attr(node, "softcap"):
            attributes["softcap"] = float(_attr(node, "softcap"))
        if layer.tables is not None:
            cos_cache, sin_cache = shared.caches(self._caches[layer.tables], layer.tables)
            inputs += [cos_cache, sin_cache, shared.inputs["position_ids"] if "position_ids" in shared.inputs else None]
            attributes["do_rotary"] = 1
            if layer.interleaved:
                attributes["rotary_interleaved"] = 1
        if biased:
            inputs += [None] * (10 - len(inputs))
            inputs += [shared.bias(node.inputs[3], layer.qkv[0].dtype, node), None, None, None, None, None,
                       shared.query_lengths()]
        while inputs and inputs[-1] is None:
            inputs.pop()
        gqa = ir.node("GroupQueryAttention", inputs, attributes=attributes, domain=MS_DOMAIN, num_outputs=3,
                      name=f"{node.name}/gqa")
        old = list(node.outputs[:3])
        for new, before in zip(gqa.outputs, old, strict=True):
            new.dtype, new.shape = before.dtype, before.shape
        ir.convenience.replace_nodes_and_values(model.graph, node, [node], [gqa], old, list(gqa.outputs))
        _remove_dead(model.graph, [*layer.rotaries, *([split] if split is not None else [])])


class _Shared:
    """The values every lowered layer reads, made on first request (in front of the graph's first node)."""

    def __init__(self, graph: ir.Graph, inputs: dict[str, ir.Value]) -> None:
        self.graph, self.inputs = graph, inputs
        self._seqlens: ir.Value | None = None
        self._total: ir.Value | None = None
        self._queries: ir.Value | None = None
        self._biases: dict[ir.Value, ir.Value] = {}
        self._caches: dict[tuple[ir.Value, ir.Value], tuple[ir.Value, ir.Value]] = {}
        self.rows = 0
        self._anchor = next(iter(graph), None)  # new nodes go in front of it, in the order they are made
        self._made = 0

    def _add(self, op: str, inputs, **attributes) -> ir.Value:
        self._made += 1
        name = f"lower_gqa/{op}_{self._made}"
        node = ir.node(op, inputs, attributes=attributes, name=name)
        node.outputs[0].name = name
        if self._anchor is None:
            self.graph.append(node)
        else:
            self.graph.insert_before(self._anchor, node)
        return node.outputs[0]

    def _const(self, array, name: str) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.dtype, value.shape = value.const_value.dtype, value.const_value.shape
        self.graph.register_initializer(value)
        return value

    def seqlens_k(self) -> ir.Value:
        """ReduceSum(attention_mask, axis 1) - 1 as int32: the index of each row's last token."""
        if self._seqlens is None:
            mask = self.inputs["attention_mask"]
            counts = self._add("ReduceSum", [self._add("Cast", [mask], to=ir.DataType.INT64),
                                             self._const(np.array([1], np.int64), "lower_gqa/axis_1")], keepdims=0)
            last = self._add("Sub", [counts, self._const(np.array(1, np.int64), "lower_gqa/one")])
            self._seqlens = self._add("Cast", [last], to=ir.DataType.INT32)
            self._seqlens.name = "lower_gqa/seqlens_k"
            self._seqlens.dtype, self._seqlens.shape = ir.DataType.INT32, ir.Shape([1])
        return self._seqlens

    def _batch(self) -> ir.Value:
        return self._add("Shape", [self.inputs["attention_mask"]], start=0, end=1)

    def all_rows_full(self) -> ir.Value:
        """seqlens_k when the mask goes in as a bias: every row holds all the mask's columns (total - 1)."""
        if self._seqlens is None:
            last = self._add("Sub", [self.total_length(), self._const(np.array(1, np.int32), "lower_gqa/one_i32")])
            self._seqlens = self._add("Expand", [last, self._batch()])
            self._seqlens.dtype, self._seqlens.shape = ir.DataType.INT32, ir.Shape([self.inputs["attention_mask"].shape[0]])
        return self._seqlens

    def query_lengths(self) -> ir.Value:
        """query_seqlens: every row's chunk is the whole step (padding is the bias's business)."""
        if self._queries is None:
            length = self._add("Shape", [self.inputs["input_ids"]], start=1, end=2)
            squeezed = self._add("Squeeze", [length, self._const(np.array([0], np.int64), "lower_gqa/axis_0b")])
            self._queries = self._add("Expand", [self._add("Cast", [squeezed], to=ir.DataType.INT32), self._batch()])
            self._queries.dtype, self._queries.shape = ir.DataType.INT32, ir.Shape([self.inputs["attention_mask"].shape[0]])
        return self._queries

    def bias(self, mask: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        """attention_bias from the Attention's mask: 0 where a bool mask shows a key, -inf where it hides it."""
        if mask not in self._biases:
            if mask.dtype != ir.DataType.BOOL:
                self._biases[mask] = mask  # already additive, in the model's dtype (Attention requires it)
            else:
                zero = self._const(np.array(0, dtype.numpy()), f"lower_gqa/zero_{len(self._biases)}")
                hidden = self._const(np.array(-np.inf, dtype.numpy()), f"lower_gqa/hidden_{len(self._biases)}")
                node = ir.node("Where", [mask, zero, hidden], name=f"lower_gqa/bias_{len(self._biases)}")
                node.outputs[0].name = node.name
                node.outputs[0].dtype, node.outputs[0].shape = dtype, mask.shape
                self.graph.insert_before(before, node)
                self._biases[mask] = node.outputs[0]
        return self._biases[mask]

    def total_length(self) -> ir.Value:
        """attention_mask's length as an int32 scalar: past + new tokens."""
        if self._total is None:
            length = self._add("Shape", [self.inputs["attention_mask"]], start=1, end=2)
            squeezed = self._add("Squeeze", [length, self._const(np.array([0], np.int64), "lower_gqa/axis_0")])
            self._total = self._add("Cast", [squeezed], to=ir.DataType.INT32)
            self._total.name = "lower_gqa/total_sequence_length"
            self._total.dtype, self._total.shape = ir.DataType.INT32, ir.Shape([])
        return self._total

    def caches(self, arrays: tuple, tables: tuple[ir.Value, ir.Value]) -> tuple[ir.Value, ir.Value]:
        if tables not in self._caches:
            index = len(self._caches)
            cos, sin = arrays
            self.rows = max(self.rows, int(cos.shape[0]))
            self._caches[tables] = (self._const(cos.astype(tables[0].dtype.numpy()), f"lower_gqa/cos_cache_{index}"),
                                    self._const(sin.astype(tables[1].dtype.numpy()), f"lower_gqa/sin_cache_{index}"))
        return self._caches[tables]


def _narrow_to_batch_one(graph: ir.Graph) -> None:
    """Batch dim 1 on the contract's inputs and outputs: the only batch the lowered graph computes right."""
    for value in [*graph.inputs, *graph.outputs]:
        name = value.name or ""
        cache = name.startswith(("past_key_values.", "present."))
        if (name in _BATCH_NAMES or cache or name == "logits") and value.shape is not None and len(value.shape):
            value.shape = ir.Shape([1, *value.shape[1:]])
