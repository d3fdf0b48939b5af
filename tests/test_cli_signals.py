"""Interrupted runs: SIGTERM like Ctrl-C, one-line message, no staging left, stale staging removed (issue 18: 6)."""

from __future__ import annotations

import io
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from framework_passes import relu_neg_model

import qgraph.cli
from qgraph.staging import STAGING_SUFFIX

# A run whose save stops, staging folder written, until a signal arrives. Ctrl-C reaches it as it reaches a
# terminal's foreground job: a shell starts background jobs (``make test &``, ``nohup``) with SIGINT ignored,
# and the child would inherit that.
_CHILD = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    import qgraph.io
    from qgraph.cli import main

    signal.signal(signal.SIGINT, signal.default_int_handler)

    real_write = qgraph.io._write_model_file

    def write_then_wait(model, staged, *args):
        real_write(model, staged, *args)
        Path(sys.argv[1]).write_text(str(staged))
        time.sleep(120)

    qgraph.io._write_model_file = write_then_wait
    sys.exit(main(sys.argv[2:]))
    """
)


def _start_stuck_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    model = tmp_path / "in.onnx"
    relu_neg_model(17, model)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(ready), "optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--passes", "dce"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the child never reached its save"
        time.sleep(0.05)
    staged = Path(ready.read_text())
    assert staged.exists() and staged.parent.name.endswith(STAGING_SUFFIX)
    return child, staged


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in ("in.onnx", "ready"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_save_cleans_up_and_says_so_in_one_line(tmp_path, signum):
    child, _ = _start_stuck_run(tmp_path)
    child.send_signal(signum)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signum
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        f"qgraph optimize: interrupted ({'Ctrl-C' if signum == signal.SIGINT else signal.Signals(signum).name}); nothing written"
    ]
    assert _leftovers(tmp_path) == []


def test_a_later_run_removes_the_staging_of_a_killed_run(tmp_path):
    child, staged = _start_stuck_run(tmp_path)
    child.kill()
    child.communicate(timeout=60)
    assert staged.exists()  # SIGKILL cannot be handled: the folder stays...
    code = qgraph.cli.main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "other.onnx"), "--passes", "dce"],
                           out=io.StringIO())
    assert code == 0
    assert _leftovers(tmp_path) == ["other.onnx"]  # ...until the next write into that folder


def test_a_live_run_keeps_its_staging_while_another_writes_beside_it(tmp_path):
    child, staged = _start_stuck_run(tmp_path)
    try:
        code = qgraph.cli.main(["optimize", str(tmp_path / "in.onnx"), "-o", str(tmp_path / "other.onnx")], out=io.StringIO())
        assert code == 0
        assert staged.exists()
    finally:
        child.terminate()
        child.communicate(timeout=60)
    assert _leftovers(tmp_path) == ["other.onnx"]


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(qgraph.cli, "_build_parser", interrupted)
    assert qgraph.cli.main(["passes"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == "qgraph: interrupted (Ctrl-C); nothing written"


def test_importing_the_entry_point_does_not_import_the_framework():
    """The window in which Ctrl-C can only print a traceback is Python's own start-up."""
    code = "import sys, qgraph.cli; print(sorted(m for m in sys.modules if m.startswith(('onnx', 'numpy'))))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
