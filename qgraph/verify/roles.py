"""Decide what each graph input *means*, so the strategies draw values it accepts.

A transformer graph does not accept arbitrary int64 tensors: token ids must
index the embedding table, an attention mask needs at least one valid token
per row, position ids must agree with the mask. The role of an input is read
from its dtype, its name (the names exporters use: ``input_ids``,
``attention_mask``, ``position_ids``) and, for token ids, from the graph
itself: the vocab size is the row count of the embedding table, found by
following the input to a ``Gather`` whose data is a constant.
"""

from __future__ import annotations

import dataclasses
import enum
import re

import onnx_ir as ir

__all__ = ["InputSpec", "Role", "describe_inputs", "dim_symbols", "feedable_inputs"]

_POSITION_NAME = re.compile(r"(^|[._/])(position_ids?|pos_ids|positions?)$", re.IGNORECASE)
_MASK_NAME = re.compile(r"mask", re.IGNORECASE)
_IDS_NAME = re.compile(r"(^|[._/])(\w*_)?ids$|(^|[._/])tokens?$", re.IGNORECASE)

# Ops that pass indices through unchanged in value (only their layout or type
# changes), followed when looking for the embedding Gather.
_INDEX_PASS_THROUGH = frozenset(
    {"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Expand", "Transpose"}
)
# Ops that turn a constant into a constant (quantized or cast embedding tables).
_CONSTANT_PRESERVING = frozenset({"Cast", "Identity", "DequantizeLinear", "Transpose", "Reshape"})


class Role(enum.Enum):
    """What kind of values an input takes."""

    TOKEN_IDS = "token_ids"
    ATTENTION_MASK = "attention_mask"
    POSITION_IDS = "position_ids"
    FLOAT = "float"
    INTEGER = "integer"
    BOOL = "bool"


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One graph input as the strategies see it.

    ``dims`` holds an int for a static dim, the dim_param string for a
    symbolic one (possibly an expression such as ``"past + seq"``) and None
    for an unnamed dim; ``dims`` itself is None when the rank is unknown.
    ``vocab_size`` is the exclusive upper bound of token ids, and
    ``vocab_source`` says where it came from.
    """

    name: str
    dtype: ir.DataType
    dims: tuple[int | str | None, ...] | None
    role: Role
    vocab_size: int | None = None
    vocab_source: str = ""


def feedable_inputs(graph: ir.Graph) -> list[ir.Value]:
    """Graph inputs a caller must feed (inputs that are initializers are optional)."""
    return [v for v in graph.inputs if not v.is_initializer()]


def _dims_of(value: ir.Value) -> tuple[int | str | None, ...] | None:
    if value.shape is None:
        return None
    dims: list[int | str | None] = []
    for d in value.shape:
        if isinstance(d, int):
            dims.append(d)
        else:
            dims.append(d.value if d.value is None else str(d.value))
    return tuple(dims)


def dim_symbols(dim: str) -> tuple[frozenset[str], bool]:
    """The names a dim_param depends on, and whether it is an expression.

    ``"seq"`` -> ({"seq"}, False); ``"past + seq"`` -> ({"past", "seq"}, True).
    Names the IR's expression parser cannot read (``"Concat_1:dim_0"``) are
    plain names.
    """
    try:
        names = ir.SymbolicDim(dim).free_symbols()
    except Exception:  # noqa: BLE001 - the parser raises several kinds on odd names
        return frozenset({dim}), False
    if names == frozenset({dim}):
        return names, False
    if not names:  # a number written as a string, e.g. "4"
        return frozenset(), True
    return names, True


def _is_constant(value: ir.Value, depth: int = 3) -> bool:
    if value.const_value is not None or value.is_initializer():
        return True
    producer = value.producer()
    if producer is None or depth == 0:
        return False
    if producer.op_type == "Constant":
        return True
    if producer.op_type in _CONSTANT_PRESERVING and producer.inputs and producer.inputs[0] is not None:
        return _is_constant(producer.inputs[0], depth - 1)
    return False


def _static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    producer = value.producer()
    if shape is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            shape = attr.value.shape
    if shape is None:
        return None
    try:
        dim = shape[axis]
    except IndexError:
        return None
    return dim if isinstance(dim, int) else None


def embedding_bounds(value: ir.Value, depth: int = 4) -> list[tuple[int, str]]:
    """Row counts of constant tables that ``value`` indexes through a Gather.

    Returns (rows, description) pairs; the caller keeps the smallest.
    """
    found: list[tuple[int, str]] = []
    for usage in value.uses():
        node, idx = usage.node, usage.idx
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Gather" and idx == 1:
            data = node.inputs[0]
            if data is None or not _is_constant(data):
                continue
            axis = node.attributes.get_int("axis", 0)
            rows = _static_dim(data, axis)
            if rows is not None:
                found.append((rows, f"Gather {node.name or '(unnamed)'!r} over {data.name!r} (axis {axis})"))
        elif node.op_type in _INDEX_PASS_THROUGH and idx == 0 and depth > 0:
            for out in node.outputs:
                found.extend(embedding_bounds(out, depth - 1))
    return found


def _role_of(value: ir.Value) -> Role:
    dtype = value.dtype
    name = value.name or ""
    assert dtype is not None
    if dtype == ir.DataType.BOOL:
        return Role.ATTENTION_MASK if _MASK_NAME.search(name) else Role.BOOL
    if dtype.is_floating_point():
        return Role.FLOAT
    if dtype.is_integer():
        if _POSITION_NAME.search(name):
            return Role.POSITION_IDS
        if _MASK_NAME.search(name):
            return Role.ATTENTION_MASK
        if _IDS_NAME.search(name) or embedding_bounds(value):
            return Role.TOKEN_IDS
        return Role.INTEGER
    return Role.INTEGER


def describe_inputs(
    model: ir.Model, *, vocab_size: int | None = None, fallback_vocab_size: int = 32
) -> list[InputSpec]:
    """Classify every input the caller must feed.

    ``vocab_size`` forces the token-id bound; otherwise it is read from the
    embedding table, and ``fallback_vocab_size`` is used when no table is
    found (an id-named input that feeds no constant Gather).
    """
    specs: list[InputSpec] = []
    for value in feedable_inputs(model.graph):
        if value.dtype is None:
            raise ValueError(f"graph input {value.name!r} has no element type")
        role = _role_of(value)
        vocab: int | None = None
        source = ""
        if role is Role.TOKEN_IDS:
            bounds = embedding_bounds(value)
            if vocab_size is not None:
                vocab, source = vocab_size, "given"
            elif bounds:
                vocab, source = min(bounds)
            else:
                vocab, source = fallback_vocab_size, "fallback (no embedding Gather found)"
        specs.append(
            InputSpec(
                name=value.name or "",
                dtype=value.dtype,
                dims=_dims_of(value),
                role=role,
                vocab_size=vocab,
                vocab_source=source,
            )
        )
    return specs
