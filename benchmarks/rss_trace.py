"""Run one qgraph command and show where its memory grew: the main thread's stack at each +150 MiB of RSS.

    .venv/bin/python benchmarks/rss_trace.py optimize IN.onnx -o OUT.onnx --passes rmsnorm attention --verify

A thread samples VmRSS every 20 ms; each time it has grown by 150 MiB since
the last report, the main thread's innermost frames are recorded. At the
end the peak (VmHWM) and the reports go to stderr. This is how the copies
behind ``--verify``'s peak were found (benchmarks/RESULTS.md, "inline
weights memory"); it measures, it does not time.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback

STEP_MIB = 150


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) // 1024
    return 0


def main(argv: list[str]) -> int:
    main_thread = threading.get_ident()
    reports: list[tuple[int, list[str]]] = []

    def sample() -> None:
        last = 0
        while True:
            rss = _status("VmRSS")
            if rss > last + STEP_MIB:
                frame = sys._current_frames().get(main_thread)
                stack = traceback.extract_stack(frame)[-14:] if frame is not None else []
                reports.append((rss, [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in stack]))
                last = rss
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from qgraph.cli import main as qgraph_main

    started = time.perf_counter()
    code = qgraph_main(argv, out=sys.stdout)
    print(f"peak RSS {_status('VmHWM')} MiB, exit {code}, {time.perf_counter() - started:.0f} s", file=sys.stderr)
    for rss, stack in reports:
        print(f"--- RSS {rss} MiB", file=sys.stderr)
        for frame in stack:
            print(f"    {frame}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
