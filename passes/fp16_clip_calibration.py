"""The activation half of ``fp16-clip``: measure each tensor's range in fp32, clip the ones that overflow fp16.

Whether an activation overflows depends on the inputs, so it is measured,
not guessed: representative inputs — the user's, or the ones verification
draws for this model (token ids below the vocabulary, padded masks,
consistent position ids) — run through onnxruntime in fp32 with every
float intermediate of the main graph exposed, and the largest finite
magnitude of each is recorded. ``Clip(-65504, 65504)`` goes after each
producer whose maximum (times ``margin``) leaves the fp16 range. In fp32 the
clip changes nothing for values inside the range, so on inputs like the
calibration ones the model only changes where fp16 would have overflowed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import hypothesis
import numpy as np
import onnx_ir as ir
from hypothesis import HealthCheck, Phase, Verbosity
from hypothesis.errors import NoSuchExample, Unsatisfiable
from qgraph_passes.fp16_emulation import take_output_name, unique_name

from qgraph.errors import BadInputError, PassFailure
from qgraph.pass_base import default_opset
from qgraph.verify import OrtRunner, RunError, input_strategy, load_inputs

__all__ = [
    "ActivationRange",
    "all_value_names",
    "calibration_feeds",
    "clip_activation",
    "describe",
    "is_clipped_by",
    "measure_activations",
]

_CHUNK = 4096  # exposed tensors per onnxruntime session, as verification's localizer does


@dataclasses.dataclass
class ActivationRange:
    """What calibration saw of one float32 tensor."""

    name: str
    largest: float = 0.0  # largest finite |x| over all examples
    infinite: bool = False  # some element was ±inf already in fp32


def calibration_feeds(
    model: ir.Model, *, examples: int, inputs_path: str, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """The user's feeds (an .npz, or a folder of them), else ``examples`` drawn by verification's strategies."""
    if inputs_path:
        path = Path(inputs_path)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise BadInputError(f"{inputs_path}: no .npz files of calibration inputs in this folder")
            return [load_inputs(f) for f in files]
        if not path.is_file():
            raise BadInputError(f"{inputs_path}: no such calibration inputs file")
        return [load_inputs(path)]
    if examples < 1:
        raise BadInputError("fp16-clip: calibration_examples must be at least 1")
    try:
        strategy = input_strategy(model)
    except ValueError as exc:
        raise BadInputError(f"fp16-clip: cannot draw calibration inputs: {exc}") from None
    drawn: list[dict[str, np.ndarray]] = []

    def keep(example) -> bool:  # never "found": hypothesis just keeps generating
        drawn.append(example.feeds)
        return False

    settings = hypothesis.settings(
        max_examples=examples, database=None, deadline=None, phases=(Phase.generate,),
        verbosity=Verbosity.quiet, suppress_health_check=list(HealthCheck),
    )
    try:
        hypothesis.find(strategy, keep, settings=settings, random=random.Random(seed))
    except (NoSuchExample, Unsatisfiable):
        pass
    return drawn[:examples]


def _candidates(graph: ir.Graph) -> list[ir.Value]:
    """Node outputs of the main graph that may be float32 (unknown types are checked at run time)."""
    return [
        out
        for node in graph
        for out in node.outputs
        if out.name and out.dtype in (None, ir.DataType.FLOAT)
    ]


def measure_activations(
    model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]
) -> tuple[dict[str, ActivationRange], int]:
    """Largest finite |x| of every float32 node output, and how many examples ran."""
    names = [v.name for v in _candidates(model.graph)]
    ranges: dict[str, ActivationRange] = {}
    ran = 0
    failure = None
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        try:
            runner = OrtRunner(model, extra_outputs=chunk, label="the model being calibrated")
        except RunError as exc:
            raise PassFailure(f"fp16-clip: calibration cannot load the model: {exc}") from None
        with runner:
            ran = 0
            for example in feeds:
                try:
                    outputs = runner.run(example)
                except RunError as exc:
                    failure = str(exc)
                    continue
                ran += 1
                for name in chunk:
                    array = outputs.get(name)
                    if array is None or array.dtype != np.float32 or array.size == 0:
                        continue
                    seen = ranges.setdefault(name, ActivationRange(name))
                    magnitude = np.abs(array)
                    finite = np.isfinite(magnitude)
                    seen.largest = max(seen.largest, float(np.max(magnitude, where=finite, initial=0.0)))
                    seen.infinite |= bool(np.isinf(magnitude).any())
    if ran == 0:
        raise BadInputError(
            f"fp16-clip: onnxruntime rejected every calibration input ({failure}); "
            "give inputs with calibration_inputs"
        )
    return ranges, ran


def clip_activation(model: ir.Model, value: ir.Value, limit: float, *, pass_name: str, taken: set[str]) -> ir.Node:
    """Insert ``Clip(value, -limit, limit)`` after ``value``'s producer and reroute its readers."""
    graph = model.graph
    producer = value.producer()
    assert producer is not None and producer.graph is graph
    opset = default_opset(model) or 1
    if opset >= 11:
        low = _bound(graph, "fp16_clip.min", -limit, taken)
        high = _bound(graph, "fp16_clip.max", limit, taken)
        clip = ir.node("Clip", [value, low, high], name=unique_name(f"{value.name}.fp16_clip", taken))
    else:  # Clip took its bounds as attributes before opset 11
        clip = ir.node(
            "Clip", [value], attributes={"min": -limit, "max": limit},
            name=unique_name(f"{value.name}.fp16_clip", taken),
        )
    clipped = clip.outputs[0]
    clipped.dtype, clipped.shape = ir.DataType.FLOAT, value.shape
    clipped.name = unique_name(f"{value.name}.fp16_clipped", taken)
    clip.metadata_props["qgraph.pass"] = pass_name
    clip.metadata_props["qgraph.rule"] = "clip-activation"
    for use in list(value.uses()):
        if use.node is not clip:
            use.node.replace_input_with(use.idx, clipped)
    graph.insert_after(producer, clip)
    if value.is_graph_output():
        # The output keeps its name and now carries the clipped tensor.
        take_output_name(graph, value, clipped, ".unclipped", taken)
    return clip


def is_clipped_by(value: ir.Value, pass_name: str) -> bool:
    """True when every reader of ``value`` is a Clip this pass inserted (a second run)."""
    uses = list(value.uses())
    return bool(uses) and all(u.node.metadata_props.get("qgraph.pass") == pass_name for u in uses)


def _bound(graph: ir.Graph, base: str, limit: float, taken: set[str]) -> ir.Value:
    """One shared scalar initializer per bound (reused by every inserted Clip)."""
    existing = graph.initializers.get(base)
    if (
        existing is not None
        and existing.const_value is not None
        and existing.const_value.dtype == ir.DataType.FLOAT
        and existing.const_value.numpy().shape == ()
        and float(existing.const_value.numpy()) == np.float32(limit)
    ):
        return existing
    name = unique_name(base, taken)
    value = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]),
                     const_value=ir.tensor(np.array(limit, dtype=np.float32), name=name))
    graph.register_initializer(value)
    return value


def all_value_names(model: ir.Model) -> set[str]:
    names: set[str] = set()
    for graph in model.graphs():
        names.update(v.name for v in graph.inputs if v.name)
        names.update(graph.initializers)
        for node in graph:
            names.update(v.name for v in node.outputs if v.name)
    return names


def describe(value: ir.Value) -> str:
    producer = value.producer()
    where = f"{producer.op_type} {producer.name!r}" if producer is not None else "a graph input"
    return f"{value.name!r} ({where})"

