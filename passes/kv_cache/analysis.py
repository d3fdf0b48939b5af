"""What a decoder graph computes, read once for every KV-cache rewrite.

The cache rewrites -- retained or concat style, and the serving variants
built on them -- all need the same facts about the no-cache graph, and none
of them may depend on how an exporter spelled it:

* **layers**: each canonical ``Attention`` node, its new K and V taken
  before any repeat_kv (so the cache holds the KV heads only), their head
  count and size (from the shapes, or measured on one token), and, for a
  graph that already has a concat cache, its past inputs and present
  outputs;
* **masks**: which function of the attention mask each layer's mask is
  (causal, padding, sliding window, an ALiBi key-position bias), read by
  running it (:mod:`.probe`);
* **positions**: where the model reads token positions and how it counts
  them (:mod:`.positions`).

:func:`analyze_decoder` changes nothing; it raises :class:`AnalysisError`
naming the layer, value and check that failed.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnx_ir as ir
from qgraph_passes.kv_cache.positions import TOKENS, PositionAnalysis, analyze_positions, dependencies
from qgraph_passes.kv_cache.probe import (
    CONCAT_PAST,
    MaskMeaning,
    ProbeError,
    empty_past,
    mask_meaning,
    probe_length,
    longest_runnable,
    probe_masks,
    run_slice,
    sees_later_key,
    zeroable_weights,
)

from qgraph.errors import BadInputError

__all__ = ["AnalysisError", "DecoderAnalysis", "Layer", "analyze_decoder", "is_attention"]

_DEFAULT_DOMAINS = ("", "ai.onnx")
RETAINED_PAST = re.compile(r"^past_(key|value)\.(\d+)$")


class AnalysisError(ValueError):
    """The graph does something the analysis cannot account for; the message names it."""


def is_attention(node: ir.Node) -> bool:
    return node.op_type == "Attention" and node.domain in _DEFAULT_DOMAINS


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) else None


@dataclasses.dataclass
class Layer:
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


@dataclasses.dataclass
class DecoderAnalysis:
    """The facts every cache rewrite needs (nothing in the graph is changed by finding them)."""

    ids: ir.Value
    mask: ir.Value
    source_positions: ir.Value | None  #: the graph's own position_ids input, if it has one
    past_inputs: set[ir.Value]  #: a concat-cached source's past_key_values inputs
    layers: list[Layer]
    positions: PositionAnalysis | None  #: None when the graph takes position_ids itself


def analyze_decoder(model: ir.Model, *, notes: list[str], mask_length_cap: int | None = None) -> DecoderAnalysis:
    """Read layers, masks and positions of ``model``.

    ``mask_length_cap``: the longest probe the masks need (a retained cache of
    ctx_len slots never needs more). Findings worth telling go to ``notes``.

    Raises:
        BadInputError: the graph is not a decoder export (inputs, outputs).
        AnalysisError: something in it cannot be accounted for.
    """
    graph = model.graph
    inputs = {v.name: v for v in graph.inputs}
    if any(RETAINED_PAST.match(n) for n in inputs):
        raise BadInputError("pass 'kv-cache': the graph already has a retained-state cache (past_key.* inputs)")
    ids = inputs.get("input_ids")
    mask_input = inputs.get("attention_mask")
    if ids is None or mask_input is None:
        missing = [n for n in ("input_ids", "attention_mask") if n not in inputs]
        raise BadInputError(f"pass 'kv-cache': the graph lacks input(s) {missing}; a decoder export has both")
    if not any(o.name == "logits" for o in graph.outputs):
        raise BadInputError("pass 'kv-cache': the graph has no 'logits' output")
    past_inputs = {v for n, v in inputs.items() if CONCAT_PAST.match(n)}
    source_positions = inputs.get("position_ids")
    layers = _layers(model, past_inputs, notes)
    unknown = _unknown_kv(layers)
    probed_kv = _read_masks(model, layers, past_inputs, notes, mask_length_cap, unknown)
    _kv_dims(model, layers, notes, probed_kv)
    positions = None if source_positions is not None else _positions(model, ids, mask_input, notes)
    return DecoderAnalysis(ids, mask_input, source_positions, past_inputs, layers, positions)


def _layers(model: ir.Model, past_inputs: set[ir.Value], notes: list[str]) -> list[Layer]:
    layers = []
    for index, node in enumerate(n for n in model.graph if is_attention(n)):
        label = f"layer {index} (Attention node {node.name!r})"
        k, v = node.inputs[1:3]
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        extra = [i for i, x in enumerate(node.inputs[4:], start=4) if x is not None]
        past = present = None
        if extra:
            if extra != [4, 5] or node.inputs[4] not in past_inputs:
                raise AnalysisError(f"{label}: inputs {extra} beyond the mask are not a past_key_values pair")
            past = (node.inputs[4], node.inputs[5])
            present = (node.outputs[1], node.outputs[2])
        if any(o.uses() or o.is_graph_output() for o in node.outputs[3:]):
            raise AnalysisError(f"{label}: its qk_matmul output is used; a cached graph cannot keep it")
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
            raise AnalysisError(f"{label}: only one of K and V is concatenated with a past input")
        if past_k is not None:
            past, present = (past_k, past_v), (cat_k, cat_v)
        if past_inputs and past is None:
            raise AnalysisError(f"{label}: the graph has past_key_values inputs but this layer's K/V are not "
                        "Concat(past, new) on axis 2")
        if rep_k != rep_v:
            raise AnalysisError(f"{label}: K and V are not repeated the same way")
        if key.dtype is None:
            raise AnalysisError(f"{label}: keys {key.name!r} have no known dtype")
        layers.append(Layer(index, node, key, value, 0, 0, key.dtype, mask,
                             bool(node.attributes.get_int("is_causal", 0)), past, present, repeated=rep_k))
    return layers


def _dims(v: ir.Value) -> tuple[int | None, int | None]:
    if v.shape is None or v.shape.rank() != 4:
        return None, None
    return _static(v.shape[1]), _static(v.shape[3])


def _unknown_kv(layers: list[Layer]) -> list[ir.Value]:
    """The K/V whose head count or size the shapes do not state (a concat source's past inputs may)."""
    for layer in layers:
        if layer.past is not None:
            for new, past in zip((layer.key, layer.value), layer.past):
                if None in _dims(new) and None not in _dims(past):
                    new.shape = ir.Shape([new.shape[0] if new.shape is not None and new.shape.rank() == 4
                                          else None, past.shape[1], None, past.shape[3]])
    return [v for x in layers for v in (x.key, x.value) if None in _dims(v)]


def _kv_dims(model: ir.Model, layers: list[Layer], notes: list[str], probed: dict[ir.Value, np.ndarray]) -> None:
    """kv_heads and head_dim of every layer's K/V: from the shapes, or from running the graph.

    Exports that reshape with -1 leave the head count symbolic for ONNX
    shape inference. The mask probe runs them (``probed``) when the masks
    need the same part of the graph -- as they do when a mask is expanded to
    Shape(q) -- else one run on a single token gives the real sizes.
    """
    dims = _dims
    unknown = [v for x in layers for v in (x.key, x.value) if None in dims(v) and v not in probed]
    measured: dict[ir.Value, tuple[int, int]] = {}
    for value, array in probed.items():
        if array.ndim != 4:
            raise AnalysisError(f"K/V {value.name!r} has rank {array.ndim}; the canonical form is 4-D BHSD")
        measured[value] = (int(array.shape[1]), int(array.shape[3]))
    if probed:
        notes.append(f"K/V head counts measured with the mask probe for {len(probed)} value(s)")
    if unknown:
        feeds = {}
        try:
            for value in model.graph.inputs:
                dtype = value.dtype.numpy() if value.dtype is not None else np.int64
                if value.name in ("input_ids", "attention_mask", "position_ids"):
                    feeds[value.name] = np.full((1, 1), 0 if value.name != "attention_mask" else 1, dtype)
                elif value.name is not None and CONCAT_PAST.match(value.name):
                    feeds[value.name] = empty_past(value, 1)  # a concat source: one token, no past
            arrays = run_slice(model, unknown, feeds)
        except ProbeError as exc:
            raise AnalysisError(f"the K/V head counts are not static in the graph and running it failed: {exc}") from None
        for value, array in zip(unknown, arrays):
            if array.ndim != 4:
                raise AnalysisError(f"K/V {value.name!r} has rank {array.ndim}; the canonical form is 4-D BHSD")
            measured[value] = (int(array.shape[1]), int(array.shape[3]))
        notes.append(f"K/V head counts measured on one token for {len(unknown)} value(s)")
    for layer in layers:
        k = measured.get(layer.key) or dims(layer.key)
        v = measured.get(layer.value) or dims(layer.value)
        if k != v:
            raise AnalysisError(f"{layer.label}: keys {layer.key.name!r} have (heads, head_dim) {k}, values {v}")
        layer.kv_heads, layer.head_dim = k


def _probe_feeds(model: ir.Model, length: int, layers: list[Layer], past_inputs: set[ir.Value]):
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
            heads, size = _dims(value)
            if heads is None or size is None:
                raise AnalysisError(f"the cache input {value.name!r} has no static head count and size")
            feeds[value.name] = np.zeros((rows, heads, 0, size), dtype)
    return valid, feeds


def _read_masks(model: ir.Model, layers: list[Layer], past_inputs: set[ir.Value], notes: list[str],
                mask_length_cap: int | None, unknown_kv: list[ir.Value]) -> dict[ir.Value, np.ndarray]:
    """Each layer's mask meaning; returns ``unknown_kv`` as run by the same probe (when masks exist)."""
    masks = list(dict.fromkeys(x.mask for x in layers if x.mask is not None))
    for layer in layers:
        if layer.mask is None and not layer.is_causal:
            raise BadInputError(f"pass 'kv-cache': {layer.label}: no mask and is_causal=0: bidirectional "
                                "attention, not a decoder")
    length = probe_length(model, masks) if masks else 16
    if mask_length_cap is not None:
        length = min(length, mask_length_cap)  # a window >= ctx_len never hides a slot
    probed: dict[ir.Value, np.ndarray] = {}
    kv: dict[ir.Value, np.ndarray] = {}
    if masks:
        length, probed = _probe_masks(model, masks + unknown_kv, length, layers, past_inputs, notes,
                                      kv_only=frozenset(unknown_kv))
        kv = {v: probed.pop(v) for v in unknown_kv}
    valid = probe_masks(length)
    for layer in layers:
        if layer.mask is None:
            layer.meaning = MaskMeaning(None)
            notes.append(f"{layer.label}: is_causal without a mask; padding is now masked too")
            continue
        later = None if layer.is_causal else sees_later_key(probed[layer.mask])
        if later is not None:
            raise BadInputError(f"pass 'kv-cache': {layer.label}: mask {layer.mask.name!r}: query {later[0]} sees the "
                                f"later key {later[1]} of an unpadded row: bidirectional attention, not a decoder")
        try:
            layer.meaning = mask_meaning(probed[layer.mask], valid, is_causal=layer.is_causal)
        except ProbeError as exc:
            raise AnalysisError(f"{layer.label}: mask {layer.mask.name!r}: {exc}") from None
    summary = ", ".join(f"{x.index}: {x.meaning.describe()}" for x in layers)
    notes.append(f"masks read by probing (length {length}): {summary}")
    if any(x.repeated for x in layers):
        notes.append("K/V cached before repeat_kv (the cache holds the KV heads only)")
    return kv


def _probe_masks(model, masks, length, layers, past_inputs, notes,
                 kv_only: frozenset = frozenset()) -> tuple[int, dict[ir.Value, np.ndarray]]:
    """The masks (and whatever else is asked) on probe rows of ``length`` tokens, or of the longest length the graph can run.

    A mask slice that reads the embeddings (for their shape) cannot run longer
    than the position table; a window longer than the model can run never
    matters, so the longest runnable length (found by bisection) is complete.
    """
    def attempt(n: int) -> dict[ir.Value, np.ndarray] | ProbeError:
        _, feeds = _probe_feeds(model, n, layers, past_inputs)
        try:
            return dict(zip(masks, run_slice(model, masks, feeds, zeroed=zeroed)))
        except ProbeError as exc:
            return exc

    # Weights that only meet token data cannot change a mask that reads none; of the token-dependent
    # values probed with the masks (K/V), only the shapes are used. Such weights need not be read.
    ids = next((v for v in model.graph.inputs if v.name == "input_ids"), None)
    zeroed: set[ir.Value] = set()
    if ids is not None:
        deps = dependencies(model.graph, ids, None)
        if not any(deps.get(m, 0) & TOKENS for m in masks if m not in kv_only):
            zeroed = zeroable_weights(model, lambda v: bool(deps.get(v, 0) & TOKENS))
    first = attempt(length)
    low, best = longest_runnable(attempt, length, shortest=2) if isinstance(first, ProbeError) else (length, first)
    if low is None:
        raise AnalysisError(f"could not run the exporter's attention masks: {best}")
    if low != length:
        notes.append(f"masks probed at {low} tokens, the longest the graph runs (at {length}: {first})")
    return low, best


def _positions(model: ir.Model, ids: ir.Value, mask_input: ir.Value, notes: list[str]) -> PositionAnalysis:
    """Where the graph reads token positions (rotary tables, position embeddings...), found by probing."""
    try:
        analysis = analyze_positions(model, ids, mask_input)
    except ProbeError as exc:
        raise AnalysisError(f"cannot tell where the model reads token positions: {exc}") from None
    if analysis.sites:
        counted = {"column": "counted from the chunk start", "mask": "computed from the attention mask"}
        how = " and ".join(sorted({counted[s.semantics] for s in analysis.sites}))
        notes.append(
            f"positions {how} rewired to position_ids: " + ", ".join(s.describe() for s in analysis.sites))
        if "column" in analysis.semantics:
            notes.append(
                "the export counts positions from column 0, so a left-padded row of the no-cache graph is "
                "shifted; the cached graph takes positions from position_ids (cumsum(mask) - 1, as generate "
                "computes them) and gives each row what the no-cache graph gives it unpadded")
    return analysis
