"""Streaming model I/O: a weightless graph, weights read from their files when used, outputs written tensor by tensor.

The pipeline never holds a model's weights.  ``read_skeleton(path)`` parses a model file
into a *skeleton*: a ModelProto whose every main-graph initializer of at least
``STREAM_MIN`` bytes is a *reference* (``data_location = EXTERNAL``, ``location``,
``offset``, ``length`` relative to the model's folder):
  * tensors already in external data keep their reference (smaller ones are read in, as
    ``onnx.load`` does);
  * tensors stored inside the ``.onnx`` file (``raw_data``) become references into the
    model file itself: the file is walked in protobuf wire format (ModelProto field 7 =
    graph, GraphProto field 5 = initializer, TensorProto field 9 = raw_data) through a
    read-only mmap, and only the bytes around the weights are copied and parsed.
A skeleton is an ordinary ModelProto: graph passes, shape inference and onnxruntime (with
``session.model_external_initializers_file_folder_path`` = the model's folder) read it as is.
Functions taking ``base`` take the model file the references are relative to.
Weights are read on demand:
  * ``LazyArray`` (``FileArray``: a range of a file; ``ComputedArray``: a function of other
    lazy arrays, e.g. a folded Transpose/Cast/DequantizeLinear chain): ``shape``, ``dtype``,
    ``size``, ``nbytes``, ``ndim``, ``T``, ``astype``, ``__array__``; every read returns a
    fresh array that is freed with its last user, so a planned layer's weight lives only
    while it is planned.  Pickling ships the values (a pool or cluster worker may not see
    the file).
  * ``import_graph(model, base)``: ``gs.import_onnx`` with every referenced initializer a
    ``StreamValues`` (a graphsurgeon ``LazyValues`` that reads the file); the exporter keeps
    the reference, so untouched weights are never loaded.
``write_model(model, out, base)`` writes a skeleton tensor by tensor (one ``CHUNK`` of a
referenced tensor in memory at a time), in one of two layouts:
  * total (the serialized size with every reference resolved) <= 2 GB: one ``.onnx`` file
    whose bytes equal ``materialize(model).SerializeToString()`` (fields are emitted in
    field-number order, as protobuf serializes them, with each reference's ``raw_data``
    spliced in at field 9);
  * above: the model file plus ``<name>.data`` holding every initializer of at least
    ``EXTERNAL_MIN`` bytes at ``ALIGN``-byte aligned offsets.
A referenced tensor that onnx had loaded from external data is written with
``data_location = DEFAULT`` set, as ``onnx.load_external_data_for_tensor`` leaves it; one
that was ``raw_data`` in the model file is written as it was, so the bytes equal an
in-memory run's.
"""
from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

STREAM_MIN = 4096        # initializers of at least this many bytes stay on disk while bfc works
EXTERNAL_MIN = 1024      # output above 2 GB: initializers of at least this many bytes go to <name>.data
ALIGN = 4096             # offsets of tensors in the output's data file (page size: mmap-able)
CHUNK = 16 << 20         # bytes copied at a time
PROTO_LIMIT = 2**31 - 1

_NUMPY = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64,
          TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
          TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.UINT32: np.uint32,
          TensorProto.INT64: np.int64, TensorProto.UINT64: np.uint64, TensorProto.BOOL: np.bool_}


# ---- protobuf wire format ----------------------------------------------------------------------

def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start: int, end: int):
    """(number, wire type, field start, value start, value end) of each field in ``buf[start:end]``."""
    pos = start
    while pos < end:
        fs = pos
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, ve = _varint(buf, pos)
            vs = pos
        elif wt == 1:
            vs, ve = pos, pos + 8
        elif wt == 2:
            n, vs = _varint(buf, pos)
            ve = vs + n
        elif wt == 5:
            vs, ve = pos, pos + 4
        else:
            raise ValueError(f"wire type {wt}")
        if num == 0 or ve > end:
            raise ValueError("truncated or malformed protobuf")
        yield num, wt, fs, vs, ve
        pos = ve


def _split(data: bytes, at: int) -> tuple[bytes, bytes]:
    """``data`` (a serialized message) cut into the fields numbered below ``at`` and the rest."""
    lo, hi = bytearray(), bytearray()
    for num, _wt, fs, _vs, ve in _fields(data, 0, len(data)):
        (lo if num < at else hi).extend(data[fs:ve])
    return bytes(lo), bytes(hi)


def _len_field(num: int, n: int) -> bytes:
    return _enc_varint((num << 3) | 2) + _enc_varint(n)


# ---- references ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataRef:
    path: Path
    offset: int
    length: int
    virtual: bool         # bytes of the model file itself (raw_data), not an external-data file


def is_ref(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def ref_of(t: TensorProto, base) -> DataRef:
    """Where a reference's bytes are; ``base`` is the model file the references are relative to (a
    reference to that file itself is one of its ``raw_data`` fields)."""
    base = Path(base)
    info = {e.key: e.value for e in t.external_data}
    loc = info.get("location", "")
    path = base.parent / loc
    offset = int(info.get("offset", 0) or 0)
    length = int(info["length"]) if info.get("length") else os.path.getsize(path) - offset
    return DataRef(path, offset, length, loc == base.name or loc == base.resolve().name)


def read_ref(ref: DataRef) -> bytes:
    with open(ref.path, "rb") as fh:
        fh.seek(ref.offset)
        data = fh.read(ref.length)
    if len(data) != ref.length:
        raise ValueError(f"{ref.path} ends before offset {ref.offset} + length {ref.length}")
    return data


def _set_ref(t: TensorProto, location: str, offset: int, length: int) -> None:
    t.ClearField("raw_data")
    del t.external_data[:]
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value=str(offset))
    t.external_data.add(key="length", value=str(length))


def _header(t: TensorProto, ref: DataRef) -> bytes:
    """``t`` as it is serialized with its data in ``raw_data``, without the raw_data field."""
    h = TensorProto()
    h.CopyFrom(t)
    del h.external_data[:]
    if ref.virtual:
        h.ClearField("data_location")
    else:
        h.data_location = TensorProto.DEFAULT       # as onnx.load_external_data_for_tensor leaves it
    return h.SerializeToString()


def resolve(t: TensorProto, base) -> None:
    """Read a reference's bytes into ``t.raw_data`` (in place)."""
    ref = ref_of(t, base)
    data = read_ref(ref)
    del t.external_data[:]
    if ref.virtual:
        t.ClearField("data_location")
    else:
        t.data_location = TensorProto.DEFAULT
    t.raw_data = data


def node_subgraphs(node: onnx.NodeProto):
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies), in attribute order."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


def graphs(g: onnx.GraphProto):
    """``g`` and every graph nested in it, depth first (main graph first): the one subgraph walk."""
    yield g
    for n in g.node:
        for sub in node_subgraphs(n):
            yield from graphs(sub)


def initializers(model: onnx.ModelProto):
    """Every initializer of every graph (main graph first)."""
    for g in graphs(model.graph):
        yield from g.initializer


def refs(model: onnx.ModelProto):
    return [t for t in initializers(model) if is_ref(t)]


def _inline_size(t: TensorProto, ref: DataRef) -> int:
    return len(_header(t, ref)) + 1 + len(_enc_varint(ref.length)) + ref.length


def proto_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model``, part by part (upb's ``ByteSize`` on a whole model serializes it
    into a transient buffer as large as the model; one tensor at a time keeps that small)."""
    g = model.graph
    parts = [g.initializer, g.sparse_initializer, g.node, g.input, g.output, g.value_info, model.functions,
             model.metadata_props, model.opset_import]
    return sum(x.ByteSize() + 8 for part in parts for x in part) + 64


def model_size(model: onnx.ModelProto, base=None) -> int:
    """``proto_size`` of the model with every reference resolved, subgraphs' included (its real size in
    memory, within the few bytes of the enclosing messages' length prefixes)."""
    size = proto_size(model)
    if base is not None:
        size += sum(_inline_size(t, ref_of(t, base)) - t.ByteSize() for t in refs(model))
    return size


def _data_bytes(model: onnx.ModelProto, base) -> int:
    """Bytes of every reference of every graph."""
    return sum(ref_of(t, base).length for t in refs(model)) if base is not None else 0


# ---- reading ------------------------------------------------------------------------------------

def read_skeleton(path) -> onnx.ModelProto:
    """The model at ``path`` with its big initializers as references (module doc); raises ValueError
    (malformed protobuf) or DecodeError."""
    path = Path(path)
    name = path.resolve().name               # a reference to the model's own bytes names the real file
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ValueError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            top, graphs = bytearray(), []
            for num, wt, fs, vs, ve in _fields(mm, 0, size):
                if num == 7 and wt == 2:
                    graphs.append((vs, ve))
                else:
                    top.extend(mm[fs:ve])
            model = onnx.ModelProto()
            model.ParseFromString(bytes(top))
            for gs_, ge in graphs:
                rest, inits = bytearray(), []
                for num, wt, fs, vs, ve in _fields(mm, gs_, ge):
                    if num == 5 and wt == 2:
                        inits.append((vs, ve))
                    else:
                        rest.extend(mm[fs:ve])
                model.graph.MergeFromString(bytes(rest))
                for vs, ve in inits:
                    t = model.graph.initializer.add()
                    raw, parts = None, bytearray()
                    for num, wt, fs, a, b in _fields(mm, vs, ve):
                        if num == 9 and wt == 2 and b - a >= STREAM_MIN:
                            raw = (a, b - a)
                        else:
                            parts.extend(mm[fs:b])
                    if raw is None:
                        t.ParseFromString(mm[vs:ve])
                    else:
                        t.ParseFromString(bytes(parts))
                        _set_ref(t, name, raw[0], raw[1])
    return model


def inline_small_refs(model: onnx.ModelProto, base) -> None:
    """External tensors under STREAM_MIN bytes are read in (shape constants stay visible to the
    shape inference and the folding of weight chains)."""
    for t in initializers(model):
        if is_ref(t) and ref_of(t, base).length < STREAM_MIN:
            resolve(t, base)


def materialize(model: onnx.ModelProto, base) -> onnx.ModelProto:
    """A copy of ``model`` with every reference read in (what ``onnx.load`` would give)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    if base is not None:
        for t in refs(out):
            resolve(t, base)
    return out


# ---- lazy arrays ---------------------------------------------------------------------------------

def _materialize(a):
    return a


class LazyArray:
    """A read-only array whose values are read when used (module doc); ``read()`` gives a fresh ndarray."""
    shape: tuple
    dtype: np.dtype

    def read(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def T(self) -> "LazyArray":
        return ComputedArray(lambda: self.read().T, tuple(self.shape[::-1]), self.dtype)

    def astype(self, dtype, *args, **kwargs) -> np.ndarray:
        return self.read().astype(dtype, *args, **kwargs)

    def __array__(self, dtype=None, copy=None):
        a = self.read()
        return a if dtype is None else a.astype(dtype)

    def all_finite(self) -> bool:
        return bool(np.isfinite(self.read()).all())

    def __reduce__(self):
        return (_materialize, (self.read(),))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


class FileArray(LazyArray):
    """``shape``/``dtype`` values (little-endian, C order) at ``offset`` of ``path``."""

    def __init__(self, path, offset: int, shape, dtype):
        self.path, self.offset, self.shape, self.dtype = Path(path), int(offset), tuple(shape), np.dtype(dtype)

    def read(self) -> np.ndarray:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            a = np.fromfile(fh, dtype=self.dtype.newbyteorder("<"), count=self.size)
        if a.size != self.size:
            raise ValueError(f"{self.path} ends inside a tensor (offset {self.offset}, {self.nbytes} bytes)")
        return a.astype(self.dtype, copy=False).reshape(self.shape)

    def all_finite(self) -> bool:
        if self.dtype.kind != "f":
            return True
        step = max(1, CHUNK // self.dtype.itemsize)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            for start in range(0, self.size, step):
                if not np.isfinite(np.fromfile(fh, dtype=self.dtype.newbyteorder("<"),
                                               count=min(step, self.size - start))).all():
                    return False
        return True


class ComputedArray(LazyArray):
    def __init__(self, fn, shape, dtype):
        self.fn, self.shape, self.dtype = fn, tuple(shape), np.dtype(dtype)

    def read(self) -> np.ndarray:
        return np.asarray(self.fn())


def file_array(t: TensorProto, base) -> FileArray | None:
    """A referenced tensor as a FileArray (None: not a reference, or a type numpy does not hold)."""
    if not is_ref(t) or base is None or t.data_type not in _NUMPY:
        return None
    ref = ref_of(t, base)
    return FileArray(ref.path, ref.offset, tuple(t.dims), _NUMPY[t.data_type])


def trim() -> None:
    """Collect garbage and hand freed heap memory back to the OS (glibc ``malloc_trim``; elsewhere a
    no-op): after a large temporary (an onnxruntime session, a layer's weight) the process's
    resident size falls back instead of staying at its high-water mark."""
    import gc
    gc.collect()
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


# ---- graphsurgeon -------------------------------------------------------------------------------

def _values_class():
    from onnx_graphsurgeon.ir.tensor import LazyValues

    class StreamValues(LazyValues):
        """graphsurgeon lazy values of a referenced initializer: ``load()`` reads the file."""

        def __init__(self, tensor, base):
            super().__init__(tensor)
            self.base = base

        def array(self) -> LazyArray | None:
            return file_array(self.tensor, self.base)

        def load(self):
            a = self.array()
            if a is not None:
                return a.read()
            t = TensorProto()
            t.CopyFrom(self.tensor)
            resolve(t, self.base)
            return np.array(onnx.numpy_helper.to_array(t))
    return StreamValues


_STREAM_VALUES = None


def stream_values_type():
    global _STREAM_VALUES
    if _STREAM_VALUES is None:
        _STREAM_VALUES = _values_class()
    return _STREAM_VALUES


def import_graph(model: onnx.ModelProto, base=None):
    """``gs.import_onnx(model)`` with every referenced initializer (all graphs) read lazily from ``base``."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.ir.tensor import LazyValues
    graph = gs.import_onnx(model)
    if base is None:
        return graph
    sv = stream_values_type()

    def visit(g):
        for t in g.tensors().values():
            if isinstance(t, gs.Constant) and type(t._values) is LazyValues and is_ref(t._values.tensor):
                t._values = sv(t._values.tensor, base)
        for node in g.nodes:
            for v in node.attrs.values():
                if isinstance(v, gs.Graph):
                    visit(v)
    visit(graph)
    return graph


def lazy_value(t):
    """A graphsurgeon Constant's values as a LazyArray when they are still on disk, else None."""
    v = getattr(t, "_values", None)
    sv = _STREAM_VALUES
    return v.array() if sv is not None and isinstance(v, sv) else None


# ---- checking -----------------------------------------------------------------------------------

def check_skeleton(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` on ``model`` with each reference replaced by a scalar of its type
    (the checker validates the graph, not the weights: those are bounds-checked by ``check_refs``)."""
    if not refs(model):
        onnx.checker.check_model(model)
        return
    probe = onnx.ModelProto()
    _probe(model, probe)
    onnx.checker.check_model(probe)


def _probe(model, probe):
    saved = []
    try:
        for t in refs(model):
            saved.append((t, TensorProto.FromString(t.SerializeToString())))
            one = np.zeros((), _NUMPY.get(t.data_type, np.uint8))
            del t.external_data[:]
            t.ClearField("data_location")
            del t.dims[:]
            t.raw_data = one.tobytes() if t.data_type in _NUMPY else b"\0"
        probe.CopyFrom(model)
    finally:
        for t, old in saved:
            t.CopyFrom(old)


def check_refs(model: onnx.ModelProto, base) -> None:
    """Every reference lies inside its file and holds as many bytes as its shape and type need;
    raises ValueError naming the tensor."""
    for t in refs(model):
        ref = ref_of(t, base)
        if not ref.path.is_file():
            raise ValueError(f"tensor {t.name!r} needs external data file {ref.path}, which is missing")
        if ref.offset < 0 or ref.length < 0 or ref.offset + ref.length > ref.path.stat().st_size:
            raise ValueError(f"tensor {t.name!r} reads bytes {ref.offset}..{ref.offset + ref.length} of {ref.path}, "
                             f"which has {ref.path.stat().st_size}")
        if t.data_type in _NUMPY:
            need = int(np.prod(t.dims, dtype=np.int64)) * np.dtype(_NUMPY[t.data_type]).itemsize
            if need != ref.length:
                raise ValueError(f"tensor {t.name!r} has shape {list(t.dims)} ({need} bytes) but its external data "
                                 f"holds {ref.length} bytes")


# ---- writing ------------------------------------------------------------------------------------

def _copy(dst, ref: DataRef) -> None:
    with open(ref.path, "rb") as src:
        src.seek(ref.offset)
        left = ref.length
        while left:
            buf = src.read(min(CHUNK, left))
            if not buf:
                raise ValueError(f"{ref.path} ends before offset {ref.offset} + length {ref.length}")
            dst.write(buf)
            left -= len(buf)


def _tensor_parts(t: TensorProto, base):
    """(prefix bytes, DataRef, suffix bytes, serialized length) of a referenced tensor written inline."""
    ref = ref_of(t, base)
    lo, hi = _split(_header(t, ref), 9)
    mid = _len_field(9, ref.length)
    return lo + mid, ref, hi, len(lo) + len(mid) + ref.length + len(hi)


def _write_graph(fh, g: onnx.GraphProto, base, write: bool):
    """Serialize ``g`` with its references inline (to ``fh`` when ``write``); returns its length.
    Only main-graph references are spliced; subgraph references were resolved by the caller."""
    shell = onnx.GraphProto()
    shell.CopyFrom(g) if not g.initializer else _shell(g, shell)
    lo, hi = _split(shell.SerializeToString(), 5)
    n = len(lo) + len(hi)
    if write:
        fh.write(lo)
    for t in g.initializer:
        if is_ref(t):
            pre, ref, post, size = _tensor_parts(t, base)
            n += len(_len_field(5, size)) + size
            if write:
                fh.write(_len_field(5, size))
                fh.write(pre)
                _copy(fh, ref)
                fh.write(post)
        else:
            data = t.SerializeToString()
            n += len(_len_field(5, len(data))) + len(data)
            if write:
                fh.write(_len_field(5, len(data)))
                fh.write(data)
    if write:
        fh.write(hi)
    return n


def _shell(g, shell):
    inits = list(g.initializer)
    del g.initializer[:]
    try:
        shell.CopyFrom(g)
    finally:
        g.initializer.extend(inits)


def _write_inline(fh, model: onnx.ModelProto, base) -> None:
    for g in list(graphs(model.graph))[1:]:      # subgraph references: small in practice, read in
        for t in g.initializer:
            if is_ref(t):
                resolve(t, base)
    top = onnx.ModelProto()
    g = model.graph
    _detach_graph(model, top)
    lo, hi = _split(top.SerializeToString(), 7)
    fh.write(lo)
    n = _write_graph(None, g, base, write=False)
    fh.write(_len_field(7, n))
    _write_graph(fh, g, base, write=True)
    fh.write(hi)


def _detach_graph(model, top):
    """``top`` = ``model`` without its graph (copied field by field, not through the graph)."""
    for f, v in model.ListFields():
        if f.name == "graph":
            continue
        if hasattr(v, "extend"):                # repeated (upb descriptors have no ``label``)
            getattr(top, f.name).extend(v)
        elif f.type == f.TYPE_MESSAGE:
            getattr(top, f.name).CopyFrom(v)
        else:
            setattr(top, f.name, v)


def write_model(model: onnx.ModelProto, out: Path, base, data_name: str | None = None,
                limit: int = PROTO_LIMIT) -> str | None:
    """Write ``model`` (a skeleton whose references are relative to ``base``) to ``out``; returns the
    name of the data file written beside it (in ``out``'s folder) or None (module doc).  ``model`` is
    changed: in the external layout its initializers become references into the new data file."""
    out = Path(out)
    total = model_size(model, base) + sum(ref_of(t, base).length for g in list(graphs(model.graph))[1:]
                                            for t in g.initializer if is_ref(t))
    if total <= limit:
        with open(out, "wb") as fh:
            _write_inline(fh, model, base)
        return None
    data_name = data_name or out.name + ".data"
    with open(out.parent / data_name, "wb") as dst:
        for t in initializers(model):
            if is_ref(t):
                ref = ref_of(t, base)
                if ref.length < EXTERNAL_MIN:
                    resolve(t, base)
                    continue
            elif not t.HasField("raw_data") or len(t.raw_data) < EXTERNAL_MIN:
                continue
            else:
                ref = None
            pad = (-dst.tell()) % ALIGN
            if pad:
                dst.write(b"\0" * pad)
            offset = dst.tell()
            if ref is not None:
                _copy(dst, ref)
                length = ref.length
            else:
                dst.write(t.raw_data)
                length = len(t.raw_data)
            _set_ref(t, data_name, offset, length)
    with open(out, "wb") as fh:
        fh.write(model.SerializeToString())
    return data_name
