"""The constant half of ``fp16-clip``: find every float32 constant and clip it, one tensor at a time.

Weights that live in external data are the reason this module exists rather
than a one-line ``np.clip``. Mapping a weight makes its pages resident, and
``np.abs`` of a whole tensor doubles it again; over a model that adds up to
the model's size. So an external weight is read from its file in 1 MiB
chunks (never mapped), a tensor that needs no change keeps its original
object (still on disk), and one that does is replaced by an
``ir.LazyTensor`` that reads and clips the source only when its values are
asked for — in practice by the writer, which takes tensors one after
another — so at most one clipped copy exists at a time however many
weights are out of range. Tensor objects are replaced, never edited: a
``--verify`` snapshot shares them with the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = [
    "FP16_MAX",
    "FP16_OVERFLOW",
    "FP16_SMALLEST_SUBNORMAL",
    "ClipStats",
    "ConstantClipper",
    "clip_chunk",
    "scan",
]

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
#: The smallest magnitude fp16 rounds to infinity (halfway between 65504 and 2**16).
FP16_OVERFLOW = 65520.0
FP16_SMALLEST_SUBNORMAL = float(np.finfo(np.float16).smallest_subnormal)  # 2**-24
_CHUNK = 1 << 18  # elements per step: 1 MiB of float32, a few such temporaries


def _chunks(tensor: ir.TensorProtocol) -> Iterator[np.ndarray]:
    """The tensor's elements as flat float32 chunks.

    External data is read from its file at the tensor's offset, chunk by
    chunk, instead of through the tensor's memory map: a mapped weight stays
    resident until unmapped, a read chunk is garbage once used.
    """
    if not isinstance(tensor, ir.ExternalTensor):
        flat = tensor.numpy().reshape(-1)
        for start in range(0, flat.size, _CHUNK):
            yield flat[start : start + _CHUNK]
        return
    left = tensor.size
    with open(tensor.path, "rb") as file:
        file.seek(tensor.offset or 0)
        while left > 0:
            count = min(_CHUNK, left)
            data = file.read(count * 4)
            if len(data) != count * 4:
                raise BadInputError(f"{tensor.path}: external data of tensor {tensor.name!r} ends early")
            yield np.frombuffer(data, dtype="<f4").astype(np.float32, copy=False)
            left -= count


@dataclasses.dataclass
class ScanResult:
    beyond: int  # finite elements with |x| > FP16_MAX
    tiny: int  # non-zero elements with |x| < FP16_SMALLEST_SUBNORMAL
    largest: float  # largest finite |x| (0 for an empty or all-non-finite tensor)


def scan(tensor: ir.TensorProtocol) -> ScanResult:
    """Count what clipping would change, a chunk at a time."""
    beyond = tiny = 0
    largest = 0.0
    for chunk in _chunks(tensor):
        magnitude = np.abs(chunk)
        finite = np.isfinite(magnitude)
        beyond += int(np.count_nonzero((magnitude > FP16_MAX) & finite))
        tiny += int(np.count_nonzero((magnitude < FP16_SMALLEST_SUBNORMAL) & (magnitude > 0)))
        largest = max(largest, float(np.max(magnitude, where=finite, initial=0.0)))
    return ScanResult(beyond, tiny, largest)


def clip_chunk(chunk: np.ndarray, *, flush_subnormals: bool) -> np.ndarray:
    """Finite |x| > 65504 -> ±65504; ±inf and NaN kept; with ``flush_subnormals`` 0 < |x| < 2**-24 -> ±0."""
    out = np.array(chunk, dtype=np.float32, copy=True)
    magnitude = np.abs(out)
    beyond = (magnitude > FP16_MAX) & np.isfinite(magnitude)
    out[beyond] = np.copysign(np.float32(FP16_MAX), out[beyond])
    if flush_subnormals:
        tiny = (magnitude < FP16_SMALLEST_SUBNORMAL) & (magnitude > 0)
        out[tiny] = np.copysign(np.float32(0.0), out[tiny])
    return out


def clipped_values(tensor: ir.TensorProtocol, *, flush_subnormals: bool) -> np.ndarray:
    """The tensor's values clipped, built chunk by chunk (one full-size array: the result)."""
    out = np.empty(tensor.size, dtype=np.float32)
    start = 0
    for chunk in _chunks(tensor):
        out[start : start + chunk.size] = clip_chunk(chunk, flush_subnormals=flush_subnormals)
        start += chunk.size
    return out.reshape(tensor.shape.numpy())


@dataclasses.dataclass
class ClipStats:
    """What the constant pass saw and changed (the pass report is built from it)."""

    tensors_scanned: int = 0
    elements_scanned: int = 0
    tensors_clipped: int = 0
    elements_clipped: int = 0
    elements_flushed: int = 0
    largest: float = 0.0
    largest_where: str | None = None
    clipped: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)

    def add(self, where: str, result: ScanResult, changed: bool) -> None:
        self.tensors_scanned += 1
        if result.largest > self.largest:
            self.largest, self.largest_where = result.largest, where
        if changed:
            self.tensors_clipped += 1
            self.elements_clipped += result.beyond
            if result.beyond:
                self.clipped.append((where, result.beyond, result.largest))


class ConstantClipper:
    """Clips the float32 constants of a model in place (replacing tensor objects, never bytes)."""

    def __init__(self, *, flush_subnormals: bool) -> None:
        self.flush = flush_subnormals
        self.stats = ClipStats()
        # A tensor object shared by several sites is scanned and replaced once.
        # The key's tensor is kept alive alongside, so its id cannot be reused.
        self._done: dict[int, tuple[ir.TensorProtocol, ir.TensorProtocol | None]] = {}

    def _needs_change(self, result: ScanResult) -> bool:
        return result.beyond > 0 or (self.flush and result.tiny > 0)

    def _replacement(self, tensor: ir.TensorProtocol, where: str) -> ir.TensorProtocol | None:
        if tensor.dtype != ir.DataType.FLOAT:
            return None
        key = id(tensor)
        if key in self._done:
            return self._done[key][1]
        result = scan(tensor)
        self.stats.elements_scanned += tensor.size
        if self.flush:
            self.stats.elements_flushed += result.tiny
        changed = self._needs_change(result)
        self.stats.add(where, result, changed)
        new = (self._lazy_clipped(tensor) if isinstance(tensor, ir.ExternalTensor)
               else self._clipped(tensor)) if changed else None
        self._done[key] = (tensor, new)
        return new

    def _clipped(self, tensor: ir.TensorProtocol) -> ir.Tensor:
        values = clipped_values(tensor, flush_subnormals=self.flush)
        return ir.Tensor(
            values, dtype=ir.DataType.FLOAT, name=tensor.name, doc_string=tensor.doc_string,
            metadata_props=dict(tensor.metadata_props) or None,
        )

    def _lazy_clipped(self, source: ir.ExternalTensor) -> ir.LazyTensor:
        flush = self.flush

        def materialize() -> ir.Tensor:
            return ir.Tensor(clipped_values(source, flush_subnormals=flush), dtype=ir.DataType.FLOAT, name=source.name)

        return ir.LazyTensor(
            materialize, dtype=ir.DataType.FLOAT, shape=source.shape, name=source.name,
            doc_string=source.doc_string, metadata_props=dict(source.metadata_props) or None,
        )

    # --- the sites ----------------------------------------------------------------

    def clip_model(self, model: ir.Model) -> None:
        for graph in model.graphs():
            scope = "" if graph is model.graph else f" in subgraph {graph.name!r}"
            for value in graph.initializers.values():
                if value.const_value is None:
                    continue
                new = self._replacement(value.const_value, f"initializer {value.name!r}{scope}")
                if new is not None:
                    value.const_value = new
        for node, where in _nodes(model):
            for name, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                label = f"attribute {name!r} of {node.op_type} {node.name!r}{where}"
                new_attr = self._attribute(node, attr, label)
                if new_attr is not None:
                    node.attributes[name] = new_attr

    def _attribute(self, node: ir.Node, attr: ir.Attr, label: str) -> ir.Attr | None:
        kind = attr.type
        if kind == ir.AttributeType.TENSOR:
            new = self._replacement(attr.value, label)
            return None if new is None else ir.Attr(attr.name, kind, new, doc_string=attr.doc_string)
        if kind == ir.AttributeType.TENSORS:
            news = [self._replacement(t, f"{label}[{i}]") for i, t in enumerate(attr.value)]
            if all(n is None for n in news):
                return None
            tensors = [old if n is None else n for old, n in zip(attr.value, news, strict=True)]
            return ir.Attr(attr.name, kind, tensors, doc_string=attr.doc_string)
        # Float attributes are constants only on Constant (value_float/value_floats);
        # elsewhere they are op parameters (epsilon, alpha) with their own meaning.
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            return None
        if kind == ir.AttributeType.FLOAT:
            array = np.array([attr.value], dtype=np.float32)
        elif kind == ir.AttributeType.FLOATS:
            array = np.array(list(attr.value), dtype=np.float32)
        else:
            return None
        new = self._replacement(ir.Tensor(array), label)
        if new is None:
            return None
        values = new.numpy().tolist()
        return ir.Attr(attr.name, kind, values[0] if kind == ir.AttributeType.FLOAT else values,
                       doc_string=attr.doc_string)


def _nodes(model: ir.Model) -> Iterator[tuple[ir.Node, str]]:
    """Every node of the model with where it sits: main graph, subgraphs, function bodies."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        where = "" if node.graph is model.graph else f" in subgraph {node.graph.name!r}"
        yield node, where
    for function in model.functions.values():
        label = f" in function {function.domain}::{function.name}"
        for node in ir.traversal.RecursiveGraphIterator(function):
            yield node, label
