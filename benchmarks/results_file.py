"""benchmarks/RESULTS.md: each benchmark owns one ``## section`` and replaces only that."""

from __future__ import annotations

import os
import platform
import re
import sys
from pathlib import Path

from qgraph.atomic import write_text_atomic

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(section: str, report: str) -> None:
    """Replace (or append) ``section``; the file is read right before the atomic write."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    body = f"## {section}\n\n{report}\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + body
    write_text_atomic(RESULTS, text)
    print(f"updated section '{section}' of {RESULTS}", file=sys.stderr)


def publish(section: str, report: str, write: bool) -> None:
    """Print ``report``; with ``write`` (the benchmarks' --write), also replace its section of RESULTS.md."""
    print(report)
    if write:
        write_section(section, report)


def machine_description(packages: tuple[str, ...] = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime")) -> str:
    """Cores, CPU model, RAM, Python and the versions of ``packages``: the line every section starts with."""
    import importlib.metadata as md

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except OSError:
        mem = float("nan")
    versions = ", ".join(f"{name} {md.version(name)}" for name in packages)
    return f"{os.cpu_count()} cores ({cpu}), {mem:.1f} GiB RAM; Python {platform.python_version()}, {versions}"
