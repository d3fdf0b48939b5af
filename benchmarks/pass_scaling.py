"""Model-pass time against the number of layers, on synthetic decoders of 8 to 128 layers.

    .venv/bin/python benchmarks/pass_scaling.py [--layers 8 32 128] [--repeats 3] [--write]

docs/design.md's budget: a pass over the graph costs O(nodes). Each size is a
``qgraph.synthetic`` decoder (dynamo-exporter op patterns, opset 23, the
causal mask combined with an ``attention_mask`` input, a fresh copy per run)
and the canonicalize and lower passes run on it in
pipeline order under the pass manager, invariant checks off so the figure is
the pass's own: ``rmsnorm``, ``attention``, ``kv-cache`` (retained, CtxScatter: its
analysis probes the graph in onnxruntime), ``lower-rmsnorm``,
``lower-attention`` (primitive) and ``fp16-clip``. Each figure is the best
of ``--repeats``. The match counts are checked against the layer count
(2 RMSNorms per layer + 1, one attention and one cached layer per layer), so a pass that got
faster by matching less is caught. The budget: a pass's time at the largest
size may be at most 20x its time at the smallest (8 -> 128 layers is 16x
the nodes); exit status 1 when exceeded.
"""

from __future__ import annotations

import argparse
import sys

from results_file import RESULTS, machine_description, publish

SECTION = "Pass scaling"
PIPELINE = (
    ("rmsnorm", {}),
    ("attention", {}),
    ("kv-cache", {"style": "retained", "scatter": "ctx-scatter"}),
    ("lower-rmsnorm", {"to": "custom-rmsnorm"}),
    ("lower-attention", {"to": "primitive"}),
    ("fp16-clip", {}),
)
BUDGET = 20.0


def measure(layers: int) -> tuple[int, dict[str, float], dict[str, int]]:
    """(nodes, seconds per pass, matches per pass) for one fresh decoder of ``layers`` layers."""
    from qgraph.graph_stats import count_nodes
    from qgraph.manager import PassManager
    from qgraph.synthetic import synthetic_decoder

    model = synthetic_decoder(layers, opset=23, mask="padding")
    nodes = count_nodes(model.graph)
    manager = PassManager([{"pass": name, "options": options} for name, options in PIPELINE],
                          check_invariants=False)
    report = manager.run(model)
    seconds = {p.name: p.seconds for p in report.passes}
    matches = {p.name: sum(p.rule_matches.values()) for p in report.passes}
    return nodes, seconds, matches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"update the '{SECTION}' section of {RESULTS.name}")
    parser.add_argument("--note", default="")
    args = parser.parse_args(argv)

    rows = []
    for layers in args.layers:
        best: dict[str, float] = {}
        for _ in range(args.repeats):
            nodes, seconds, matches = measure(layers)
            for name, s in seconds.items():
                best[name] = min(best.get(name, s), s)
        expected = {"rmsnorm": 2 * layers + 1, "attention": layers, "kv-cache": layers}
        for name, want in expected.items():
            if matches[name] != want:
                raise SystemExit(f"{layers} layers: {name} matched {matches[name]}, expected {want}")
        rows.append((layers, nodes, best))
        print(f"{layers} layers, {nodes} nodes: " + ", ".join(f"{k} {v:.3f}s" for k, v in best.items()),
              file=sys.stderr)

    names = [name for name, _ in PIPELINE]
    first, last = rows[0], rows[-1]
    ratios = {name: last[2][name] / first[2][name] for name in names}
    lines = [
        "Command: `.venv/bin/python benchmarks/pass_scaling.py --write`",
        "",
        f"Machine: {machine_description()}.",
        "",
        "Synthetic Llama-shaped decoders (opset 23), the passes in pipeline order under the pass manager with "
        "invariant checks off; seconds are each pass's own, best of "
        f"{args.repeats}. Match counts checked: 2 RMSNorms per layer + 1, one attention and one cached layer "
        "per layer.",
        "",
        "| layers | nodes | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for layers, nodes, best in rows:
        lines.append(f"| {layers} | {nodes} | " + " | ".join(f"{best[n]:.3f}" for n in names) + " |")
    lines.append(
        f"| ratio {last[0]}/{first[0]} layers | {last[1] / first[1]:.1f}× | "
        + " | ".join(f"{ratios[n]:.1f}×" for n in names) + " |"
    )
    over = [n for n in names if ratios[n] > BUDGET]
    lines += ["", f"Budget: at most {BUDGET:.0f}× from the smallest to the largest size (linear in nodes): "
              + ("**exceeded by " + ", ".join(over) + "**" if over else "met by every pass") + "."]
    if args.note:
        lines += ["", args.note]
    report = "\n".join(lines)
    publish(SECTION, report, args.write)
    return 1 if over else 0


if __name__ == "__main__":
    raise SystemExit(main())
