"""Weights on disk handed to onnxruntime once per process, shared by every session that reads them.

Why: a verification runs the model before and after a pass side by side,
and ``--verify`` does so after every pass. Left to itself, onnxruntime
gives each session its own copy of every weight -- it maps or reads the
external data per session, and prepacks each MatMul weight into a private
buffer -- so a 652 MB model held two or three copies at once (2.1 GB for
``optimize --passes rmsnorm attention --verify``).

Instead, each weight that lies in a file (``ir.ExternalTensor``, which is
also how qgraph loads the weights of an inline model) is mapped once,
wrapped in one ``OrtValue`` and given to every session as an initializer
(``SessionOptions.add_initializer``): onnxruntime then uses those bytes in
place, and the pages are counted once however many sessions read them.
Prepacking is off for verification sessions, since a prepacked copy is
exactly the duplicate being avoided; the GEMM then packs its operand per
run, which on verification's small inputs costs little.

Two files often hold the same weights (``qgraph check IN.onnx OUT.onnx``
compares a model with its own rewrite): a weight whose dtype and shape
match one already mapped from another file is compared by a digest of its
bytes -- read with ordinary file reads, which leave the pages in the page
cache rather than in the process -- and the same bytes are shared.

A mapped weight lives as long as a session that reads it: sessions hold
the :class:`SharedWeight` objects, and the process-wide tables only refer
to them weakly.
"""

from __future__ import annotations

import hashlib
import os
import weakref

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

__all__ = ["SharedWeight", "share_external_weights"]

#: Smaller weights are not worth an entry; onnxruntime reads them as usual.
MIN_SHARED_BYTES = 64 * 1024


_READ_BLOCK = 8 << 20


def _file_digest(path: str, offset: int, length: int) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(_READ_BLOCK, length))
            if not block:
                break
            h.update(block)
            length -= len(block)
    return h.digest()


class SharedWeight:
    """One mapped weight and the OrtValue that wraps it (the array must outlive every session using it)."""

    def __init__(self, array: np.ndarray, path: str, offset: int, length: int) -> None:
        self.array = array
        self.value = ort.OrtValue.ortvalue_from_numpy(array)
        self._where = (path, offset, length)
        self._digest: bytes | None = None

    @property
    def digest(self) -> bytes:
        if self._digest is None:
            self._digest = _file_digest(*self._where)
        return self._digest


_BY_LOCATION: weakref.WeakValueDictionary[tuple, SharedWeight] = weakref.WeakValueDictionary()
_BY_FORM: dict[tuple, weakref.WeakSet[SharedWeight]] = {}


def _location(tensor: ir.ExternalTensor) -> tuple[str, int, int]:
    return os.path.realpath(os.fspath(tensor.path)), tensor.offset or 0, tensor.nbytes


def _shared(tensor: ir.ExternalTensor) -> SharedWeight:
    """The mapped weight holding ``tensor``'s bytes: by location, else by content among weights of its form."""
    where = _location(tensor)
    form = (int(tensor.dtype), tuple(tensor.shape.numpy()))
    key = (*where, *form)
    found = _BY_LOCATION.get(key)
    if found is None:
        same_form = _BY_FORM.setdefault(form, weakref.WeakSet())
        if len(same_form):
            digest = _file_digest(*where)
            found = next((w for w in list(same_form) if w.digest == digest), None)
        if found is None:
            found = SharedWeight(np.asarray(tensor.numpy()), *where)
            same_form.add(found)
        _BY_LOCATION[key] = found
    return found


def _numpy_native(dtype: ir.DataType) -> bool:
    """Types the onnxruntime binding wraps without conversion (not bfloat16, fp8 or packed 4-bit)."""
    try:
        return np.dtype(dtype.numpy()).kind in "fiub" and dtype.bitwidth >= 8 and dtype not in (
            ir.DataType.BFLOAT16, ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT8E4M3FNUZ,
            ir.DataType.FLOAT8E5M2, ir.DataType.FLOAT8E5M2FNUZ,
        )
    except (TypeError, ValueError):
        return False


def share_external_weights(model: ir.Model, options: ort.SessionOptions) -> list[SharedWeight]:
    """Give ``options`` every large main-graph weight of ``model`` that lies in a file, mapped once.

    Returns the weights the session will read: the caller keeps them for
    as long as the session lives. The caller's options must have prepacking
    off (``qgraph.verify.runner`` turns it off for every session), or each
    session would still keep a packed copy of every MatMul weight.
    """
    graph_inputs = {v.name for v in model.graph.inputs}
    used: list[SharedWeight] = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if (not isinstance(tensor, ir.ExternalTensor) or name in graph_inputs
                or tensor.nbytes < MIN_SHARED_BYTES or not _numpy_native(tensor.dtype)):
            continue
        shared = _shared(tensor)
        options.add_initializer(name, shared.value)
        used.append(shared)
    return used
