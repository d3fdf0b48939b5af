"""Reading ``specializations.json``, the shapes a device compiles a graph at.

Two forms exist and both are read: QEfficient's current named one,
``{"specializations": [{"name": "Prefill", "symbols": {"seq_len": "32", ...}}]}``,
and the older flat list ``{"specializations": [{"seq_len": "32", ...}]}``.
A graph whose ``ctx_len`` is symbolic takes its context length from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = ["FILE_NAME", "compiled_ctx_len", "parse_specializations"]

FILE_NAME = "specializations.json"
_SIDECAR_KEY = "qgraph.sidecar:" + FILE_NAME  # qgraph.io.SIDECAR_PREFIX (io imports much more than this needs)


def parse_specializations(data: object, origin: str) -> list[tuple[str | None, dict[str, int]]]:
    """(graph name or None for the flat form, symbols as ints) of each entry; BadInputError naming ``origin``."""
    entries = data.get("specializations") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BadInputError(f'{origin}: expected {{"specializations": [{{...}}, ...]}}')
    out = []
    for entry in entries:
        name, symbols = None, entry
        if set(entry) == {"name", "symbols"}:
            name, symbols = str(entry["name"]), entry["symbols"]
            if not isinstance(symbols, dict):
                raise BadInputError(f"{origin}: graph {name!r}: 'symbols' must be a mapping, got {symbols!r}")
        try:
            out.append((name, {str(k): int(v) for k, v in symbols.items()}))
        except (TypeError, ValueError):
            raise BadInputError(f"{origin}: every symbol must be an integer, got {entry}") from None
    return out


def compiled_ctx_len(model: ir.Model, source: object = None) -> int | None:
    """The largest ``ctx_len`` the model's specializations name (its sidecar, else the file beside ``source``)."""
    text, origin = model.metadata_props.get(_SIDECAR_KEY), f"{FILE_NAME} of the model"
    if text is None and isinstance(source, (str, Path)):
        path = Path(source).parent / FILE_NAME
        if path.is_file():
            text, origin = path.read_text(encoding="utf-8"), str(path)
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{origin}: not JSON ({exc})") from None
    lengths = [s["ctx_len"] for _, s in parse_specializations(data, origin) if "ctx_len" in s]
    return max(lengths) if lengths else None
