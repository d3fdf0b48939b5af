"""A JSON-ready summary of a model, and its text form for ``qgraph inspect``.

The summary answers what an engineer asks first about an exported graph
(what goes in and out, which opsets, which ops and how many, how big are the
weights) without reading a single weight: sizes come from shapes and dtypes,
so inspecting a model with gigabytes of external data is instant.

Counting follows :mod:`qgraph.graph_stats` (shared with pass reports):
subgraphs of control-flow nodes count in the main totals and
``subgraph_nodes`` says how many are nested; a call to a model-local
function counts once under its op name, and function bodies are reported
separately under ``functions``, each with its own histogram (expanding them
would double-count repeated calls and hide which custom ops the device
compiler sees).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import onnx_ir as ir

from qgraph.graph_stats import count_nodes, op_histogram, op_key

__all__ = ["format_summary", "summarize"]

def _dim(dim: int | ir.SymbolicDim) -> int | str | None:
    if isinstance(dim, int):
        return dim
    return dim.value  # the symbolic name, or None for an unnamed unknown dim


def _value_summary(value: ir.Value) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": value.name}
    if value.type is None or isinstance(value.type, ir.TensorType):
        entry["dtype"] = value.dtype.name if value.dtype is not None else None
        entry["shape"] = None if value.shape is None else [_dim(d) for d in value.shape]
    else:  # sequences, optionals, maps: the type's own text says it best
        entry["type"] = str(value.type)
        entry["shape"] = None
    return entry


def _initializer_summary(model: ir.Model) -> dict[str, Any]:
    graphs = list(model.graphs())
    for function in model.functions.values():
        graphs.extend(function.subgraphs())
    count = parameters = total_bytes = external_count = external_bytes = 0
    external_files: set[str] = set()
    for graph in graphs:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            count += 1
            parameters += tensor.size
            total_bytes += tensor.nbytes
            if isinstance(tensor, ir.ExternalTensor):
                external_count += 1
                external_bytes += tensor.nbytes
                external_files.add(os.fspath(tensor.location))
    return {
        "count": count,
        "parameters": parameters,
        "bytes": total_bytes,
        "external": {
            "count": external_count,
            "bytes": external_bytes,
            "files": sorted(external_files),
        },
    }


def summarize(model: ir.Model) -> dict[str, Any]:
    """A JSON-serialisable description of ``model`` that reads no weight data.

    Keys: ``graph_name``, ``ir_version``, ``producer`` (name, version),
    ``opset_imports`` (domain -> version; the default domain as ``ai.onnx``),
    ``inputs``/``outputs`` (name, dtype as the ONNX type name, shape with
    symbolic dims as their names and unknown dims as null), ``nodes``,
    ``subgraph_nodes``, ``op_histogram``, ``initializers`` (count,
    parameters, bytes, and the external part: count, bytes, files) and
    ``functions`` (name, inputs, outputs, nodes, op_histogram). See the module
    docstring for what is counted where.
    """
    top_level = len(model.graph)
    total = count_nodes(model.graph)
    return {
        "graph_name": model.graph.name,
        "ir_version": model.ir_version,
        "producer": {"name": model.producer_name, "version": model.producer_version},
        "opset_imports": {
            ("ai.onnx" if domain in ("", "ai.onnx") else domain): version
            for domain, version in sorted(model.opset_imports.items())
        },
        "inputs": [_value_summary(v) for v in model.graph.inputs],
        "outputs": [_value_summary(v) for v in model.graph.outputs],
        "nodes": total,
        "subgraph_nodes": total - top_level,
        "op_histogram": op_histogram(model.graph),
        "initializers": _initializer_summary(model),
        "functions": [
            {
                "name": op_key(f.domain, f.name, f.overload),
                "inputs": len(f.inputs),
                "outputs": len(f.outputs),
                "nodes": count_nodes(f),
                "op_histogram": op_histogram(f),
            }
            for f in model.functions.values()
        ],
    }


# ---------------------------------------------------------------------- text


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _table(headers: Iterable[str], rows: Iterable[Iterable[Any]], indent: str = "  ") -> list[str]:
    """Left-aligned columns (numbers right-aligned) wide enough for every cell."""
    header = [str(h) for h in headers]
    body = [[("" if cell is None else str(cell)) for cell in row] for row in rows]
    numeric = [
        all(row[i].replace(",", "").isdigit() for row in body) if body else False
        for i in range(len(header))
    ]
    widths = [max([len(header[i])] + [len(row[i]) for row in body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header)] + [line(row) for row in body]


def _shape_text(entry: Mapping[str, Any]) -> str:
    shape = entry.get("shape")
    if shape is None:
        return "?"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def format_summary(summary: Mapping[str, Any]) -> str:
    """Render :func:`summarize`'s dict as the text ``qgraph inspect`` prints."""
    lines: list[str] = []
    producer = summary.get("producer") or {}
    made_by = " ".join(p for p in (producer.get("name"), producer.get("version")) if p)
    lines.append(
        f"Model: graph {summary.get('graph_name')!r}, IR version {summary.get('ir_version')}"
        + (f", produced by {made_by}" if made_by else "")
    )
    opsets = summary.get("opset_imports", {})
    lines.append("Opsets: " + (", ".join(f"{d} {v}" for d, v in opsets.items()) or "none"))

    for title in ("inputs", "outputs"):
        entries = summary.get(title, [])
        lines.append("")
        lines.append(f"{title.capitalize()} ({len(entries)}):")
        lines += _table(
            ["name", "dtype", "shape"],
            [[e["name"], e.get("dtype") or e.get("type") or "?", _shape_text(e)] for e in entries],
        )

    lines.append("")
    nested = summary.get("subgraph_nodes", 0)
    lines.append(
        f"Nodes: {summary.get('nodes', 0):,}"
        + (f" ({nested:,} inside subgraphs)" if nested else "")
    )
    histogram = summary.get("op_histogram", {})
    if histogram:
        lines += _table(["op", "count"], [[op, f"{n:,}"] for op, n in histogram.items()])

    init = summary.get("initializers", {})
    external = init.get("external", {})
    lines.append("")
    lines.append(
        f"Initializers: {init.get('count', 0):,}, parameters {init.get('parameters', 0):,}, "
        f"{_human_bytes(init.get('bytes', 0))}"
    )
    if external.get("count"):
        lines.append(
            f"  external data: {external['count']:,} tensors, "
            f"{_human_bytes(external.get('bytes', 0))} in {', '.join(external.get('files', []))}"
        )

    functions = summary.get("functions", [])
    if functions:
        lines.append("")
        lines.append(f"Functions ({len(functions)}):")
        lines += _table(
            ["name", "inputs", "outputs", "nodes"],
            [[f["name"], f["inputs"], f["outputs"], f["nodes"]] for f in functions],
        )
    return "\n".join(lines) + "\n"
