"""Peak memory of `qgraph optimize`, `inspect`, `--verify` and `check` on a model with its weights inline vs in external data.

    .venv/bin/python benchmarks/inline_memory.py [--tensors N] [--mib M] [--write] [--note TEXT]

A synthetic model (a chain of ``N`` MatMul + Add blocks, weights of ``M``
MiB each, written one tensor at a time) is saved twice: with every weight
inside the .onnx file, and with the weights in ``model.onnx.data``. Each
command then runs in a fresh process (``qgraph.cli.main``), so peak RSS
(VmHWM, ``harness.peak_rss_mib``) is the command's own, interpreter and
imports included. The target (issue 18): peak RSS at most 1.5x the model
size with inline weights, at most 0.3x with external data. ``--verify`` and
``check`` hold two onnxruntime sessions of the model at once: their weights
are mapped once and shared (``qgraph.verify.shared_weights``), so they need
about one model's size on top of the interpreter, not one per session.

``--write`` replaces the "inline weights memory" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import benchmark_parser, in_child, peak_rss_mib, ran_as_child
from results_file import machine_description, publish

SECTION = "inline weights memory"
MIB = 2**20


def child(task: dict[str, Any]) -> dict[str, Any]:
    if task["kind"] == "make":
        return _write_model(Path(task["folder"]), task["tensors"], task["mib"])
    from qgraph.cli import main

    code = main(task["argv"], out=io.StringIO())
    return {"exit": code, "peak_rss_mib": peak_rss_mib()}


def _write_model(folder: Path, tensors: int, mib: int) -> dict[str, Any]:
    import numpy as np
    import onnx_ir as ir

    from qgraph import io as qio

    side = int((mib * MIB // 4) ** 0.5)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", side]))
    nodes, inits, current = [], [], x
    for i in range(tensors):
        def make(seed: int = i) -> ir.Tensor:  # materialized by the writer, one at a time
            return ir.Tensor(np.random.default_rng(seed).standard_normal((side, side), dtype=np.float32) / side)

        lazy = ir.LazyTensor(make, dtype=ir.DataType.FLOAT, shape=ir.Shape([side, side]), name=f"w{i}")
        w = ir.Value(name=f"w{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([side, side]), const_value=lazy)
        inits.append(w)
        mm = ir.node("MatMul", [current, w], name=f"mm{i}")
        mm.outputs[0].name = f"h{i}"
        add = ir.node("Add", [mm.outputs[0], current], name=f"res{i}")
        add.outputs[0].name = f"r{i}"
        nodes += [mm, add]
        current = add.outputs[0]
    graph = ir.Graph([x], [current], nodes=nodes, initializers=inits, opset_imports={"": 18}, name="chain")
    paths = {}
    for layout, external in (("inline", False), ("external", True)):
        (folder / layout).mkdir(parents=True, exist_ok=True)
        path = folder / layout / "model.onnx"
        qio.save(ir.Model(graph, ir_version=10), path, external_data=external)
        paths[layout] = str(path)
    return {"paths": paths, "weights_mib": tensors * side * side * 4 / MIB}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--mib", type=int, default=64, help="size of each weight")
    args = parser.parse_args(argv)
    if ran_as_child(args, child):
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="qgraph-inline-bench-") as tmp:
        made = in_child(__file__, {"kind": "make", "folder": tmp, "tensors": args.tensors, "mib": args.mib})
        for layout, path in made["paths"].items():
            size = sum(p.stat().st_size for p in Path(path).parent.iterdir()) / MIB
            verified = str(Path(tmp) / f"verified-{layout}.onnx")
            for label, argv_ in (
                ("inspect", ["inspect", path]),
                ("optimize --passes rmsnorm attention", ["optimize", path, "-o", str(Path(tmp) / f"out-{layout}.onnx"),
                                                          "--passes", "rmsnorm", "attention"]),
                ("optimize (cleanup preset)", ["optimize", path, "-o", str(Path(tmp) / f"clean-{layout}.onnx")]),
                # Verification runs the model before and after the pass side by side in onnxruntime.
                ("optimize --passes shape-inference --verify", ["optimize", path, "-o", verified,
                                                              "--passes", "shape-inference", "--verify"]),
                ("check IN OUT (OUT: the verified output)", ["check", path, verified, "--examples", "5"]),
            ):
                print(f"{layout}: {label} ...", file=sys.stderr)
                row = in_child(__file__, {"kind": "run", "argv": argv_})
                rows.append({"layout": layout, "command": label, "size_mib": size, **row})
                if not label.endswith("--verify"):
                    for p in Path(tmp).glob("*-*.onnx*"):
                        p.unlink()
    publish(SECTION, _report(rows, made["weights_mib"], args.note), args.write)
    return 0


def _report(rows: list[dict[str, Any]], weights_mib: float, note: str) -> str:
    lines = [
        machine_description(),
        "",
        f"`python benchmarks/inline_memory.py`: a synthetic chain of MatMul + Add blocks, {weights_mib:.0f} MiB of "
        "float32 weights, saved once with the weights inline and once in `model.onnx.data`. Each command is a fresh "
        "process running `qgraph.cli.main`; *peak RSS* is its VmHWM, interpreter and imports included; *ratio* is "
        "peak RSS over the size of the model's files. Targets: <= 1.5 inline, <= 0.3 external (optimize, inspect); "
        "`--verify` and `check` run the model in onnxruntime, which reads every weight once.",
        "",
        "| layout | command | model MiB | exit | peak RSS MiB | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['command']} | {r['size_mib']:.0f} | {r['exit']} | "
                     f"{r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / r['size_mib']:.2f} |")
    if note:
        lines += ["", note]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
