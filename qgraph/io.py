"""Loading and saving ONNX models: the one place where qgraph touches model files.

qgraph is a stage in other people's pipelines, so it accepts a model in the
form the caller already has (a path, serialized bytes, an ``onnx.ModelProto``,
an ``onnx_ir.Model`` or an onnx-graphsurgeon ``Graph``) and gives the result
back in the same form (:func:`to_kind_of`). Inside, everything is an
``onnx_ir.Model``.

Three promises shape this module:

* **Weights stay on disk.** A model loaded from a path keeps its external data
  as ``onnx_ir.ExternalTensor`` (memory-mapped on first use), so loading a
  multi-GB model costs the size of its graph, not its weights. External data
  is validated at load time from file sizes only, never by reading it, so a
  bad file is reported as bad input at once instead of failing in the middle
  of a pass.
* **Bad input is named.** Every problem with the caller's input raises
  :class:`qgraph.errors.BadInputError` (CLI exit code 2) with the file, and
  the tensor where there is one, in the message. That includes truncated
  files: protobuf happily parses a prefix of a model that ends on a field
  boundary, so after parsing we check the graph is present and consistent.
  One truncation cannot be detected by anyone: a cut that only drops trailing
  ``metadata_props`` leaves a complete, valid model.
* **Saving is atomic and never eats the input.** Files are written into a
  temporary folder beside the destination and moved into place (data file
  first, model file last); on failure nothing is left behind and an existing
  destination is unchanged. Writing over a file the model still reads (its
  source file or an external-data file it maps lazily) is refused before
  anything is written.

A pass only sees a model, yet some targets want files beside it (a device
compiler's ``specializations.json``). A pass leaves such a file's text in
``model.metadata_props`` under ``qgraph.sidecar:<file name>`` (see
:data:`SIDECAR_PREFIX`); :func:`save` writes each one beside the model, in
the same atomic commit, and leaves those entries out of the saved model (the
files are the record; the in-memory model keeps them). Only a saved path gets
sidecar files: bytes and protos handed back in memory keep the entries as
metadata.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import stat
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from qgraph.errors import BadInputError, UnwritableOutputError
from qgraph.graph_stats import iter_nodes
from qgraph.graph_wellformed import (
    check_acyclic,
    check_default_domain_op,
    check_single_producers,
    check_tensor_size,
    check_versions,
    node_label,
)
from qgraph.inline_weights import weights_as_references, write_streamed
from qgraph.output_paths import same_file
from qgraph.staging import Staging, commit_lock

if TYPE_CHECKING:  # onnx-graphsurgeon is only imported when a gs.Graph is involved
    import onnx_graphsurgeon as gs

__all__ = [
    "AUTO_EXTERNAL_DATA_BYTES",
    "DATA_SUFFIX",
    "EXTERNAL_TENSOR_THRESHOLD_BYTES",
    "PAIR_KEY",
    "SIDECAR_PREFIX",
    "SOURCE_PATH_KEY",
    "ModelSource",
    "data_path_for",
    "files_read_by",
    "initializer_bytes",
    "load",
    "save",
    "sidecar_files",
    "to_bytes",
    "to_kind_of",
    "to_model_proto",
]

ModelSource = Union[
    str, "os.PathLike[str]", bytes, bytearray, memoryview, onnx.ModelProto, ir.Model, "gs.Graph"
]

#: The external data file of ``out.onnx`` is ``out.onnx.data`` (what the torch
#: exporter writes too), so a model and its weights are obviously a pair.
DATA_SUFFIX = ".data"

#: ``save(external_data=None)`` moves weights to external data once the
#: initializers total more than this. Protobuf cannot serialize a message over
#: 2 GiB, and the graph structure, names and small inline tensors count
#: towards that limit too, hence 128 MiB of headroom below 2 GiB.
#: Tests monkeypatch this to something tiny.
AUTO_EXTERNAL_DATA_BYTES = 2**31 - 2**27

#: When writing external data, tensors of at most this many bytes stay inside
#: the model file: shape constants and scalars are read by passes all the
#: time, and a separate mapped read for each would cost more than it saves.
EXTERNAL_TENSOR_THRESHOLD_BYTES = 1024

#: Protobuf's hard limit on one serialized message.
_PROTOBUF_LIMIT_BYTES = 2**31 - 1

#: Key in ``model.meta`` (in-memory only, never serialized) holding the
#: absolute path a model was loaded from, so :func:`save` can refuse to
#: overwrite it even when the caller forgets to pass ``protect``.
SOURCE_PATH_KEY = "qgraph.io.source_path"

#: ``model.metadata_props[SIDECAR_PREFIX + "name.json"] = text`` asks
#: :func:`save` to write ``name.json`` beside the model.
SIDECAR_PREFIX = "qgraph.sidecar:"

_DEFAULT_DOMAINS = ("", "ai.onnx")


# --------------------------------------------------------------------------- load


def load(source: ModelSource, *, base_dir: str | os.PathLike[str] | None = None) -> ir.Model:
    """Turn any supported model form into an ``onnx_ir.Model``.

    ``source`` may be a path (``str``/``PathLike``), serialized ``bytes``, an
    ``onnx.ModelProto``, an ``onnx_ir.Model`` (returned as is, unchecked) or an
    onnx-graphsurgeon ``Graph``. A path keeps its external data lazy, resolved
    against the model file's folder. For in-memory forms that reference
    external data, ``base_dir`` says which folder the locations are relative
    to; without it such a model is rejected, because its data cannot be found.

    A ``ModelProto`` is not copied: the returned model reads its tensor data
    from the proto (IR passes replace tensors rather than edit them, so the
    proto itself is never modified), and the caller should not mutate the
    proto while the model is in use.

    A node in a custom domain that neither ONNX, onnxruntime nor a function
    in the model defines gives a warning, not an error: a device runtime may
    implement it, but it is also what a file cut short before its functions
    looks like.

    Raises:
        BadInputError: the file is missing, unreadable, not ONNX, truncated or
            inconsistent, or its external data is missing, out of bounds or
            outside the model's folder.
    """
    if isinstance(source, ir.Model):
        return source
    if _is_gs_graph(source):
        import onnx_graphsurgeon as gs

        origin = f"onnx-graphsurgeon graph {source.name!r}"
        try:
            proto = gs.export_onnx(source)
        except Exception as error:  # gs raises a variety of types for bad graphs
            raise BadInputError(f"{origin}: cannot export it to ONNX: {error}") from error
        return _model_from_proto(proto, origin, base_dir)
    if isinstance(source, onnx.ModelProto):
        return _model_from_proto(source, "the given onnx.ModelProto", base_dir)
    if isinstance(source, (bytes, bytearray, memoryview)):
        origin = "the given bytes"
        return _model_from_proto(_parse(bytes(source), origin), origin, base_dir)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(Path(source))
    raise BadInputError(
        f"cannot load a model from a {type(source).__name__}: give a path, bytes, "
        "an onnx.ModelProto, an onnx_ir.Model or an onnx-graphsurgeon Graph"
    )


def _load_path(path: Path) -> ir.Model:
    # What ir.load does (parse without external data, deserialize, set the
    # tensors' base folder), with checks in between and an *absolute* base
    # folder: ir.load records os.path.dirname(path), which is "" for a bare
    # file name, so the lazy tensors would silently depend on the cwd.
    shown = os.fspath(path)
    try:
        data = _model_bytes(path)
    except FileNotFoundError:
        raise BadInputError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise BadInputError(f"{shown}: is a folder, not an ONNX file") from None
    except OSError as error:
        raise BadInputError(f"{shown}: cannot read it ({error.strerror or error})") from None
    absolute = os.path.abspath(path)
    model = _model_from_proto(_parse(data, shown), shown, os.path.dirname(absolute))
    model.meta[SOURCE_PATH_KEY] = absolute
    return model


def _model_bytes(path: Path) -> bytes:
    """The file's bytes, with large inline weights left in the file as references to it (read lazily).

    Only where the file can serve as its own external data: a regular file
    with one link (onnx_ir refuses to map others), in the folder it is named
    in (a symbolic link from elsewhere would point outside it).
    """
    info = os.stat(path)
    absolute = os.path.abspath(path)
    if (
        stat.S_ISREG(info.st_mode)
        and info.st_nlink == 1
        and os.path.dirname(os.path.realpath(absolute)) == os.path.dirname(absolute)
        and info.st_size > EXTERNAL_TENSOR_THRESHOLD_BYTES
    ):
        referenced = weights_as_references(path, EXTERNAL_TENSOR_THRESHOLD_BYTES)
        if referenced is not None:
            return referenced
    return path.read_bytes()


def _parse(data: bytes, origin: str) -> onnx.ModelProto:
    if not data:
        raise BadInputError(f"{origin}: is empty, not an ONNX model")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise BadInputError(
            f"{origin}: not an ONNX model, or the file is truncated or corrupt ({error})"
        ) from None
    return proto


def _model_from_proto(
    proto: onnx.ModelProto, origin: str, base_dir: str | os.PathLike[str] | None
) -> ir.Model:
    _check_structure(proto, origin)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # serde wraps many failure kinds; all mean a bad model
        raise BadInputError(f"{origin}: cannot read the model: {error}") from error
    _attach_external_data(model, origin, base_dir)
    _check_pair(model, origin)
    return model


# ------------------------------------------------------------- structure checks


def _check_structure(proto: onnx.ModelProto, origin: str) -> None:
    """Reject a parsed proto that is not a whole model.

    Protobuf parses any prefix that ends on a field boundary, so a truncated
    file can come back as a model without its graph, without its opset
    imports (they follow the graph on disk) or without its functions (they
    come last). Each of those leaves a visible hole: no graph, a node in a
    domain nothing imports, a name nothing defines. ONNX Runtime rejects all
    of them too, so this never refuses a model that could run.
    """
    truncated = "the file may be truncated"
    if not proto.HasField("graph"):
        raise BadInputError(f"{origin}: has no graph; not an ONNX model, or {truncated}")
    if proto.ir_version <= 0:
        raise BadInputError(f"{origin}: has no ir_version; not an ONNX model, or {truncated}")
    if not proto.opset_import:
        raise BadInputError(f"{origin}: imports no opset; {truncated}")
    check_versions(proto, origin)
    imported = {_normal_domain(o.domain) for o in proto.opset_import}
    functions = {(f.domain, f.name, f.overload) for f in proto.functions}
    function_domains = {domain for domain, _, _ in functions}
    default_opset = next((o.version for o in proto.opset_import if _normal_domain(o.domain) == ""), None)
    checker = _ConsistencyChecker(origin, functions, function_domains, default_opset)
    checker.check_graph(proto.graph, outer=frozenset(), imported=imported)
    for function in proto.functions:
        fn_imported = {_normal_domain(o.domain) for o in function.opset_import} or imported
        checker.check_function(function, fn_imported)
    checker.warn_unresolved()


def _normal_domain(domain: str) -> str:
    return "" if domain in _DEFAULT_DOMAINS else domain


@dataclass
class _ConsistencyChecker:
    """Checks that every name a node reads is defined and every domain imported."""

    origin: str
    functions: set[tuple[str, str, str]]
    function_domains: set[str]
    default_opset: int | None = None

    def __post_init__(self) -> None:
        self._unresolved: list[str] = []

    def check_graph(
        self, graph: onnx.GraphProto, *, outer: frozenset[str], imported: set[str]
    ) -> None:
        where = f"graph {graph.name!r}"
        check_single_producers(graph, self.origin, where)
        check_acyclic(graph, self.origin, where)
        for tensor in graph.initializer:
            check_tensor_size(tensor, self.origin, f"initializer {tensor.name!r} of {where}")
        defined = set(outer)
        defined.update(v.name for v in graph.input)
        defined.update(t.name for t in graph.initializer)
        defined.update(s.values.name for s in graph.sparse_initializer)
        for node in graph.node:
            defined.update(node.output)
        self._check_nodes(graph.node, defined, imported, where)
        for output in graph.output:
            if output.name not in defined:
                raise BadInputError(
                    f"{self.origin}: {where} outputs {output.name!r}, which nothing defines; "
                    "the file is corrupt or truncated"
                )

    def check_function(self, function: onnx.FunctionProto, imported: set[str]) -> None:
        where = f"function '{function.domain}::{function.name}'"
        defined = set(function.input)
        for node in function.node:
            defined.update(node.output)
        self._check_nodes(function.node, defined, imported, where)
        for output in function.output:
            if output not in defined:
                raise BadInputError(
                    f"{self.origin}: {where} outputs {output!r}, which nothing defines; "
                    "the file is corrupt or truncated"
                )

    def _check_nodes(
        self, nodes: Iterable[onnx.NodeProto], defined: set[str], imported: set[str], where: str
    ) -> None:
        # Names are checked against everything the graph defines, not only
        # what precedes the node: ordering is a pass's business (topological
        # sort), whereas an undefined name means data is missing.
        for index, node in enumerate(nodes):
            label = f"node {node.name!r} ({node.op_type})" if node.name else f"a {node.op_type} node"
            domain = _normal_domain(node.domain)
            if domain not in imported:
                raise BadInputError(
                    f"{self.origin}: {label} in {where} uses domain {node.domain!r}, which the "
                    "model does not import; the file is corrupt or truncated"
                )
            for name in node.input:
                if name and name not in defined:
                    raise BadInputError(
                        f"{self.origin}: {label} in {where} reads {name!r}, which no input, "
                        "initializer or node defines; the file is corrupt or truncated"
                    )
            self._note_unresolved(node, domain)
            if domain == "" and not where.startswith("function"):
                check_default_domain_op(node, index, self.default_opset, self.origin, where)
            for attr in node.attribute:
                if attr.HasField("t"):
                    check_tensor_size(attr.t, self.origin, f"attribute {attr.name!r} of {node_label(node, index)}")
                subgraphs = [attr.g] if attr.HasField("g") else list(attr.graphs)
                for subgraph in subgraphs:
                    self.check_graph(subgraph, outer=frozenset(defined), imported=imported)

    def _note_unresolved(self, node: onnx.NodeProto, domain: str) -> None:
        # A node in a custom domain with neither a schema nor a local function
        # is legitimate (a device runtime may implement it), so this is only a
        # warning -- but it is also exactly what a file cut short before its
        # functions looks like, and that must not pass silently.
        if domain == "" or (node.domain, node.op_type, node.overload) in self.functions:
            return
        if onnx.defs.has(node.op_type, domain) or (domain, node.op_type) in _runtime_ops():
            return
        self._unresolved.append(f"{node.domain}::{node.op_type}")

    def warn_unresolved(self) -> None:
        if self._unresolved:
            ops = ", ".join(sorted(set(self._unresolved)))
            warnings.warn(
                f"{self.origin}: calls {ops}, which is neither an ONNX op nor a function in "
                "the model; a runtime must provide it (if the file was cut short, its "
                "functions are missing)",
                stacklevel=4,
            )


@functools.cache
def _runtime_ops() -> frozenset[tuple[str, str]]:
    """Ops onnxruntime implements beyond the ONNX standard (com.microsoft, ...).

    Looked up only when a model uses an op onnx does not know, since building
    the list takes a few hundred milliseconds.
    """
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

        return frozenset((s.domain, s.name) for s in ort_state.get_all_operator_schema())
    except Exception:  # a build without schema export: simply warn more often
        return frozenset()


# ----------------------------------------------------------------- external data


@dataclass(frozen=True)
class _TensorSite:
    """A tensor in the model and a human-readable description of where it sits."""

    where: str
    tensor: ir.TensorProtocol


def _all_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its subgraphs, and the subgraphs inside function bodies."""
    yield from model.graphs()
    for function in model.functions.values():
        yield from function.subgraphs()


def _all_nodes(model: ir.Model) -> Iterator[tuple[ir.Node, str]]:
    """Every node (subgraphs included) with a label of the body it belongs to."""
    for node in iter_nodes(model.graph):
        yield node, ""
    for function in model.functions.values():
        label = f" in function '{function.domain}::{function.name}'"
        for node in iter_nodes(function):
            yield node, label


def _tensor_sites(model: ir.Model, *, described: bool = True) -> Iterator[_TensorSite]:
    """Every tensor stored in the model: initializers and tensor attributes.

    ``described=False`` leaves ``where`` empty: :func:`files_read_by` runs
    several times per command and reads only the tensors.
    """
    for graph in _all_graphs(model):
        scope = "" if graph is model.graph or not described else f" of subgraph {graph.name!r}"
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield _TensorSite(f"initializer {value.name!r}{scope}" if described else "", value.const_value)
    for node, label in _all_nodes(model):
        if not node.attributes:
            continue
        for name, attr in node.attributes.items():
            if attr.is_ref():
                continue
            tensors: list[ir.TensorProtocol] = []
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                tensors = [attr.value]
            elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
                tensors = list(attr.value)
            for tensor in tensors:
                yield _TensorSite(f"attribute {name!r} of node {node.name!r}{label}" if described else "", tensor)


def _attach_external_data(
    model: ir.Model, origin: str, base_dir: str | os.PathLike[str] | None
) -> None:
    """Point every external tensor at ``base_dir`` and check its bytes exist.

    Only ``stat`` is used, never a read: the point is to fail at load time on
    a file that cannot work while keeping the weights on disk.
    """
    sizes: dict[str, os.stat_result] = {}
    resolved: dict[str, str] = {}
    for site in _tensor_sites(model):
        tensor = site.tensor
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if base_dir is None:
            raise BadInputError(
                f"{origin}: {site.where} is stored in external data file "
                f"{os.fspath(tensor.location)!r}, but a model given in memory has no folder to "
                "find it in; load it from its path or pass base_dir"
            )
        base = os.path.abspath(base_dir)
        tensor.base_dir = base
        _check_external_tensor(tensor, site.where, origin, base, sizes, resolved)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normcase(path), os.path.normcase(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_external_tensor(
    tensor: ir.ExternalTensor,
    where: str,
    origin: str,
    base: str,
    stats: dict[str, os.stat_result],
    resolved: dict[str, str],
) -> None:
    location = os.fspath(tensor.location)
    prefix = f"{origin}: {where} reads external data {location!r}"
    if not location:
        raise BadInputError(f"{prefix}: the location is empty")
    # ONNX locations are relative to the model's folder; an absolute path or a
    # `..` escape would let a downloaded model read any file on the machine.
    if os.path.isabs(location) or Path(location).drive:
        raise BadInputError(
            f"{prefix}: an absolute path; ONNX requires a location relative to the model's folder"
        )
    path = os.path.normpath(os.path.join(base, location))
    if not _inside(path, base):
        raise BadInputError(f"{prefix}: it points outside the model's folder {base}")
    # Hundreds of tensors name one or two files: each path is resolved once per load (realpath
    # costs a system call per path component).
    for spelling in (path, base):
        if spelling not in resolved:
            resolved[spelling] = os.path.realpath(spelling)
    real = resolved[path]
    if not _inside(real, resolved[base]):
        raise BadInputError(
            f"{prefix}: a symbolic link to {real}, outside the model's folder {base}"
        )
    if real not in stats:
        try:
            stats[real] = os.stat(real)
        except FileNotFoundError:
            raise BadInputError(f"{prefix}: the data file {path} does not exist") from None
        except OSError as error:
            raise BadInputError(f"{prefix}: cannot stat {path} ({error.strerror})") from None
    info = stats[real]
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{prefix}: {path} is not a regular file")
    if info.st_nlink > 1:
        # onnx_ir refuses to map a data file with several hard links (a guard
        # against linking a sensitive file into the model folder); report it
        # now rather than when a pass first touches the weights.
        raise BadInputError(
            f"{prefix}: {path} has {info.st_nlink} hard links, which onnx_ir refuses to "
            "read; copy the file instead of hard-linking it"
        )
    offset = tensor.offset or 0
    try:
        needed = tensor.nbytes
    except Exception as error:  # e.g. a dtype that cannot be stored externally
        raise BadInputError(f"{prefix}: cannot size it ({error})") from None
    length = tensor.length
    if offset < 0 or (length is not None and length < 0):
        raise BadInputError(f"{prefix}: negative offset or length")
    if length is not None and length < needed:
        raise BadInputError(
            f"{prefix}: length {length} is smaller than the {needed} bytes its shape "
            f"{list(tensor.shape)} and dtype {tensor.dtype.name} need"
        )
    end = offset + (needed if length is None else length)
    if end > info.st_size:
        raise BadInputError(
            f"{prefix}: bytes {offset}..{end} are beyond the end of the {info.st_size}-byte "
            "data file (truncated, or the wrong file)"
        )


def files_read_by(model: ir.Model) -> set[Path]:
    """Files the model depends on: its source file and every external-data file.

    Paths are absolute with symbolic links resolved, so they compare equal
    however the caller spelled them. :func:`save` refuses to write over any of
    them: the lazily mapped data would change under the model's feet.
    """
    files: set[Path] = set()
    source = model.meta.get(SOURCE_PATH_KEY)
    if source:
        files.add(Path(os.path.realpath(source)))
    # Resolve each distinct spelling once: a model's hundreds of weights name one or two files,
    # and realpath costs a few system calls (it was a visible share of `qgraph optimize`).
    spellings = {site.tensor.path for site in _tensor_sites(model, described=False)
                 if isinstance(site.tensor, ir.ExternalTensor)}
    files.update(Path(os.path.realpath(spelling)) for spelling in spellings)
    return files


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of all initializers (subgraphs and functions included), from shapes only."""
    total = 0
    for graph in _all_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


# ------------------------------------------------------------ back to the caller


def _in_memory(tensor: ir.ExternalTensor) -> ir.Tensor:
    # Wraps the memory-mapped array, so serializing copies each weight once
    # (into the proto) instead of twice.
    return ir.Tensor(
        tensor.numpy(),
        dtype=tensor.dtype,
        name=tensor.name,
        doc_string=tensor.doc_string,
        metadata_props=dict(tensor.metadata_props) or None,
    )


@contextlib.contextmanager
def _external_tensors_inlined(
    model: ir.Model, *, initializers: bool = True, main_graph_initializers: bool = True
) -> Iterator[None]:
    """Temporarily replace external tensors with in-memory ones.

    The IR serializes an ``ExternalTensor`` as a reference to its location,
    which is only right next to the original data file. Anything that leaves
    that folder (bytes, a ModelProto, a save elsewhere) must carry the data.
    The model is restored afterwards, so it stays lazily backed.
    """
    swapped_values: list[tuple[ir.Value, ir.TensorProtocol]] = []
    swapped_attrs: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        if initializers:
            for graph in _all_graphs(model):
                if graph is model.graph and not main_graph_initializers:
                    continue  # the caller reads those itself (write_streamed)
                for value in graph.initializers.values():
                    tensor = value.const_value
                    if isinstance(tensor, ir.ExternalTensor):
                        swapped_values.append((value, tensor))
                        value.const_value = _in_memory(tensor)
        for node, _ in _all_nodes(model):
            for name, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    swapped_attrs.append((node, name, attr))
                    node.attributes[name] = ir.Attr(
                        name, attr.type, _in_memory(attr.value), doc_string=attr.doc_string
                    )
                elif attr.type == ir.AttributeType.TENSORS and any(
                    isinstance(t, ir.ExternalTensor) for t in attr.value
                ):
                    swapped_attrs.append((node, name, attr))
                    tensors = [
                        _in_memory(t) if isinstance(t, ir.ExternalTensor) else t for t in attr.value
                    ]
                    node.attributes[name] = ir.Attr(
                        name, attr.type, tensors, doc_string=attr.doc_string
                    )
        yield
    finally:
        for value, tensor in swapped_values:
            value.const_value = tensor
        for node, name, attr in swapped_attrs:
            node.attributes[name] = attr


def to_model_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize to a self-contained ``ModelProto`` (external data read and inlined)."""
    with _external_tensors_inlined(model):
        return ir.serde.serialize_model(model)


def to_bytes(model: ir.Model) -> bytes:
    """Serialize to self-contained protobuf bytes.

    Raises:
        BadInputError: the model exceeds protobuf's 2 GiB message limit; such
            a model can only be handed over as a path with external data.
    """
    proto = to_model_proto(model)
    size = proto.ByteSize()
    if size > _PROTOBUF_LIMIT_BYTES:
        raise BadInputError(
            f"the model needs {size} bytes, over protobuf's 2 GiB limit for one message; "
            "ask for a saved path instead of bytes (its weights then go to external data)"
        )
    return proto.SerializeToString()


def to_kind_of(
    model: ir.Model,
    like: ModelSource,
    *,
    output: str | os.PathLike[str] | None = None,
    external_data: bool | None = None,
) -> ir.Model | onnx.ModelProto | bytes | gs.Graph | Path:
    """Give ``model`` back in the form of ``like``, the caller's original input.

    bytes -> bytes, ModelProto -> ModelProto, onnx_ir.Model -> the model
    itself, gs.Graph -> gs.Graph. A path becomes a saved file: ``output`` is
    required and the result is ``save(model, output, external_data=...,
    protect=[like])``, so the input file can never be overwritten.
    """
    if isinstance(like, ir.Model):
        return model
    if isinstance(like, onnx.ModelProto):
        return to_model_proto(model)
    if isinstance(like, (bytes, bytearray, memoryview)):
        return to_bytes(model)
    if _is_gs_graph(like):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(to_model_proto(model))
    if isinstance(like, (str, os.PathLike)):
        if output is None:
            raise ValueError("a model that came from a path is given back as a file: pass output=")
        return save(model, output, external_data=external_data, protect=[like])
    raise TypeError(f"cannot give a model back as a {type(like).__name__}")


def _is_gs_graph(obj: Any) -> bool:
    # If onnx_graphsurgeon was never imported, obj cannot be one of its graphs;
    # checking sys.modules keeps gs off the import path of every other caller.
    gs_module = sys.modules.get("onnx_graphsurgeon")
    return gs_module is not None and isinstance(obj, gs_module.Graph)


# ------------------------------------------------------------------------- save


def data_path_for(path: str | os.PathLike[str]) -> Path:
    """The external data file :func:`save` writes beside ``path``: ``<name>.data``."""
    path = Path(path)
    return path.with_name(path.name + DATA_SUFFIX)


def save(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
    protect: Iterable[str | os.PathLike[str]] = (),
    extra_files: Mapping[str | os.PathLike[str], str] | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically and return the absolute path.

    ``external_data``: None decides by size (initializers above
    :data:`AUTO_EXTERNAL_DATA_BYTES`), True always writes ``<name>.data``
    beside the model (tensors over :data:`EXTERNAL_TENSOR_THRESHOLD_BYTES`),
    False writes everything into the one file (external tensors are read).
    The location recorded in the model is the data file's bare name.

    ``protect``: files that must not be overwritten (the caller's inputs);
    every file in :func:`files_read_by` is protected as well. Paths are
    compared after resolving links, so ``./a.onnx`` and ``a.onnx`` match.

    ``extra_files``: {path: text} written in the same commit (the CLI's
    ``--report``), in any existing folder; they are checked like the model's
    own files, so a report can never replace the model, its data or an input.

    The in-memory model is unchanged and stays valid: its tensors keep
    pointing at the files they were loaded from, which is why those cannot be
    overwritten.

    Sidecar files (:data:`SIDECAR_PREFIX` entries of ``metadata_props``)
    are written beside the model in the same commit and left out of the
    saved model's metadata.

    A data file ends with a random marker that the model records
    (:data:`PAIR_KEY`); :func:`load` refuses a model whose data file carries
    another one, so a model and data file from two different writes never
    load silently (renames of concurrent qgraph writers into one folder are
    also serialized, see ``qgraph.staging.commit_lock``).

    Raises:
        BadInputError: the folder does not exist, the destination is a
            folder, it would overwrite a protected file, two of the files
            written are one, a sidecar's name is not a plain file name, the
            model is too large for one file with ``external_data=False``, or
            the operating system refuses a write (the path is named).
            Nothing is written in any of these cases.
    """
    destination = Path(os.path.abspath(path))
    folder = destination.parent
    if not folder.is_dir():
        raise BadInputError(f"{os.fspath(path)}: the output folder {folder} does not exist")
    if destination.is_dir():
        raise BadInputError(f"{os.fspath(path)}: is a folder; give the path of an .onnx file")

    size = initializer_bytes(model)
    use_external = size > AUTO_EXTERNAL_DATA_BYTES if external_data is None else external_data
    if not use_external and size > AUTO_EXTERNAL_DATA_BYTES:
        raise BadInputError(
            f"{os.fspath(path)}: {size} bytes of weights do not fit in one protobuf file "
            "(2 GiB limit); save with external data"
        )
    data_path = data_path_for(destination)
    sidecars = sidecar_files(model)
    _check_sidecar_names(sidecars, destination, data_path)
    extras = {Path(os.path.abspath(p)): text for p, text in (extra_files or {}).items()}
    _refuse_overwriting_inputs(
        model, destination, data_path if use_external else None, protect, [folder / n for n in sidecars]
    )
    _refuse_colliding_outputs(destination, data_path, [folder / n for n in sidecars], extras, protect, model)

    # Staging folders beside each destination: same filesystem, so the final
    # os.replace is atomic, and the files inside already carry their final
    # base names, which ir.save records as the external-data location.
    stagings: dict[Path, Staging] = {}
    try:
        staging = _staging_for(stagings, folder, destination.name, path)
        staged_model = staging / destination.name
        staged_data = staging / data_path.name
        pair_marker = _new_pair_marker() if use_external else None
        try:
            with _sidecars_left_out(model), _pair_recorded(model, pair_marker):
                _write_model_file(model, staged_model, data_path, use_external)
        except ValueError as error:
            if "protobuf" in str(error) or "2GB" in str(error):
                raise BadInputError(
                    f"{os.fspath(path)}: the model does not fit in one protobuf file "
                    f"({error}); save with external data"
                ) from error
            raise
        except OSError as error:
            raise _unwritable(destination, error) from None
        _fsync(staged_model)
        # ir.save creates the data file even when no tensor is large enough
        # to go there; an empty file referenced by nothing is not installed.
        has_data = use_external and staged_data.exists() and staged_data.stat().st_size > 0
        if has_data:
            _append_pair_marker(staged_data, pair_marker)
            _fsync(staged_data)
        companions = [(staged_data, data_path)] if has_data else []
        texts = [(folder / name, text) for name, text in sidecars.items()] + list(extras.items())
        for final, text in texts:
            box = _staging_for(stagings, final.parent, final.name, final) / ".files"
            box.mkdir(exist_ok=True)
            staged = box / final.name
            try:
                staged.write_text(text, encoding="utf-8")
            except OSError as error:
                raise _unwritable(final, error) from None
            _fsync(staged)
            companions.append((staged, final))
        with commit_lock([folder] + [final.parent for _, final in companions]):
            _commit(staged_model, destination, companions)
    finally:
        for box in stagings.values():
            box.close()
    return destination


def _staging_for(stagings: dict[Path, Staging], folder: Path, name: str, shown: object) -> Path:
    """The staging folder of this save in ``folder`` (made on first use)."""
    if folder not in stagings:
        try:
            stagings[folder] = Staging(folder, name)
        except OSError as error:
            raise _unwritable(Path(os.fspath(shown)), error) from None
    return stagings[folder].path


def _unwritable(path: Path, error: OSError) -> UnwritableOutputError:
    reason = error.strerror or str(error)
    return UnwritableOutputError(f"{path}: cannot write it ({reason}); nothing was written")


#: ``metadata_props`` key of a saved model: the marker its data file ends with.
PAIR_KEY = "qgraph.external_data_pair"
_PAIR_TRAILER = b"\nqgraph-external-data-pair:"


def _new_pair_marker() -> str:
    return secrets.token_hex(16)


@contextlib.contextmanager
def _pair_recorded(model: ir.Model, marker: str | None) -> Iterator[None]:
    previous = model.metadata_props.pop(PAIR_KEY, None)
    if marker is not None:
        model.metadata_props[PAIR_KEY] = marker
    try:
        yield
    finally:
        model.metadata_props.pop(PAIR_KEY, None)
        if previous is not None:
            model.metadata_props[PAIR_KEY] = previous


def _append_pair_marker(data_file: Path, marker: str | None) -> None:
    # Bytes after the last tensor are never read: offsets and lengths say
    # where each tensor is, so onnxruntime and onnx ignore the trailer.
    with open(data_file, "ab") as handle:
        handle.write(_PAIR_TRAILER + (marker or "").encode("ascii"))


def _check_pair(model: ir.Model, origin: str) -> None:
    """Refuse a model whose external data file was written together with another model."""
    marker = model.metadata_props.pop(PAIR_KEY, None)
    if marker is None:
        return
    expected = _PAIR_TRAILER + marker.encode("ascii")
    for site in _tensor_sites(model):
        tensor = site.tensor
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        data_file = tensor.path
        try:
            with open(data_file, "rb") as handle:
                handle.seek(max(0, os.fstat(handle.fileno()).st_size - len(expected)))
                trailer = handle.read()
        except OSError as error:
            raise BadInputError(f"{origin}: cannot read {data_file} ({error.strerror})") from None
        # No marker at all: another tool (onnx.save, onnx_ir.save) wrote this pair and kept our metadata;
        # only a marker of another qgraph write proves the files are from two writes.
        if trailer != expected and trailer.startswith(_PAIR_TRAILER):
            raise BadInputError(
                f"{origin}: its external data file {data_file} is not the one written with it "
                "(another write replaced one file of the pair); write the model again"
            )
        return  # qgraph writes one data file per model


def sidecar_files(model: ir.Model) -> dict[str, str]:
    """The files a pass asked :func:`save` to write beside the model: {file name: text}."""
    return {
        key[len(SIDECAR_PREFIX) :]: text
        for key, text in model.metadata_props.items()
        if key.startswith(SIDECAR_PREFIX)
    }


def _check_sidecar_names(sidecars: dict[str, str], destination: Path, data_path: Path) -> None:
    for name in sidecars:
        if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).name != name:
            raise BadInputError(
                f"sidecar file {name!r} (metadata key {SIDECAR_PREFIX + name!r}): "
                "not a plain file name; a sidecar is written beside the model"
            )
        if name in (destination.name, data_path.name):
            raise BadInputError(
                f"sidecar file {name!r} would overwrite the model or its data file {destination.parent / name}"
            )


@contextlib.contextmanager
def _sidecars_left_out(model: ir.Model) -> Iterator[None]:
    """Serialize without the sidecar entries; the in-memory model keeps them."""
    kept = {k: v for k, v in model.metadata_props.items() if k.startswith(SIDECAR_PREFIX)}
    for key in kept:
        del model.metadata_props[key]
    try:
        yield
    finally:
        model.metadata_props.update(kept)


def _write_model_file(model: ir.Model, staged_model: Path, data_path: Path, use_external: bool) -> None:
    if use_external:
        # ir.save externalizes initializers (and restores the model's own
        # tensors afterwards) but leaves external tensor *attributes* as
        # references to their old location.
        with _external_tensors_inlined(model, initializers=False):
            ir.save(
                model,
                staged_model,
                format="protobuf",
                external_data=data_path.name,
                size_threshold_bytes=EXTERNAL_TENSOR_THRESHOLD_BYTES,
            )
    else:
        # Weights mapped from files are streamed into the new file one at a
        # time rather than gathered in one proto (see qgraph.inline_weights).
        with _external_tensors_inlined(model, main_graph_initializers=False):
            write_streamed(model, staged_model, EXTERNAL_TENSOR_THRESHOLD_BYTES)


def _refuse_overwriting_inputs(
    model: ir.Model,
    destination: Path,
    data_path: Path | None,
    protect: Iterable[str | os.PathLike[str]],
    sidecars: Iterable[Path] = (),
) -> None:
    guarded = [(Path(p), "an input of this run") for p in protect]
    guarded += [(p, "a file the model reads") for p in sorted(files_read_by(model))]
    targets = [destination] + ([data_path] if data_path is not None else []) + list(sidecars)
    for target in targets:
        for guarded_path, why in guarded:
            if same_file(target, guarded_path):
                role = (
                    "output" if target == destination
                    else "output's external data file" if target == data_path
                    else "output's sidecar file"
                )
                raise BadInputError(
                    f"refusing to write {target}: the {role} is the same file as {guarded_path}, "
                    f"{why}; write to another path"
                )


def _refuse_colliding_outputs(
    destination: Path,
    data_path: Path,
    sidecars: list[Path],
    extras: dict[Path, str],
    protect: Iterable[str | os.PathLike[str]],
    model: ir.Model,
) -> None:
    """No extra file may be an input or one of the model's own files (data file reserved even when unused)."""
    own = [(destination, "the output model"), (data_path, "the output's external data file")]
    own += [(p, "a sidecar file of the output") for p in sidecars]
    guarded = [(Path(p), "an input of this run") for p in protect]
    guarded += [(p, "a file the model reads") for p in sorted(files_read_by(model))]
    listed: list[Path] = []
    for extra in extras:
        for other, what in own + guarded + [(p, "another file of this save") for p in listed]:
            if same_file(extra, other):
                raise BadInputError(f"refusing to write {extra}: it is {what} ({other}); write to another path")
        if not extra.parent.is_dir():
            raise BadInputError(f"{extra}: the folder {extra.parent} does not exist")
        if extra.is_dir():
            raise BadInputError(f"{extra}: is a folder; give the path of a file")
        listed.append(extra)


def _commit(
    staged_model: Path,
    destination: Path,
    companions: list[tuple[Path, Path]],
) -> None:
    """Move the staged files into place: companions (data, sidecars, report) first, model last.

    The model file is what readers open, so it changes last; if any rename
    fails, the companions already replaced are put back (or removed where
    there were none) and the failure is reported naming the path. Each
    backup is a hard link in the companion's own staging folder.
    """
    restore: list[tuple[Path | None, Path]] = []  # (backup or None if it did not exist, final path)
    current = destination
    try:
        for index, (staged, final) in enumerate(companions):
            current = final
            backup: Path | None = None
            if final.exists():
                backup = staged.parent / f".previous-{index}"
                try:
                    os.link(final, backup)
                except OSError:  # filesystem without hard links: no rollback possible
                    backup = staged.parent / ".no-backup"
            os.replace(staged, final)
            restore.append((backup, final))
        current = destination
        os.replace(staged_model, destination)
    except BaseException as error:
        for backup, final in reversed(restore):
            if backup is None:
                with contextlib.suppress(OSError):
                    os.remove(final)
            elif backup.exists():
                os.replace(backup, final)
        if isinstance(error, OSError):
            raise _unwritable(current, error) from None
        raise
    for folder in {destination.parent} | {final.parent for _, final in companions}:
        _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk so a crash cannot expose half a model."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders cannot be opened on Windows; durability is best effort there
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
