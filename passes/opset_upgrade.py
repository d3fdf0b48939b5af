"""Default-domain opset conversion with onnxscript's version converter, all or nothing."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.version_converter import ConvertVersionPass
from onnxscript.version_converter._version_converter import (
    SUPPORTED_MAX_ONNX_OPSET,
    SUPPORTED_MIN_ONNX_OPSET,
    registry,
)
from qgraph_passes._library_logs import captured_warnings
from qgraph_passes.opset_meaning import meaning_change

from qgraph.custom_ops import op_signature, retarget_error, retarget_function
from qgraph.errors import BadInputError
from qgraph.graph_stats import all_nodes, iter_nodes
from qgraph.pass_base import Option, Pass, Prerequisite, default_opset

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


def _default_domain_ops(model: ir.Model) -> set[str]:
    return {n.op_type for n in all_nodes(model) if n.domain in ("", "ai.onnx")}


def _only_renumbers(model: ir.Model, source: int | None, target: int) -> bool:
    """Whether onnxscript's converter would only renumber versions: no adapter applies to any node.

    Then the conversion cannot fail half-way, so it can be done on the model
    itself by renumbering; cloning a 2000-node export cost more than the
    conversion (an 18 -> 23 upgrade of SmolLM2 touches no node).
    """
    if source is None or not SUPPORTED_MIN_ONNX_OPSET <= source < target <= SUPPORTED_MAX_ONNX_OPSET:
        return False
    for node in all_nodes(model):
        if node.domain not in ("", "ai.onnx"):
            continue
        version = node.version or source
        if version > target or any(attr.is_ref() for attr in node.attributes.values()):
            return False
        if any(registry.lookup_adapters("", node.op_type, v, True) for v in range(version, target)):
            return False
    return True


def _renumber(model: ir.Model, target: int) -> None:
    """What the converter does when no adapter applies, without its clone, inlining and cleanup."""
    for node in iter_nodes(model.graph):
        if node.domain in ("", "ai.onnx") and node.version is not None:
            node.version = target
    model.opset_imports.pop("ai.onnx", None)
    model.opset_imports[""] = target
    for function in model.functions.values():
        retarget_function(function, target)


def _unconvertible_group_norm(model: ir.Model, source: int | None, target: int) -> str | None:
    """Why onnxscript would silently mis-convert a GroupNormalization, if it would.

    Opset 21 changed GroupNormalization's scale/bias from one value per group
    to one per channel. onnxscript's adapter expands them only when the
    channel dim and the scale/bias lengths are static; otherwise it keeps the
    node as it is, which changes its meaning without a warning.
    """
    if source is None or not (18 <= source < 21 <= target):
        return None
    for node in all_nodes(model):
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


_UNCHANGED_DOMAIN = "qgraph.opset-upgrade.unchanged"
_NO_ADAPTER = re.compile(r"No Adapter (?:To|From) Version \$?\d+ for (\w+)")


def _written_the_same(node: ir.Node, low: int, high: int) -> bool:
    """The node reads the same at every opset in [low, high]: same input names, its attributes exist.

    Used only for ops onnx's converter has no adapter for (revisions that
    widened types, or added an attribute the node does not use, as Split 18's
    num_outputs); ops whose meaning changed under the same spelling
    (Softmax 13) have adapters and never get here.
    """
    if low > high:
        low, high = high, low
    signatures = [op_signature(node.op_type, v) for v in range(low, high + 1)]
    if any(sig is None for sig in signatures):
        return False
    used = set(node.attributes)
    return all(
        sig[0] == signatures[0][0] and sig[1] == signatures[0][1] and used <= set(sig[2]) for sig in signatures
    )


def _any_written_the_same(model: ir.Model, op_type: str, low: int, high: int) -> bool:
    return any(n.op_type == op_type and _written_the_same(n, low, high) for n in all_nodes(model)
               if n.domain in ("", "ai.onnx"))


def _split_sizes_explicit(model: ir.Model) -> None:
    """Split 18's ``num_outputs`` as an explicit ``split`` input, where the axis length is static.

    Opset 17 has no num_outputs; a Split with explicit sizes reads the same
    at both, so the conversion can keep it. Sizes follow opset 18's rule:
    ceil(length / n) each, the last one what remains.
    """
    for node in list(iter_nodes(model.graph)):
        attr = node.attributes.get("num_outputs")
        if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or attr is None:
            continue
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            continue
        shape = node.inputs[0].shape if node.inputs and node.inputs[0] is not None else None
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        if shape is None or not -len(shape) <= axis < len(shape) or not isinstance(shape[axis], int):
            continue
        n, length = attr.as_int(), shape[axis]
        chunk = -(-length // n)
        sizes = [min(chunk, length - i * chunk) for i in range(n)]
        if any(size <= 0 for size in sizes):
            continue
        graph = node.graph
        sizes_value = ir.Value(name=f"{node.name or 'split'}.sizes", const_value=ir.tensor(np.array(sizes, np.int64)))
        sizes_value.name = _fresh_name(graph, sizes_value.name)
        graph.register_initializer(sizes_value)
        node.resize_inputs(2)
        node.replace_input_with(1, sizes_value)
        del node.attributes["num_outputs"]


def _fresh_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers) | {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    candidate, i = name, 0
    while candidate in taken:
        i += 1
        candidate = f"{name}.{i}"
    return candidate


def _drop_default_noop_with_empty_axes(model: ir.Model) -> None:
    """Remove ``noop_with_empty_axes=0`` from reductions before a downgrade below 18.

    The dynamo exporter writes the attribute out even at its default, and
    onnx's 18 -> 17 reduction adapters move the axes input to an attribute
    but keep it, which opset 17 rejects ("Unrecognized attribute"). At 0 it
    means what opset 17 does anyway; a 1 is left for the converter to refuse.
    """
    for node in all_nodes(model):
        attr = node.attributes.get("noop_with_empty_axes")
        if node.op_type.startswith("Reduce") and attr is not None and attr.as_int() == 0:
            del node.attributes["noop_with_empty_axes"]


def _readable(message: str) -> str:
    """onnx's C++ assertion text without its source-file prefix."""
    return message.split("failed: ", 1)[-1].strip()


def _min_ir_version(opset: int) -> int:
    try:
        return onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", opset)])
    except Exception:  # pragma: no cover - opset newer than the onnx package's table
        return 0


def _failure(converted: ir.Model, records: list, target: int) -> tuple[str, str | None] | None:
    """(reason, op) when a conversion did not reach ``target`` cleanly, from the converter's log."""
    skipped = [r for r in records if r.getMessage().startswith(_SKIPPED_NODE)]
    if skipped:
        return skipped[0].getMessage(), str(skipped[0].args[0]) if skipped[0].args else None
    reached = default_opset(converted)
    if reached != target:
        errors = [r for r in records if r.exc_info and r.exc_info[1] is not None]
        if errors:
            return _readable(str(errors[-1].exc_info[1])), None
        return f"the converter left the opset at {reached}", None
    return None


class OpsetUpgradePass(Pass):
    """Convert the default-domain (ai.onnx) opset to `target` with onnxscript's converter.

    Wraps ``onnxscript.version_converter.ConvertVersionPass(fallback=True)``:
    from opset 18 upwards onnxscript's own adapters run on the IR (DFT,
    GridSample, GroupNormalization get rewritten, every other op is
    unchanged); anything else (sources below 18, or downgrades) goes through
    ``onnx.version_converter`` with the large initializers stripped, e.g.
    ReduceMean/Split/Squeeze attributes becoming inputs from 17 to 18.
    Model-local functions whose bodies are written the same way at the target
    (custom ops' bodies, see ``qgraph.custom_ops``) are kept and re-targeted;
    the others are inlined first (onnxscript's converter needs that) and unused nodes, functions and opset imports are dropped after
    (onnxscript's cleanup). The model's IR version is raised when the new
    opset needs it.

    When no onnxscript adapter applies to any node on the way (an upgrade
    from 18 or later of a graph without DFT, GridSample or
    GroupNormalization, such as SmolLM2's 18 -> 23), the conversion is a
    renumbering of versions and opset imports, done on the model itself:
    the same result as the converter's, without its clone, inlining and
    cleanup.

    All or nothing: the conversion runs on a clone (tensors shared, so no
    weight is copied or read) and is checked — opset import reached, no node
    skipped by an adapter, every ai.onnx node at the target version — before
    the caller's model takes the result. When the converter cannot reach the
    target the pass raises ``BadInputError`` naming the versions and, when
    known, the op, and the model is untouched. No-op when already at target.

    Downgrading is allowed exactly where onnx's converter has the adapters
    (e.g. ReduceMean 18 -> 17); ops that do not exist in the lower opset
    (RMSNormalization, Attention at 23) make it fail, so lower those first.
    A downgrade across a revision that changed an op's meaning under the
    same spelling (Softmax 13 on a non-last axis, GroupNormalization 21) is
    refused naming the node (``qgraph_passes.opset_meaning``).

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

    def _attempt(
        self, model: ir.Model, source: int | None, target: int, unchanged: set[str]
    ) -> tuple[ir.Model, tuple[str, str | None] | None]:
        """Convert a clone of ``model`` (tensors shared), ops in ``unchanged`` left as written.

        Returns the clone and, when it did not reach ``target`` cleanly, (reason, op).
        """
        converted = model.clone()
        # Custom ops' functions (CustomRMSNorm, CtxScatter...) must survive a
        # conversion: the device compiler knows them by name. A body written
        # the same way at the target is set aside and re-targeted, not inlined.
        kept = {
            key: f for key, f in converted.functions.items() if retarget_error(f, target) is None
        }
        for key in kept:
            del converted.functions[key]
        if target < 18 <= (source or 0):
            _drop_default_noop_with_empty_axes(converted)
        if target < 18 <= (source or 0):
            _split_sizes_explicit(converted)
        hidden = [
            n for n in all_nodes(converted)
            if n.domain in ("", "ai.onnx") and n.op_type in unchanged and _written_the_same(n, target, source or target)
        ]
        for node in hidden:
            node.domain = _UNCHANGED_DOMAIN
        if hidden:
            converted.opset_imports[_UNCHANGED_DOMAIN] = 1
        error: Exception | None = None
        with captured_warnings(_CONVERTER_LOGGER) as records:
            try:
                ConvertVersionPass(target_version=target, fallback=True)(converted)
            except (ValueError, RuntimeError) as e:  # incl. VersionConverterError
                error = e
        # The C-API path rebuilds the nodes: find the moved ones again.
        for node in all_nodes(converted):
            if node.domain == _UNCHANGED_DOMAIN:
                node.domain = ""
        converted.opset_imports.pop(_UNCHANGED_DOMAIN, None)
        for key, function in kept.items():
            retarget_function(function, target)
            converted.functions[key] = function
        if error is not None:
            return converted, (_readable(str(error)), None)
        return converted, _failure(converted, records, target)

    def undo_for(self, model: ir.Model) -> Callable[[], None] | None:
        """When the upgrade will only renumber (no adapter applies, no function to retarget): restoring
        the opset imports, the IR version and the versions of nodes that carry one takes it back."""
        source, target = default_opset(model), self.config["target"]
        if model.functions or source == target or not _only_renumbers(model, source, target):
            return None
        imports, ir_version, metadata = dict(model.opset_imports), model.ir_version, dict(model.metadata_props)
        versions = [(node, node.version) for node in iter_nodes(model.graph) if node.version is not None]

        def restore() -> None:
            for node, version in versions:
                node.version = version
            model.opset_imports.clear()
            model.opset_imports.update(imports)
            model.ir_version = ir_version
            model.metadata_props.clear()
            model.metadata_props.update(metadata)

        return restore

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
        if source is not None and target < source and (changed := meaning_change(model, source, target)):
            raise self._fail(source, target, changed[1], changed[0])
        if (reason := _unconvertible_group_norm(model, source, target)) is not None:
            raise self._fail(source, target, reason, "GroupNormalization")

        def failing_op(message: str) -> str | None:
            named = sorted(op for op in ops if re.search(rf"\b{re.escape(op)}\b", message))
            return named[0] if named else None

        # onnx's converter has no downgrade adapter for some revisions that
        # only widened an op's types (ConstantOfShape 20 -> 19). Such an op is
        # written the same way at every version in between, so its nodes are
        # moved to a private domain for the conversion and moved back after.
        unchanged: set[str] = set()
        functions_before = len(model.functions)
        renumber = _only_renumbers(model, source, target) and all(
            retarget_error(f, target) is None for f in model.functions.values()
        )
        while not renumber:
            converted, failure = self._attempt(model, source, target, unchanged)
            if failure is None:
                break
            reason, op = failure
            adapterless = _NO_ADAPTER.search(reason)
            if (
                adapterless
                and adapterless.group(1) not in unchanged
                and _any_written_the_same(converted, adapterless.group(1), target, source)
            ):
                unchanged.add(adapterless.group(1))
                continue
            raise self._fail(source, target, reason, op or failing_op(reason))
        if renumber:
            converted = model
            _renumber(model, target)
        if unchanged:
            self.report.notes.append(
                "kept as written (no converter adapter, same inputs and attributes at both "
                f"opsets): {', '.join(sorted(unchanged))}"
            )
        stale = sorted(
            {
                n.op_type
                for n in all_nodes(converted)
                if n.domain in ("", "ai.onnx") and n.version not in (None, target)
            }
        )
        if stale:
            raise self._fail(source, target, "nodes left at another version", stale[0])

        # Commit: the caller's model takes the converted graph and functions.
        functions_gone = functions_before - len(converted.functions)
        if converted is not model:
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
