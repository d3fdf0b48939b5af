"""The subgraphs the KV-cache pass adds: masks from positions, position biases, last-token gather.

(The retained form's writes, reads and masks are in :mod:`.retained`.)

Every mask here is a comparison of positions (or of columns, in the concat
form) -- never a Trilu -- because a device compiler with a fixed context
needs the mask as a function of its inputs, and because the comparison is
what docs/design.md's retained contract states: query at position p sees slot c
iff c <= p (and p - c < window for sliding-window layers).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qgraph.node_types import infer_output_types

__all__ = ["GraphBuilder"]

_PASS = "kv-cache"
_BOOLEAN_OPS = {"Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Equal", "And", "Or", "Not"}
_INDEX_OPS = {"Shape", "ArgMax"}


def _output_dtype(op_type: str, inputs, attributes) -> ir.DataType | None:
    """The dtype of the ops this builder emits (later passes read it: a bool mask is not an additive one)."""
    if op_type in _BOOLEAN_OPS:
        return ir.DataType.BOOL
    if op_type in _INDEX_OPS:
        return ir.DataType.INT64
    if op_type == "Cast":
        return ir.DataType(attributes["to"])
    source = inputs[1] if op_type == "Where" else next((x for x in inputs if x is not None and x.dtype is not None), None)
    return source.dtype if source is not None else None


class GraphBuilder:
    """Appends nodes and constants to a graph under fresh, recognizable names."""

    def __init__(self, graph: ir.Graph, prefix: str = "kv_cache") -> None:
        self.graph = graph
        self.prefix = prefix
        self.created: list[ir.Node] = []
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers)
        for node in graph:
            self._taken |= {v.name for v in node.outputs}
            if node.name:
                self._taken.add(node.name)
        self._count = 0

    def fresh(self, hint: str) -> str:
        while True:
            self._count += 1
            name = f"{self.prefix}/{hint}_{self._count}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def op(
        self,
        op_type: str,
        *inputs: ir.Value | None,
        domain: str = "",
        name: str | None = None,
        rule: str = "kv-cache",
        **attributes,
    ) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes, domain=domain, name=self.fresh(op_type))
        node.metadata_props["qgraph.pass"] = _PASS
        node.metadata_props["qgraph.rule"] = rule
        self.graph.append(node)
        self.created.append(node)
        out = node.outputs[0]
        dtype = _output_dtype(op_type, inputs, attributes)
        if dtype is not None:
            out.type = ir.TensorType(dtype)
        out.name = name if name is not None else node.name
        if name is not None:
            self._taken.add(name)
        infer_output_types(node, self.graph.opset_imports)
        return out

    def const(self, value, dtype=np.int64, hint: str = "const") -> ir.Value:
        array = np.asarray(value, dtype=dtype)
        init = ir.Value(
            name=self.fresh(hint),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            shape=ir.Shape(array.shape),
            const_value=ir.tensor(array),
        )
        self.graph.register_initializer(init)
        return init

    # --- shapes -----------------------------------------------------------------

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """Shape(value)[axis] as a 1-element int64 tensor (an existing such Shape node is reused).

        Reusing matters beyond tidiness: a duplicate costs the cleanup
        fixpoint after the pass a whole extra round just to merge it.
        """
        for user, _ in value.uses():
            attrs = user.attributes
            if (
                user.op_type == "Shape" and user.domain == "" and user.graph is self.graph
                and set(attrs) == {"start", "end"}
                and attrs["start"].value == axis and attrs["end"].value == axis + 1
            ):
                return user.outputs[0]
        return self.op("Shape", value, start=axis, end=axis + 1)

    def scalar_dim(self, value: ir.Value, axis: int) -> ir.Value:
        return self.op("Squeeze", self.dim(value, axis), self.const([0]))

    # --- concat form -------------------------------------------------------------------

    def concat_visibility(self, attention_mask: ir.Value, input_ids: ir.Value, window: int | None) -> ir.Value:
        """bool [B, 1, S, T] over past + current columns: key t visible to query s iff
        mask[t] and t <= past + s (and past + s - t < window); a query always sees itself,
        so a padding query never has an all-masked row."""
        zero, one = self.const(0), self.const(1)
        total = self.scalar_dim(attention_mask, 1)
        seq = self.scalar_dim(input_ids, 1)
        keys = self.op("Unsqueeze", self.op("Range", zero, total, one), self.const([0]))  # [1, T]
        queries = self.op("Unsqueeze", self.op("Range", self.op("Sub", total, seq), total, one), self.const([1]))  # [S, 1]
        causal = self.op("LessOrEqual", keys, queries)  # [S, T]
        if window is not None:
            causal = self.op("And", causal, self.op("Greater", keys, self.op("Sub", queries, self.const(window))))
        key_ok = self.op("Unsqueeze", self.op("Cast", attention_mask, to=ir.DataType.BOOL), self.const([1, 2]))
        visible = self.op("And", causal, key_ok)  # [B, 1, S, T]
        visible = self.op("Or", visible, self.op("Equal", keys, queries))
        visible.shape = ir.Shape([attention_mask.shape[0], 1, input_ids.shape[1], attention_mask.shape[1]])
        return visible

    # --- position biases (ALiBi) ----------------------------------------------------------

    def key_position_bias(self, visible: ir.Value, key_positions: ir.Value, slopes, dtype: ir.DataType) -> ir.Value:
        """float [B, H, S, T]: slopes[h] * position(key) where visible, a large negative number elsewhere.

        ``key_positions`` broadcasts as [B or 1, 1, 1, T]. The fill is half the
        dtype's lowest value, so adding it never overflows; no row is fully
        hidden (a query always sees a slot), so the fill never decides a row.
        """
        np_dtype = dtype.numpy()
        heads = self.const(np.asarray(slopes, np_dtype).reshape(1, -1, 1, 1), dtype=np_dtype, hint="alibi_slopes")
        bias = self.op("Mul", heads, self.op("Cast", key_positions, to=dtype))
        fill = self.const(np.finfo(np_dtype).min / 2, dtype=np_dtype, hint="hidden")
        return self.op("Where", visible, bias, fill)

    def concat_key_positions(self, attention_mask: ir.Value) -> ir.Value:
        """[B, 1, 1, T]: cumsum(mask) - 1 of every column, past and current."""
        mask = self.op("Cast", attention_mask, to=ir.DataType.INT64)
        counted = self.op("Sub", self.op("CumSum", mask, self.const(1)), self.const(1))
        return self.op("Unsqueeze", counted, self.const([1, 2]))

    # --- last-token logits ---------------------------------------------------------------

    def gather_last_valid(self, hidden: ir.Value, positions: ir.Value) -> ir.Value:
        """hidden [B, S, H] at each row's last valid token (argmax of position_ids) -> [B, 1, H]."""
        last = self.op("ArgMax", positions, axis=1, keepdims=1)  # [B, 1]
        grid = self.op("Concat", self.dim(hidden, 0), self.const([1]), self.dim(hidden, 2), axis=0)
        index = self.op("Expand", self.op("Unsqueeze", last, self.const([2])), grid)
        return self.op("GatherElements", hidden, index, axis=1)

    def last_column(self, hidden: ir.Value) -> ir.Value:
        """hidden [B, S, H] at the chunk's last column -> [B, 1, H] (the concat form: rows are left-padded)."""
        return self.op("Slice", hidden, self.const([-1]), self.const([np.iinfo(np.int64).max]), self.const([1]),
                       rule="last-column-logits")
