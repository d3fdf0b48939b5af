"""Synthetic Llama-shaped decoder graphs, as the torch dynamo exporter emits them.

The repo builds this model itself (no hub access, no torch needed) for the
README's main job and for the benchmarks: every block is written in the
primitive ops the dynamo exporter produces for a Hugging Face Llama at opset
18+, so the canonicalizing passes have the real patterns to find:

* embedding: ``Gather(embed_tokens, input_ids)``;
* positions and the causal mask built in-graph from ``Shape(input_ids)``
  (``Range``, ``LessOrEqual``, ``Where`` — never ``Trilu``), or an additive
  ``attention_mask`` input [batch, 1, seq, seq];
* rotary tables: ``inv_freq @ position_ids`` → ``Concat(freqs, freqs)`` →
  ``Cos``/``Sin`` times the attention scaling (1.0), cast to the model dtype;
* per layer: RMSNorm as ``Pow(x, 2)`` → ``ReduceMean(axes=[-1])`` → ``Add(eps)``
  → ``Sqrt`` → ``Reciprocal`` → ``Mul(x, ·)`` → ``Mul(weight, ·)`` (with the
  exporter's ``Cast`` to float and back when ``casts``), q/k/v ``MatMul`` +
  ``Reshape``/``Transpose`` to BHSD, rotary embedding (``Slice`` halves,
  ``Neg``, ``Concat``, ``Mul`` cos/sin, ``Add``), GQA ``repeat_kv``
  (``Unsqueeze``/``Expand``/``Reshape``), the attention core (``MatMul`` with
  ``Transpose``\\ d keys, ``Mul`` by the scale, ``Add`` mask, ``Softmax``,
  ``MatMul`` v), output projection, residual ``Add``, post-attention RMSNorm,
  SwiGLU MLP (``Sigmoid`` * gate, * up, down ``MatMul``), residual ``Add``;
* final RMSNorm and the ``lm_head`` ``MatMul`` → ``logits`` [batch, seq, vocab].

Shapes and dtypes of every value are annotated (symbolic ``batch`` and
``seq``), as the exporter leaves them. Weights are small seeded random float32,
so the model runs in onnxruntime and its logits are finite.

``python -m qgraph.synthetic OUT.onnx --layers N`` writes one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qgraph.errors import BadInputError
from qgraph.io import save

__all__ = ["DecoderConfig", "main", "synthetic_decoder", "write_synthetic_model"]

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
BOOL = ir.DataType.BOOL
_INT64_MAX = np.iinfo(np.int64).max


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Sizes of the synthetic decoder (defaults: a tiny GQA Llama)."""

    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    vocab: int = 256
    seed: int = 0
    opset: int = 18
    casts: bool = True  # the exporter's Cast-to-float around each RMSNorm and on cos/sin
    mask: str = "causal"  # "causal": built in-graph; "additive": an ``attention_mask`` input;
    # "padding": causal in-graph and keys masked by an ``attention_mask`` [batch, seq] input (kv-cache can read it)
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.layers < 0:
            raise ValueError(f"layers must be >= 0, got {self.layers}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for the rotary halves, got {self.head_dim}")
        if self.mask not in ("causal", "additive", "padding"):
            raise ValueError(f"mask must be 'causal', 'additive' or 'padding', got {self.mask!r}")
        if self.opset < 18:
            raise ValueError(f"opset must be >= 18 (ReduceMean takes axes as an input), got {self.opset}")


class _Emitter:
    """Appends typed nodes to a graph, naming them by scope like an exporter."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.scope = ""
        self._count = 0
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], ir.Value] = {}

    def op(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        dtype: ir.DataType,
        shape: Sequence[int | str],
    ) -> ir.Value:
        n = self._count
        self._count += 1
        prefix = f"{self.scope}/" if self.scope else ""
        node = ir.Node(
            "",
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(dict(attributes or {})),
            name=f"{prefix}{op_type}_{n}",
        )
        out = node.outputs[0]
        out.name = f"{prefix}{op_type}_{n}_output"
        out.dtype = dtype
        out.shape = ir.Shape(shape)
        self.graph.append(node)
        return out

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        tensor = ir.tensor(array, name=name)
        value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        return value

    def const(self, value: Any, dtype: np.dtype | type) -> ir.Value:
        """A small constant initializer, shared by every node that uses the same value."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        found = self._consts.get(key)
        if found is None:
            found = self._consts[key] = self.initializer(f"const_{len(self._consts)}", array)
        return found


class _Decoder:
    def __init__(self, config: DecoderConfig) -> None:
        self.c = config
        self.rng = np.random.default_rng(config.seed)

    def weight(self, e: _Emitter, name: str, shape: tuple[int, ...], std: float) -> ir.Value:
        return e.initializer(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def norm_weight(self, e: _Emitter, name: str) -> ir.Value:
        return e.initializer(name, (1.0 + 0.1 * self.rng.standard_normal(self.c.hidden)).astype(np.float32))

    # -- blocks ----------------------------------------------------------------
    def rms_norm(self, e: _Emitter, x: ir.Value, weight: ir.Value) -> ir.Value:
        bsh = ["batch", "seq", self.c.hidden]
        if self.c.casts:
            x = e.op("Cast", [x], {"to": FLOAT}, dtype=FLOAT, shape=bsh)
        sq = e.op("Pow", [x, e.const(2.0, np.float32)], dtype=FLOAT, shape=bsh)
        mean = e.op("ReduceMean", [sq, e.const([-1], np.int64)], {"keepdims": 1}, dtype=FLOAT, shape=["batch", "seq", 1])
        var = e.op("Add", [mean, e.const(self.c.rms_eps, np.float32)], dtype=FLOAT, shape=["batch", "seq", 1])
        std = e.op("Sqrt", [var], dtype=FLOAT, shape=["batch", "seq", 1])
        inv = e.op("Reciprocal", [std], dtype=FLOAT, shape=["batch", "seq", 1])
        normed = e.op("Mul", [x, inv], dtype=FLOAT, shape=bsh)
        if self.c.casts:
            normed = e.op("Cast", [normed], {"to": FLOAT}, dtype=FLOAT, shape=bsh)
        return e.op("Mul", [weight, normed], dtype=FLOAT, shape=bsh)

    def project_heads(self, e: _Emitter, h: ir.Value, w: ir.Value, heads: int) -> ir.Value:
        d = self.c.head_dim
        flat = e.op("MatMul", [h, w], dtype=FLOAT, shape=["batch", "seq", heads * d])
        split = e.op("Reshape", [flat, e.const([0, 0, heads, d], np.int64)], dtype=FLOAT, shape=["batch", "seq", heads, d])
        return e.op("Transpose", [split], {"perm": [0, 2, 1, 3]}, dtype=FLOAT, shape=["batch", heads, "seq", d])

    def rotary(self, e: _Emitter, x: ir.Value, cos: ir.Value, sin: ir.Value, heads: int) -> ir.Value:
        d, half = self.c.head_dim, self.c.head_dim // 2
        bhs = ["batch", heads, "seq"]
        axes, steps = e.const([3], np.int64), e.const([1], np.int64)
        x1 = e.op("Slice", [x, e.const([0], np.int64), e.const([half], np.int64), axes, steps], dtype=FLOAT, shape=[*bhs, half])
        x2 = e.op("Slice", [x, e.const([half], np.int64), e.const([_INT64_MAX], np.int64), axes, steps], dtype=FLOAT, shape=[*bhs, half])
        neg = e.op("Neg", [x2], dtype=FLOAT, shape=[*bhs, half])
        rotated = e.op("Concat", [neg, x1], {"axis": -1}, dtype=FLOAT, shape=[*bhs, d])
        x_cos = e.op("Mul", [x, cos], dtype=FLOAT, shape=[*bhs, d])
        rot_sin = e.op("Mul", [rotated, sin], dtype=FLOAT, shape=[*bhs, d])
        return e.op("Add", [x_cos, rot_sin], dtype=FLOAT, shape=[*bhs, d])

    def repeat_kv(self, e: _Emitter, x: ir.Value) -> ir.Value:
        c = self.c
        n_rep = c.heads // c.kv_heads
        if n_rep == 1:
            return x
        d = c.head_dim
        x5 = e.op("Unsqueeze", [x, e.const([2], np.int64)], dtype=FLOAT, shape=["batch", c.kv_heads, 1, "seq", d])
        wide = e.op("Expand", [x5, e.const([1, 1, n_rep, 1, 1], np.int64)], dtype=FLOAT, shape=["batch", c.kv_heads, n_rep, "seq", d])
        return e.op("Reshape", [wide, e.const([0, c.heads, -1, d], np.int64)], dtype=FLOAT, shape=["batch", c.heads, "seq", d])

    def attention(self, e: _Emitter, i: int, h: ir.Value, cos: ir.Value, sin: ir.Value, mask: ir.Value) -> ir.Value:
        c = self.c
        p = f"model.layers.{i}.self_attn"
        qd, kvd = c.heads * c.head_dim, c.kv_heads * c.head_dim
        std = 1.0 / math.sqrt(c.hidden)
        q = self.project_heads(e, h, self.weight(e, f"{p}.q_proj.weight", (c.hidden, qd), std), c.heads)
        k = self.project_heads(e, h, self.weight(e, f"{p}.k_proj.weight", (c.hidden, kvd), std), c.kv_heads)
        v = self.project_heads(e, h, self.weight(e, f"{p}.v_proj.weight", (c.hidden, kvd), std), c.kv_heads)
        # apply_rotary_pos_emb unsqueezes cos/sin at the head axis in every layer.
        one = e.const([1], np.int64)
        cos4 = e.op("Unsqueeze", [cos, one], dtype=FLOAT, shape=["batch", 1, "seq", c.head_dim])
        sin4 = e.op("Unsqueeze", [sin, one], dtype=FLOAT, shape=["batch", 1, "seq", c.head_dim])
        q = self.rotary(e, q, cos4, sin4, c.heads)
        k = self.rotary(e, k, cos4, sin4, c.kv_heads)
        k = self.repeat_kv(e, k)
        v = self.repeat_kv(e, v)
        bh = ["batch", c.heads]
        k_t = e.op("Transpose", [k], {"perm": [0, 1, 3, 2]}, dtype=FLOAT, shape=[*bh, c.head_dim, "seq"])
        scores = e.op("MatMul", [q, k_t], dtype=FLOAT, shape=[*bh, "seq", "seq"])
        scaled = e.op("Mul", [scores, e.const(c.head_dim**-0.5, np.float32)], dtype=FLOAT, shape=[*bh, "seq", "seq"])
        masked = e.op("Add", [scaled, mask], dtype=FLOAT, shape=[*bh, "seq", "seq"])
        probs = e.op("Softmax", [masked], {"axis": -1}, dtype=FLOAT, shape=[*bh, "seq", "seq"])
        ctx = e.op("MatMul", [probs, v], dtype=FLOAT, shape=[*bh, "seq", c.head_dim])
        ctx = e.op("Transpose", [ctx], {"perm": [0, 2, 1, 3]}, dtype=FLOAT, shape=["batch", "seq", c.heads, c.head_dim])
        ctx = e.op("Reshape", [ctx, e.const([0, 0, qd], np.int64)], dtype=FLOAT, shape=["batch", "seq", qd])
        w_o = self.weight(e, f"{p}.o_proj.weight", (qd, c.hidden), 1.0 / math.sqrt(qd))
        return e.op("MatMul", [ctx, w_o], dtype=FLOAT, shape=["batch", "seq", c.hidden])

    def mlp(self, e: _Emitter, i: int, h: ir.Value) -> ir.Value:
        c = self.c
        p = f"model.layers.{i}.mlp"
        inner = ["batch", "seq", c.intermediate]
        std = 1.0 / math.sqrt(c.hidden)
        gate = e.op("MatMul", [h, self.weight(e, f"{p}.gate_proj.weight", (c.hidden, c.intermediate), std)], dtype=FLOAT, shape=inner)
        up = e.op("MatMul", [h, self.weight(e, f"{p}.up_proj.weight", (c.hidden, c.intermediate), std)], dtype=FLOAT, shape=inner)
        sig = e.op("Sigmoid", [gate], dtype=FLOAT, shape=inner)
        act = e.op("Mul", [gate, sig], dtype=FLOAT, shape=inner)
        gated = e.op("Mul", [act, up], dtype=FLOAT, shape=inner)
        w_down = self.weight(e, f"{p}.down_proj.weight", (c.intermediate, c.hidden), 1.0 / math.sqrt(c.intermediate))
        return e.op("MatMul", [gated, w_down], dtype=FLOAT, shape=["batch", "seq", c.hidden])

    # -- whole model ---------------------------------------------------------------
    def build(self) -> ir.Model:
        c = self.c
        input_ids = ir.val("input_ids", INT64, ir.Shape(["batch", "seq"]))
        graph = ir.Graph([input_ids], [], nodes=[], opset_imports={"": c.opset}, name="main_graph")
        e = _Emitter(graph)
        bsh = ["batch", "seq", c.hidden]

        e.scope = "model.embed_tokens"
        table = self.weight(e, "model.embed_tokens.weight", (c.vocab, c.hidden), 1.0)
        x = e.op("Gather", [table, input_ids], {"axis": 0}, dtype=FLOAT, shape=bsh)

        e.scope = "model.positions"
        ids_shape = e.op("Shape", [input_ids], dtype=INT64, shape=[2])
        seq_len = e.op("Gather", [ids_shape, e.const(1, np.int64)], {"axis": 0}, dtype=INT64, shape=[])
        positions = e.op("Range", [e.const(0, np.int64), seq_len, e.const(1, np.int64)], dtype=INT64, shape=["seq"])
        row = e.op("Unsqueeze", [positions, e.const([0], np.int64)], dtype=INT64, shape=[1, "seq"])
        position_ids = e.op("Expand", [row, ids_shape], dtype=INT64, shape=["batch", "seq"])

        e.scope = "model.rotary_emb"
        half = c.head_dim // 2
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        inv_freq_v = e.initializer("model.rotary_emb.inv_freq", inv_freq.astype(np.float32).reshape(1, half, 1))
        pos3 = e.op("Unsqueeze", [position_ids, e.const([1], np.int64)], dtype=INT64, shape=["batch", 1, "seq"])
        pos_f = e.op("Cast", [pos3], {"to": FLOAT}, dtype=FLOAT, shape=["batch", 1, "seq"])
        freqs = e.op("MatMul", [inv_freq_v, pos_f], dtype=FLOAT, shape=["batch", half, "seq"])
        freqs = e.op("Transpose", [freqs], {"perm": [0, 2, 1]}, dtype=FLOAT, shape=["batch", "seq", half])
        emb = e.op("Concat", [freqs, freqs], {"axis": -1}, dtype=FLOAT, shape=["batch", "seq", c.head_dim])
        tables = []
        for fn in ("Cos", "Sin"):
            t = e.op(fn, [emb], dtype=FLOAT, shape=["batch", "seq", c.head_dim])
            t = e.op("Mul", [t, e.const(1.0, np.float32)], dtype=FLOAT, shape=["batch", "seq", c.head_dim])  # attention_scaling
            if c.casts:
                t = e.op("Cast", [t], {"to": FLOAT}, dtype=FLOAT, shape=["batch", "seq", c.head_dim])
            tables.append(t)
        cos, sin = tables

        e.scope = "model.causal_mask"
        if c.mask == "additive":
            mask = ir.val("attention_mask", FLOAT, ir.Shape(["batch", 1, "seq", "seq"]))
            graph.inputs.append(mask)
        else:
            rows = e.op("Unsqueeze", [positions, e.const([1], np.int64)], dtype=INT64, shape=["seq", 1])
            cols = e.op("Unsqueeze", [positions, e.const([0], np.int64)], dtype=INT64, shape=[1, "seq"])
            allowed = e.op("LessOrEqual", [cols, rows], dtype=BOOL, shape=["seq", "seq"])
            lowest = np.finfo(np.float32).min
            additive = e.op("Where", [allowed, e.const(0.0, np.float32), e.const(lowest, np.float32)], dtype=FLOAT, shape=["seq", "seq"])
            if c.mask == "padding":  # and keys whose attention_mask entry is 0: [batch, 1, seq, seq]
                padding = ir.val("attention_mask", INT64, ir.Shape(["batch", "seq"]))
                graph.inputs.append(padding)
                keys = e.op("Cast", [padding], {"to": ir.DataType.BOOL}, dtype=BOOL, shape=["batch", "seq"])
                keys = e.op("Unsqueeze", [keys, e.const([1, 2], np.int64)], dtype=BOOL, shape=["batch", 1, 1, "seq"])
                allowed = e.op("And", [allowed, keys], dtype=BOOL, shape=["batch", 1, "seq", "seq"])
                additive = e.op("Where", [allowed, e.const(0.0, np.float32), e.const(lowest, np.float32)],
                                dtype=FLOAT, shape=["batch", 1, "seq", "seq"])
                mask = additive
            else:
                mask = e.op("Unsqueeze", [additive, e.const([0, 1], np.int64)], dtype=FLOAT,
                            shape=[1, 1, "seq", "seq"])

        for i in range(c.layers):
            e.scope = f"model.layers.{i}"
            h = self.rms_norm(e, x, self.norm_weight(e, f"model.layers.{i}.input_layernorm.weight"))
            x = e.op("Add", [x, self.attention(e, i, h, cos, sin, mask)], dtype=FLOAT, shape=bsh)
            h = self.rms_norm(e, x, self.norm_weight(e, f"model.layers.{i}.post_attention_layernorm.weight"))
            x = e.op("Add", [x, self.mlp(e, i, h)], dtype=FLOAT, shape=bsh)

        e.scope = "model.norm"
        h = self.rms_norm(e, x, self.norm_weight(e, "model.norm.weight"))
        e.scope = "lm_head"
        lm_head = self.weight(e, "lm_head.weight", (c.hidden, c.vocab), 1.0 / math.sqrt(c.hidden))
        logits = e.op("MatMul", [h, lm_head], dtype=FLOAT, shape=["batch", "seq", c.vocab])
        logits.name = "logits"
        graph.outputs.append(logits)

        ir_version = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", c.opset)])
        return ir.Model(graph, ir_version=max(ir_version, 10), producer_name="qgraph.synthetic")


def synthetic_decoder(layers: int = 2, **sizes: Any) -> ir.Model:
    """A Llama-shaped decoder of ``layers`` layers; ``sizes`` are ``DecoderConfig`` fields."""
    return _Decoder(DecoderConfig(layers=layers, **sizes)).build()


def write_synthetic_model(path: str | os.PathLike[str], layers: int = 2, **sizes: Any) -> Path:
    """Build ``synthetic_decoder(layers, **sizes)`` and save it to ``path``; returns the path."""
    return save(synthetic_decoder(layers, **sizes), path)


def main(argv: Sequence[str] | None = None) -> int:
    defaults = DecoderConfig()
    parser = argparse.ArgumentParser(
        prog="python -m qgraph.synthetic",
        description="Write a synthetic Llama-shaped decoder (dynamo-exporter op patterns, random weights).",
    )
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    for field in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "seed", "opset"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--mask", choices=("causal", "additive", "padding"), default=defaults.mask)
    parser.add_argument("--no-casts", dest="casts", action="store_false", help="omit the exporter's Cast nodes")
    args = parser.parse_args(argv)
    sizes = {k: v for k, v in vars(args).items() if k not in ("output", "layers")}
    try:
        path = write_synthetic_model(args.output, args.layers, **sizes)
    except (ValueError, BadInputError) as error:
        parser.error(str(error))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
