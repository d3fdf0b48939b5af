"""Huge pages for the weights a decode step streams (Linux, glibc 2.35+): the model-running commands ask for them.

A decode step reads every weight of the model once: ~520 MB per token for
SmolLM2-135M in float32, ~85 MB in int4. In 4 KiB pages that is ~130,000
pages a token, and the page walks of their TLB misses are part of what a
step costs. With transparent huge pages in ``madvise`` mode (what most
distributions ship) a process gets 2 MiB pages only for memory it marked
with ``madvise(MADV_HUGEPAGE)``; onnxruntime allocates its prepacked weights
with ``malloc`` and marks nothing. glibc marks every region it maps when the
process starts with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` -- a setting
read once, at start-up. So the commands that run a model (``generate``,
``embed``, ``demo``, ``infer``, ``execute``) start themselves again, once,
with it added to the environment (``os.execve``: same process id, same
arguments and streams; a second interpreter start-up, a few tens of ms, before anything is read). Measured on
SmolLM2-135M: see benchmarks/RESULTS.md, "ort vs onnxruntime-genai" (its
rows of qgraph with and without).

Nothing changes where it cannot help: another OS or C library, THP
``never`` (nothing to ask for) or ``always`` (nothing to ask), a tunable the
user set already. ``QGRAPH_HUGE_PAGES=0`` turns it off. A program that
imports qgraph as a library sets the tunable in its own environment.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

__all__ = ["MODEL_COMMANDS", "TUNABLE", "environment_with_huge_pages", "restart_with_huge_pages"]

TUNABLE = "glibc.malloc.hugetlb=1"
MODEL_COMMANDS = frozenset({"generate", "embed", "demo", "infer", "execute"})
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_GLIBC_FIRST = (2, 35)  # the release that added glibc.malloc.hugetlb


def _command(argv: Sequence[str]) -> str | None:
    """The sub-command of a ``qgraph`` command line (after any top-level ``--plugin X``)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--plugin":
            skip = True
        elif not arg.startswith("-"):
            return arg
        elif not arg.startswith("--plugin="):
            return None
    return None


def _glibc_version() -> tuple[int, ...] | None:
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")  # "glibc 2.36"
        return tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc, or no confstr
        return None


def _thp_mode() -> str | None:
    """``always``, ``madvise`` or ``never``: the bracketed word of the kernel's setting."""
    try:
        with open(_THP_MODE, encoding="ascii") as file:
            text = file.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def environment_with_huge_pages(environ: Mapping[str, str], *, glibc: tuple[int, ...] | None,
                                thp_mode: str | None) -> dict[str, str] | None:
    """The environment to start again with, or None where asking for huge pages would change nothing."""
    if environ.get("QGRAPH_HUGE_PAGES", "1") == "0":
        return None
    if glibc is None or glibc < _GLIBC_FIRST or thp_mode != "madvise":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables:  # the user's own choice, or this process already restarted
        return None
    new = dict(environ)
    new["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return new


def restart_with_huge_pages(argv: Sequence[str]) -> None:
    """For a model-running command, replace this process by itself with the tunable set (returns otherwise)."""
    if not sys.platform.startswith("linux") or _command(argv) not in MODEL_COMMANDS:
        return
    environ = environment_with_huge_pages(os.environ, glibc=_glibc_version(), thp_mode=_thp_mode())
    if environ is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, environ)
    except OSError:  # cannot start again: run as we are
        return
