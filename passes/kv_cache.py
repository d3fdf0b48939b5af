"""Give a decoder graph a KV cache on the graph itself: retained-state (device) or concat form.

Exporters give either no cache or a dynamic concat cache, and a device
compiler needs the cache as explicit inputs and outputs of fixed shape.
Because the attention core is one canonical ``Attention`` node (the
``attention`` pass), the rewrite does not depend on the exporter:

* each Attention node's new K and V (taken before any repeat_kv, so the
  cache holds the KV heads only) are written into the cache -- ScatterND or
  ``com.qualcomm.cloud::CtxScatter`` at ``position_ids`` in the retained
  form, Concat after the past in the concat form -- and the node attends
  over the whole cache;
* the exporter's mask becomes a mask built from position (or column)
  comparisons; which mask to build (causal, sliding window of w keys) is
  read by running the exporter's own mask subgraph on probe masks
  (``kv_cache_probe``), so a mask with any other meaning stops the pass;
* the positions the exporter computed from the attention mask
  (``cumsum(mask) - 1``, found the same way) become the ``position_ids``
  input, so rotary tables (full, partial, interleaved) and learned position
  embeddings (OPT's offset included) follow without being matched;
* retained form: logits at each row's last valid token by default, and
  ``specializations.json`` / ``custom_io.yaml`` beside the saved model
  (``qgraph.io`` sidecars).

A graph that already has a concat cache (optimum's names) is converted to
the retained form. Whatever the pass cannot account for -- a mask that is
not causal, positions it cannot find, a leftover use of the attention mask
or a sequence Range -- stops it with a report of what was not found; it
never emits a graph whose meaning it has not established.

Retained-form contract (DESIGN.md): a padding token (position -1) writes
slot ctx_len - 1, which a valid query at position p < ctx_len - 1 never
sees, so a sequence may hold at most ctx_len - 1 tokens.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from qgraph_passes.kv_cache_build import GraphBuilder
from qgraph_passes.kv_cache_ctx_scatter import CTX_SCATTER_DOMAIN, ctx_scatter_function
from qgraph_passes.kv_cache_files import custom_io_yaml, specializations_json
from qgraph_passes.kv_cache_positions import (
    PositionAnalysis,
    analyze_positions,
    retype_downstream,
    site_replacement,
    verify_rewired,
)
from qgraph_passes.kv_cache_probe import (
    MaskMeaning,
    ProbeError,
    mask_meaning,
    probe_length,
    probe_masks,
    run_slice,
)

from qgraph.custom_ops import attach_function
from qgraph.errors import BadInputError, PassFailure
from qgraph.io import SIDECAR_PREFIX
from qgraph.pass_base import Option, Pass, Prerequisite

__all__ = ["KVCachePass"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
_CONCAT_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_RETAINED_PAST = re.compile(r"^past_(key|value)\.(\d+)$")
# Ops applied to each token's logits on the way to the output (gemma2's soft-cap, scaling).
_PER_TOKEN_OPS = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Softcap", "Identity"}


def _is_attention(node: ir.Node) -> bool:
    return node.op_type == "Attention" and node.domain in _DEFAULT_DOMAINS


def _has_attention(model: ir.Model) -> bool:
    return any(_is_attention(n) for n in model.graph)


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


def _fail(message: str) -> PassFailure:
    return PassFailure(f"pass 'kv-cache': {message}", pass_name="kv-cache")


@dataclasses.dataclass
class _Layer:
    """One Attention node and the K/V the cache stores for it."""

    index: int
    node: ir.Node
    key: ir.Value  # new keys [B, Hkv, S, D], before repeat_kv
    value: ir.Value
    kv_heads: int
    head_dim: int
    dtype: ir.DataType
    mask: ir.Value | None
    is_causal: bool
    past: tuple[ir.Value, ir.Value] | None = None  # a concat source's past inputs
    present: tuple[ir.Value, ir.Value] | None = None  # and its present outputs
    meaning: MaskMeaning | None = None
    repeated: bool = False

    @property
    def label(self) -> str:
        return f"layer {self.index} (Attention node {self.node.name!r})"


def _reads_graph_inputs(value: ir.Value, limit: int = 64) -> bool:
    """Whether ``value`` depends on a graph input (searching at most ``limit`` producers; True if unsure)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.is_graph_input():
            return True
        node = v.producer()
        if node is None:
            continue
        if len(seen) > limit:
            return True
        stack.extend(x for x in node.inputs if x is not None)
    return False


def _const_ints(value: ir.Value | None) -> list[int] | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is None:
        return None
    return [int(x) for x in np.asarray(tensor.numpy()).reshape(-1)]


def _before_repeat_kv(value: ir.Value) -> tuple[ir.Value, bool]:
    """The K/V before repeat_kv's Unsqueeze(axis 2) -> Expand -> Reshape, when that is what feeds attention."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape":
        return value, False
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand":
        return value, False
    unsqueeze = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return value, False
    axes = _const_ints(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if axes is None and "axes" in unsqueeze.attributes:
        axes = list(unsqueeze.attributes["axes"].value)
    base = unsqueeze.inputs[0]
    expanded = expand.outputs[0].shape
    if axes != [2] or base is None or base.shape is None or base.shape.rank() != 4 or expanded is None:
        return value, False
    heads, dim = _static(base.shape[1]), _static(base.shape[3])
    if expanded.rank() != 5 or heads is None or _static(expanded[1]) != heads or _static(expanded[4]) != dim:
        return value, False
    return base, True


def _concat_past(value: ir.Value, past_inputs: set[ir.Value]) -> tuple[ir.Value, ir.Value] | None:
    """(past input, new K/V) when ``value`` is Concat(past, new) on the sequence axis."""
    node = value.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0] not in past_inputs:
        return None
    axis = node.attributes["axis"].value
    return (node.inputs[0], node.inputs[1]) if axis in (2, -2) else None


class KVCachePass(Pass):
    """Give a decoder graph with Attention nodes a KV cache: retained-state (device) or concat (optimum) I/O."""

    name = "kv-cache"
    meaning = "sequence"
    options = {
        "style": Option(str, "retained", "retained: fixed ctx_len cache written at position_ids; concat: "
                        "past_key_values -> present", ("retained", "concat")),
        "ctx_len": Option(int, 128, "retained: cache slots (at most ctx_len - 1 tokens per sequence)"),
        "logits": Option(str, "last", "retained: logits at each row's last valid token, or at every token",
                         ("last", "all")),
        "scatter": Option(str, "scatternd", "retained: how new K/V are written (ctx-scatter: "
                          "com.qualcomm.cloud::CtxScatter with its ScatterND body)", ("scatternd", "ctx-scatter")),
        "batch_size": Option(int, 1, "retained: batch_size in specializations.json"),
        "prefill_len": Option(int, 32, "retained: prefill seq_len in specializations.json (capped at ctx_len - 1)"),
        "kv_dtype": Option(str, "float16", "retained: KV precision in custom_io.yaml (model: the graph's dtype)",
                           ("float16", "float32", "model")),
    }
    prerequisites = (
        Prerequisite("the graph has Attention nodes", _has_attention, satisfied_by="attention"),
    )

    # --- analysis (nothing is changed until the whole graph is understood) -------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # The rewrite runs on a copy (tensors shared) and replaces the model's graph only when it
        # succeeded, so a graph the pass refuses -- even on a check after the rewrite -- is unchanged.
        work = model.clone()
        self._rewrite(work)
        model.graph = work.graph
        model.functions.clear()
        model.functions.update(work.functions)
        model.metadata_props.update(work.metadata_props)
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, model: ir.Model) -> None:
        cfg = self.config
        retained = cfg["style"] == "retained"
        if retained and cfg["ctx_len"] < 2:
            raise BadInputError(f"option 'kv-cache.ctx_len': {cfg['ctx_len']} leaves no slot for a token")
        graph = model.graph
        inputs = {v.name: v for v in graph.inputs}
        if any(_RETAINED_PAST.match(n) for n in inputs):
            raise BadInputError("pass 'kv-cache': the graph already has a retained-state cache (past_key.* inputs)")
        ids = inputs.get("input_ids")
        mask_input = inputs.get("attention_mask")
        if ids is None or mask_input is None:
            missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
            raise BadInputError(f"pass 'kv-cache': the graph lacks input(s) {missing}; a decoder export has both")
        if not any(o.name == "logits" for o in graph.outputs):
            raise BadInputError("pass 'kv-cache': the graph has no 'logits' output")
        past_inputs = {v for n, v in inputs.items() if _CONCAT_PAST.match(n)}
        source_positions = inputs.get("position_ids")

        layers = self._layers(model, past_inputs)
        self._read_masks(model, layers, past_inputs)
        analysis = None if source_positions is not None else self._positions(model, ids, mask_input)

        # --- rewrite ---------------------------------------------------------------------
        # The no-cache graph's mask has the chunk's shape; its Shape reads the chunk's
        # batch and length, which input_ids carries in the cached graph.
        for use in list(mask_input.uses()):
            if use.node.op_type == "Shape":
                use.node.replace_input_with(use.idx, ids)
        b = GraphBuilder(graph)
        dims = ("batch_size", "seq_len") if retained else ("batch_size", "sequence_length")
        self._rename_dims(graph, ids, dims)
        positions = self._position_input(graph, source_positions, dims, retained)
        clamped = b.op("Max", positions, b.const(0), name=b.fresh("positions"))
        for use in list(positions.uses()):  # a source's own position_ids: -1 now marks padding
            if use.node is not clamped.producer():
                use.node.replace_input_with(use.idx, clamped)
        if analysis is not None:
            self._rewire_positions(model, b, analysis, clamped, retained)

        if retained:
            self._write_retained(model, b, layers, positions)
        else:
            self._write_concat(graph, b, layers, mask_input, ids)
        self._drop_concat_source(graph, layers, past_inputs)
        if retained and cfg["logits"] == "last":
            self._last_token_logits(graph, b, positions)
        self._set_logits_shape(graph, retained, dims)

        RemoveUnusedNodesPass()(model)
        self._drop_past_inputs(graph, past_inputs)
        self._check_nothing_left(graph, b, mask_input, ranges=analysis is None)
        if retained:
            graph.inputs.remove(mask_input)
            self._device_files(model, layers)
        graph.sort()
        self.report.count("layers", len(layers))

    def _layers(self, model: ir.Model, past_inputs: set[ir.Value]) -> list[_Layer]:
        layers = []
        for index, node in enumerate(n for n in model.graph if _is_attention(n)):
            label = f"layer {index} (Attention node {node.name!r})"
            k, v = node.inputs[1:3]
            mask = node.inputs[3] if len(node.inputs) > 3 else None
            extra = [i for i, x in enumerate(node.inputs[4:], start=4) if x is not None]
            past = present = None
            if extra:
                if extra != [4, 5] or node.inputs[4] not in past_inputs:
                    raise _fail(f"{label}: inputs {extra} beyond the mask are not a past_key_values pair")
                past = (node.inputs[4], node.inputs[5])
                present = (node.outputs[1], node.outputs[2])
            if any(o.uses() or o.is_graph_output() for o in node.outputs[3:]):
                raise _fail(f"{label}: its qk_matmul output is used; a cached graph cannot keep it")
            found = []
            for kv in (k, v):
                base, repeated = _before_repeat_kv(kv)
                from_concat = _concat_past(base, past_inputs)
                if from_concat is not None:
                    found.append((from_concat[1], repeated, from_concat[0], base))
                else:
                    found.append((base, repeated, None, None))
            (key, rep_k, past_k, cat_k), (value, rep_v, past_v, cat_v) = found
            if (past_k is None) != (past_v is None):
                raise _fail(f"{label}: only one of K and V is concatenated with a past input")
            if past_k is not None:
                past, present = (past_k, past_v), (cat_k, cat_v)
            if past_inputs and past is None:
                raise _fail(f"{label}: the graph has past_key_values inputs but this layer's K/V are not "
                            "Concat(past, new) on axis 2")
            if rep_k != rep_v:
                raise _fail(f"{label}: K and V are not repeated the same way")
            if key.dtype is None:
                raise _fail(f"{label}: keys {key.name!r} have no known dtype")
            layers.append(_Layer(index, node, key, value, 0, 0, key.dtype, mask,
                                 bool(node.attributes.get_int("is_causal", 0)), past, present, repeated=rep_k))
        self._kv_dims(model, layers)
        return layers

    def _kv_dims(self, model: ir.Model, layers: list[_Layer]) -> None:
        """kv_heads and head_dim of every layer's K/V: from the shapes, or by running the graph on one token.

        Exports that reshape with -1 leave the head count symbolic for ONNX
        shape inference; one run on a single token gives the real sizes.
        """
        def dims(v: ir.Value) -> tuple[int | None, int | None]:
            if v.shape is None or v.shape.rank() != 4:
                return None, None
            return _static(v.shape[1]), _static(v.shape[3])

        for layer in layers:  # a concat source declares the cache shape on its past inputs
            if layer.past is not None:
                for new, past in zip((layer.key, layer.value), layer.past):
                    if None in dims(new) and None not in dims(past):
                        new.shape = ir.Shape([new.shape[0] if new.shape is not None and new.shape.rank() == 4
                                              else None, past.shape[1], None, past.shape[3]])
        unknown = [v for x in layers for v in (x.key, x.value) if None in dims(v)]
        measured: dict[ir.Value, tuple[int, int]] = {}
        if unknown:
            feeds = {}
            for value in model.graph.inputs:
                dtype = value.dtype.numpy() if value.dtype is not None else np.int64
                if value.name in ("input_ids", "attention_mask", "position_ids"):
                    feeds[value.name] = np.full((1, 1), 0 if value.name != "attention_mask" else 1, dtype)
            try:
                arrays = run_slice(model, unknown, feeds)
            except ProbeError as exc:
                raise _fail(f"the K/V head counts are not static in the graph and running it failed: {exc}") from None
            for value, array in zip(unknown, arrays):
                if array.ndim != 4:
                    raise _fail(f"K/V {value.name!r} has rank {array.ndim}; the canonical form is 4-D BHSD")
                measured[value] = (int(array.shape[1]), int(array.shape[3]))
            self.report.notes.append(f"K/V head counts measured on one token for {len(unknown)} value(s)")
        for layer in layers:
            k = measured.get(layer.key) or dims(layer.key)
            v = measured.get(layer.value) or dims(layer.value)
            if k != v:
                raise _fail(f"{layer.label}: keys {layer.key.name!r} have (heads, head_dim) {k}, values {v}")
            layer.kv_heads, layer.head_dim = k

    def _probe_feeds(self, model: ir.Model, length: int, layers: list[_Layer], past_inputs: set[ir.Value]):
        valid = probe_masks(length)
        rows = valid.shape[0]
        feeds = {}
        for value in model.graph.inputs:
            dtype = value.dtype.numpy() if value.dtype is not None else np.int64
            if value.name == "attention_mask":
                feeds[value.name] = valid.astype(dtype)
            elif value.name == "input_ids":
                feeds[value.name] = np.zeros(valid.shape, dtype)
            elif value.name == "position_ids":
                feeds[value.name] = np.where(valid, np.cumsum(valid, axis=1) - 1, 1).astype(dtype)
            elif value in past_inputs:
                layer = next(x for x in layers if x.past is not None and value in x.past)
                feeds[value.name] = np.zeros((rows, layer.kv_heads, 0, layer.head_dim), dtype)
        return valid, feeds

    def _read_masks(self, model: ir.Model, layers: list[_Layer], past_inputs: set[ir.Value]) -> None:
        masks = list(dict.fromkeys(x.mask for x in layers if x.mask is not None))
        for layer in layers:
            if layer.mask is None and not layer.is_causal:
                raise _fail(f"{layer.label}: no mask and is_causal=0: bidirectional attention, not a decoder")
        length = probe_length(model, masks) if masks else 16
        if self.config["style"] == "retained":
            length = min(length, self.config["ctx_len"])  # a window >= ctx_len never hides a slot
        probed: dict[ir.Value, np.ndarray] = {}
        if masks:
            length, probed = self._probe_masks(model, masks, length, layers, past_inputs)
        valid = probe_masks(length)
        for layer in layers:
            if layer.mask is None:
                layer.meaning = MaskMeaning(None)
                self.report.notes.append(f"{layer.label}: is_causal without a mask; padding is now masked too")
                continue
            try:
                layer.meaning = mask_meaning(probed[layer.mask], valid, is_causal=layer.is_causal)
            except ProbeError as exc:
                raise _fail(f"{layer.label}: mask {layer.mask.name!r}: {exc}") from None
        summary = ", ".join(f"{x.index}: {x.meaning.describe()}" for x in layers)
        self.report.notes.append(f"masks read by probing (length {length}): {summary}")
        if any(x.repeated for x in layers):
            self.report.notes.append("K/V cached before repeat_kv (the cache holds the KV heads only)")

    def _probe_masks(self, model, masks, length, layers, past_inputs) -> tuple[int, dict[ir.Value, np.ndarray]]:
        """The masks on probe rows of ``length`` tokens, or of the longest length the graph can run.

        A mask slice that reads the embeddings (for their shape) cannot run longer
        than the position table; a window longer than the model can run never
        matters, so the longest runnable length (found by bisection) is complete.
        """
        def attempt(n: int) -> dict[ir.Value, np.ndarray] | ProbeError:
            _, feeds = self._probe_feeds(model, n, layers, past_inputs)
            try:
                return dict(zip(masks, run_slice(model, masks, feeds)))
            except ProbeError as exc:
                return exc

        result = attempt(length)
        if not isinstance(result, ProbeError):
            return length, result
        low, high, best = 2, length, None
        while high - low > 1:
            middle = (low + high) // 2
            tried = attempt(middle)
            if isinstance(tried, ProbeError):
                high = middle
            else:
                low, best = middle, tried
        if best is None:
            raise _fail(f"could not run the exporter's attention masks: {result}")
        self.report.notes.append(f"masks probed at {low} tokens, the longest the graph runs (at {length}: {result})")
        return low, best

    def _positions(self, model: ir.Model, ids: ir.Value, mask_input: ir.Value) -> PositionAnalysis:
        """Where the graph reads token positions (rotary tables, position embeddings...), found by probing."""
        try:
            analysis = analyze_positions(model, ids, mask_input)
        except ProbeError as exc:
            raise _fail(f"cannot tell where the model reads token positions: {exc}") from None
        if analysis.sites:
            counted = {"column": "counted from the chunk start", "mask": "computed from the attention mask"}
            how = " and ".join(sorted({counted[s.semantics] for s in analysis.sites}))
            self.report.notes.append(
                f"positions {how} rewired to position_ids: " + ", ".join(s.describe() for s in analysis.sites))
            if "column" in analysis.semantics:
                self.report.notes.append(
                    "the export counts positions from column 0, so a left-padded row of the no-cache graph is "
                    "shifted; the cached graph takes positions from position_ids (cumsum(mask) - 1, as generate "
                    "computes them) and gives each row what the no-cache graph gives it unpadded")
        return analysis

    # --- rewrite helpers ---------------------------------------------------------------------

    @staticmethod
    def _rewire_positions(model: ir.Model, b: GraphBuilder, analysis: PositionAnalysis, clamped: ir.Value,
                          retained: bool) -> None:
        """Each position site reads position_ids instead; the result is run against the original."""
        replacements = {}
        for site in analysis.sites:
            replacement = site_replacement(b, site, clamped)
            site.value.replace_all_uses_with(replacement)
            replacements[site.value] = replacement
        widened = [replacements[s.value] for s in analysis.sites if s.batch_axis < 0]
        if widened:
            retype_downstream(widened, model.graph.opset_imports)
        model.graph.sort()
        try:
            verify_rewired(model, analysis, replacements, chunk_mask="none" if retained else "total",
                           shapes_declared=not widened)
        except ProbeError as exc:
            hint = ""
            if widened:
                hint = ("; positions laid out without a batch axis were given one, which the graph does not "
                        "broadcast: " + ", ".join(s.describe() for s in analysis.sites if s.batch_axis < 0))
            raise _fail(f"positions rewired to position_ids do not compute what the export computed: {exc}{hint}") \
                from None

    @staticmethod
    def _rename_dims(graph: ir.Graph, ids: ir.Value, names: tuple[str, str]) -> None:
        """The batch and seq dims of input_ids take the contract's names throughout the graph."""
        if ids.shape is None:
            return
        mapping = {}
        for dim, name in zip(ids.shape, names):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                mapping[dim.value] = name
        if not mapping:
            return

        def renamed(value: ir.Value) -> None:
            if value.shape is None:
                return
            dims = [ir.SymbolicDim(mapping[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in mapping else d
                    for d in value.shape]
            value.shape = ir.Shape(dims)

        for value in graph.inputs:
            renamed(value)
        for node in graph:
            for value in node.outputs:
                renamed(value)

    @staticmethod
    def _position_input(graph: ir.Graph, existing: ir.Value | None, dims: tuple[str, str], retained: bool) -> ir.Value:
        if existing is not None:
            existing.shape = ir.Shape(list(dims))
            return existing
        positions = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(list(dims)))
        # QEfficient's order (input_ids, position_ids, ...) and optimum's (input_ids, attention_mask, position_ids, ...)
        after = "input_ids" if retained else "attention_mask"
        index = next(i for i, v in enumerate(graph.inputs) if v.name == after)
        graph.inputs.insert(index + 1, positions)
        return positions

    @staticmethod
    def _replace_attention(graph: ir.Graph, b: GraphBuilder, layer: _Layer, key, value, mask) -> None:
        """A new Attention over the cache and the new mask; the old node (and its past inputs) goes."""
        old = layer.node
        attributes = [a for name, a in old.attributes.items() if name not in ("is_causal",)]
        new = ir.Node("", "Attention", [old.inputs[0], key, value, mask], attributes=attributes,
                      num_outputs=1, name=old.name)
        new.metadata_props.update(old.metadata_props)
        new.metadata_props["qgraph.pass"] = "kv-cache"
        new.metadata_props["qgraph.rule"] = "attend-over-cache"
        graph.insert_after(old, new)
        out, old_out = new.outputs[0], old.outputs[0]
        out.type, out.shape = old_out.type, old_out.shape
        old_out.replace_all_uses_with(out, replace_graph_outputs=True)
        for extra in old.outputs[1:]:
            if extra.is_graph_output():
                graph.outputs.remove(extra)
        graph.remove(old, safe=True)
        out.name = old_out.name
        b.created.append(new)

    def _write_retained(self, model: ir.Model, b: GraphBuilder, layers: list[_Layer], positions: ir.Value) -> None:
        graph, cfg = model.graph, self.config
        ctx_len = cfg["ctx_len"]
        # Padding (position -1) writes the reserved last slot, explicitly rather than by ScatterND's wrap.
        is_pad = b.op("Less", positions, b.const(0))
        slots = b.op("Where", is_pad, b.const(ctx_len - 1), positions, name=b.fresh("slots"))
        indices: dict[int, ir.Value] = {}
        visibility: dict[MaskMeaning, ir.Value] = {}
        if cfg["scatter"] == "ctx-scatter":
            attach_function(model, ctx_scatter_function())
        for layer in layers:
            cache_shape = ir.Shape(["batch_size", layer.kv_heads, ctx_len, layer.head_dim])
            written = []
            for kind, new in (("key", layer.key), ("value", layer.value)):
                past = ir.Value(name=f"past_{kind}.{layer.index}", type=ir.TensorType(layer.dtype), shape=cache_shape)
                graph.inputs.append(past)
                out_name = f"past_{kind}.{layer.index}_RetainedState"
                if cfg["scatter"] == "ctx-scatter":
                    state = b.op("CtxScatter", past, slots, new, domain=CTX_SCATTER_DOMAIN, name=out_name,
                                 rule="retained-write")
                else:
                    if layer.kv_heads not in indices:
                        indices[layer.kv_heads] = b.scatter_indices(slots, layer.kv_heads)
                    state = b.op("ScatterND", past, indices[layer.kv_heads], new, name=out_name, rule="retained-write")
                state.type, state.shape = ir.TensorType(layer.dtype), cache_shape
                graph.outputs.append(state)
                written.append(state)
            meaning = layer.meaning
            if meaning not in visibility:
                visible = b.retained_visibility(positions, ctx_len, meaning.window)
                if meaning.slopes is not None:
                    visible = b.key_position_bias(visible, b.retained_key_positions(ctx_len), meaning.slopes,
                                                  layer.dtype)
                visibility[meaning] = visible
            self._replace_attention(graph, b, layer, written[0], written[1], visibility[meaning])

    def _write_concat(self, graph: ir.Graph, b: GraphBuilder, layers: list[_Layer], mask_input, ids) -> None:
        mask_input.shape = ir.Shape(["batch_size", "total_sequence_length"])
        visibility: dict[MaskMeaning, ir.Value] = {}
        for layer in layers:
            past_shape = ir.Shape(["batch_size", layer.kv_heads, "past_sequence_length", layer.head_dim])
            present_shape = ir.Shape(["batch_size", layer.kv_heads, "total_sequence_length", layer.head_dim])
            joined = []
            for kind, new in (("key", layer.key), ("value", layer.value)):
                past = ir.Value(name=f"past_key_values.{layer.index}.{kind}", type=ir.TensorType(layer.dtype),
                                shape=past_shape)
                graph.inputs.append(past)
                state = b.op("Concat", past, new, axis=2, name=f"present.{layer.index}.{kind}", rule="concat-write")
                state.type, state.shape = ir.TensorType(layer.dtype), present_shape
                graph.outputs.append(state)
                joined.append(state)
            meaning = layer.meaning
            if meaning not in visibility:
                visible = b.concat_visibility(mask_input, ids, meaning.window)
                if meaning.slopes is not None:
                    visible = b.key_position_bias(visible, b.concat_key_positions(mask_input), meaning.slopes,
                                                  layer.dtype)
                visibility[meaning] = visible
            self._replace_attention(graph, b, layer, joined[0], joined[1], visibility[meaning])

    @staticmethod
    def _drop_concat_source(graph: ir.Graph, layers: list[_Layer], past_inputs: set[ir.Value]) -> None:
        """A converted optimum graph loses its old past inputs and present outputs."""
        if not past_inputs:
            return
        for layer in layers:
            for old in layer.present or ():
                if old.is_graph_output():
                    graph.outputs.remove(old)

    @staticmethod
    def _drop_past_inputs(graph: ir.Graph, past_inputs: set[ir.Value]) -> None:
        for value in sorted(past_inputs, key=lambda v: v.name):
            if value.uses():
                users = ", ".join(sorted({u.node.name or u.node.op_type for u in value.uses()}))
                raise _fail(f"the old cache input {value.name!r} is still read by {users}")
            graph.inputs.remove(value)

    def _last_token_logits(self, graph: ir.Graph, b: GraphBuilder, positions: ir.Value) -> None:
        """Gather each row's last valid token before the LM head, or at the logits when no head is found.

        The head is the MatMul whose only graph-dependent operand is the
        hidden state [B, S, H], reached from the logits through per-token
        ops with constant operands (scaling, gemma2's final soft-cap).
        """
        logits = next(o for o in graph.outputs if o.name == "logits")
        chain = [logits]
        value, head = logits, None
        while (node := value.producer()) is not None:
            variable = [x for x in node.inputs if x is not None and _reads_graph_inputs(x)]
            if len(variable) != 1:
                break
            hidden = node.inputs[0]
            if node.op_type == "MatMul" and hidden is variable[0] and hidden.shape is not None and hidden.shape.rank() == 3:
                head = node
                break
            if node.op_type not in _PER_TOKEN_OPS:
                break
            value = variable[0]
            chain.append(value)
        if head is not None:
            head.replace_input_with(0, b.gather_last_valid(head.inputs[0], positions))
            where = f"before the LM head (MatMul {head.name!r})"
        else:  # no head found: gather at the output (the head then runs on every token)
            index = graph.outputs.index(logits)
            logits.name = b.fresh("logits_every_token")
            gathered = b.gather_last_valid(logits, positions)
            gathered.name, gathered.type = "logits", logits.type
            graph.outputs[index] = gathered
            chain = [gathered]
            where = "at the logits output (no LM head MatMul found)"
        for v in chain:
            if v.shape is not None and v.shape.rank() == 3:
                v.shape = ir.Shape([v.shape[0], 1, v.shape[2]])
        self.report.notes.append(f"logits gathered at each row's last valid token {where}")

    @staticmethod
    def _set_logits_shape(graph: ir.Graph, retained: bool, dims: tuple[str, str]) -> None:
        logits = next(o for o in graph.outputs if o.name == "logits")
        if logits.shape is not None and logits.shape.rank() == 3:
            seq = logits.shape[1] if isinstance(logits.shape[1], int) else dims[1]
            logits.shape = ir.Shape([dims[0], seq, logits.shape[2]])

    @staticmethod
    def _check_nothing_left(graph: ir.Graph, b: GraphBuilder, mask_input: ir.Value, *, ranges: bool) -> None:
        """Nothing may still read the mask; with a position_ids input, no Range may count positions.

        (Without one, every value that carries positions was found, rewired and
        run against the original by the position analysis.)
        """
        ours = set(b.created)
        stray = sorted({u.node.name or u.node.op_type for u in mask_input.uses() if u.node not in ours})
        if stray:
            raise _fail(f"'attention_mask' is still read by {', '.join(stray)} after the masks and positions were "
                        "replaced; the pass does not know what these nodes compute")
        ranges = [n for n in graph if n.op_type == "Range" and n not in ours] if ranges else []
        if ranges:
            names = ", ".join(repr(n.name) for n in ranges)
            raise _fail(f"Range node(s) {names} still feed the graph: positions counted from the chunk start would be "
                        "wrong after the first step; the pass cannot account for them")

    def _device_files(self, model: ir.Model, layers: list[_Layer]) -> None:
        cfg = self.config
        model.metadata_props[SIDECAR_PREFIX + "specializations.json"] = specializations_json(
            batch_size=cfg["batch_size"], prefill_len=min(cfg["prefill_len"], cfg["ctx_len"] - 1),
            ctx_len=cfg["ctx_len"],
        )
        names = []
        for layer in layers:
            for kind in ("key", "value"):
                names.append(f"past_{kind}.{layer.index}")
        names += [f"{n}_RetainedState" for n in list(names)]
        precision = cfg["kv_dtype"]
        if precision == "model":
            precision = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16"}.get(layers[0].dtype, "float32")
        model.metadata_props[SIDECAR_PREFIX + "custom_io.yaml"] = custom_io_yaml(names, precision)
