"""Pipelines in Python, TOML and CLI form; the entry-point registry."""

from __future__ import annotations

import sys
import textwrap

import pytest
from framework_passes import registry_with_test_passes

from qgraph.errors import BadInputError
from qgraph.pipeline import Fixpoint, FixpointPasses, Pipeline, parse_option_assignments
from qgraph.registry import Registry


def test_toml_pipeline_keeps_order_options_and_fixpoint_groups(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(textwrap.dedent("""
        [[steps]]
        pass = "double-neg"

        [[steps]]
        fixpoint = ["countdown", "identity-elimination"]
        max_iterations = 4

        [[steps]]
        pass = "countdown"
        options = { times = 7 }
    """))
    pipeline = Pipeline.from_toml(path)
    created = pipeline.instantiate(registry_with_test_passes())
    assert created[0].name == "double-neg"
    assert isinstance(created[1], FixpointPasses) and created[1].max_iterations == 4
    assert [p.name for p in created[1].passes] == ["countdown", "identity-elimination"]
    assert created[2].config == {"times": 7}


def test_python_and_toml_spellings_agree(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text('[[steps]]\npass = "countdown"\noptions = { times = 3 }\n')
    python = Pipeline([("countdown", {"times": 3})])
    toml = Pipeline.from_toml(path)
    registry = registry_with_test_passes()
    assert [p.config for p in python.instantiate(registry)] == [p.config for p in toml.instantiate(registry)]


def test_command_line_options_are_typed_by_the_pass():
    pipeline = Pipeline(["countdown", "double-neg"])
    pipeline.set_options(parse_option_assignments(["countdown.times=0x10"]))
    (countdown, _) = pipeline.instantiate(registry_with_test_passes())
    assert countdown.config["times"] == 16


@pytest.mark.parametrize(
    ("assignment", "message"),
    [
        ("times=3", "PASS.KEY=VALUE"),
        ("countdown.times", "PASS.KEY=VALUE"),
    ],
)
def test_malformed_option_assignments(assignment, message):
    with pytest.raises(BadInputError, match=message):
        parse_option_assignments([assignment])


def test_option_for_a_pass_not_in_the_pipeline_is_an_error():
    with pytest.raises(BadInputError, match="kv-cache.*not in the pipeline"):
        Pipeline(["countdown"]).set_options({"kv-cache": {"ctx_len": "128"}})


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[[steps]\npass = ")
    with pytest.raises(BadInputError, match="broken.toml.*not valid TOML"):
        Pipeline.from_toml(path)
    with pytest.raises(BadInputError, match="does not exist"):
        Pipeline.from_toml(tmp_path / "missing.toml")
    (tmp_path / "empty.toml").write_text("title = 'x'\n")
    with pytest.raises(BadInputError, match="empty.toml.*steps"):
        Pipeline.from_toml(tmp_path / "empty.toml")


def test_fixpoint_bound_must_be_positive():
    with pytest.raises(BadInputError, match="max_iterations"):
        Fixpoint(["dce"], max_iterations=0)


def test_builtin_passes_come_from_entry_points():
    registry = Registry()
    for name in ["constant-folding", "dce", "cse", "identity-elimination", "shape-inference", "topological-sort", "opset-upgrade"]:
        assert name in registry
        assert registry.get(name).summary()
    assert "cleanup" in registry.preset_names()


def _install_fake_distribution(tmp_path, entry_points: str, module: str, source: str):
    site = tmp_path / "site"
    dist = site / "qgraph_plugin_demo-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qgraph-plugin-demo\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    (site / f"{module}.py").write_text(source)
    return site


def test_a_pass_from_another_installed_package_registers_the_same_way(tmp_path, monkeypatch):
    site = _install_fake_distribution(
        tmp_path,
        "[qgraph.passes]\nflip-relu = qgraph_plugin_demo:FlipRelu\nbroken = qgraph_plugin_missing:Nope\n",
        "qgraph_plugin_demo",
        textwrap.dedent('''
            import onnx_ir as ir
            from qgraph import Pass

            class FlipRelu(Pass):
                """A pass shipped by a third-party package."""
                name = "flip-relu"
                def call(self, model):
                    return ir.passes.PassResult(model, False)
        '''),
    )
    monkeypatch.syspath_prepend(str(site))
    registry = Registry()
    assert registry.get("flip-relu").summary() == "A pass shipped by a third-party package."
    assert "dce" in registry  # the built-ins are still there
    assert "qgraph-plugin-demo" in registry.broken()["broken"]
    with pytest.raises(BadInputError, match="broken.*cannot be loaded.*qgraph-plugin-demo"):
        registry.get("broken")
    sys.modules.pop("qgraph_plugin_demo", None)


def test_registered_name_must_match_the_class_name():
    from framework_passes import Countdown

    class Misnamed(Countdown):
        name = "other"

    registry = Registry(load_entry_points=False)
    registry.register(Misnamed)
    with pytest.raises(ValueError, match="already registered"):
        registry.register(type("Clash", (Countdown,), {"name": "other"}))


def test_a_pass_module_is_imported_when_its_name_is_asked_for():
    """Pipelines name a handful of passes; importing every installed one cost more than some passes."""
    import subprocess

    code = textwrap.dedent("""
        import sys
        from qgraph.registry import Registry
        registry = Registry()
        registry.get("dce")
        print("qgraph_passes.dead_code" in sys.modules, "qgraph_passes.rmsnorm_lowering" in sys.modules)
        assert "lower-rmsnorm" in registry.names()
        print("qgraph_passes.rmsnorm_lowering" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]


def test_a_plugin_cannot_take_an_installed_pass_name_that_was_not_imported_yet():
    from framework_passes import Countdown

    class Dce(Countdown):
        name = "dce"

    registry = Registry()
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Dce)
    assert registry.get("dce") is not Dce
