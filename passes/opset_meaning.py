"""Ops whose meaning changed between opsets while their spelling stayed the same.

onnx's version converter adapts signatures (an attribute that became an
input, a renamed attribute), but some revisions kept the exact spelling and
changed what the op computes. A downgrade across such a revision would give
a model that loads, runs and returns other numbers: Softmax(axis=1) at opset
12 coerces its input to 2-D at axis 1 and normalizes over everything after
it, at opset 13 it normalizes over axis 1 alone (0.55 apart on a [2, 3, 4]
input). :func:`meaning_change` finds the nodes a conversion would change
this way, so opset-upgrade can refuse the target instead of converting
silently. The table lists every such revision qgraph knows of; ops whose
revisions only widened types or added attributes at their old defaults keep
their meaning and are not listed.
"""

from __future__ import annotations

import onnx_ir as ir

from qgraph.graph_stats import all_nodes

__all__ = ["meaning_change"]

# Before opset 13, Softmax, LogSoftmax and Hardmax flattened the input to 2-D
# at `axis` (default 1) and normalized over the second dim; from 13 on they
# normalize over `axis` alone (default -1). Both read the same only when
# `axis` is the last dim.
_COERCED_TO_2D = {"Softmax": 13, "LogSoftmax": 13, "Hardmax": 13}
# Opset 21 made GroupNormalization's scale and bias per channel instead of
# per group.
_PER_CHANNEL_SCALE = {"GroupNormalization": 21}


def _crosses(version: int, low: int, high: int) -> bool:
    return low < version <= high


def _last_axis(node: ir.Node, default_axis: int) -> bool:
    attr = node.attributes.get("axis")
    axis = attr.as_int() if attr is not None else default_axis
    value = node.inputs[0] if node.inputs else None
    rank = len(value.shape) if value is not None and value.shape is not None else None
    if rank is None:
        return False
    return axis in (-1, rank - 1)


def meaning_change(model: ir.Model, source: int, target: int) -> tuple[str, str] | None:
    """(op, reason) for the first node whose meaning a conversion source -> target would change."""
    low, high = sorted((source, target))
    for node in all_nodes(model):
        if node.domain not in ("", "ai.onnx"):
            continue
        label = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
        version = _COERCED_TO_2D.get(node.op_type)
        if version is not None and _crosses(version, low, high):
            default_axis = -1 if source >= version else 1
            if not _last_axis(node, default_axis):
                attr = node.attributes.get("axis")
                axis = attr.as_int() if attr is not None else default_axis
                return node.op_type, (
                    f"{label} works along axis {axis}, which means another computation on the "
                    f"other side of opset {version} (before it the input is coerced to 2-D at the "
                    "axis); only a last-axis node of known rank keeps its meaning"
                )
        version = _PER_CHANNEL_SCALE.get(node.op_type)
        if version is not None and _crosses(version, low, high) and target < source:
            return node.op_type, (
                f"{label}: opset {version} made scale and bias per channel instead of per "
                "group, and a downgrade cannot express that"
            )
    return None
