"""What every benchmark script shares: a fresh process per measurement, and the exports it measures.

A measurement runs in a child process (``python SCRIPT --child JSON``, the
result as JSON on the last line of stdout), so its peak RSS is that job's
alone and no import or cache of an earlier job helps it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["benchmark_parser", "exported", "huge_pages_mib", "in_child", "interleaved_decode", "peak_rss_mib",
           "ran_as_child"]


def huge_pages_mib() -> float:
    """How much of this process's memory is in transparent huge pages now (AnonHugePages), 0 where unknown."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident set size, from /proc/self/status (VmHWM).

    Not ``getrusage``'s ru_maxrss: Linux carries it over from the parent at
    fork, so a child started by a parent that once held a model would report
    the parent's peak. VmHWM belongs to the address space, which exec renews.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_child(script: str, task: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script --child TASK`` in a fresh interpreter (``env``: added to this one's environment);
    its last stdout line, parsed."""
    environ = {**os.environ, **env} if env else None
    done = subprocess.run([sys.executable, script, "--child", json.dumps(task)],
                          stdout=subprocess.PIPE, text=True, check=False, env=environ)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}) on {task}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def exported(model: str, exporter: str, exports: Path | None, folder: str) -> Path:
    """``exports/<folder>/model.onnx`` when given, else a fresh export through qgraph's default cache.

    The cache makes every export after the first a copy, so a fresh machine
    pays the export once (README.md: about 3 minutes for SmolLM2 with dynamo).
    """
    if exports is not None:
        path = exports / folder / "model.onnx"
        if not path.exists():
            raise SystemExit(f"{path}: not found (make it with `qgraph export {model} -o {path.parent} "
                             f"--exporter {exporter}`)")
        return path
    from qgraph.export.frontend import export_model
    from qgraph.export.progress import Progress

    print(f"exporting {model} with {exporter} (cached after the first time) ...", file=sys.stderr)
    out = Path(tempfile.mkdtemp(prefix="qgraph-bench-")) / folder
    return Path(export_model(model, out, exporter=exporter, progress=Progress()).model_path)


def benchmark_parser(doc: str, section: str) -> argparse.ArgumentParser:
    """The options every child-process benchmark takes: --write, --note and the hidden --child."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"update the '{section}' section of RESULTS.md")
    parser.add_argument("--note", default="", help="a remark appended to the section (e.g. other load on the machine)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def ran_as_child(args: argparse.Namespace, child: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """When started by :func:`in_child`, run ``child`` on the task and print its result; True then."""
    if not args.child:
        return False
    print(json.dumps(child(json.loads(args.child))))
    return True


def interleaved_decode(engines: dict[str, Any], prompt: Any, steps: int,
                       flip: bool) -> tuple[dict[str, float], dict[str, list[float]], dict[str, list[int]]]:
    """Prefill every ``qgraph.runtime`` engine (batch 1), then greedy decode steps alternating between them
    (A B A B ..., or B A B A ... with ``flip``), so load on a shared machine falls on all of them alike.

    Returns each engine's prefill seconds, per-step decode seconds and greedy tokens.
    """
    import time

    import numpy as np

    names = list(engines)[::-1] if flip else list(engines)
    logits, prefill = {}, {}
    for name in names:
        engines[name].start(1)
        started = time.perf_counter()
        logits[name] = engines[name].prefill(prompt, np.ones_like(prompt, bool))
        prefill[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {n: [] for n in names}
    tokens: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(steps):
        for name in names:
            token = np.argmax(logits[name], axis=-1)
            tokens[name].append(int(token[0]))
            started = time.perf_counter()
            logits[name] = engines[name].decode(token, np.ones(1, bool))
            times[name].append(time.perf_counter() - started)
    return prefill, times, tokens
