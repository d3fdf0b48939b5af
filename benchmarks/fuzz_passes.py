"""The long fuzz run: random valid graphs through every registered pass and preset, verdicts counted.

    .venv/bin/python benchmarks/fuzz_passes.py [--graphs N] [--seed S] [--write] [--note TEXT]

Each graph (``qgraph.verify.random_graphs``) is written to a temporary
folder and run through ``qgraph optimize`` once per configuration
(``qgraph.verify.pipeline_contract.configurations``: every preset and every
pass but fp16-emulate), judged on three drawn inputs. The contract (issue
18): every run is ``equivalent`` or ``refused``; the counts of internal
errors, wrong results, changed inputs, unloadable or missing outputs must
be 0. The first few failures are listed with their graph saved under
``--keep DIR`` when given. tests/test_fuzz_passes.py runs the same check,
sized for the test suite.

``--write`` replaces the "fuzz: passes on random graphs" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from results_file import machine_description, publish

from qgraph.verify.pipeline_contract import VERDICTS, configurations, run_configuration, write_graph
from qgraph.verify.random_graphs import random_feeds, random_graphs

SECTION = "fuzz: passes on random graphs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="save the graphs that broke the contract here")
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of RESULTS.md")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    configs = configurations()
    counts: dict[str, collections.Counter] = {label: collections.Counter() for label in configs}
    kinds: collections.Counter = collections.Counter()
    failures: list[str] = []
    graphs = 0
    started = time.perf_counter()

    @seed(args.seed)
    @settings(max_examples=args.graphs, deadline=None, phases=[Phase.generate], database=None,
              suppress_health_check=list(HealthCheck))
    @given(graph=random_graphs(), data=st.data())
    def fuzz(graph, data):
        nonlocal graphs
        feeds = [data.draw(random_feeds(graph)) for _ in range(3)]  # may abort the example: count after
        graphs += 1
        kinds.update(set(graph.kinds))
        with tempfile.TemporaryDirectory(prefix="qgraph-fuzz-") as folder:
            source = write_graph(graph.model, Path(folder))
            for label, arguments in configs.items():
                outcome = run_configuration(source, label, arguments, feeds)
                counts[label][outcome.verdict] += 1
                if not outcome.ok:
                    failures.append(f"graph {graphs}, {label}: {outcome.verdict}: {outcome.detail[:300]}")
                    if args.keep:
                        args.keep.mkdir(parents=True, exist_ok=True)
                        shutil.copy(source, args.keep / f"graph-{graphs}.onnx")
        if graphs % 25 == 0:
            print(f"{graphs} graphs, {len(failures)} contract failures, {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)

    fuzz()
    seconds = time.perf_counter() - started
    publish(SECTION, _report(counts, kinds, graphs, failures, seconds, args), args.write)
    return 1 if failures else 0


def _report(counts, kinds, graphs, failures, seconds, args) -> str:
    total = collections.Counter()
    for c in counts.values():
        total.update(c)
    lines = [
        machine_description(),
        "",
        f"`python benchmarks/fuzz_passes.py --graphs {args.graphs} --seed {args.seed}`: {graphs} random valid graphs "
        f"(hypothesis, `qgraph.verify.random_graphs`), each through `qgraph optimize` with every registered preset "
        f"and pass but fp16-emulate ({len(counts)} configurations, {sum(total.values())} runs, {seconds:.0f} s), "
        "judged on 3 drawn inputs each. Contract: every run `equivalent` (onnxruntime loads the output, same "
        "outputs within 2e-3) or `refused` (exit 1/2 with a message, nothing written).",
        "",
        "| configuration | " + " | ".join(VERDICTS) + " |",
        "|---|" + "---:|" * len(VERDICTS),
    ]
    for label, c in counts.items():
        lines.append(f"| {label} | " + " | ".join(str(c[v]) for v in VERDICTS) + " |")
    lines.append("| **total** | " + " | ".join(f"**{total[v]}**" for v in VERDICTS) + " |")
    lines += ["", "Constructs drawn (graphs containing each): " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()) + "."]
    if failures:
        lines += ["", f"{len(failures)} contract failure(s); the first ones:", ""]
        lines += [f"- {f}" for f in failures[:10]]
    if args.note:
        lines += ["", args.note]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
