"""The examples/ scripts run end to end (on tiny zoo models: the packaged ones are benchmarks' business)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_causal_lm_quickstart(tmp_path: Path) -> None:
    from qgraph.export.zoo import write_tiny_folder

    folder = write_tiny_folder("llama", tmp_path / "llama")
    out = _run("causal_lm_quickstart.py", "--model", str(folder), "--prompt-len", "8", "--ctx-len", "48",
               "--generation-len", "5")
    assert out.count("Performance Stats") == 2  # one block per target
    assert "## target qaic" in out and "## target ort" in out and "perf_metrics: PerfMetrics(ttft=" in out


@pytest.mark.parametrize("pooling", ["mean"])
def test_embedding_quickstart(tmp_path: Path, pooling: str) -> None:
    from qgraph.export.zoo import write_tiny_folder

    folder = write_tiny_folder("bert", tmp_path / "bert")
    out = _run("embedding_quickstart.py", "--model", str(folder), "--pooling", pooling)
    rows = [line.split()[:3] for line in out.splitlines() if line.startswith("  ")]
    assert len(rows) == 3
    assert [float(rows[i][i]) for i in range(3)] == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)  # self-similarity
