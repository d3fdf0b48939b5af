"""The CLI contract: commands, exit codes, nothing written on failure."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from framework_passes import registry_with_test_passes, relu_neg_model

import qgraph.registry
from qgraph.cli import main


@pytest.fixture(autouse=True)
def test_registry(monkeypatch):
    monkeypatch.setattr(qgraph.registry, "_DEFAULT", registry_with_test_passes())


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    relu_neg_model(17, path)
    return path


def run(*argv):
    out = io.StringIO()
    code = main([str(a) for a in argv], out=out)
    return code, out.getvalue()


def test_optimize_writes_model_and_report(model_path, tmp_path):
    out_path, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    code, text = run("optimize", model_path, "-o", out_path, "--passes", "double-neg", "identity-elimination", "--report", report_path)
    assert code == 0, text
    result = onnx.load(out_path)
    assert [n.op_type for n in result.graph.node] == ["Relu"]
    assert [o.name for o in result.graph.output] == ["y"]
    report = json.loads(report_path.read_text())
    assert [p["name"] for p in report["passes"]] == ["double-neg", "identity-elimination"]
    assert report["passes"][0]["rule_matches"] == {"double-neg": 1}
    assert "double-neg" in text  # the table


def test_default_pipeline_is_the_cleanup_preset(model_path, tmp_path):
    code, text = run("optimize", model_path, "-o", tmp_path / "out.onnx")
    assert code == 0, text
    assert "identity-elimination" in text and "dce" in text


def test_pipeline_file_and_options(model_path, tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[[steps]]\npass = "countdown"\n')
    code, _ = run("optimize", model_path, "-o", tmp_path / "o.onnx", "--pipeline", toml, "--option", "countdown.times=1", "--report", tmp_path / "r.json")
    assert code == 0
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["options"] == {"times": 1}


def test_output_equal_to_input_is_refused_and_input_untouched(model_path):
    before = model_path.read_bytes()
    for spelling in (model_path, model_path.parent / "." / model_path.name):
        code, _ = run("optimize", model_path, "-o", spelling, "--passes", "double-neg")
        assert code == 2
    assert model_path.read_bytes() == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--passes", "no-such-pass"], "unknown pass 'no-such-pass'"),
        (["--passes", "countdown", "--option", "countdown.nope=1"], "no option 'nope'"),
        (["--passes", "countdown", "--option", "countdown.times=x"], "cannot read 'x' as int"),
        (["--preset", "nope"], "unknown preset 'nope'"),
        (["--passes", "opset-upgrade", "--option", "opset-upgrade.target=99"], "opset-upgrade"),
    ],
)
def test_bad_usage_exits_2_and_writes_nothing(model_path, tmp_path, capsys, argv, message):
    out_path = tmp_path / "out.onnx"
    code, _ = run("optimize", model_path, "-o", out_path, *argv)
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_not_an_onnx_file_exits_2_naming_it(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("hello, this is not a model")
    code, _ = run("optimize", bad, "-o", tmp_path / "out.onnx")
    assert code == 2
    assert "notes.onnx" in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()


def test_failing_pass_exits_1_names_it_and_writes_nothing(model_path, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    code, _ = run("optimize", model_path, "-o", out_path, "--passes", "double-neg", "break-dangling")
    assert code == 1
    assert "pass 'break-dangling'" in capsys.readouterr().err
    assert not out_path.exists()


def test_explain_without_output_only_explains(model_path, tmp_path):
    code, text = run("optimize", model_path, "--passes", "double-neg", "--explain", "double-neg")
    assert code == 0
    lines = text.splitlines()
    assert lines[0].startswith("rule 'double-neg' of pass 'double-neg': 2 candidate root(s), 1 match(es)")
    assert any("[no match]" in line and "is a graph input" in line for line in lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]


def test_explain_unknown_rule_is_bad_usage(model_path, capsys):
    code, _ = run("optimize", model_path, "--passes", "double-neg", "--explain", "nope")
    assert code == 2
    assert "its rules: double-neg" in capsys.readouterr().err


def test_passes_lists_each_pass_with_its_doc_and_options():
    code, text = run("passes")
    assert code == 0
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "Remove double negations" in lines["double-neg"]
    assert "[options: times=2]" in lines["countdown"]
    assert "dce" in lines and "opset-upgrade" in lines


def test_inspect_prints_ops_and_json(model_path):
    code, text = run("inspect", model_path)
    assert code == 0 and "Neg" in text and "Relu" in text
    code, text = run("inspect", model_path, "--json")
    assert code == 0
    assert json.loads(text)["inputs"][0]["name"] == "x"


def test_console_script_exit_codes(model_path, tmp_path):
    exe = shutil.which("qgraph", path=str(Path(sys.executable).parent))
    assert exe is not None, "the qgraph console script is installed with the package"
    ok = subprocess.run([exe, "optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "--passes", "dce"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    usage = subprocess.run([exe, "optimize"], capture_output=True, text=True)
    assert usage.returncode == 2
    missing = subprocess.run([exe, "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True)
    assert missing.returncode == 2 and "missing.onnx" in missing.stderr


def test_verify_names_the_pass_that_changed_the_meaning(model_path, tmp_path, capsys):
    out_path = tmp_path / "out.onnx"
    code, _ = run("optimize", model_path, "-o", out_path, "--passes", "double-neg", "wrong-scale", "--verify")
    assert code == 1
    err = capsys.readouterr().err
    assert "pass 'wrong-scale' changed the model's meaning" in err
    assert "double-neg" not in err.split("changed")[0]  # the correct pass is not blamed
    assert not out_path.exists()


def test_verify_accepts_equivalent_rewrites(model_path, tmp_path, capsys):
    code, _ = run("optimize", model_path, "-o", tmp_path / "out.onnx", "--passes", "double-neg", "identity-elimination", "--verify", "--report", tmp_path / "r.json")
    assert code == 0, capsys.readouterr().err
    assert all(p["verified"] for p in json.loads((tmp_path / "r.json").read_text())["passes"] if p["changed"])


def test_the_executable_leaves_its_objects_to_the_os_and_main_does_not(tmp_path):
    """`qgraph` (cli.entry) freezes what is left before exit, so the interpreter's last collection skips the model;
    main(), which tests and tools call in long-lived processes, leaves the collector alone."""
    import gc

    probe = ("import atexit, gc, sys\n"
             "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
             "sys.argv = ['qgraph', 'passes']\n"
             "from qgraph.cli import entry\n"
             "entry()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rmsnorm" in done.stdout
    assert int(done.stdout.strip().splitlines()[-1].split()[1]) > 0
    before = gc.get_freeze_count()
    assert main(["passes"], out=io.StringIO()) == 0
    assert gc.get_freeze_count() == before
