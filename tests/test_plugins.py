"""Passes loaded from a .py file or a module: --plugin (any command) and QGRAPH_PLUGINS."""

from __future__ import annotations

import io
import os
import textwrap

import onnx
import pytest
from framework_passes import registry_with_test_passes, relu_neg_model

import qgraph.registry
from qgraph.cli import main
from qgraph.errors import BadInputError
from qgraph.plugins import load_plugin, plugins_from_environment
from qgraph.registry import Registry

PLUGIN_SOURCE = textwrap.dedent('''
    """A plugin written outside qgraph: Relu(Relu(x)) -> Relu(x)."""
    from qgraph import RewritePass, Rule, RuleSet

    def relu_relu(op, x):
        return op.Relu(op.Relu(x))

    class DoubleReluPass(RewritePass):
        """Fold Relu(Relu(x)) into one Relu (plugin)."""

        name = "double-relu"
        rules = RuleSet([Rule("double-relu", relu_relu, lambda op, x: op.Relu(x))])
''')


@pytest.fixture(autouse=True)
def test_registry(monkeypatch):
    monkeypatch.delenv("QGRAPH_PLUGINS", raising=False)
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry_with_test_passes())


@pytest.fixture
def plugin_file(tmp_path):
    path = tmp_path / "my_relu_plugin.py"
    path.write_text(PLUGIN_SOURCE)
    return path


def _double_relu_model(path):
    model = relu_neg_model(17)
    for node in model.graph.node:
        if node.op_type == "Neg":
            node.op_type = "Relu"
    onnx.save(model, path)
    return path


def run(*argv):
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def test_a_plugin_file_registers_its_passes_with_their_origin(plugin_file):
    registry = Registry(load_entry_points=False)
    names = load_plugin(str(plugin_file), registry)
    assert names == ["double-relu"]
    assert registry.get("double-relu").__name__ == "DoubleReluPass"
    assert registry.origin("double-relu") == f"plugin file {plugin_file}"


def test_a_plugin_module_is_imported_by_name(plugin_file, monkeypatch):
    monkeypatch.syspath_prepend(str(plugin_file.parent))
    registry = Registry(load_entry_points=False)
    assert load_plugin("my_relu_plugin", registry) == ["double-relu"]
    assert registry.origin("double-relu") == "plugin module my_relu_plugin"


def test_passes_command_lists_plugin_passes_with_where_they_came_from(plugin_file):
    code, text = run("passes", "--plugin", plugin_file)
    assert code == 0, text
    line = next(line for line in text.splitlines() if line.startswith("double-relu"))
    assert "Fold Relu(Relu(x))" in line and f"plugin file {plugin_file}" in line


def test_optimize_runs_a_pass_from_a_plugin_file(plugin_file, tmp_path):
    source, target = _double_relu_model(tmp_path / "in.onnx"), tmp_path / "out.onnx"
    code, text = run("optimize", source, "-o", target, "--passes", "double-relu", "--plugin", plugin_file)
    assert code == 0, text
    assert [n.op_type for n in onnx.load(target).graph.node].count("Relu") == 1  # three Relus became one


def test_plugin_option_may_come_before_the_command(plugin_file):
    code, text = run("--plugin", plugin_file, "passes")
    assert code == 0 and "double-relu" in text


def test_plugins_before_and_after_the_command_are_all_loaded(plugin_file, tmp_path):
    other = tmp_path / "other_plugin.py"
    other.write_text(PLUGIN_SOURCE.replace("double-relu", "double-relu-2").replace("DoubleReluPass", "OtherPass"))
    code, text = run("--plugin", plugin_file, "passes", "--plugin", other)
    assert code == 0 and "double-relu " in text and "double-relu-2" in text


def test_environment_variable_loads_plugins_for_every_command(plugin_file, tmp_path, monkeypatch):
    other = tmp_path / "other_plugin.py"
    other.write_text(PLUGIN_SOURCE.replace("double-relu", "double-relu-2").replace("DoubleReluPass", "OtherPass"))
    monkeypatch.setenv("QGRAPH_PLUGINS", os.pathsep.join([str(plugin_file), str(other)]))
    assert plugins_from_environment() == [str(plugin_file), str(other)]
    code, text = run("passes")
    assert code == 0
    assert "double-relu " in text and "double-relu-2" in text


def test_default_registry_reads_the_environment(plugin_file, monkeypatch):
    monkeypatch.setenv("QGRAPH_PLUGINS", str(plugin_file))
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", None)
    assert "double-relu" in qgraph.registry.default_registry()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import no_such_module_anywhere\n", "No module named"),
        ("x = 1\n", "defines no qgraph pass"),
        ("def broken(:\n", "SyntaxError"),
    ],
)
def test_a_broken_plugin_is_bad_input_naming_the_file(tmp_path, source, message):
    path = tmp_path / "broken_plugin.py"
    path.write_text(source)
    with pytest.raises(BadInputError, match=message) as info:
        load_plugin(str(path), Registry(load_entry_points=False))
    assert str(path) in str(info.value)
    code, _ = run("passes", "--plugin", path)
    assert code == 2


def test_a_missing_plugin_is_bad_input():
    with pytest.raises(BadInputError, match="no_such_plugin"):
        load_plugin("no_such_plugin.py", Registry(load_entry_points=False))
    with pytest.raises(BadInputError, match="cannot import plugin module"):
        load_plugin("no_such_plugin_module", Registry(load_entry_points=False))


def test_a_plugin_pass_cannot_silently_replace_a_registered_one(tmp_path):
    path = tmp_path / "clash.py"
    path.write_text(PLUGIN_SOURCE.replace('name = "double-relu"', 'name = "double-neg"'))
    with pytest.raises(BadInputError, match="double-neg"):
        load_plugin(str(path), registry_with_test_passes())
