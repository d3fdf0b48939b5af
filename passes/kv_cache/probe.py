"""Reading what an exporter's mask and position subgraphs mean, by running them.

Exporters spell the causal mask, the padding mask and a sliding window in a
dozen ways (bool or additive float, Trilu or position comparisons, vmap'd
index arithmetic). The KV-cache pass does not need to match each spelling:
it needs to know *which* function of the attention mask the subgraph
computes, so it can rebuild the same function from positions. It therefore
cuts the subgraph that computes a value out of the graph, runs it in
onnxruntime on a few probe masks (no padding, left padding, right padding)
and compares the result with the candidate meaning:

* attention masks: key j visible to query i iff mask[j] and j <= i and
  i - j < window (window None = unbounded), checked on every valid query;
* a float mask may also add a bias to the visible scores: it must be
  ``slope[h] * position(key)`` (ALiBi), which the cached graph rebuilds from
  the slots' positions.

Anything else (a bidirectional mask, a mask that reads other inputs, a
relative-position bias) is reported, never guessed at. Positions are read
by :mod:`kv_cache_positions`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

__all__ = [
    "CONCAT_PAST",
    "backward_slice",
    "empty_past",
    "key_position_slopes",
    "longest_runnable",
    "mask_meaning",
    "MaskMeaning",
    "probe_length",
    "ProbeError",
    "run_slice",
    "sees_later_key",
    "shape_cuts",
    "zeroable_weights",
]

#: Integer constants above this are sentinels (INT64_MAX ends of Slice), not window sizes.
_LARGEST_WINDOW_CONSTANT = 1 << 20


#: Initializers above this size are zeros in a probe that does not need weight values.
_ZEROED_WEIGHT_BYTES = 1 << 20


class ProbeError(ValueError):
    """A subgraph could not be probed or does not compute what the pass needs."""


#: A concat cache input (optimum's names): [batch, kv heads, past length, head size].
CONCAT_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def empty_past(value: ir.Value, rows: int) -> np.ndarray:
    """The cache input ``value`` with no past: ``rows`` rows of 0 slots, heads and size as declared.

    The heads and size must be declared: a probe that guessed them would
    compute the wrong thing rather than fail.
    """
    shape = value.shape
    if shape is None or shape.rank() != 4 or not all(isinstance(shape[a], int) for a in (1, 3)):
        raise ProbeError(f"the cache input {value.name!r} has shape {shape}, not [batch, heads, past, size] with "
                         "static heads and size; it cannot be fed to a probe")
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return np.zeros((rows, shape[1], 0, shape[3]), dtype)


def backward_slice(
    graph: ir.Graph, outputs: Sequence[ir.Value], *, cut: dict[ir.Node, list[ir.Value]] | None = None,
) -> tuple[list[ir.Node], list[ir.Value], list[ir.Value]]:
    """Nodes (graph order), graph inputs and initializers that ``outputs`` depend on.

    ``cut``: nodes whose inputs are not followed; the slice reads the listed
    graph inputs instead (a Shape computed from the inputs' dims, see
    :func:`_shape_stand_in`).
    """
    graph_inputs = set(graph.inputs)
    needed_nodes: set[ir.Node] = set()
    inputs: set[ir.Value] = set()
    initializers: set[ir.Value] = set()
    stack = list(outputs)
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value is None or value in seen:
            continue
        seen.add(value)
        if value in graph_inputs:
            inputs.add(value)
            continue
        if value.is_initializer():
            initializers.add(value)
            continue
        node = value.producer()
        if node is None:
            raise ProbeError(f"value {value.name!r} has no producer and is not an input")
        if node in needed_nodes:
            continue
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                raise ProbeError(f"node {node.name!r} ({node.op_type}) has a subgraph; it cannot be probed")
        needed_nodes.add(node)
        if cut is not None and node in cut:
            stack.extend(cut[node])
            continue
        stack.extend(v for v in node.inputs if v is not None)
    ordered = _topological(needed_nodes, cut)
    by_order = [v for v in graph.inputs if v in inputs]
    return ordered, by_order, sorted(initializers, key=lambda v: v.name or "")


def _topological(nodes: set[ir.Node], cut: dict[ir.Node, list[ir.Value]] | None) -> list[ir.Node]:
    """``nodes`` producers first, whatever the graph's order (a pass may have appended a producer)."""
    ordered: list[ir.Node] = []
    done: set[ir.Node] = set()
    for root in nodes:
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in done:
                continue
            if expanded:
                done.add(node)
                ordered.append(node)
                continue
            stack.append((node, True))
            if cut is not None and node in cut:
                continue
            for x in node.inputs:
                producer = x.producer() if x is not None else None
                if producer in nodes and producer not in done:
                    stack.append((producer, False))
    return ordered


def _dim_sources(graph: ir.Graph) -> dict[str, tuple[ir.Value, int]]:
    """Each symbolic dim of a graph input: the (input, axis) that carries it."""
    sources: dict[str, tuple[ir.Value, int]] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, ir.SymbolicDim) and dim.value and dim.value not in sources:
                sources[dim.value] = (value, axis)
    return sources


def _shape_stand_in(node: ir.Node, sources: dict[str, tuple[ir.Value, int]]) -> list[onnx.NodeProto] | None:
    """Nodes computing ``Shape(x)`` from the graph inputs' dims, when x's declared shape names only those.

    A probe needs the sizes of a tensor, not the tensor: without this, the
    slice behind ``Shape(inputs_embeds)`` would pull in the embedding table
    and every layer above it, and one probe session would cost as much as
    the model.
    """
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        return None
    x = node.inputs[0]
    if x is None or x.shape is None or x.is_graph_input():
        return None
    rank = len(x.shape)
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    start, end = (max(0, min(rank, i + rank if i < 0 else i)) for i in (start, end))
    out = node.outputs[0].name
    protos, parts = [], []
    for i, dim in enumerate(list(x.shape)[start:end]):
        part = f"{out}__dim{i}"
        if isinstance(dim, int):
            protos.append(onnx.helper.make_node("Constant", [], [part], value_ints=[dim]))
        elif isinstance(dim, ir.SymbolicDim) and dim.value in sources:
            source, axis = sources[dim.value]
            protos.append(onnx.helper.make_node("Shape", [source.name], [part], start=axis, end=axis + 1))
        else:
            return None
        parts.append(part)
    if not parts:
        return [onnx.helper.make_node("Constant", [], [out], value=onnx.numpy_helper.from_array(np.zeros(0, np.int64)))]
    protos.append(onnx.helper.make_node("Concat", parts, [out], axis=0))
    return protos


def _value_info(value: ir.Value, *, with_shape: bool) -> onnx.ValueInfoProto:
    if value.dtype is None:  # onnxruntime infers an output's type; an undefined one it rejects
        return onnx.ValueInfoProto(name=value.name)
    dtype = value.dtype.value
    shape = None
    if with_shape and value.shape is not None:
        shape = [d if isinstance(d, int) else (str(d) if d.value is not None else None) for d in value.shape]
    return onnx.helper.make_tensor_value_info(value.name, dtype, shape)


def shape_cuts(model: ir.Model) -> tuple[dict[ir.Node, list[onnx.NodeProto]], dict[ir.Node, list[ir.Value]]]:
    """The Shape nodes a probe computes from the graph inputs' dims: their stand-ins and the inputs they read."""
    stand_ins: dict[ir.Node, list[onnx.NodeProto]] = {}
    cut: dict[ir.Node, list[ir.Value]] = {}
    sources = _dim_sources(model.graph)
    by_name = {v.name: v for v in model.graph.inputs}
    for node in model.graph:
        protos = _shape_stand_in(node, sources) if node.op_type == "Shape" else None
        if protos is not None:
            stand_ins[node] = protos
            cut[node] = [by_name[p.input[0]] for p in protos if p.op_type == "Shape"]
    return stand_ins, cut


def zeroable_weights(model: ir.Model, token_dependent: Callable[[ir.Value], bool]) -> set[ir.Value]:
    """Large initializers that only ever meet token data: their values reach no value that reads none.

    A probe of values that read no token data gets the same answer with such
    a weight zeroed, and a token-dependent value keeps its shape; a table
    the masks or positions read themselves (a causal-mask buffer, a learned
    position table) is read by a node whose result is not token-dependent,
    so it is kept. Zeroing spares the probe session reading the model's
    weights.
    """
    out = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= _ZEROED_WEIGHT_BYTES:
            continue
        uses = value.uses()
        if uses and all(token_dependent(o) for use in uses for o in use.node.outputs):
            out.add(value)
    return out


def run_slice(
    model: ir.Model,
    outputs: Sequence[ir.Value],
    feeds: dict[str, np.ndarray] | Sequence[dict[str, np.ndarray]],
    *,
    shapes_from_inputs: bool = True,
    zeroed: Collection[ir.Value] = (),
) -> list:
    """Run only the part of ``model`` that computes ``outputs``, in onnxruntime.

    ``feeds``: one dict (returns the outputs' arrays) or a list of them
    (returns one list of arrays per dict, all from one session). Feeds for
    graph inputs the slice does not read are ignored; a graph input it reads
    without a feed is an error. ``shapes_from_inputs``: a ``Shape`` whose
    operand's declared shape names only the inputs' dims is computed from
    those (pass False when declared shapes may be stale).
    ``zeroed``: initializers that become zeros of their shape, made at run
    time, so the session does not read them (see :func:`zeroable_weights`).
    """
    several = not isinstance(feeds, dict)
    runs = list(feeds) if several else [feeds]
    stand_ins, cut = shape_cuts(model) if shapes_from_inputs else ({}, {})
    nodes, inputs, initializers = backward_slice(model.graph, outputs, cut=cut)
    for run in runs:
        missing = [v.name for v in inputs if v.name not in run]
        if missing:
            raise ProbeError(f"the subgraph reads inputs {missing}, which the probe does not know how to feed")
    tensors = []
    zeros: list[onnx.NodeProto] = []
    weight_dir: str | None = None
    for value in initializers:
        tensor = value.const_value
        if value in zeroed and tensor is not None:
            fill = onnx.helper.make_tensor("value", tensor.dtype.value, [1], [0])
            shape = onnx.numpy_helper.from_array(np.asarray(tensor.shape.numpy(), np.int64), f"{value.name}__shape")
            tensors.append(shape)
            zeros.append(onnx.helper.make_node("ConstantOfShape", [shape.name], [value.name], value=fill))
            continue
        if isinstance(tensor, ir.ExternalTensor):
            # onnxruntime reads it from its file: the model comes as bytes, so
            # it is told the one folder relative locations are in (weights
            # from any other folder are read here).
            weight_dir = weight_dir or str(tensor.base_dir)
            if str(tensor.base_dir) != weight_dir:
                tensor = ir.Tensor(tensor.numpy())
        proto = ir.serde.serialize_tensor(tensor)
        proto.name = value.name
        tensors.append(proto)
    node_protos = list(zeros)
    for n in nodes:
        node_protos.extend(stand_ins[n] if n in stand_ins else [ir.serde.serialize_node(n)])
    graph = onnx.helper.make_graph(
        node_protos,
        "kv_cache_probe",
        [_value_info(v, with_shape=True) for v in inputs],
        [_value_info(v, with_shape=False) for v in outputs],
        tensors,
    )
    domains = {n.domain for n in nodes}
    functions = [ir.serde.serialize_function(f) for f in model.functions.values() if f.domain in domains]
    opsets = [onnx.helper.make_opsetid(d, v) for d, v in model.opset_imports.items()]
    proto = onnx.helper.make_model(graph, opset_imports=opsets, functions=functions)
    proto.ir_version = max(model.ir_version or 0, 8)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # a failed probe is reported by the pass, not logged
    options.intra_op_num_threads = 1
    if weight_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", weight_dir)
    run_options = ort.RunOptions()
    run_options.log_severity_level = 4
    wanted = {v.name for v in inputs}
    names = [v.name for v in outputs]
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = [session.run(names, {k: a for k, a in run.items() if k in wanted}, run_options) for run in runs]
    except Exception as exc:  # onnxruntime raises several types for a graph it cannot run
        raise ProbeError(f"onnxruntime cannot run the subgraph: {exc}") from exc
    return results if several else results[0]


def longest_runnable(attempt: Callable[[int], object], length: int, shortest: int = 1):
    """``(n, attempt(n))`` for ``n = length``, or for the longest shorter n that runs (bisection).

    ``attempt`` returns a ProbeError instead of raising when the graph cannot
    run at n tokens -- a slice that reads a learned position table cannot run
    past the table. Returns ``(None, first error)`` when nothing runs.
    """
    result = attempt(length)
    if not isinstance(result, ProbeError):
        return length, result
    low, high, best = shortest, length, None
    while high - low > 1:
        middle = (low + high) // 2
        tried = attempt(middle)
        if isinstance(tried, ProbeError):
            high = middle
        else:
            low, best = middle, tried
    return (None, result) if best is None else (low, best)


def probe_length(model: ir.Model, values: Iterable[ir.Value], floor: int = 16, ceiling: int = 8192) -> int:
    """A probe sequence length long enough to expose any window the subgraphs encode.

    A subgraph can only encode a window of w tokens through a constant of
    about that size, so probing with the largest integer constant + 2
    tokens reveals every window it can express (capped at ``ceiling``).
    """
    nodes, _, initializers = backward_slice(model.graph, list(values), cut=shape_cuts(model)[1])
    largest = 0
    tensors = [v.const_value for v in initializers]
    arrays = []
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                tensors.append(attr.value)
            elif attr.type == ir.AttributeType.INT:
                arrays.append(np.asarray([attr.value], np.int64))
    for tensor in tensors:
        if tensor is not None and tensor.size <= 64:
            arrays.append(tensor.numpy())
    for array in arrays:
        if not np.issubdtype(array.dtype, np.integer):
            continue
        small = np.abs(array[np.abs(array) < _LARGEST_WINDOW_CONSTANT].astype(np.int64))
        if small.size:
            largest = max(largest, int(small.max()))
    return int(min(max(floor, largest + 2), ceiling))


def probe_masks(length: int) -> np.ndarray:
    """bool [3, length]: no padding, left padding, right padding (a third of the row each)."""
    pad = max(1, length // 3)
    cols = np.arange(length)
    return np.stack([np.ones(length, bool), cols >= pad, cols < length - pad])


@dataclasses.dataclass(frozen=True)
class MaskMeaning:
    """A causal padding mask, with a sliding window of ``window`` keys (None: unbounded within the probe).

    ``slopes``: the mask also adds ``slopes[h] * position(key)`` to the
    visible scores of head h (ALiBi); a term that is the same for every key
    of a query row is dropped, since softmax does not see it.
    """

    window: int | None
    slopes: tuple[float, ...] | None = None

    def describe(self) -> str:
        text = "causal" if self.window is None else f"causal, sliding window {self.window}"
        if self.slopes is not None:
            text += f", key-position bias with {len(self.slopes)} head slope(s)"
        return text


_HIDDEN_GAP = 1.0e4


def _visible(mask: np.ndarray, dtype_name: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The visible entries, and the additive float mask when it adds anything but 0 to them."""
    if mask.dtype == np.bool_:
        return mask, None
    if np.issubdtype(mask.dtype, np.floating):
        # Hidden: at most lowest / 4 (a fill of finfo.min / 2 plus a position bias is still hidden), or
        # _HIDDEN_GAP below the row's largest entry -- the fills -1e4 and -1e9 that exporters also write,
        # whose softmax weight is exactly 0 in any float dtype. A position bias varies far less than that.
        top = mask.max(axis=-1, keepdims=True)
        visible = (mask > np.finfo(mask.dtype).min / 4) & (mask > top - _HIDDEN_GAP)
        return visible, (mask if np.any(visible & (mask != 0)) else None)
    raise ProbeError(f"a mask of dtype {mask.dtype} is neither bool nor an additive float mask")


def sees_later_key(mask: np.ndarray) -> tuple[int, int] | None:
    """(query, key) of the first key after its query that the unpadded probe row (row 0) sees, if any.

    A decoder never lets a token see a later one; a mask that does is an
    encoder's, whatever else it does -- the input is not what kv-cache takes.
    """
    visible, _ = _visible(mask, str(mask.dtype))
    if visible.ndim != 4:
        return None
    first = visible[0].any(axis=0)  # any head
    later = np.argwhere(np.triu(first, k=1))
    return (int(later[0][0]), int(later[0][1])) if later.size else None


def key_position_slopes(bias: np.ndarray, visible: np.ndarray, valid: np.ndarray) -> tuple[float, ...]:
    """Per-head slopes s_h with bias[b, h, i, j] = s_h * position(j) + c[b, h, i] on every visible entry.

    position(j) is cumsum(mask) - 1 of the key (ALiBi as BLOOM computes it);
    keys counted from column 0 differ from it by a constant per row, which
    softmax does not see, so both fit. Raises ProbeError when the bias is
    not of this form (a relative-position or query-dependent bias).
    """
    rows, length = valid.shape
    bias = np.broadcast_to(bias, (rows, bias.shape[1], length, length)).astype(np.float64)
    visible = np.broadcast_to(visible, bias.shape)
    keypos = (np.cumsum(valid, axis=1) - 1)[:, None, None, :].astype(np.float64)
    last = length - 1  # the unpadded row's last query sees every key (without a window)
    seen = visible[0, :, last]
    slopes = []
    for h in range(bias.shape[1]):
        keys = np.flatnonzero(seen[h])
        if keys.size < 2:
            raise ProbeError("the mask's position bias cannot be read: the last query of a full row sees fewer than "
                             "two keys")
        slope = (bias[0, h, last, keys[-1]] - bias[0, h, last, keys[0]]) / (keys[-1] - keys[0])
        slopes.append(float(slope))
    fitted = bias - np.asarray(slopes)[None, :, None, None] * keypos
    row_const = np.max(np.where(visible, fitted, -np.inf), axis=3, keepdims=True)
    row_const = np.where(np.isfinite(row_const), row_const, 0.0)  # a row that sees no key has nothing to fit
    spread = np.where(visible, np.abs(fitted - row_const), 0.0)
    scale = max(1.0, float(np.nanmax(np.abs(np.where(visible, bias, 0.0)))))
    if spread.max() > 1e-4 * scale:
        b, h, i, j = (int(x) for x in np.unravel_index(int(np.argmax(spread)), spread.shape))
        raise ProbeError(f"the mask adds a bias to visible scores that is not slope * key position (ALiBi): at row {b}, "
                         f"head {h}, query {i}, key {j} it is off by {spread[b, h, i, j]:.3g}")
    return tuple(slopes)


def mask_meaning(mask: np.ndarray, valid: np.ndarray, *, is_causal: bool) -> MaskMeaning:
    """What the probed mask [rows or 1, heads or 1, S, S] means for the probe rows ``valid`` [rows, S].

    Raises ProbeError naming the first (row, query, key) that no causal
    padding mask with a sliding window explains.
    """
    rows, length = valid.shape
    if mask.ndim != 4 or mask.shape[-2:] != (length, length):
        raise ProbeError(f"the mask has shape {mask.shape}; expected [batch, heads, {length}, {length}]")
    visible, bias = _visible(mask, str(mask.dtype))
    if visible.shape[1] > 1 and not (visible == visible[:, :1]).all():
        raise ProbeError("the mask differs between heads")
    slopes = None
    if bias is not None:
        slopes = key_position_slopes(bias, visible, valid)
    visible = np.broadcast_to(visible[:, 0], (rows, length, length))
    if is_causal:
        visible = visible & np.tril(np.ones((length, length), bool))
    counts = visible[0].sum(axis=1)  # the unpadded row: query i sees min(i + 1, window) keys
    window = int(counts.max())
    window_or_none = None if window >= length else window
    i = np.arange(length)[:, None]
    j = np.arange(length)[None, :]
    allowed = (j <= i) & ((i - j) < (window_or_none or length + 1))
    expected = allowed[None] & valid[:, None, :]
    wrong = (expected != visible) & valid[:, :, None]
    if wrong.any():
        row, query, key = (int(x) for x in np.argwhere(wrong)[0])
        side = ("no padding", "left padding", "right padding")[row] if rows == 3 else f"row {row}"
        meaning = MaskMeaning(window_or_none).describe()
        raise ProbeError(
            f"not a causal padding mask: with {side} (probe length {length}), query {query} "
            f"{'sees' if visible[row, query, key] else 'does not see'} key {key}, which a {meaning} mask "
            f"{'hides' if visible[row, query, key] else 'shows'}"
        )
    return MaskMeaning(window_or_none, slopes)
