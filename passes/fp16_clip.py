"""fp16 clipping: nothing overflows when the device compiler converts the graph to half precision."""

from __future__ import annotations

import onnx_ir as ir
from qgraph_passes.fp16_clip_constants import FP16_MAX, FP16_OVERFLOW, ConstantClipper

from qgraph.errors import BadInputError
from qgraph.pass_base import Option, Pass

__all__ = ["FP16ClipPass"]

_LISTED = 20  # clipped constants named one by one in the notes; the rest are counted
_FIXED = ("Constant", "ConstantOfShape")


class FP16ClipPass(Pass):
    """Clip float32 constants (and, on request, calibrated activations) to the fp16 range ±65504.

    Device compilers convert fp32 graphs to fp16, where anything beyond
    ±65504 becomes ±inf: the dynamo exporter's attention-mask fill
    (``finfo(float32).min`` = -3.4e38), large scales, and activations that
    grow past the range. An inf then meets a zero or another inf and the
    device returns NaN.

    Constants: every float32 constant — initializers, ``Constant`` nodes
    (``value``, ``value_float``, ``value_floats``), ``ConstantOfShape``
    values and any other tensor attribute, in the main graph, If/Loop/Scan
    bodies and model-local functions — has its finite elements beyond
    ±65504 set to ±65504. ±inf stays (a -inf mask fill keeps its meaning:
    fp16 has infinities), NaN is untouched, and with ``flush_subnormals``
    magnitudes below fp16's smallest subnormal (2**-24) become zero. Weights
    in external data are read from their file in 1 MiB chunks (never mapped
    whole); only out-of-range ones are replaced, by a tensor that clips on
    demand, so saving with external data writes them back one at a time and
    memory stays near the largest tensor, not the model.

    Activations (``activations=true``): representative inputs run through
    onnxruntime in fp32 (``calibration_inputs``, an .npz written by
    ``qgraph.verify.save_inputs`` or a folder of them; otherwise
    ``calibration_examples`` inputs drawn by verification's strategies), the
    largest finite magnitude of every float32 node output of the main graph
    is recorded, and ``Clip(-65504, 65504)`` goes after each producer whose
    maximum times ``margin`` would overflow (fp16 rounds |x| >= 65520 to
    inf; 65504 < |x| < 65520 rounds to 65504 and needs no clip); the notes
    say which and by how much. On the device the producer's fp16 output
    still overflows, and the Clip turns that inf into ±65504 before it meets
    a zero or another inf. Inside the range a Clip changes nothing, so fp32
    results only change where fp16 would have overflowed; a tensor that
    also held ±inf in fp32 has those saturated to ±65504 too (noted).
    Values inside subgraphs are not calibrated. Calibration in fp32 cannot
    see overflows that only fp16 rounding creates downstream; check the
    result with ``qgraph.verify.fp16.check_fp16``.

    Report: ``constants-clipped`` (tensors), ``elements-clipped``,
    ``elements-flushed``, ``activations-clipped``; notes name the largest
    finite magnitude seen and every clipped tensor. ``--verify`` checks the
    clipped model emulated in fp16 against the fp32 original
    (``meaning = "fp16"``, ``qgraph.verify.fp16.fp16_step_verifier``): in
    fp32 alone the clip changes rows where every key is masked, since
    -3.4e38 swallows the score added to it and -65504 does not.
    """

    name = "fp16-clip"
    meaning = "fp16"
    options = {
        "flush_subnormals": Option(
            bool, False, "also set constants with |x| below 2**-24 (fp16's smallest subnormal) to zero"
        ),
        "activations": Option(
            bool, False, "calibrate in onnxruntime and insert Clip(-65504, 65504) after overflowing producers"
        ),
        "calibration_examples": Option(
            int, 8, "inputs drawn by verification's strategies for calibration (without calibration_inputs)"
        ),
        "calibration_inputs": Option(
            str, "", "an .npz of feeds (qgraph.verify.save_inputs) or a folder of them, used for calibration"
        ),
        "margin": Option(
            float, 1.0,
            "safety factor for activations: clip a producer when max|x| * margin would overflow "
            "fp16 (2.0 also clips those that reach half the range on the calibration inputs)",
        ),
    }

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.config["margin"] < 1.0:
            raise BadInputError(f"option '{self.name}.margin' must be at least 1.0, got {self.config['margin']}")
        modified = self._clip_constants(model)
        if self.config["activations"]:
            modified |= self._clip_activations(model)
        return ir.passes.PassResult(model, modified=modified)

    def _clip_constants(self, model: ir.Model) -> bool:
        clipper = ConstantClipper(flush_subnormals=self.config["flush_subnormals"])
        clipper.clip_model(model)
        stats = clipper.stats
        report = self.report
        report.count("constants-clipped", stats.tensors_clipped)
        report.count("elements-clipped", stats.elements_clipped)
        if self.config["flush_subnormals"]:
            report.count("elements-flushed", stats.elements_flushed)
        seen = f"{stats.tensors_scanned} float32 constant(s), {stats.elements_scanned} element(s) scanned"
        if stats.largest_where is not None:
            seen += f"; largest finite magnitude {stats.largest:.6g} ({stats.largest_where})"
        report.notes.append(seen)
        for where, count, largest in stats.clipped[:_LISTED]:
            report.notes.append(
                f"clipped {count} element(s) of {where} to ±{FP16_MAX:g} (largest magnitude {largest:.6g})"
            )
        if len(stats.clipped) > _LISTED:
            report.notes.append(f"... and {len(stats.clipped) - _LISTED} more clipped constant(s)")
        return stats.tensors_clipped > 0

    def _clip_activations(self, model: ir.Model) -> bool:
        # Imported here: calibration needs onnxruntime and hypothesis, which the
        # constant-only default (the memory benchmark's case) should not load.
        from qgraph_passes.fp16_clip_calibration import (
            all_value_names,
            calibration_feeds,
            clip_activation,
            describe,
            is_clipped_by,
            measure_activations,
        )

        feeds = calibration_feeds(
            model,
            examples=self.config["calibration_examples"],
            inputs_path=self.config["calibration_inputs"],
        )
        ranges, ran = measure_activations(model, feeds)
        margin = self.config["margin"]
        taken = all_value_names(model)
        clipped = 0
        for node in list(model.graph):
            if node.op_type in _FIXED and node.domain in ("", "ai.onnx"):
                continue  # its values are a constant, clipped above: no input can push it further
            for value in node.outputs:
                seen = ranges.get(value.name)
                if seen is None or seen.largest * margin < FP16_OVERFLOW or is_clipped_by(value, self.name):
                    continue
                what = describe(value)  # before a graph output is renamed
                clip_activation(model, value, FP16_MAX, pass_name=self.name, taken=taken)
                clipped += 1
                note = (
                    f"activation {what}: max |x| {seen.largest:.6g} "
                    f"= {seen.largest / FP16_MAX:.4g}x the fp16 maximum over {ran} calibration "
                    "example(s); Clip inserted"
                )
                if seen.infinite:
                    note += " (it also held ±inf in fp32, now saturated to ±65504)"
                self.report.notes.append(note)
        self.report.count("activations-clipped", clipped)
        if not clipped:
            self.report.notes.append(f"no activation left the fp16 range over {ran} calibration example(s)")
        if any(node.op_type in ("If", "Loop", "Scan") for node in model.graph):
            self.report.notes.append("values inside If/Loop/Scan bodies were not calibrated")
        return clipped > 0
