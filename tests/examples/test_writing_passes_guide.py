"""docs/writing-passes.md stays true: its code is the examples' code, its commands name real files, passes and rules."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from qgraph.plugins import load_plugin
from qgraph.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
GUIDE = (ROOT / "docs" / "writing-passes.md").read_text()
EXAMPLES = ROOT / "examples" / "passes"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE, flags=re.S)


def commands() -> list[list[str]]:
    """Every ``qgraph ...`` command of the guide (indented code lines; continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", GUIDE)
    return [shlex.split(line.strip()) for line in text.splitlines() if line.startswith("    qgraph ")]


def test_the_guide_shows_each_example_file():
    for name in ("gelu_fusion.py", "qkv_merge.py", "silu_custom_op.py"):
        assert f"examples/passes/{name}" in GUIDE or f"`{name}`" in GUIDE


@pytest.mark.parametrize("block", python_blocks()[:3], ids=["gelu", "qkv", "silu"])
def test_every_line_of_the_guides_code_is_in_an_example_file(block):
    sources = {path.name: path.read_text() for path in EXAMPLES.glob("*.py")}
    for line in block.splitlines():
        if line.strip():
            assert any(line.strip() in source for source in sources.values()), line


def test_every_command_names_existing_plugins_passes_and_rules():
    checked = 0
    for argv in commands():
        plugins = [argv[i + 1] for i, a in enumerate(argv) if a == "--plugin"]
        if not plugins:
            continue
        registry = Registry(load_entry_points=False)
        defined = []
        for plugin in plugins:
            assert (ROOT / plugin).is_file(), plugin
            defined += load_plugin(str(ROOT / plugin), registry)
        rules = {rule.name for name in defined for rule in registry.get(name)().rule_set()}
        if "--passes" in argv:
            assert argv[argv.index("--passes") + 1] in defined, argv
        if "--rule" in argv:
            assert argv[argv.index("--rule") + 1] in rules, argv
        checked += 1
    assert checked >= 4
