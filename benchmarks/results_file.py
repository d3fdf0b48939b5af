"""benchmarks/RESULTS.md: each benchmark owns one ``## section`` and replaces only that."""

from __future__ import annotations

import re
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
