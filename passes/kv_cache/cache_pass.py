"""Give a decoder graph a KV cache on the graph itself: retained-state (device) or concat form.

Exporters give either no cache or a dynamic concat cache, and a device
compiler needs the cache as explicit inputs and outputs of fixed shape.
Because the attention core is one canonical ``Attention`` node (the
``attention`` pass), the rewrite does not depend on the exporter:

* each Attention node's new K and V (taken before any repeat_kv, so the
  cache holds the KV heads only) are written into the cache -- ScatterND or
  ``com.qualcomm.cloud::CtxScatter`` at ``position_ids`` in the retained
  form, Concat after the past in the concat form -- and the node attends
  over the whole cache;
* the exporter's mask becomes a mask built from position (or column)
  comparisons; which mask to build (causal, sliding window of w keys) is
  read by running the exporter's own mask subgraph on probe masks
  (``kv_cache_probe``), so a mask with any other meaning stops the pass;
* the positions the exporter computed from the attention mask
  (``cumsum(mask) - 1``, found the same way) become the ``position_ids``
  input, so rotary tables (full, partial, interleaved) and learned position
  embeddings (OPT's offset included) follow without being matched;
* retained form: logits at each row's last valid token by default, and
  ``specializations.json`` / ``custom_io.yaml`` beside the saved model
  (``qgraph.io`` sidecars);
* concat form: logits at every token by default, or (``logits=last``) at
  the chunk's last column only, sliced before the LM head -- the rows are
  left-padded, so that column is each row's latest token.

A graph that already has a concat cache (optimum's names) is converted to
the retained form: it is read as the no-cache graph it is when its past is
empty, so its reads of the cache's dims (the past length that
``cache_position`` and the masks start from) read an empty cache's. Whatever the pass cannot account for -- a mask that is
not causal, positions it cannot find, a leftover use of the attention mask
or a sequence Range -- stops it with a report of what was not found; it
never emits a graph whose meaning it has not established.

Retained-form contract (docs/design.md): a padding token (position -1) writes
slot ctx_len - 1, which a valid query at position p < ctx_len - 1 never
sees, so a sequence may hold at most ctx_len - 1 tokens.
"""

from __future__ import annotations

import gc

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass
from qgraph_passes.kv_cache.analysis import AnalysisError, Layer, analyze_decoder, is_attention
from qgraph_passes.kv_cache.build import GraphBuilder
from qgraph_passes.kv_cache.files import custom_io_yaml, specializations_json
from qgraph_passes.kv_cache.logits import (
    NUM_LOGITS_TO_KEEP,
    add_num_logits_to_keep,
    check_speculative_options,
    gather_last_k_valid,
    speculative_symbols,
)
from qgraph_passes.kv_cache.positions import (
    PositionAnalysis,
    retype_downstream,
    site_replacement,
    table_replacement,
    tabulate,
    verify_rewired,
)
from qgraph_passes.kv_cache.probe import MaskMeaning, ProbeError

from qgraph.errors import BadInputError, PassFailure
from qgraph.io import SIDECAR_PREFIX
from qgraph.pass_base import Option, Pass, Prerequisite

__all__ = ["KVCachePass"]

# Ops applied to each token's logits on the way to the output (gemma2's soft-cap, scaling).
_PER_TOKEN_OPS = {"Add", "Sub", "Mul", "Div", "Tanh", "Cast", "Softcap", "Identity"}


def _decoder_interface(model: ir.Model) -> bool:
    return (any(v.name == "input_ids" for v in model.graph.inputs)
            and any(o.name == "logits" for o in model.graph.outputs))


def _has_attention(model: ir.Model) -> bool:
    return any(is_attention(n) for n in model.graph)


def _reads_graph_inputs(value: ir.Value, limit: int = 64) -> bool:
    """Whether ``value`` depends on a graph input (searching at most ``limit`` producers; True if unsure)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v.is_graph_input():
            return True
        node = v.producer()
        if node is None:
            continue
        if len(seen) > limit:
            return True
        stack.extend(x for x in node.inputs if x is not None)
    return False


def _mask(b: GraphBuilder, layer: Layer, visible: ir.Value, key_positions) -> ir.Value:
    """The layer's mask over the cache: the visibility, plus its ALiBi bias when the export's mask had one."""
    if layer.meaning.slopes is None:
        return visible
    return b.key_position_bias(visible, key_positions(), layer.meaning.slopes, layer.dtype)


def _fail(message: str) -> PassFailure:
    return PassFailure(f"pass 'kv-cache': {message}", pass_name="kv-cache")


class KVCachePass(Pass):
    """Give a decoder graph with Attention nodes a KV cache: retained-state (device) or concat (optimum) I/O."""

    name = "kv-cache"
    meaning = "sequence"
    options = {
        "style": Option(str, "retained", "retained: cache written at position_ids, ctx_len symbolic; concat: "
                        "past_key_values -> present", ("retained", "concat")),
        "ctx_len": Option(int, 128, "retained: the ctx_len compiled in specializations.json (the graph's is "
                          "symbolic; a sequence holds at most ctx_len - 1 tokens)"),
        "logits": Option(str, "auto", "last: logits [batch, 1, vocab] only -- retained: at each row's last valid "
                         "token; concat: at the chunk's last column (rows are left-padded), the LM head then runs on "
                         "one column; all: at every token; auto: last for retained, all for concat",
                         ("auto", "last", "all")),
        "scatter": Option(str, "scatternd", "retained: how the cache is written and read (ctx-scatter: "
                          "com.qualcomm.cloud::CtxScatter/CtxGather with their bodies)", ("scatternd", "ctx-scatter")),
        "batch_size": Option(int, 1, "retained: batch_size in specializations.json"),
        "prefill_len": Option(int, 32, "retained: prefill seq_len in specializations.json (capped at ctx_len - 1)"),
        "full_batch_size": Option(int, 0, "retained: continuous batching -- the cache has this many rows and the "
                                  "batch_index input picks each running sequence's row (0: off)"),
        "comp_ctx_lengths": Option(str, "", "retained: compute-context lengths, comma-separated (e.g. 64,128): "
                                   "input comp_ctx_lengths (its length used) bounds the slots attention reads; "
                                   "one specialization each for prefill and decode"),
        "phase": Option(str, "both", "retained: one graph for prefill and decode, or a graph for one phase "
                        "(disaggregated serving; same cache I/O, decode's seq_len fixed at 1, specializations of "
                        "that phase only)", ("both", "prefill", "decode")),
        "specializations": Option(str, "named", "retained: specializations.json as QEfficient's named graphs "
                                  "({name, symbols}) or the older flat list", ("named", "flat")),
        "kv_dtype": Option(str, "float16", "retained: KV precision in custom_io.yaml (model: the graph's dtype)",
                           ("float16", "float32", "mxint8", "model")),
        "num_speculative_tokens": Option(int, 0, "retained: K > 0 makes a speculative-decoding target: input "
                                         "num_logits_to_keep (its length n), logits at each row's last n valid "
                                         "tokens, decode specialization seq_len K+1 (0: off)"),
        "table_len": Option(int, 4096, "concat: positions a value is tabulated for when its subgraph cannot "
                            "take per-row positions (retained: ctx_len)"),
    }
    prerequisites = (
        # First, and provided by no pass: a graph that is not a decoder is bad input (exit 2) whether or
        # not its attention would fuse.
        Prerequisite("a decoder's interface (input input_ids, output logits)", _decoder_interface),
        Prerequisite("the graph has Attention nodes", _has_attention, satisfied_by="attention"),
    )

    # --- analysis (nothing is changed until the whole graph is understood) -------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # The rewrite runs on a copy (tensors shared) and replaces the model's graph only when it
        # succeeded, so a graph the pass refuses -- even on a check after the rewrite -- is unchanged.
        # The copy creates every node and value again, which only allocates: with the cyclic garbage
        # collector on, its collections over the growing heap made the copy superlinear in depth
        # (4x the layers, 6x the time), so it is paused for the copy.
        paused = gc.isenabled()
        gc.disable()
        try:
            work = model.clone()
        finally:
            if paused:
                gc.enable()
        self._rewrite(work)
        model.graph = work.graph
        model.functions.clear()
        model.functions.update(work.functions)
        model.metadata_props.update(work.metadata_props)
        return ir.passes.PassResult(model, modified=True)

    def _rewrite(self, model: ir.Model) -> None:
        cfg = self.config
        retained = cfg["style"] == "retained"
        if retained:
            self._check_retained_options()
        logits_at = self._logits_at()
        check_speculative_options(cfg["num_speculative_tokens"], style=cfg["style"], logits=logits_at,
                                  prefill_len=min(cfg["prefill_len"], cfg["ctx_len"] - 1), ctx_len=cfg["ctx_len"])
        graph = model.graph
        try:
            found = analyze_decoder(model, notes=self.report.notes,
                                    mask_length_cap=cfg["ctx_len"] if retained else None)
        except AnalysisError as exc:
            raise _fail(str(exc)) from None
        ids, mask_input, layers = found.ids, found.mask, found.layers
        past_inputs, source_positions, analysis = found.past_inputs, found.source_positions, found.positions

        # --- rewrite ---------------------------------------------------------------------
        # The no-cache graph's mask has the chunk's shape; its Shape reads the chunk's
        # batch and length, which input_ids carries in the cached graph.
        for use in list(mask_input.uses()):
            if use.node.op_type == "Shape":
                use.node.replace_input_with(use.idx, ids)
        b = GraphBuilder(graph)
        dims = ("batch_size", "seq_len") if retained else ("batch_size", "sequence_length")
        self._rename_dims(graph, ids, dims)
        positions = self._position_input(graph, source_positions, dims, retained)
        clamped = b.op("Max", positions, b.const(0), name=b.fresh("positions"))
        for use in list(positions.uses()):  # a source's own position_ids: -1 now marks padding
            if use.node is not clamped.producer():
                use.node.replace_input_with(use.idx, clamped)
        self._empty_past_dims(b, past_inputs, ids)
        if analysis is not None:
            self._rewire_positions(model, b, analysis, clamped, retained)

        if retained:
            self._write_retained(model, b, layers, positions)
        else:
            self._write_concat(graph, b, layers, mask_input, ids)
        self._drop_concat_source(graph, layers, past_inputs)
        if logits_at == "last":
            self._last_token_logits(graph, b, positions, retained)
        self._set_logits_shape(graph, retained, dims)

        RemoveUnusedNodesPass()(model)
        self._drop_past_inputs(graph, past_inputs)
        self._check_nothing_left(graph, b, mask_input, ranges=analysis is None)
        if retained:
            graph.inputs.remove(mask_input)
            if cfg["phase"] == "decode":  # one token a step, or a speculative target's K + 1
                self._fix_dim(graph, "seq_len", cfg["num_speculative_tokens"] + 1)
            self._device_files(model, layers)
        graph.sort()
        self.report.count("layers", len(layers))

    # --- rewrite helpers ---------------------------------------------------------------------

    def _rewire_positions(self, model: ir.Model, b: GraphBuilder, analysis: PositionAnalysis, clamped: ir.Value,
                          retained: bool) -> None:
        """Each position site reads position_ids instead; the result is run against the original.

        When the rewired subgraph cannot take per-row positions (a reshape
        that hard-codes the traced batch of 1, say), the sites are restored
        and each position-dependent value becomes a table indexed by
        position instead (ctx_len rows in the retained form, the option
        ``table_len`` -- or the most the graph can run -- in the concat form).
        """
        chunk_mask = "none" if retained else "total"
        replacements = {}
        for site in analysis.sites:
            replacement = site_replacement(b, site, clamped)
            site.value.replace_all_uses_with(replacement)
            replacements[site.value] = replacement
        widened = [replacements[s.value] for s in analysis.sites if s.batch_axis < 0]
        old_shapes = retype_downstream(widened, model.graph.opset_imports) if widened else {}
        try:
            verify_rewired(model, analysis, replacements, chunk_mask=chunk_mask, shapes_declared=not widened)
            return
        except ProbeError as exc:
            first = str(exc)
            if widened:
                first += ("; positions laid out without a batch axis were given one, which the graph does not "
                          "broadcast: " + ", ".join(s.describe() for s in analysis.sites if s.batch_axis < 0))
        for original, replacement in replacements.items():  # back to the export's own subgraph
            replacement.replace_all_uses_with(original)
        for value, shape in old_shapes.items():
            value.shape = shape
        dependent = [f for f in analysis.frontier if f.seq_axis is not None]
        wanted = self.config["ctx_len"] if retained else self.config["table_len"]
        try:
            length, tables = tabulate(model, dependent, wanted)
            tabled = {}
            for f, table in zip(dependent, tables):
                tabled[f.value] = table_replacement(b, f, table, clamped)
                f.value.replace_all_uses_with(tabled[f.value])
            verify_rewired(model, analysis, tabled, chunk_mask=chunk_mask, shapes_declared=False)
        except ProbeError as exc:
            raise _fail(f"positions rewired to position_ids do not compute what the export computed: {first}; "
                        f"nor does a table of the values by position: {exc}") from None
        self.report.notes.append(
            f"positions could not be rewired in place ({first}); {len(dependent)} position-dependent value(s) "
            f"became tables of {length} positions read at position_ids: "
            + ", ".join(repr(f.value.name) for f in dependent))

    @staticmethod
    def _rename_dims(graph: ir.Graph, ids: ir.Value, names: tuple[str, str]) -> None:
        """The batch and seq dims of input_ids take the contract's names throughout the graph."""
        if ids.shape is None:
            return
        mapping = {}
        for dim, name in zip(ids.shape, names):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                mapping[dim.value] = name
        if not mapping:
            return

        def renamed(value: ir.Value) -> None:
            if value.shape is None:
                return
            dims = [ir.SymbolicDim(mapping[d.value]) if isinstance(d, ir.SymbolicDim) and d.value in mapping else d
                    for d in value.shape]
            value.shape = ir.Shape(dims)

        for value in graph.inputs:
            renamed(value)
        for node in graph:
            for value in node.outputs:
                renamed(value)

    @staticmethod
    def _fix_dim(graph: ir.Graph, name: str, size: int) -> None:
        """The symbolic dim ``name`` becomes ``size`` on every value that declares it."""

        def fixed(value: ir.Value) -> None:
            if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value == name for d in value.shape):
                value.shape = ir.Shape([size if isinstance(d, ir.SymbolicDim) and d.value == name else d
                                        for d in value.shape])

        for value in graph.inputs:
            fixed(value)
        for node in graph:
            for value in node.outputs:
                fixed(value)

    @staticmethod
    def _position_input(graph: ir.Graph, existing: ir.Value | None, dims: tuple[str, str], retained: bool) -> ir.Value:
        if existing is not None:
            existing.shape = ir.Shape(list(dims))
            return existing
        positions = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(list(dims)))
        # QEfficient's order (input_ids, position_ids, ...) and optimum's (input_ids, attention_mask, position_ids, ...)
        after = "input_ids" if retained else "attention_mask"
        index = next(i for i, v in enumerate(graph.inputs) if v.name == after)
        graph.inputs.insert(index + 1, positions)
        return positions

    @staticmethod
    def _replace_attention(graph: ir.Graph, b: GraphBuilder, layer: Layer, key, value, mask) -> None:
        """A new Attention over the cache and the new mask; the old node (and its past inputs) goes."""
        old = layer.node
        attributes = [a for name, a in old.attributes.items() if name not in ("is_causal",)]
        new = ir.Node("", "Attention", [old.inputs[0], key, value, mask], attributes=attributes,
                      num_outputs=1, name=old.name)
        new.metadata_props.update(old.metadata_props)
        new.metadata_props["qgraph.pass"] = "kv-cache"
        new.metadata_props["qgraph.rule"] = "attend-over-cache"
        graph.insert_after(old, new)
        out, old_out = new.outputs[0], old.outputs[0]
        out.type, out.shape = old_out.type, old_out.shape
        old_out.replace_all_uses_with(out, replace_graph_outputs=True)
        for extra in old.outputs[1:]:
            if extra.is_graph_output():
                graph.outputs.remove(extra)
        graph.remove(old, safe=True)
        out.name = old_out.name
        b.created.append(new)

    def _write_retained(self, model: ir.Model, b: GraphBuilder, layers: list[Layer], positions: ir.Value) -> None:
        # Imported here: the CtxScatter/CtxGather bodies are compiled by onnxscript when their
        # module loads (~0.07 s), which a concat cache (the ort preset) never needs.
        from qgraph_passes.kv_cache.retained import RetainedForm, write_retained

        cfg = self.config
        form = RetainedForm(device_ops=cfg["scatter"] == "ctx-scatter",
                            continuous_batching=cfg["full_batch_size"] > 0,
                            compute_context=bool(self._compute_context_lengths()))
        write_retained(model, b, layers, positions, form,
                       lambda layer, key, value, mask: self._replace_attention(model.graph, b, layer, key, value, mask))

    def _write_concat(self, graph: ir.Graph, b: GraphBuilder, layers: list[Layer], mask_input, ids) -> None:
        mask_input.shape = ir.Shape(["batch_size", "total_sequence_length"])
        visibility: dict[MaskMeaning, ir.Value] = {}
        for layer in layers:
            past_shape = ir.Shape(["batch_size", layer.kv_heads, "past_sequence_length", layer.head_dim])
            present_shape = ir.Shape(["batch_size", layer.kv_heads, "total_sequence_length", layer.head_dim])
            joined = []
            for kind, new in (("key", layer.key), ("value", layer.value)):
                past = ir.Value(name=f"past_key_values.{layer.index}.{kind}", type=ir.TensorType(layer.dtype),
                                shape=past_shape)
                graph.inputs.append(past)
                state = b.op("Concat", past, new, axis=2, name=f"present.{layer.index}.{kind}", rule="concat-write")
                state.type, state.shape = ir.TensorType(layer.dtype), present_shape
                graph.outputs.append(state)
                joined.append(state)
            if layer.meaning not in visibility:
                visibility[layer.meaning] = _mask(
                    b, layer, b.concat_visibility(mask_input, ids, layer.meaning.window),
                    lambda: b.concat_key_positions(mask_input))
            self._replace_attention(graph, b, layer, joined[0], joined[1], visibility[layer.meaning])

    @staticmethod
    def _drop_concat_source(graph: ir.Graph, layers: list[Layer], past_inputs: set[ir.Value]) -> None:
        """A converted optimum graph loses its old past inputs and present outputs."""
        if not past_inputs:
            return
        for layer in layers:
            for old in layer.present or ():
                if old.is_graph_output():
                    graph.outputs.remove(old)

    @staticmethod
    def _empty_past_dims(b: GraphBuilder, past_inputs: set[ir.Value], ids: ir.Value) -> None:
        """A concat source's reads of its cache's dims give those of an empty cache of the chunk's batch.

        The analysis read the source as the no-cache graph it is when its
        past is empty (every probe fed one), and an exporter reads the past
        length from the cache's shape (``cache_position`` starts at it, the
        masks' key count adds it). Each ``Shape``/``Size`` of an old cache
        input becomes the [batch, heads, 0, size] it gives for an empty past,
        so the graph is that no-cache graph: its positions and masks are then
        rewired and rebuilt -- and checked -- as any no-cache graph's, and
        nothing reads the old inputs once the layers write the new cache. A
        read of the cache's values outside the layer's Concat is not changed;
        the old input is then still read, and the pass stops naming the reader.
        """
        for past in sorted(past_inputs, key=lambda v: v.name):
            readers = [u.node for u in past.uses()
                       if u.node.op_type in ("Shape", "Size") and u.node.domain in ("", "ai.onnx")]
            if not readers:
                continue
            shape = past.shape
            if shape is None or shape.rank() != 4 or not all(isinstance(shape[a], int) for a in (1, 3)):
                raise _fail(f"the cache input {past.name!r} has shape {shape}, not [batch, heads, past, size] with "
                            f"static heads and size; its dims are read by {readers[0].name!r}")
            for node in readers:
                if node.op_type == "Size":
                    value = b.const(0, hint="empty_past_size")
                else:
                    # Shape's start and end: negative counts from the rank, both clamped to [0, 4].
                    bounds = [node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)]
                    first, last = (min(4, max(0, i + 4 if i < 0 else i)) for i in bounds)
                    dims = [None, shape[1], 0, shape[3]][first:last]
                    if first == 0 and last == 1:
                        value = b.dim(ids, 0)
                    elif first == 0 and last > 0:
                        value = b.op("Concat", b.dim(ids, 0), b.const(dims[1:]), axis=0, name=b.fresh("empty_past"))
                        value.shape = ir.Shape([last])
                    else:
                        value = b.const(dims, hint="empty_past_dims")
                node.outputs[0].replace_all_uses_with(value, replace_graph_outputs=True)

    @staticmethod
    def _drop_past_inputs(graph: ir.Graph, past_inputs: set[ir.Value]) -> None:
        for value in sorted(past_inputs, key=lambda v: v.name):
            if value.uses():
                users = ", ".join(sorted({u.node.name or u.node.op_type for u in value.uses()}))
                raise _fail(f"the old cache input {value.name!r} is still read by {users}")
            graph.inputs.remove(value)

    def _logits_at(self) -> str:
        """The ``logits`` option resolved: ``auto`` keeps each style's historical default."""
        chosen = self.config["logits"]
        if chosen == "auto":
            return "last" if self.config["style"] == "retained" else "all"
        return chosen

    def _last_token_logits(self, graph: ir.Graph, b: GraphBuilder, positions: ir.Value, retained: bool) -> None:
        """Gather each row's last token before the LM head, or at the logits when no head is found.

        The head is the MatMul whose only graph-dependent operand is the
        hidden state [B, S, H], reached from the logits through per-token
        ops with constant operands (scaling, gemma2's final soft-cap).
        Gathering before it is the point: generation reads one token's
        logits per row, and the head (hidden x vocab) is the largest matmul
        of a small model, so a prefill of S tokens would otherwise pay for
        it S times. Which token: in the retained form each row's last valid
        one (argmax of position_ids, any padding side); in the concat form
        the chunk's last column, as Hugging Face's ``logits_to_keep=1``
        slices it -- its rows are left-padded (docs/design.md, concat
        contract), so that column is every row's last token of the chunk.
        """
        logits = next(o for o in graph.outputs if o.name == "logits")
        chain = [logits]
        value, head = logits, None
        while (node := value.producer()) is not None:
            variable = [x for x in node.inputs if x is not None and _reads_graph_inputs(x)]
            if len(variable) != 1:
                break
            hidden = node.inputs[0]
            if node.op_type == "MatMul" and hidden is variable[0] and hidden.shape is not None and hidden.shape.rank() == 3:
                head = node
                break
            if node.op_type not in _PER_TOKEN_OPS:
                break
            value = variable[0]
            chain.append(value)
        keep = add_num_logits_to_keep(graph) if self.config["num_speculative_tokens"] else None

        def gather(hidden: ir.Value) -> ir.Value:
            if not retained:
                return b.last_column(hidden)
            if keep is None:
                return b.gather_last_valid(hidden, positions)
            return gather_last_k_valid(b, hidden, positions, keep)

        if head is not None:
            head.replace_input_with(0, gather(head.inputs[0]))
            where = f"before the LM head (MatMul {head.name!r})"
        else:  # no head found: gather at the output (the head then runs on every token)
            index = graph.outputs.index(logits)
            logits.name = b.fresh("logits_every_token")
            gathered = gather(logits)
            gathered.name, gathered.type = "logits", logits.type
            graph.outputs[index] = gathered
            chain = [gathered]
            where = "at the logits output (no LM head MatMul found)"
        for v in chain:
            if v.shape is not None and v.shape.rank() == 3:
                v.shape = ir.Shape([v.shape[0], 1 if keep is None else NUM_LOGITS_TO_KEEP, v.shape[2]])
        kept = "last valid token" if keep is None else "last len(num_logits_to_keep) valid tokens"
        if not retained:
            self.report.notes.append(f"logits taken at the chunk's last column (rows left-padded) {where}")
        else:
            self.report.notes.append(f"logits gathered at each row's {kept} {where}")

    @staticmethod
    def _set_logits_shape(graph: ir.Graph, retained: bool, dims: tuple[str, str]) -> None:
        logits = next(o for o in graph.outputs if o.name == "logits")
        if logits.shape is not None and logits.shape.rank() == 3:
            kept = str(logits.shape[1]) == NUM_LOGITS_TO_KEEP  # a speculative target's [B, n, V]
            seq = logits.shape[1] if isinstance(logits.shape[1], int) or kept else dims[1]
            logits.shape = ir.Shape([dims[0], seq, logits.shape[2]])

    @staticmethod
    def _check_nothing_left(graph: ir.Graph, b: GraphBuilder, mask_input: ir.Value, *, ranges: bool) -> None:
        """Nothing may still read the mask; with a position_ids input, no Range may count positions.

        (Without one, every value that carries positions was found, rewired and
        run against the original by the position analysis.)
        """
        ours = set(b.created)
        stray = sorted({u.node.name or u.node.op_type for u in mask_input.uses() if u.node not in ours})
        if stray:
            raise _fail(f"'attention_mask' is still read by {', '.join(stray)} after the masks and positions were "
                        "replaced; the pass does not know what these nodes compute")
        ranges = [n for n in graph if n.op_type == "Range" and n not in ours] if ranges else []
        if ranges:
            names = ", ".join(repr(n.name) for n in ranges)
            raise _fail(f"Range node(s) {names} still feed the graph: positions counted from the chunk start would be "
                        "wrong after the first step; the pass cannot account for them")

    def _compute_context_lengths(self) -> list[int]:
        text = self.config["comp_ctx_lengths"].strip()
        if not text:
            return []
        try:
            lengths = sorted({int(part, 0) for part in text.split(",") if part.strip()})
        except ValueError:
            raise BadInputError(f"option 'kv-cache.comp_ctx_lengths': {text!r} is not a comma-separated list of "
                                "integers") from None
        ctx_len = self.config["ctx_len"]
        bad = [n for n in lengths if not 1 <= n <= ctx_len]
        if bad:
            raise BadInputError(f"option 'kv-cache.comp_ctx_lengths': {bad} outside 1..ctx_len ({ctx_len})")
        return lengths

    def _check_retained_options(self) -> None:
        cfg = self.config
        if cfg["ctx_len"] < 2:
            raise BadInputError(f"option 'kv-cache.ctx_len': {cfg['ctx_len']} leaves no slot for a token")
        if cfg["full_batch_size"] < 0:
            raise BadInputError(f"option 'kv-cache.full_batch_size': {cfg['full_batch_size']} is negative")
        self._compute_context_lengths()

    def _device_files(self, model: ir.Model, layers: list[Layer]) -> None:
        cfg = self.config
        model.metadata_props[SIDECAR_PREFIX + "specializations.json"] = specializations_json(
            batch_size=cfg["batch_size"], prefill_len=min(cfg["prefill_len"], cfg["ctx_len"] - 1),
            ctx_len=cfg["ctx_len"], full_batch_size=cfg["full_batch_size"] or None,
            comp_ctx_lengths=self._compute_context_lengths(), named=cfg["specializations"] == "named",
            phases=("Prefill", "Decode") if cfg["phase"] == "both" else (cfg["phase"].capitalize(),),
            fixed=("seq_len",) if cfg["phase"] == "decode" else (),
            decode_len=cfg["num_speculative_tokens"] + 1,
            extra=speculative_symbols(cfg["num_speculative_tokens"]),
        )
        names = []  # QEfficient's order: each cache input, then the output that retains it
        for layer in layers:
            for kind in ("key", "value"):
                names += [f"past_{kind}.{layer.index}", f"past_{kind}.{layer.index}_RetainedState"]
        precision = cfg["kv_dtype"]
        if precision == "model":
            precision = {ir.DataType.FLOAT: "float32", ir.DataType.FLOAT16: "float16"}.get(layers[0].dtype, "float32")
        model.metadata_props[SIDECAR_PREFIX + "custom_io.yaml"] = custom_io_yaml(names, precision)
