"""What MatMulNBits' accuracy_level costs at decode time (M = 1), against float MatMul of the same weight.

`compile(precision="gguf")` runs the GGUF's blocks at accuracy_level 0 (exact
up to float rounding; level 4 rounds activations to int8), and SmolLM2 decoded
~8x slower at level 0 than at level 4. This times single products of
SmolLM2's shapes in onnxruntime, each in its own session with the weight as
initializers (so onnxruntime prepacks it as in a real graph):

- 576 x 1536, 4 bits, blocks of 32, uint8 zero points (a Q4_1 gate/up part as
  `quantize gguf=` places it) -- and without zero points (Q4_0);
- 576 x 1536 and 576 x 49152 (the tied LM head, Q8_0 in the packaged GGUF), 8 bits;

at accuracy_level 0, 1 and 4, and the float32 MatMul of the dequantized
weight as the peer of the same run. A product that costs about what
dequantizing the whole weight to float32 and multiplying costs (at least the
float MatMul's time, and the same at M = 1 as at M = 16) is taken to
dequantize the weight per call; one well under the float MatMul reads the
packed blocks directly.

    .venv/bin/python benchmarks/matmul_nbits_levels.py [--threads N] [--calls N] [--rounds N] [--write] [--note TEXT]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import benchmark_parser  # noqa: E402
from results_file import machine_description, publish  # noqa: E402

SECTION = "MatMulNBits accuracy_level at decode (M=1)"
SHAPES = [  # (label, K, N, bits, zero points)
    ("576x1536 4-bit, zero points (Q4_1 part)", 576, 1536, 4, True),
    ("576x1536 4-bit, no zero points (Q4_0)", 576, 1536, 4, False),
    ("576x1536 8-bit (Q8_0)", 576, 1536, 8, False),
    ("576x49152 8-bit (Q8_0 LM head)", 576, 49152, 8, False),
]
LEVELS = (0, 1, 4)
BLOCK = 32


def model_bytes(k: int, n: int, bits: int, zero_points: bool, level: int | None, rng: np.random.Generator) -> bytes:
    """One MatMulNBits (or, ``level=None``, float MatMul of the same dequantized weight) as a serialized model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from qgraph.quant_blocks import BlockQuantized

    n_blocks = k // BLOCK
    codes = rng.integers(0, 2**bits, (n, n_blocks, BLOCK), dtype=np.uint8)
    scales = (rng.standard_normal((n, n_blocks)) * 0.01).astype(np.float32)
    zeros = np.zeros((n, n_blocks), np.uint8) if zero_points else None
    q = BlockQuantized(codes, scales, zeros, bits, BLOCK, k)
    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])
    if level is None:
        inits = [numpy_helper.from_array(q.dequantize(), "W")]
        node = helper.make_node("MatMul", ["A", "W"], ["Y"])
        opsets = [helper.make_opsetid("", 21)]
    else:
        b, s, z = q.matmul_nbits_inputs()
        inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "scales")]
        inputs = ["A", "B", "scales"]
        if z is not None:
            inits.append(numpy_helper.from_array(z, "zero_points"))
            inputs.append("zero_points")
        node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=BLOCK, accuracy_level=level)
        opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph([node], "product", [a], [y], inits)
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def per_call_us(session, m: int, k: int, calls: int) -> float:
    feed = {"A": np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)}
    session.run(None, feed)  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        session.run(None, feed)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = benchmark_parser(__doc__, SECTION)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--calls", type=int, default=200, help="products per timing")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    args = parser.parse_args()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    rng = np.random.default_rng(0)
    rows = []
    for label, k, n, bits, zero_points in SHAPES:
        variants = {"float MatMul": None, **{f"level {level}": level for level in LEVELS}}
        sessions = {name: ort.InferenceSession(model_bytes(k, n, bits, zero_points, level, rng), options,
                                               providers=["CPUExecutionProvider"]) for name, level in variants.items()}
        calls = max(5, args.calls if n <= 4096 else args.calls // 20)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                for m in (1, 16):
                    times.setdefault((name, m), []).append(per_call_us(session, m, k, calls))
        median = {key: statistics.median(values) for key, values in times.items()}
        for name in variants:
            rows.append((label, name, median[(name, 1)], median[(name, 1)] / median[("float MatMul", 1)],
                         median[(name, 16)], median[(name, 16)] / median[(name, 1)]))
        del sessions
    lines = [f"`.venv/bin/python benchmarks/matmul_nbits_levels.py --threads {args.threads} --calls {args.calls} "
             f"--rounds {args.rounds}`: one product A [M, K] x W [K, N] per call (session.run), weights as initializers "
             f"(prepacked by onnxruntime), blocks of {BLOCK}, {args.threads} intra-op thread(s); median of "
             f"{args.rounds} interleaved rounds. *vs float*: the time over the float32 MatMul of the same dequantized "
             "weight in the same run.", "", machine_description(("onnx", "onnxruntime")), "",
             "| weight | kernel | us/call M=1 | vs float M=1 | us/call M=16 | M=16 / M=1 |", "|---|---|---|---|---|---|"]
    for label, name, t1, ratio, t16, growth in rows:
        lines.append(f"| {label} | {name} | {t1:.1f} | {ratio:.2f} | {t16:.1f} | {growth:.2f} |")
    if args.note:
        lines += ["", args.note]
    publish(SECTION, "\n".join(lines), args.write)


if __name__ == "__main__":
    main()
