"""Custom ops that onnxruntime can still run: every one carries a function body.

A device compiler knows ``com.qti.aisw.onnx::CustomRMSNorm`` natively;
onnxruntime does not, so each custom op qgraph emits is also defined as a
model-local ONNX function (docs/design.md, "Custom ops"). That keeps every
lowered graph checkable against the original in onnxruntime.

Two rules of the ONNX checker shape this module. A function's domain must be
imported by the model, or the node that calls it is an unknown op. And a
function body must use the same version of a domain as the model does: a
body written against opset 18 is rejected in an opset-17 or opset-23 model.
``attach_function`` therefore re-targets the body's default-domain import to
the model's version and checks, with onnx's own schemas, that every op of
the body is written the same way there (same inputs and attributes) -- so a body is written once for the range of opsets
it is valid in (e.g. ReduceSum with an axes input works from 13 on, where
ReduceMean needs 18), and a mismatch is an error at attach time, not a
checker failure later.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qgraph.errors import BadInputError

__all__ = ["attach_function", "function_from_script", "op_signature", "retarget_error", "retarget_function"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


def function_from_script(fn) -> ir.Function:
    """An ``@onnxscript.script()`` function as an ``ir.Function`` (a fresh copy each call)."""
    return ir.serde.deserialize_function(fn.to_function_proto())


def _model_version(model: ir.Model, domain: str) -> int | None:
    if domain in _DEFAULT_DOMAINS:
        for d in _DEFAULT_DOMAINS:
            if d in model.opset_imports:
                return model.opset_imports[d]
        return None
    return model.opset_imports.get(domain)


def op_signature(op_type: str, version: int) -> tuple | None:
    """What a node of ``op_type`` is written with at ``version``: inputs, outputs, attributes."""
    try:
        schema = onnx.defs.get_schema(op_type, version, "")
    except onnx.defs.SchemaError:
        return None
    return (
        tuple(i.name for i in schema.inputs),
        tuple(o.name for o in schema.outputs),
        tuple(sorted(schema.attributes)),
    )


def _written_for(function: ir.Function) -> int | None:
    imports = function.opset_imports
    return next((imports[d] for d in _DEFAULT_DOMAINS if d in imports), None)


def retarget_error(function: ir.Function, version: int) -> str | None:
    """Why the body cannot run at default-domain opset ``version``, or None if it can.

    Most revisions of an op only widen its types (Mul 13 -> 14 adds
    bfloat16), which a body does not notice; a revision that moves an
    attribute to an input (ReduceMean 17 -> 18, axes) or renames inputs makes
    the body invalid, and that is what this compares.
    """
    written_for = _written_for(function) or version
    for node in ir.traversal.RecursiveGraphIterator(function):
        if node.domain not in _DEFAULT_DOMAINS:
            continue
        wanted = op_signature(node.op_type, written_for)
        if wanted is None or wanted != op_signature(node.op_type, version):
            return (
                f"custom op {function.domain}::{function.name}: its body uses "
                f"{node.op_type} as defined at opset {written_for}, which differs at "
                f"default-domain opset {version}"
            )
    return None


def retarget_function(function: ir.Function, version: int) -> None:
    """Make the body import default-domain opset ``version`` (BadInputError if it cannot)."""
    if (reason := retarget_error(function, version)) is not None:
        raise BadInputError(reason)
    imports = function.opset_imports
    for domain in _DEFAULT_DOMAINS:
        imports.pop(domain, None)
    imports[""] = version


def attach_function(model: ir.Model, function: ir.Function) -> ir.Function:
    """Add ``function`` to the model once, with the imports the checker requires.

    Returns the function the model holds under that identifier: ``function``
    itself the first time, the one already attached afterwards (so a pass
    that lowers many nodes calls this once per node without duplicates).
    """
    existing = model.functions.get(function.identifier())
    if existing is not None:
        return existing
    version = _model_version(model, "")
    if version is None:
        raise BadInputError(
            f"custom op {function.domain}::{function.name}: the model imports no "
            "default-domain opset to run its body with"
        )
    retarget_function(function, version)
    imports = function.opset_imports
    for domain, ver in list(imports.items()):
        known = _model_version(model, domain)
        if domain and known is None:
            model.opset_imports[domain] = ver
        elif domain and known != ver:
            imports[domain] = known
    # The function's own domain: imported by the model so callers resolve,
    # and by the function as the checker expects of a function's domain.
    model.opset_imports.setdefault(function.domain, 1)
    imports.setdefault(function.domain, model.opset_imports[function.domain])
    model.functions[function.identifier()] = function
    return function
