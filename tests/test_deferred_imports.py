"""qgraph.deferred_imports: a deferred module runs on first use, and then behaves as if imported normally."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qgraph.deferred_imports import defer


def _run(code: str, *path: Path) -> str:
    """``code`` in a fresh interpreter (sys.modules untouched by this test session); its stdout."""
    env_path = ":".join(str(p) for p in path)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"}, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package ``probepkg`` whose import is visible (it counts its executions) and a submodule."""
    pkg = tmp_path / "probepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import builtins\nbuiltins.PROBE_RUNS = getattr(builtins, 'PROBE_RUNS', 0) + 1\n"
                                     "VALUE = 41 + 1\n")
    (pkg / "sub.py").write_text("from probepkg import VALUE\nDOUBLE = 2 * VALUE\n")
    return tmp_path


def test_a_deferred_module_runs_on_first_attribute_read_and_only_once(package: Path) -> None:
    out = _run("""
        import builtins
        from qgraph.deferred_imports import defer
        print(defer("probepkg"))
        import probepkg
        import probepkg as again
        print(getattr(builtins, "PROBE_RUNS", 0))
        print(probepkg.VALUE, again.VALUE, getattr(builtins, "PROBE_RUNS", 0))
        import probepkg.sub
        print(probepkg.sub.DOUBLE, builtins.PROBE_RUNS)
    """, package)
    assert out.split() == ["True", "0", "42", "42", "1", "84", "1"]


def test_an_imported_module_is_not_deferred_and_a_missing_one_still_fails_to_import() -> None:
    assert defer("json") is False  # imported already (pytest uses it)
    out = _run("""
        from qgraph.deferred_imports import defer
        defer("no_such_module_qgraph_test")
        try:
            import no_such_module_qgraph_test
        except ModuleNotFoundError:
            print("not found")
    """)
    assert out.strip() == "not found"


def test_nothing_is_in_sys_modules_before_it_is_imported() -> None:
    out = _run("""
        import sys, qgraph
        print(sorted(m for m in sys.modules if m.startswith(("sympy", "onnx"))))
    """)
    assert out.split() == ["[]"]


def test_importing_qgraph_as_a_library_defers_nothing() -> None:
    out = _run("""
        import sys, qgraph.io
        print(type(sys.modules["sympy"]).__name__, "sympy.core" in sys.modules)
    """)
    assert out.split() == ["module", "True"]


def test_with_the_executables_deferral_qgraph_io_does_not_run_sympy_and_symbolic_dims_still_compute() -> None:
    out = _run("""
        import sys
        from qgraph.deferred_imports import DEFERRED, defer
        for name in DEFERRED:  # what the qgraph executable does first (cli.entry)
            defer(name)
        import qgraph.io, onnx_ir as ir
        print("sympy.core" in sys.modules)
        dim = ir.SymbolicDim("batch")
        print(dim == "batch", "sympy.core" in sys.modules)
        print((ir.SymbolicDim("max(a, b)") * 2).evaluate({"a": 3, "b": 5}), "sympy.core" in sys.modules)
        import sympy
        print(sympy.Symbol("x") + 1)
    """)
    assert out.split("\n")[:4] == ["False", "True False", "10 True", "x + 1"]
