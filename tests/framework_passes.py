"""Test-only passes and models for the pass-manager, pipeline and CLI tests."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from qgraph.pass_base import Option, Pass, Prerequisite, default_opset
from qgraph.registry import Registry
from qgraph.rewrite import Rule, RuleSet
from qgraph.rewrite_pass import RewritePass


def relu_neg_model(opset: int = 17, path=None) -> onnx.ModelProto:
    """x -> Neg -> Neg -> Relu -> Identity -> y (foldable, with a rewrite target)."""
    nodes = [
        helper.make_node("Neg", ["x"], ["n1"], name="neg1"),
        helper.make_node("Neg", ["n1"], ["n2"], name="neg2"),
        helper.make_node("Relu", ["n2"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["y"], name="id"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    if path is not None:
        onnx.save(model, path)
    return model


def double_neg(op, x):
    return op.Neg(op.Neg(x))


NEG_RULES = RuleSet([Rule("double-neg", double_neg, lambda op, x: op.Identity(x), doc="-(-x) -> x")])


class DoubleNegPass(RewritePass):
    """Remove double negations (test pass)."""

    name = "double-neg"
    rules = NEG_RULES


class NeedsOpset23(Pass):
    """Needs the default opset at 23 (test pass)."""

    name = "needs-23"
    prerequisites = (
        Prerequisite("default-domain opset >= 23", lambda m: (default_opset(m) or 0) >= 23, "opset-upgrade", {"target": 23}),
    )

    def call(self, model):
        if (default_opset(model) or 0) < 23:
            raise AssertionError("needs-23 ran before its prerequisite")
        return ir.passes.PassResult(model, False)


class NeedsUnprovided(Pass):
    """Needs a condition nothing provides (test pass)."""

    name = "needs-magic"
    prerequisites = (Prerequisite("a magic marker in metadata", lambda m: "magic" in m.metadata_props, None),)

    def call(self, model):
        return ir.passes.PassResult(model, False)


class Countdown(Pass):
    """Changes the model `times` times, then reports no change (test pass)."""

    name = "countdown"
    options: ClassVar = {"times": Option(int, 2, "how many runs change the model")}

    def __init__(self, **options):
        super().__init__(**options)
        self.left = self.config["times"]

    def call(self, model):
        if self.left <= 0:
            return ir.passes.PassResult(model, False)
        self.left -= 1
        model.metadata_props["countdown"] = str(self.left)
        return ir.passes.PassResult(model, True)


class DanglingPass(Pass):
    """Removes a node without rewiring its users (a broken test pass)."""

    name = "break-dangling"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Relu")
        model.graph.remove(node)  # unsafe: users keep reading its output
        return ir.passes.PassResult(model, True)


class ShufflePass(Pass):
    """Moves the last node to the front (a broken test pass)."""

    name = "break-order"

    def call(self, model):
        nodes = list(model.graph)
        model.graph.remove(nodes[-1])
        model.graph.insert_before(nodes[0], nodes[-1])
        return ir.passes.PassResult(model, True)


class DuplicateNamePass(Pass):
    """Renames a value to clash with another (a broken test pass)."""

    name = "break-names"

    def call(self, model):
        nodes = list(model.graph)
        nodes[1].outputs[0].name = nodes[0].outputs[0].name
        return ir.passes.PassResult(model, True)


class CrashPass(Pass):
    """Raises (a broken test pass)."""

    name = "crash"

    def call(self, model):
        raise ZeroDivisionError("boom")


class ScaleOutputPass(Pass):
    """Multiplies the graph output by 2: changes the meaning (a wrong test pass)."""

    name = "wrong-scale"

    def call(self, model):
        out = model.graph.outputs[0]
        two = ir.Value(name="two", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]), const_value=ir.tensor(np.float32(2.0), name="two"))
        model.graph.register_initializer(two)
        producer = out.producer()
        mul = ir.node("Mul", [out, two])
        model.graph.insert_after(producer, mul)
        new = mul.outputs[0]
        new.dtype, new.shape = out.dtype, out.shape
        model.graph.outputs[0] = new
        name = out.name
        out.name = name + "_unscaled"
        new.name = name
        return ir.passes.PassResult(model, True)


class BadAttributePass(Pass):
    """Gives the Relu an attribute its schema lacks (a broken test pass, caught by the onnx checker)."""

    name = "break-attribute"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "Relu")
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 0.5)
        return ir.passes.PassResult(model, True)


class AddCustomOpPass(Pass):
    """Puts a custom-domain op (with its opset import) after the Relu; valid (test pass)."""

    name = "add-custom-op"

    def call(self, model):
        relu = next(n for n in model.graph if n.op_type == "Relu")
        users = list(relu.outputs[0].uses())
        custom = ir.node("Twist", [relu.outputs[0]], domain="test.custom", name="twist")
        custom.outputs[0].name = "twisted"
        custom.outputs[0].type, custom.outputs[0].shape = relu.outputs[0].type, relu.outputs[0].shape
        model.graph.insert_after(relu, custom)
        for user, index in users:
            user.replace_input_with(index, custom.outputs[0])
        model.opset_imports["test.custom"] = 1
        return ir.passes.PassResult(model, True)


class DropCustomImportPass(Pass):
    """Removes the custom domain's opset import, leaving its (unchanged) nodes without one (broken test pass)."""

    name = "break-imports"

    def call(self, model):
        del model.opset_imports["test.custom"]
        return ir.passes.PassResult(model, True)


class LowerOpsetImportPass(Pass):
    """Sets the default opset import to 17 without touching a node (broken for ops newer than 17)."""

    name = "break-opset"

    def call(self, model):
        model.opset_imports[""] = 17
        return ir.passes.PassResult(model, True)


class UntypedOutputPass(Pass):
    """Takes the graph output's type away (a broken test pass)."""

    name = "break-output-type"

    def call(self, model):
        model.graph.outputs[0].type = None
        return ir.passes.PassResult(model, True)


TEST_PASSES = [DoubleNegPass, NeedsOpset23, NeedsUnprovided, Countdown, DanglingPass, ShufflePass, DuplicateNamePass,
               CrashPass, ScaleOutputPass, BadAttributePass, AddCustomOpPass, DropCustomImportPass, UntypedOutputPass,
               LowerOpsetImportPass]


def registry_with_test_passes() -> Registry:
    registry = Registry()
    for cls in TEST_PASSES:
        registry.register(cls)
    return registry
