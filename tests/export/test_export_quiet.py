"""`qgraph export --quiet` prints nothing on stderr, progress bars included (issue 18: 7)."""

from __future__ import annotations

import io

from qgraph.cli import main
from qgraph.export.zoo import write_tiny_folder


def test_quiet_export_draws_no_progress_bar(tmp_path, capfd):
    folder = write_tiny_folder("llama", tmp_path / "llama")
    capfd.readouterr()
    code = main(["export", str(folder), "-o", str(tmp_path / "out"), "--exporter", "torchscript", "--quiet",
                 "--cache-dir", str(tmp_path / "cache")], out=io.StringIO())
    assert code == 0
    assert capfd.readouterr().err == ""
