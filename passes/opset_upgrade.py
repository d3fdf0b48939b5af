"""Default-domain opset conversion with onnxscript's version converter, all or nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass

from qgraph.errors import BadInputError
from qgraph.pass_base import Option, Pass, Prerequisite, default_opset
from qgraph_passes._library_logs import captured_warnings

__all__ = ["OpsetUpgradePass", "opset_at_least"]

_DEFAULT_TARGET = 23

# onnxscript reports what it could not convert only as warnings on this logger
# (a node whose adapter raised is skipped and keeps its old semantics; a
# failed onnx C-API conversion leaves the model as it was).
_CONVERTER_LOGGER = "onnxscript.version_converter"
_SKIPPED_NODE = "Skipping version conversion for node"


def opset_at_least(version: int) -> Prerequisite:
    """The prerequisite "default-domain opset >= version", provided by opset-upgrade."""
    return Prerequisite(
        description=f"default-domain opset >= {version}",
        check=lambda model: (default_opset(model) or 0) >= version,
        satisfied_by="opset-upgrade",
        options={"target": version},
    )




def _all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    yield from ir.traversal.RecursiveGraphIterator(model.graph)
    for function in model.functions.values():
        yield from ir.traversal.RecursiveGraphIterator(function)


def _default_domain_ops(model: ir.Model) -> set[str]:
    return {n.op_type for n in _all_nodes(model) if n.domain in ("", "ai.onnx")}


def _unconvertible_group_norm(model: ir.Model, source: int | None, target: int) -> str | None:
    """Why onnxscript would silently mis-convert a GroupNormalization, if it would.

    Opset 21 changed GroupNormalization's scale/bias from one value per group
    to one per channel. onnxscript's adapter expands them only when the
    channel dim and the scale/bias lengths are static; otherwise it keeps the
    node as it is, which changes its meaning without a warning.
    """
    if source is None or not (18 <= source < 21 <= target):
        return None
    for node in _all_nodes(model):
        if node.op_type != "GroupNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        shapes = [v.shape if v is not None else None for v in node.inputs[:3]]
        if len(shapes) < 3 or any(s is None or len(s) < 1 for s in shapes):
            return "GroupNormalization inputs need known shapes to convert past opset 21"
        x, scale, bias = shapes
        if len(x) < 2 or not all(isinstance(d, int) for d in (x[1], scale[0], bias[0])):
            return (
                "GroupNormalization needs a static channel dim and scale/bias "
                "lengths to convert past opset 21"
            )
    return None


def _readable(message: str) -> str:
    """onnx's C++ assertion text without its source-file prefix."""
    return message.split("failed: ", 1)[-1].strip()


def _min_ir_version(opset: int) -> int:
    try:
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    except Exception:  # pragma: no cover - opset newer than the onnx package's table
        return 0


class OpsetUpgradePass(Pass):
    """Convert the default-domain (ai.onnx) opset to `target` with onnxscript's converter.

    Wraps ``onnxscript.version_converter.ConvertVersionPass(fallback=True)``:
    from opset 18 upwards onnxscript's own adapters run on the IR (DFT,
    GridSample, GroupNormalization get rewritten, every other op is
    unchanged); anything else (sources below 18, or downgrades) goes through
    ``onnx.version_converter`` with the large initializers stripped, e.g.
    ReduceMean/Split/Squeeze attributes becoming inputs from 17 to 18.
    Model-local functions are inlined first (onnxscript's converter needs
    that) and unused nodes, functions and opset imports are dropped after
    (onnxscript's cleanup). The model's IR version is raised when the new
    opset needs it.

    All or nothing: the conversion runs on a clone (tensors shared, so no
    weight is copied or read) and is checked — opset import reached, no node
    skipped by an adapter, every ai.onnx node at the target version — before
    the caller's model takes the result. When the converter cannot reach the
    target the pass raises ``BadInputError`` naming the versions and, when
    known, the op, and the model is untouched. No-op when already at target.

    Downgrading is allowed exactly where onnx's converter has the adapters
    (e.g. ReduceMean 18 -> 17); ops that do not exist in the lower opset
    (RMSNormalization, Attention at 23) make it fail, so lower those first.

    onnxscript's GroupNormalization 20 -> 21 adapter silently keeps the node
    when the channel dim is not static, which changes its meaning; the pass
    refuses that case up front.
    """

    name = "opset-upgrade"
    options = {
        "target": Option(int, _DEFAULT_TARGET, "default-domain opset version to convert to"),
    }

    def _fail(self, source: int | None, target: int, reason: str, op: str | None) -> BadInputError:
        where = f" at op {op}" if op else ""
        return BadInputError(
            f"pass '{self.name}': cannot convert the default-domain opset from "
            f"{source} to {target}{where}: {reason}"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        target = self.config["target"]
        source = default_opset(model)
        if source == target:
            return ir.passes.PassResult(model, modified=False)
        newest = onnx.defs.onnx_opset_version()
        if not 1 <= target <= newest:
            raise self._fail(
                source, target, f"the installed onnx knows opsets 1 to {newest}", None
            )

        ops = _default_domain_ops(model)
        if (reason := _unconvertible_group_norm(model, source, target)) is not None:
            raise self._fail(source, target, reason, "GroupNormalization")

        def failing_op(message: str) -> str | None:
            named = sorted(op for op in ops if re.search(rf"\b{re.escape(op)}\b", message))
            return named[0] if named else None

        converted = model.clone()
        with captured_warnings(_CONVERTER_LOGGER) as records:
            try:
                ConvertVersionPass(target_version=target, fallback=True)(converted)
            except (ValueError, RuntimeError) as e:  # incl. VersionConverterError
                raise self._fail(source, target, _readable(str(e)), failing_op(str(e))) from e

        skipped = [r for r in records if r.getMessage().startswith(_SKIPPED_NODE)]
        if skipped:
            op = str(skipped[0].args[0]) if skipped[0].args else None
            raise self._fail(source, target, skipped[0].getMessage(), op)
        reached = default_opset(converted)
        if reached != target:
            errors = [r for r in records if r.exc_info and r.exc_info[1] is not None]
            reason = (
                _readable(str(errors[-1].exc_info[1]))
                if errors
                else f"the converter left the opset at {reached}"
            )
            raise self._fail(source, target, reason, failing_op(reason))
        stale = sorted(
            {
                n.op_type
                for n in _all_nodes(converted)
                if n.domain in ("", "ai.onnx") and n.version not in (None, target)
            }
        )
        if stale:
            raise self._fail(source, target, "nodes left at another version", stale[0])

        # Commit: the caller's model takes the converted graph and functions.
        functions_gone = len(model.functions) - len(converted.functions)
        model.graph = converted.graph
        model.functions.clear()
        model.functions.update(converted.functions)
        if model.ir_version < (min_ir := _min_ir_version(target)):
            self.report.notes.append(f"raised IR version {model.ir_version} -> {min_ir}")
            model.ir_version = min_ir
        if functions_gone > 0:
            self.report.notes.append(f"inlined {functions_gone} model-local function(s)")
        self.report.notes.append(f"default-domain opset {source} -> {target}")
        self.report.count("opset-converted")
        return ir.passes.PassResult(model, modified=True)
