"""Weight-only quantization: MatMuls with constant weights -> com.microsoft::MatMulNBits."""

from __future__ import annotations

import fnmatch
import time

import numpy as np
import onnx_ir as ir

from qgraph.errors import BadInputError, PassFailure
from qgraph.gguf_blocks import GgufWeights
from qgraph.pass_base import Option, Pass
from qgraph.quant_blocks import BITS, BLOCK_SIZES, BlockQuantized, concatenate_columns, quantize_rtn
from qgraph.quant_gptq import quantize_gptq
from qgraph.rewrite.engine import PASS_KEY, RULE_KEY
from qgraph_passes.pack_matmuls import PackedColumns

__all__ = ["QuantizePass"]

MICROSOFT = "com.microsoft"
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
# --verify's default budget by bits: (least greedy agreement, largest perplexity rise). Measured
# on SmolLM2-135M's fixed text (qgraph.verify.budget), round to nearest with blocks of 32:
# 8 bits 100 % / +0.6 %, 4 bits 67.5 % / +77 % -- int4 RTN of a 135M model is that lossy.
# method=gptq keeps the same budget: measured the same way (benchmarks/quantize_methods.py, ort-int4,
# 4096 calibration tokens) it lowers the rise on that text (+45 % vs +80 %) but not the agreement
# (70 % vs 72.5 %), so no tighter agreement is earned.
_DEFAULT_BUDGET = {8: (0.9, 0.05), 4: (0.6, 1.0)}
# With ``gguf``, the float graph already holds the GGUF's dequantized weights: the blocks change
# nothing but float rounding (and accuracy_level's int8 activations), hence the tight budget.
_GGUF_BUDGET = (0.95, 0.01)


def _constant(value: ir.Value | None) -> ir.TensorProtocol | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        return attr.as_tensor() if attr is not None else None
    return None


def _weight_source(value: ir.Value) -> tuple[ir.Value, bool] | None:
    """(the constant the weight is read from, whether the MatMul sees it transposed)."""
    if _constant(value) is not None:
        return value, False
    producer = value.producer()
    if (producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx")
            and list(producer.attributes.get_ints("perm", [1, 0])) == [1, 0]
            and _constant(producer.inputs[0]) is not None):
        return producer.inputs[0], True
    return None


def _embedding_tables(graph: ir.Graph) -> list[ir.Value]:
    """Constant tables read by a Gather on axis 0 (token embeddings)."""
    tables = []
    for node in graph:
        if (node.op_type == "Gather" and node.domain in ("", "ai.onnx") and node.attributes.get_int("axis", 0) == 0
                and _constant(node.inputs[0]) is not None and node.inputs[0] not in tables):
            tables.append(node.inputs[0])
    return tables


class QuantizePass(Pass):
    """Quantize constant MatMul weights to com.microsoft::MatMulNBits (weight-only, round to nearest or GPTQ).

    Every ``MatMul(A, W)`` of the main graph whose ``W`` is a 2-D float32 or
    float16 constant (an initializer, a ``Constant``, or one of them
    transposed) -- and every ``Gemm(A, W[, bias])`` with such a ``W``
    (``transB`` either way, alpha 1, a constant 1-D bias with beta 1, which
    MatMulNBits takes as its bias input) -- becomes ``MatMulNBits(A, B, scales[, zero_points])`` with
    ``bits`` 4 or 8, blocks of ``block_size`` along K, symmetric (implicit
    zero point) or with zero points; ``accuracy_level`` is passed on (4
    lets onnxruntime compute with int8 activations, 0 leaves the choice to
    it). ``method=rtn`` (the default) rounds each block to nearest
    (``qgraph.quant_blocks`` states the arithmetic and the layout).
    ``method=gptq`` fits the same layout with GPTQ (``qgraph.quant_gptq``):
    each row's rounding error is compensated on the rows not yet rounded,
    weighted by the Hessian of that MatMul's input over ``calibration_tokens``
    seeded token ids run through the float graph in onnxruntime
    (``qgraph_passes.quantize_calibration``; decoder graphs only -- others
    get an error naming this option), ``damping`` times the mean diagonal
    added for stability. A tied LM head whose blocks the embedding lookup
    also reads stays round to nearest (a lookup's error is the weight error,
    which GPTQ enlarges to shrink the head's output error).

    ``exclude``: comma-separated shell patterns matched against the MatMul
    node's name and the weight's name (``*lm_head*,*linear_14``); a match is
    kept in float and noted. A weight shared by several MatMuls, and an LM
    head tied to the token embedding (the same table, or the exporter's
    transposed copy of it), is quantized once and its MatMulNBits inputs
    shared. With ``tied_lookup=quantized`` (the default) the embedding's
    Gather then reads those same blocks (``com.microsoft::GatherBlockQuantized``
    over B seen as [N, K * bits / 8]; K must be a multiple of the block) and
    the float table goes; ``float`` keeps the table for the lookup. Float
    weights that no longer have a reader are dropped.

    The result computes an approximation (``meaning = "approximate"``):
    ``--verify`` checks the budget in the ``budget_*`` options instead of
    equality (``qgraph.verify.budget``): on decoders, greedy next-token
    agreement and the perplexity rise on a fixed text the float graph
    writes itself (by default at least 90 % and at most +5 % at 8 bits,
    60 % and +100 % at 4 bits); on other graphs, a per-output relative
    error.

    ``gguf=PATH`` takes the blocks from a GGUF file instead of rounding: a
    weight whose float values are exactly a Q4_0, Q4_1 or Q8_0 tensor of the
    file (as ``qgraph export`` dequantized it, rows possibly permuted) gets
    that tensor's own codes and scales (``qgraph.gguf_blocks``: Q4_0/Q4_1
    -> 4 bits, Q8_0 -> 8 bits, blocks of 32; ``bits`` and ``block_size`` do
    not apply), so the graph computes what llama.cpp computes; any other
    weight stays float, noted. A weight pack-matmuls concatenated
    (``PackedColumns``: Q/K/V, gate/up, packed before quantize in the ``ort``
    presets) is no single GGUF tensor: each part is looked up, and when all
    are tensors of one type their blocks are placed side by side along N
    (``qgraph.quant_blocks.concatenate_columns``); a part the file does not
    hold, or parts of different types, keep the packed weight float, noted
    with the part. Q4_1's minimum ``m`` is not a zero point:
    MatMulNBits (zero points 0) is followed by ``+ (A @ block_sums) @ m``,
    two small float MatMuls, and such a tied embedding keeps its float
    lookup. The default budget is then tight (95 %, +1 %).
    """

    name = "quantize"
    meaning = "approximate"
    options = {
        "bits": Option(int, 4, "bits per weight", choices=BITS),
        "block_size": Option(int, 32, "weights per scale along K (a power of 2, 16-256)", choices=BLOCK_SIZES),
        "symmetric": Option(bool, False, "no zero points (the implicit 2**(bits-1); the block's largest-magnitude "
                            "weight on code 0); otherwise one per block"),
        "accuracy_level": Option(
            int, 0, "MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations",
            choices=(0, 1, 2, 3, 4),
        ),
        "accuracy_level_8bit": Option(
            int, -1, "accuracy_level of the 8-bit MatMulNBits (a GGUF's Q8_0 tensors; bits=8): -1 as "
            "accuracy_level. onnxruntime 1.32's CPU kernel has no float path for 8 bits and dequantizes the whole "
            "weight on every call at levels 0-1 (~23x a float MatMul); 4 computes with int8 activations",
            choices=(-1, 0, 1, 2, 3, 4),
        ),
        "method": Option(
            str, "rtn", "how blocks are rounded: 'rtn' (round to nearest) or 'gptq' (each rounding error "
            "compensated on the rows not yet rounded, fitted to a calibration text; decoders only)",
            choices=("rtn", "gptq"),
        ),
        "calibration_tokens": Option(
            int, 4096, "method=gptq: seeded token ids (segments of 64) whose activations GPTQ fits to; more "
            "than the widest MatMul input (K) keeps its Hessian of full rank",
        ),
        "damping": Option(float, 0.01, "method=gptq: added to the Hessian's diagonal, times its mean"),
        "exclude": Option(str, "", "comma-separated shell patterns of MatMul node or weight names to keep in float"),
        "tied_lookup": Option(
            str, "quantized",
            "an embedding tied to a quantized LM head: 'quantized' (its Gather reads the same blocks, "
            "GatherBlockQuantized) or 'float' (the float table stays for the lookup)",
            choices=("quantized", "float"),
        ),
        "gguf": Option(
            str, "", "a GGUF file whose Q4_0/Q4_1/Q8_0 blocks become the MatMulNBits weights of the float "
            "weights they dequantize to (others stay float); empty: round to nearest",
        ),
        "budget_agreement": Option(
            float, -1.0,
            "--verify (decoders): least share of greedy next tokens equal to the float graph's "
            "(negative: by bits, 0.9 at 8, 0.6 at 4)",
        ),
        "budget_perplexity_rise": Option(
            float, -1.0,
            "--verify (decoders): largest relative perplexity rise on the fixed text "
            "(negative: by bits, 0.05 at 8, 1.0 at 4)",
        ),
        "budget_relative_error": Option(
            float, 0.05, "--verify (other graphs): per output, |q - f| <= e * max(1, max|f|) + e * |f|"
        ),
        "budget_tokens": Option(int, 48, "--verify (decoders): length of the fixed text, in tokens"),
    }

    def verification_budget(self):
        from qgraph.verify.budget import Budget

        agreement, rise = _GGUF_BUDGET if self.config["gguf"] else _DEFAULT_BUDGET[self.config["bits"]]
        given_agreement, given_rise = self.config["budget_agreement"], self.config["budget_perplexity_rise"]
        return Budget(
            token_agreement=agreement if given_agreement < 0 else given_agreement,
            perplexity_rise=rise if given_rise < 0 else given_rise,
            relative_error=self.config["budget_relative_error"],
            text_tokens=self.config["budget_tokens"],
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if self.config["method"] == "gptq" and self.config["gguf"]:
            raise BadInputError(f"{self.name}: method=gptq and gguf exclude each other (gguf takes the file's "
                                "blocks as they are; there is nothing to fit)")
        if not self.config["damping"] > 0:
            raise BadInputError(f"{self.name}: damping must be positive, got {self.config['damping']}")
        self._source = GgufWeights(self.config["gguf"]) if self.config["gguf"] else None
        self._offsets: dict[int, ir.Value] = {}  # id(blocks with offsets) -> offsets^T [n_blocks, N]
        self._block_sums: dict[tuple[int, int, ir.DataType], ir.Value] = {}  # (K, block, dtype) -> [K, n_blocks]
        patterns = [p.strip() for p in self.config["exclude"].split(",") if p.strip()]
        tables = _embedding_tables(graph)
        done: dict[tuple[int, bool], tuple[list[ir.Value], BlockQuantized] | None] = {}
        keys: dict[tuple[int, bool], tuple[int, bool]] = {}
        self._tied: dict[tuple[int, bool], ir.Value] = {}  # key -> the embedding table an LM head is tied to
        replaced = 0
        dropped: list[ir.Value] = []  # float weights (and their sources) that may have lost their last reader
        self._hessians = self._calibrate(model, patterns) if self.config["method"] == "gptq" else {}
        for node in list(graph):
            candidate = self._candidate(node)
            if candidate is None:
                continue
            a, w, source, bias = candidate
            if _excluded(node, w, source[0], patterns):
                self.report.notes.append(f"kept {node.op_type} '{node.name}' in float: excluded by 'exclude'")
                continue
            seen = (id(source[0]), source[1])
            if seen not in keys:  # a tie is established (and noted) once per weight
                keys[seen] = self._key(source, tables)
            key = keys[seen]
            if key not in done:
                done[key] = self._quantize(graph, w, source, a, key)
            elif done[key] is not None:
                self.report.count("weights-shared")
            if done[key] is None:
                continue
            inputs, quantized = done[key]
            dropped.extend((w, source[0]))
            self._replace(model, node, a, inputs, quantized, bias)
            replaced += 1
        if replaced:
            model.opset_imports.setdefault(MICROSOFT, 1)
            self.report.count("matmuls-quantized", replaced)
            if self.config["tied_lookup"] == "quantized":
                for key, table in self._tied.items():
                    if done.get(key) is not None:
                        self._share_with_lookups(graph, table, *done[key])
                        dropped.append(table)
            _drop_unread(graph, dropped)
        return ir.passes.PassResult(model, replaced > 0)

    def _candidate(self, node: ir.Node, *, note: bool = True
                   ) -> tuple[ir.Value, ir.Value, tuple[ir.Value, bool], ir.Value | None] | None:
        """(A, W, (the constant W is read from, whether it is seen transposed), bias) of a MatMul or Gemm whose
        weight can be quantized; None for any other node (a Gemm kept in float is noted when ``note``)."""
        operands = self._operands(node, note=note)
        if operands is None:
            return None
        a, w, flip, bias = operands
        source = _weight_source(w) if w is not None else None
        if a is None or source is None:
            return None
        source = (source[0], source[1] != flip)
        tensor = _constant(source[0])  # dtype and rank from the data: a Transpose output may be untyped
        if tensor.dtype not in _FLOATS or len(tensor.shape) != 2:
            return None
        if a.shape is not None and len(a.shape) < 2:
            return None
        return a, w, source, bias

    def _calibrate(self, model: ir.Model, patterns: list[str]) -> dict[str, np.ndarray]:
        """method=gptq: the Hessian of the input of every MatMul that will be quantized, over the calibration text."""
        from qgraph_passes.quantize_calibration import calibration_text, collect_hessians, require_decoder

        require_decoder(model, self.name)
        activations = []
        for node in model.graph:
            candidate = self._candidate(node, note=False)  # the quantizing loop notes what it keeps
            if candidate is None or _excluded(node, candidate[1], candidate[2][0], patterns):
                continue
            if not candidate[0].name:
                raise PassFailure(f"{self.name}: method=gptq cannot expose the unnamed input of "
                                  f"{node.op_type} '{node.name}' for calibration", pass_name=self.name)
            activations.append(candidate[0].name)
        if not activations:
            return {}
        started = time.perf_counter()
        segments = calibration_text(model, self.config["calibration_tokens"], self.name)
        hessians = collect_hessians(model, activations, segments, self.name)
        self.report.notes.append(f"gptq: calibrated {len(hessians)} MatMul input(s) on {sum(map(len, segments))} "
                                 f"seeded token ids ({len(segments)} segment(s)) in "
                                 f"{time.perf_counter() - started:.1f} s")
        widest = max(h.shape[0] for h in hessians.values())
        if sum(map(len, segments)) < widest:
            self.report.notes.append(f"gptq: {sum(map(len, segments))} calibration tokens are fewer than the widest "
                                     f"MatMul input ({widest}): its Hessian is rank-deficient and only damping "
                                     "holds the unseen directions; raise calibration_tokens")
        return hessians

    def _operands(self, node: ir.Node, *, note: bool = True
                  ) -> tuple[ir.Value | None, ir.Value | None, bool, ir.Value | None] | None:
        """(A, W, whether W is read transposed, bias) of a MatMul or of a Gemm MatMulNBits can express."""
        if node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "MatMul" and len(node.inputs) == 2:
            return node.inputs[0], node.inputs[1], False, None
        if node.op_type != "Gemm" or len(node.inputs) < 2:
            return None
        attrs = node.attributes
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b = node.inputs[1]
        width = None if b is None or b.shape is None or len(b.shape) != 2 else b.shape[0 if attrs.get_int("transB", 0) else 1]
        reason = None
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
            reason = "transA or alpha"
        elif bias is not None and (attrs.get_float("beta", 1.0) != 1.0 or _constant(bias) is None
                                   or tuple(_constant(bias).shape) != (width,)):
            reason = "its C is not a constant bias of one value per output column (or beta is not 1)"
        if reason is not None:
            if note:
                self.report.notes.append(f"kept Gemm '{node.name}' in float: {reason}")
            return None
        return node.inputs[0], b, bool(attrs.get_int("transB", 0)), bias

    def _key(self, source: tuple[ir.Value, bool], tables: list[ir.Value]) -> tuple[int, bool]:
        """Weights that are one tensor (or an embedding table and its transposed copy) share a key."""
        value, transposed = source
        if value in tables:
            if transposed:
                self.report.notes.append(f"LM head reads the embedding table '{value.name}' (tied): quantized once")
                self.report.count("tied-embeddings")
                self._tied[(id(value), True)] = value
            return id(value), transposed
        for table in tables:
            if (value.shape is not None and table.shape is not None and table.dtype == value.dtype
                    and tuple(value.shape) == tuple(reversed(table.shape)) and not transposed):
                if np.array_equal(_constant(value).numpy(), _constant(table).numpy().T):
                    self.report.notes.append(
                        f"weight '{value.name}' is the embedding table '{table.name}' transposed (tied): quantized once"
                    )
                    self.report.count("tied-embeddings")
                    self._tied[(id(table), True)] = table
                    return id(table), True
        return id(value), transposed

    def _share_with_lookups(self, graph: ir.Graph, table: ir.Value, inputs: list[ir.Value], q: BlockQuantized) -> None:
        """Gather(table, ids) -> GatherBlockQuantized over the LM head's quantized blocks (B seen as [N, K*bits/8])."""
        if q.offsets is not None:
            self.report.notes.append(f"embedding '{table.name}' keeps its float lookup: its blocks add an offset "
                                     "(GGUF Q4_1's minimum), which GatherBlockQuantized cannot")
            return
        if q.k % q.block_size:
            self.report.notes.append(f"embedding '{table.name}' keeps its float lookup: its width {q.k} is not "
                                     f"a multiple of block_size {q.block_size}")
            return
        lookups = [u.node for u in table.uses() if u.node.op_type == "Gather" and u.idx == 0
                   and u.node.domain in ("", "ai.onnx") and u.node.attributes.get_int("axis", 0) == 0]
        if not lookups:
            return
        shape_name = _unique(graph, f"{inputs[0].name}.rows")
        shape = ir.Value(name=shape_name, const_value=ir.tensor(np.array([q.n, q.k * q.bits // 8], np.int64),
                                                                 name=shape_name),
                         type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
        graph.register_initializer(shape)
        rows = ir.node("Reshape", [inputs[0], shape], name=f"{table.name}/blocks_as_rows")
        rows.outputs[0].name = f"{inputs[0].name}.as_rows"
        rows.outputs[0].type, rows.outputs[0].shape = ir.TensorType(ir.DataType.UINT8), ir.Shape([q.n, q.k * q.bits // 8])
        graph.insert_before(lookups[0], [rows])
        for gather in lookups:
            new = ir.node("GatherBlockQuantized", [rows.outputs[0], gather.inputs[1], *inputs[1:]],
                          attributes={"bits": q.bits, "block_size": q.block_size, "gather_axis": 0, "quantize_axis": 1},
                          domain=MICROSOFT, name=f"{gather.name}/q{q.bits}" if gather.name else None)
            new.metadata_props[PASS_KEY] = self.name
            new.metadata_props[RULE_KEY] = f"tied-gather-to-gather-block-quantized-{q.bits}"
            self._swap(graph, gather, new)
            self.report.count("lookups-shared")
        self.report.notes.append(f"embedding '{table.name}': its {len(lookups)} lookup(s) read the LM head's "
                                 f"{q.bits}-bit blocks (GatherBlockQuantized); the float table is dropped")

    def _quantize(self, graph: ir.Graph, w: ir.Value, source: tuple[ir.Value, bool], a: ir.Value,
                  key: tuple[int, bool]) -> tuple[list[ir.Value], BlockQuantized] | None:
        value, transposed = source
        if self._source is not None:
            quantized = self._from_gguf(value, transposed)
            if quantized is None:
                return None
        else:
            quantized = self._rounded(value, transposed, a, key)
        b, scales, zero_points = quantized.matmul_nbits_inputs()
        base = f"{value.name or w.name}.q{quantized.bits}"
        inputs = []
        for suffix, data in (("", b), (".scales", scales), (".zero_points", zero_points)):
            if data is None:
                continue
            name = _unique(graph, base + suffix)
            init = ir.Value(name=name, const_value=ir.tensor(data, name=name),
                            type=ir.TensorType(ir.DataType.from_numpy(data.dtype)), shape=ir.Shape(data.shape))
            graph.register_initializer(init)
            inputs.append(init)
        if quantized.offsets is not None:
            self._offsets[id(quantized)] = _initializer(graph, base + ".offsets", np.ascontiguousarray(quantized.offsets.T))
        return inputs, quantized

    def _rounded(self, value: ir.Value, transposed: bool, a: ir.Value, key: tuple[int, bool]) -> BlockQuantized:
        """The blocks this pass fits itself (round to nearest or GPTQ) for the weight read from ``value``."""
        array = _constant(value).numpy()
        weight = array.T if transposed else array
        if self.config["method"] == "gptq" and key in self._tied and self.config["tied_lookup"] == "quantized":
            # The embedding lookup reads these blocks too, and for a lookup the weight error *is* the output
            # error: GPTQ trades a larger weight error for a smaller LM-head output error, so it would hurt
            # every embedded token. Round to nearest gives the smallest weight error.
            self.report.notes.append(f"gptq: the tied LM head '{value.name}' is rounded to nearest (its embedding "
                                     "lookup reads the same blocks; tied_lookup=float lets GPTQ fit it)")
        elif self.config["method"] == "gptq":
            # A weight read by several MatMuls is fitted to its first reader's input (the others share it).
            self.report.count("gptq-weights")
            return quantize_gptq(weight, self._hessians[a.name], self.config["bits"], self.config["block_size"],
                                 symmetric=self.config["symmetric"], damping=self.config["damping"])
        return quantize_rtn(weight, self.config["bits"], self.config["block_size"], symmetric=self.config["symmetric"])

    def _from_gguf(self, value: ir.Value, transposed: bool) -> BlockQuantized | None:
        """The GGUF blocks of the weight read from ``value`` (rows of the GGUF's [N, K]), or None (noted).

        A packed weight (``PackedColumns``, what pack-matmuls makes of Q/K/V
        and gate/up) matches no single GGUF tensor; its parts are looked up
        one by one instead. Any other weight no tensor matches whole may
        still be GGUF tensors side by side (a packed weight saved and loaded
        again): its columns are looked up as consecutive runs.
        """
        tensor = _constant(value)
        if isinstance(tensor, PackedColumns) and not transposed:
            return self._from_gguf_parts(value, tensor)
        array = tensor.numpy()
        weight = np.ascontiguousarray((array.T if transposed else array).T)  # [N, K], the GGUF's layout
        match = self._source.find(weight)
        if match is not None:
            self.report.count(f"gguf-{match.qtype.lower()}")
            return match.blocks
        runs = self._source.find_side_by_side(weight)
        if runs is None or len(runs) < 2:
            self.report.notes.append(f"kept '{value.name}' {list(weight.T.shape)} in float: no Q4_0/Q4_1/Q8_0 tensor "
                                     f"of {self._source.path.name} dequantizes to it, nor do several side by side")
            return None
        described = [f"columns {sum(r.blocks.n for r in runs[:i])}.."
                     f"{sum(r.blocks.n for r in runs[:i + 1]) - 1}" for i in range(len(runs))]
        return self._joined(value, list(weight.T.shape), described, runs)

    def _from_gguf_parts(self, value: ir.Value, packed: PackedColumns) -> BlockQuantized | None:
        """The blocks of ``[W0 | W1 | ...]`` when every part is a GGUF tensor (of one block type); else None, noted
        with the part that kept it in float."""
        matches = [self._source.find(np.ascontiguousarray(part.numpy().T)) for part in packed.parts]
        described = [f"'{part.name or f'part {i}'}' {list(part.shape)}" for i, part in enumerate(packed.parts)]
        missing = [d for d, match in zip(described, matches) if match is None]
        if missing:
            self.report.notes.append(
                f"kept packed '{value.name}' {list(packed.shape)} in float: its part(s) {', '.join(missing)} are no "
                f"Q4_0/Q4_1/Q8_0 tensor of {self._source.path.name} (of {len(described)} parts packed by pack-matmuls)")
            self.report.count("gguf-packed-kept-float")
            return None
        return self._joined(value, list(packed.shape), described, matches)

    def _joined(self, value: ir.Value, shape: list[int], described: list[str], matches: list) -> BlockQuantized | None:
        """The GGUF tensors ``matches`` side by side along N (blocks run along K, so a column's blocks are its own:
        ``concatenate_columns``), if one MatMulNBits layout holds them all; else None, noted."""
        types = [match.qtype for match in matches]
        if len(set(types)) > 1:
            found = ", ".join(f"{d} is {m.name} ({m.qtype})" for d, m in zip(described, matches))
            self.report.notes.append(f"kept packed '{value.name}' {shape} in float: its parts are GGUF tensors of "
                                     f"different block types, one MatMulNBits cannot hold them ({found})")
            self.report.count("gguf-packed-kept-float")
            return None
        try:
            blocks = concatenate_columns([match.blocks for match in matches])
        except ValueError as error:
            self.report.notes.append(f"kept packed '{value.name}' {shape} in float: its parts' GGUF blocks do not "
                                     f"concatenate ({error})")
            self.report.count("gguf-packed-kept-float")
            return None
        for match in matches:
            self.report.count(f"gguf-{match.qtype.lower()}")
        self.report.count("gguf-packed")
        return blocks

    def _replace(self, model: ir.Model, node: ir.Node, a: ir.Value, inputs: list[ir.Value], q: BlockQuantized,
                 bias: ir.Value | None) -> None:
        level = self.config["accuracy_level"]
        if q.bits == 8 and self.config["accuracy_level_8bit"] >= 0:
            level = self.config["accuracy_level_8bit"]
        attributes = {**q.attributes(), "accuracy_level": level}
        operands = [a, *inputs]
        if bias is not None:  # inputs 3 and 4 (zero points, g_idx) may be absent before it
            operands += [None] * (5 - len(operands)) + [bias]
        new = ir.node("MatMulNBits", operands, attributes=attributes, domain=MICROSOFT,
                      name=f"{node.name}/q{q.bits}" if node.name else None)
        nodes = [new]
        if q.offsets is not None:  # + (A @ block_sums) @ offsets: each block's offset times its sum of A
            sums = ir.node("MatMul", [a, self._block_sum(model.graph, q)],
                           name=f"{node.name}/block_sums" if node.name else None)
            added = ir.node("MatMul", [sums.outputs[0], self._offsets[id(q)]],
                            name=f"{node.name}/offsets" if node.name else None)
            nodes += [sums, added, ir.node("Add", [new.outputs[0], added.outputs[0]],
                                           name=f"{node.name}/plus_offsets" if node.name else None)]
            for helper in nodes[:-1]:
                helper.outputs[0].type = node.outputs[0].type
        for made in nodes:
            made.metadata_props[PASS_KEY] = self.name
            made.metadata_props[RULE_KEY] = f"matmul-to-matmul-nbits-{q.bits}" + ("-offsets" if q.offsets is not None
                                                                                  else "")
            for key in ("qgraph.layer", "qgraph.scope"):
                if key in node.metadata_props:
                    made.metadata_props[key] = node.metadata_props[key]
        self._swap(model.graph, node, *nodes)

    def _block_sum(self, graph: ir.Graph, q: BlockQuantized) -> ir.Value:
        """[K, n_blocks] of ones where row k belongs to block column k // block_size (shared per K)."""
        key = (q.k, q.block_size, ir.DataType.from_numpy(q.scales.dtype))
        if key not in self._block_sums:
            ones = np.zeros((q.k, q.n_blocks), q.scales.dtype)
            ones[np.arange(q.k), np.arange(q.k) // q.block_size] = 1
            self._block_sums[key] = _initializer(graph, f"quantize.block_sums.k{q.k}.b{q.block_size}", ones)
        return self._block_sums[key]

    @staticmethod
    def _swap(graph: ir.Graph, node: ir.Node, *made: ir.Node) -> None:
        """``made`` (the last computes the result) takes ``node``'s place: the old output's name, type and readers."""
        old = node.outputs[0]
        out = made[-1].outputs[0]
        out.type, out.shape = old.type, old.shape
        graph.insert_before(node, list(made))
        name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = None
        out.name = name
        graph.remove(node, safe=True)


def _excluded(node: ir.Node, w: ir.Value, source: ir.Value, patterns: list[str]) -> bool:
    names = [node.name or "", w.name or "", source.name or ""]
    return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in patterns)


def _drop_unread(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the float weights no node reads any more: their Transpose/Constant producers, then initializers."""
    for value in values:
        producer = value.producer()
        if (producer is not None and producer.op_type in ("Transpose", "Constant") and producer.graph is graph
                and not value.uses() and not value.is_graph_output()):
            graph.remove(producer, safe=True)
    for value in values:
        name = value.name
        if (name in graph.initializers and graph.initializers[name] is value and not value.uses()
                and not value.is_graph_input() and not value.is_graph_output()):
            del graph.initializers[name]


def _initializer(graph: ir.Graph, name: str, data: np.ndarray) -> ir.Value:
    name = _unique(graph, name)
    value = ir.Value(name=name, const_value=ir.tensor(data, name=name),
                     type=ir.TensorType(ir.DataType.from_numpy(data.dtype)), shape=ir.Shape(data.shape))
    graph.register_initializer(value)
    return value


def _unique(graph: ir.Graph, name: str) -> str:
    if name not in graph.initializers:
        return name
    i = 1
    while f"{name}.{i}" in graph.initializers:
        i += 1
    return f"{name}.{i}"
