"""The model-running commands start again once with glibc's huge-page tunable; everything else runs as it is."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from qgraph import huge_pages
from qgraph.huge_pages import MODEL_COMMANDS, TUNABLE, environment_with_huge_pages

_OTHER_TUNABLES = st.lists(st.sampled_from(["glibc.malloc.check=0", "glibc.malloc.arena_max=2",
                                            "glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=2"]), max_size=2)


@given(switch=st.sampled_from([None, "0", "1"]), glibc=st.sampled_from([None, (2, 31), (2, 34), (2, 35), (2, 36), (3, 0)]),
       mode=st.sampled_from([None, "always", "madvise", "never"]), tunables=_OTHER_TUNABLES)
def test_the_tunable_is_added_exactly_where_it_can_help(switch, glibc, mode, tunables):
    environ = {"PATH": "/bin"}
    if switch is not None:
        environ["QGRAPH_HUGE_PAGES"] = switch
    if tunables:
        environ["GLIBC_TUNABLES"] = ":".join(tunables)
    new = environment_with_huge_pages(environ, glibc=glibc, thp_mode=mode)
    helps = (switch != "0" and glibc is not None and glibc >= (2, 35) and mode == "madvise"
             and not any(t.startswith("glibc.malloc.hugetlb") for t in tunables))
    if not helps:
        assert new is None
        return
    assert new is not None
    assert new["GLIBC_TUNABLES"].split(":") == [*tunables, TUNABLE]  # the user's own tunables kept, in order
    assert {k: v for k, v in new.items() if k != "GLIBC_TUNABLES"} == {
        k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    assert environment_with_huge_pages(new, glibc=glibc, thp_mode=mode) is None  # once: the restart does not loop


@given(plugins=st.lists(st.sampled_from(["--plugin", "--plugin=x.py"]), max_size=2),
       command=st.sampled_from(sorted(MODEL_COMMANDS | {"optimize", "inspect", "check", "export", "passes"})))
def test_the_command_is_read_past_top_level_plugins(plugins, command):
    argv = []
    for flag in plugins:
        argv += [flag, "my_passes.py"] if flag == "--plugin" else [flag]
    assert huge_pages._command([*argv, command, "model.onnx", "--threads", "2"]) == command
    assert huge_pages._command([*argv, "--help"]) is None


_PROBE = """
import os, sys
from qgraph import huge_pages
huge_pages._thp_mode = lambda: "madvise"      # the decision is tested above; here: the restart itself
huge_pages._glibc_version = lambda: (2, 36)
print("start", os.getpid(), flush=True)
huge_pages.restart_with_huge_pages(sys.argv[1:])
print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES"), sys.argv[1:])
"""


def _probe(*argv: str, **env: str) -> list[list[str]]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "QGRAPH_HUGE_PAGES")}
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], env={**environ, **env}, capture_output=True,
                          text=True, timeout=60, check=True)
    return [line.split(" ", 3) for line in done.stdout.splitlines()]


def test_a_model_command_restarts_once_as_the_same_process_with_its_arguments():
    lines = _probe("generate", "folder", "--prompt", "a b", GLIBC_TUNABLES="glibc.malloc.check=0")
    (start1, pid1), (start2, pid2), (running, pid3, tunables, argv) = lines
    assert (start1, start2, running) == ("start", "start", "running")
    assert pid1 == pid2 == pid3  # replaced in place: a caller waiting on the pid sees one process
    assert tunables == f"glibc.malloc.check=0:{TUNABLE}"
    assert argv == "['generate', 'folder', '--prompt', 'a b']"


def test_other_commands_and_the_switch_run_as_they_are():
    for argv, env in ((["optimize", "m.onnx"], {}), (["generate", "folder"], {"QGRAPH_HUGE_PAGES": "0"})):
        lines = _probe(*argv, **env)
        assert [line[0] for line in lines] == ["start", "running"]
        assert lines[1][2] == "None"
