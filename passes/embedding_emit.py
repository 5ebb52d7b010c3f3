"""Graph emission of quantized embedding tables (``bfc.quant.embedding.QuantizedEmbedding``) in place of
``Gather(table, indices)`` (axis 0, indices int32/int64 of any rank, negative ones counted from the end).

Both emitters compute ``form.dequantized()[indices]`` exactly (the scales' type, then one Cast to the
builder's float type when it differs) and read the stored tensors directly: no float table is ever
materialized, so onnxruntime's resident bytes equal the file bytes (``QuantizedEmbedding.resident_nbytes``).

ort (``emit_ort``): one ``com.microsoft.GatherBlockQuantized(codes, indices, scales[, zero_points])``
  with ``bits`` 8, 4 or 2, ``block_size`` B, ``gather_axis`` 0, ``quantize_axis`` 1, on the form's uint8
  codes as stored (4 bits: two per byte, low nibble first; 2 bits: four per byte, element 4j + i in bits
  2i..2i+1 of byte j, least significant first: byte 0b11100100 reads levels 0, 1, 2, 3).  onnxruntime
  1.32's CPU kernel computes ``T2(float(u - z) * float(s))`` with T2 the scales' type (float32 or float16;
  that is the output type), z = the zero point, or 2^(bits-1) when none is given (uint8 data): the form's
  symmetric level.
  Constraints found by probing onnxruntime 1.32 (CPU):
    * uint8 data: bits 2, 4 or 8 (bfc uses all three; default zero point 2^(bits-1): 128, 8, 2, checked
      by the probe); gather_axis must be 0 and quantize_axis the last axis; int4/uint4 data (ONNX
      INT4/UINT4): bits 4 only, default zero point 0 (not used here).
    * block_size: a power of two >= 16 (8 and 48 are refused at session creation); a block may be longer
      than the row (D = 384 with block_size 512 is one scale per row), so a per-row form always fits;
      other block sizes (e.g. 48, 96) return a reason (``ort_support``).
    * scales float32 or float16 (bfloat16 not on CPU); zero points uint8, shape of the scales at 8 bits,
      (V, ceil(n_blocks / 2)) nibbles at 4 bits, (V, ceil(n_blocks / 4)) at 2 bits packed like the codes
      (unpacked (V, n_blocks) zero points at 2 bits: "scales and zero_points shape does not match").
    * indices int32 or int64, any rank (a scalar gives (D,)); out-of-range indices give zero rows
      (standard Gather fails instead).
    * domain com.microsoft version 1; any default-domain opset (tested 13 and 21).
  Availability is probed once per process (``ort_support``): a 2-row model per (bits, scale type, zero
  points) must load and reproduce ``dequantized``; otherwise the reason says why.

portable (``emit_portable``): standard ops, Gather first, then the dequantization of the gathered rows:
    g  = Gather(codes, idx)                  (..., n_blocks, B) or (..., D) when n_blocks = 1
    4 bits: lo = BitwiseAnd(g, 15) (opset >= 18; below: BitShift left then right by 4), hi = g >> 4,
            g = Concat(lo, hi, axis=-1)      the codes are re-packed at emit time so that byte j of a
                                             block holds level j (low) and level j + B/2 (high): the same
                                             bytes as the ort layout, no interleave nodes
    2 bits: g = Concat(g << 6, g << 4, g << 2, g, axis=-1) >> 6    (BitShift on uint8 only, any opset;
                                             byte j of a block holds levels j, j + B/4, j + B/2, j + 3B/4
                                             from the low bits up: 5 nodes, vs 6 for the And/shift pairs;
                                             codes stored (V, nb, 1, B/4) shifted by a (4, 1) constant
                                             instead (2 nodes, no Concat) measured 1409 vs 924 us at B = 32:
                                             onnxruntime's broadcast BitShift is slow)
    f  = Cast(g, float32)  [- z]             z: int8 codes make the symmetric 8-bit zero level free (u - 128
                                             stored as int8), 4 bits Sub 8, 2 bits Sub 2, and asymmetric forms
                                             Gather their zero points (4- and 2-bit ones packed the same split
                                             way across blocks, Slice when n_blocks is not a multiple of 2 / 4)
    y  = f * Cast(Gather(scales, idx), float32)    scales stored (V, n_blocks, 1) (or (V, 1)); the Cast only
                                             for float16 scales, after the Gather (nothing is folded at load)
    y  = Reshape(y, [0]*rank + [D])          n_blocks > 1 only (Shape/Concat when the rank is unknown)
    y  = Cast(y, float16)                    float16 scales: the form's rounding (see its module doc), then
                                             a Cast to the builder's type if that is float32
  The arithmetic is float32 on purpose: onnxruntime's CPU has no float16 Mul; it inserts Casts around a
  float16 Mul and then merges "precision free" Cast pairs, dropping the float16 rounding of the product
  when a Cast to float32 follows (measured: not bit-exact).  An explicit float32 -> float16 -> float32
  Cast pair after a float32 Mul is kept (bit-exact, all optimization levels; the tests check it).
  Nodes: 4 (8-bit symmetric, float32 scales, one per row; 7 with float16 scales in a float32 graph) to 18
  (4-bit asymmetric, float16 scales, odd n_blocks) and 22 (2-bit asymmetric, float16 scales, n_blocks not
  a multiple of 4; 2-bit symmetric: 10 to 14); ops Gather, Cast, Mul,
  Sub, Reshape, BitShift (11), Concat, Slice, BitwiseAnd (18, optional): minimum opset ``PORTABLE_MIN_OPSET``.
  Chosen over DequantizeLinear(block_size, opset 21) -> Gather by measurement on 30522 x 384 int8,
  B = 32 (onnxruntime 1.32, one thread, indices 8 x 128; RSS after session creation / after one run,
  minus a trivial session's):
    DequantizeLinear -> Gather                13.6 MB / 66.3 MB   15.2 ms per run (whole table each run)
    Gather, Gather -> DequantizeLinear(21)    13.5 MB / 15.7 MB    548 us
    Gather, Gather -> Cast, Mul, Reshape      13.6 MB / 17.6 MB    386 us   <- emitted (also opset 13)
    GatherBlockQuantized (ort)                13.5 MB / 15.4 MB    290 us   (4 bits: 7.7 MB, 460 us)
    fp32 Gather                               47.1 MB / 48.8 MB    156 us
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import UnsupportedError
from bfc.passes.graph_builder import GraphBuilder
from bfc.quant.embedding import QuantizedEmbedding, pack_levels, per_byte
from bfc.quant.formats import format_of_dtype

DOMAIN = "com.microsoft"
PORTABLE_MIN_OPSET = 13
BITWISE_AND_OPSET = 18
INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))
FLOAT = 1                     # onnx.TensorProto.FLOAT


# ----------------------------------------------------------------------------------------------- sites
def gather_reason(node: gs.Node, form: QuantizedEmbedding | None = None) -> str | None:
    """None when ``node`` is a Gather that the emitters can replace (constant 2-D float table read along
    axis 0, int32/int64 indices), else why not."""
    if node.op != "Gather":
        return f"node {node.name!r} is {node.op}, not Gather"
    if not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return f"Gather {node.name!r} reads a computed tensor, not a constant table"
    table = node.inputs[0]
    shape = tuple(table.shape)
    if len(shape) != 2:
        return f"Gather {node.name!r} reads a rank-{len(shape)} table {table.name!r} {list(shape)}; only 2-D tables"
    if not np.issubdtype(np.dtype(table.dtype), np.floating):
        return f"Gather {node.name!r} reads a {np.dtype(table.dtype)} table {table.name!r}; only float tables"
    axis = int(node.attrs.get("axis", 0))
    if axis not in (0, -2):
        return f"Gather {node.name!r} reads table {table.name!r} along axis {axis}; only axis 0 (rows)"
    idx = node.inputs[1] if len(node.inputs) > 1 else None
    if idx is None or (idx.dtype is not None and np.dtype(idx.dtype) not in INDEX_TYPES):
        return f"Gather {node.name!r} has indices of type {None if idx is None else idx.dtype}; need int32/int64"
    if form is not None and tuple(form.shape) != shape:
        return f"Gather {node.name!r} table {table.name!r} is {list(shape)}, the form is {list(form.shape)}"
    return None


def _rank(indices) -> int | None:
    shape = getattr(indices, "shape", None)
    if isinstance(indices, gs.Constant):
        return np.asarray(indices.values).ndim
    return None if shape is None else len(shape)


def _flatten_tail(b: GraphBuilder, y, indices, rank: int | None, d: int, dtype):
    """(..., n_blocks, B) -> (..., D)."""
    if rank is not None:
        return b.op("Reshape", [y, b.const("shape", np.array([0] * rank + [d], np.int64))], dtype=dtype)
    lead = b.op("Shape", [indices], dtype=np.int64)
    tgt = b.op("Concat", [lead, b.const("d", np.array([d], np.int64))], {"axis": 0}, dtype=np.int64)
    return b.op("Reshape", [y, tgt], dtype=dtype)


def _to_builder_type(b: GraphBuilder, y, sdt: np.dtype):
    return y if sdt == b.dtype else b.cast(y, b.dtype, format_of_dtype(b.dtype).onnx_type)


# ------------------------------------------------------------------------------------------------- ort
def ort_block_size(form: QuantizedEmbedding) -> int | None:
    """GatherBlockQuantized's ``block_size`` for the form (a power of two >= 16), or None."""
    bs, d = form.block_size, form.shape[1]
    if bs >= 16 and bs & (bs - 1) == 0:
        return bs
    if form.n_blocks == 1:                        # one block per row: any longer power of two
        return 1 << max(4, (d - 1).bit_length())
    return None


@cache
def _probe_ort(bits: int, scale_dtype: str, with_zero_points: bool) -> str | None:
    """Run a 2 x 32 table through GatherBlockQuantized in the installed onnxruntime."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:                       # pragma: no cover - both are dependencies
        return f"onnxruntime is not importable ({e})"
    rng = np.random.default_rng(0)
    v, d, bs = 3, 32, 16
    u = rng.integers(0, 1 << bits, (v, d)).astype(np.uint8)
    codes = pack_levels(u, bits)
    sdt = np.dtype(scale_dtype)
    zp = rng.integers(0, 1 << bits, (v, d // bs)).astype(np.uint8) if with_zero_points else None
    form = QuantizedEmbedding((v, d), bits, bs, codes, (rng.standard_normal((v, d // bs)) * 0.1).astype(sdt), zp)
    inits = [numpy_helper.from_array(form.codes, "q"), numpy_helper.from_array(form.scales, "s")]
    ins = ["q", "i", "s"]
    if zp is not None:
        inits.append(numpy_helper.from_array(form.zero_points_packed, "z"))
        ins.append("z")
    node = helper.make_node("GatherBlockQuantized", ins, ["y"], domain=DOMAIN, bits=bits, block_size=bs,
                            gather_axis=0, quantize_axis=1)
    out_t = TensorProto.FLOAT if sdt == np.float32 else TensorProto.FLOAT16
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("i", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", out_t, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid(DOMAIN, 1)])
    idx = np.array([2, 0, -1], np.int64)
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"i": idx})[0]
    except Exception as e:  # noqa: BLE001 - any failure means "not available", with its message
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        return (f"onnxruntime {ort.__version__} has no usable com.microsoft.GatherBlockQuantized for {bits}-bit "
                f"uint8 data with {sdt} scales{' and zero points' if zp is not None else ''}: {msg}")
    ref = form.dequantized(sdt)[idx]
    if y.shape != ref.shape or not np.array_equal(y.view(np.uint8), ref.view(np.uint8)):
        return (f"onnxruntime {ort.__version__}'s GatherBlockQuantized ({bits} bits, {sdt} scales) does not compute "
                "bfc's dequantized table (different zero-point or packing convention); use the portable target")
    return None


def ort_support(form: QuantizedEmbedding) -> str | None:
    """None when ``emit_ort`` can emit ``form`` in the installed onnxruntime, else the reason."""
    if ort_block_size(form) is None:
        return (f"GatherBlockQuantized needs block_size a power of two >= 16 (or one block per row); the form's "
                f"block_size is {form.block_size} for rows of {form.shape[1]}: choose 16, 32, 64, 128 or the row length")
    return _probe_ort(form.bits, str(form.scale_dtype), not form.symmetric)


@dataclass(frozen=True)
class OrtTensors:
    codes: gs.Constant
    scales: gs.Constant
    zero_points: gs.Constant | None
    attrs: dict


def ort_tensors(b: GraphBuilder, form: QuantizedEmbedding) -> OrtTensors:
    """The form's initializers for GatherBlockQuantized (create once per graph, share among its Gathers)."""
    reason = ort_support(form)
    if reason is not None:
        raise UnsupportedError(reason)
    z = form.zero_points_packed
    return OrtTensors(b.const("emb_codes", form.codes), b.const("emb_scales", form.scales),
                      None if z is None else b.const("emb_zero_points", z),
                      {"bits": form.bits, "block_size": ort_block_size(form), "gather_axis": 0, "quantize_axis": 1})


def emit_ort(b: GraphBuilder, indices, form: QuantizedEmbedding, tensors: OrtTensors | None = None) -> gs.Variable:
    """``form.dequantized()[indices]`` as one com.microsoft.GatherBlockQuantized (+ a Cast to the builder's
    type when the scales' type differs).  Raises UnsupportedError with ``ort_support``'s reason."""
    t = tensors if tensors is not None else ort_tensors(b, form)
    ins = [t.codes, indices, t.scales] + ([t.zero_points] if t.zero_points is not None else [])
    y = b.op("GatherBlockQuantized", ins, dict(t.attrs), dtype=form.scale_dtype, domain=DOMAIN)
    return _to_builder_type(b, y, form.scale_dtype)


# -------------------------------------------------------------------------------------------- portable
def portable_support(form: QuantizedEmbedding, opset: int) -> str | None:
    if opset < PORTABLE_MIN_OPSET:
        return (f"the portable embedding needs default-domain opset >= {PORTABLE_MIN_OPSET} (Gather, Reshape-13, "
                f"BitShift); the model has {opset}: upgrade the opset")
    return None


def _split_pack(u: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) levels, n a multiple of k = 8 / bits -> (..., n/k) bytes: byte j holds u[j + i n/k] in bits
    [bits i, bits (i+1)) for i < k, so ``_unpack_split`` is a Concat of k shifted copies."""
    k = per_byte(bits)
    h = u.shape[-1] // k
    out = np.zeros(u.shape[:-1] + (h,), np.uint8)
    for i in range(k):
        out |= (u[..., i * h:(i + 1) * h] << (bits * i)).astype(np.uint8)
    return out


@dataclass(frozen=True)
class PortableTensors:
    codes: gs.Constant               # int8 (symmetric 8-bit) or uint8; (V, D/k) or (V, nb, B/k), k = 8 / bits
    scales: gs.Constant              # (V, 1) or (V, nb, 1)
    zero_points: gs.Constant | None  # uint8 (V, 1) or (V, nb, 1); 4/2-bit nb > 1: (V, ceil(nb/k), 1) split-packed


def portable_tensors(b: GraphBuilder, form: QuantizedEmbedding) -> PortableTensors:
    """The form's initializers for ``emit_portable`` (same bytes as ``form.nbytes``), re-laid out for
    Gather-first dequantization; create once per graph."""
    v, d = form.shape
    nb, bs = form.n_blocks, form.block_size
    blocks = (v, d) if nb == 1 else (v, nb, bs)
    if form.bits == 8:
        codes = form.codes.reshape(blocks)
        if form.symmetric:
            codes = (codes ^ np.uint8(0x80)).view(np.int8)          # u - 128 as two's complement
    else:
        codes = _split_pack(form.levels().reshape(blocks), form.bits)
    scales = form.scales.reshape((v, 1) if nb == 1 else (v, nb, 1))
    zp = None
    if not form.symmetric:
        z = form.zero_points
        if nb == 1:
            zp = z.reshape(v, 1)
        elif form.bits == 8:
            zp = z.reshape(v, nb, 1)
        else:
            pad = -nb % per_byte(form.bits)
            if pad:
                z = np.concatenate([z, np.zeros((v, pad), np.uint8)], axis=1)
            zp = _split_pack(z, form.bits).reshape(v, -1, 1)
    return PortableTensors(b.const("emb_codes", np.ascontiguousarray(codes)),
                           b.const("emb_scales", np.ascontiguousarray(scales)),
                           None if zp is None else b.const("emb_zero_points", np.ascontiguousarray(zp)))


def _unpack_split(b: GraphBuilder, g, axis: int, bits: int):
    """uint8 bytes -> the k = 8 / bits fields of every byte, lowest first, concatenated along ``axis``.
    4 bits: Concat(g & 15 (BitwiseAnd, opset >= 18; below: (g << 4) >> 4), g >> 4).
    2 bits: Concat(g << 6, g << 4, g << 2, g) >> 6 (BitShift only: any opset, 5 nodes)."""
    if bits == 2:
        parts = [b.op("BitShift", [g, b.const("shl", np.array(8 - 2 * (i + 1), np.uint8))], {"direction": "LEFT"},
                      dtype=np.uint8) for i in range(3)] + [g]
        cat = b.op("Concat", parts, {"axis": axis}, dtype=np.uint8)
        return b.op("BitShift", [cat, b.const("six", np.array(6, np.uint8))], {"direction": "RIGHT"}, dtype=np.uint8)
    four = b.const("four", np.array(4, np.uint8))
    hi = b.op("BitShift", [g, four], {"direction": "RIGHT"}, dtype=np.uint8)
    if b.opset >= BITWISE_AND_OPSET:
        lo = b.op("BitwiseAnd", [g, b.const("mask", np.array(0x0F, np.uint8))], dtype=np.uint8)
    else:
        lo = b.op("BitShift", [b.op("BitShift", [g, four], {"direction": "LEFT"}, dtype=np.uint8), four],
                  {"direction": "RIGHT"}, dtype=np.uint8)
    return b.op("Concat", [lo, hi], {"axis": axis}, dtype=np.uint8)


def emit_portable(b: GraphBuilder, indices, form: QuantizedEmbedding, tensors: PortableTensors | None = None,
                  rank: int | None = None) -> gs.Variable:
    """``form.dequantized()[indices]`` with standard ops (module doc); ``rank`` of the indices when known
    (taken from ``indices`` otherwise; unknown costs a Shape and a Concat)."""
    reason = portable_support(form, b.opset)
    if reason is not None:
        raise UnsupportedError(reason)
    t = tensors if tensors is not None else portable_tensors(b, form)
    rank = _rank(indices) if rank is None else rank
    sdt = form.scale_dtype
    f32 = np.dtype(np.float32)
    nb = form.n_blocks
    codes_dt = np.dtype(t.codes.values.dtype)
    g = b.op("Gather", [t.codes, indices], {"axis": 0}, dtype=codes_dt)
    if form.bits < 8:
        g = _unpack_split(b, g, -1, form.bits)
    f = b.cast(g, f32, FLOAT)
    if t.zero_points is not None:
        zg = b.op("Gather", [t.zero_points, indices], {"axis": 0}, dtype=np.uint8)
        if form.bits < 8 and nb > 1:
            zg = _unpack_split(b, zg, -2, form.bits)
            if nb % per_byte(form.bits):
                zg = b.op("Slice", [zg, b.const("start", np.array([0], np.int64)),
                                    b.const("end", np.array([nb], np.int64)),
                                    b.const("axes", np.array([-2], np.int64))], dtype=np.uint8)
        f = b.op("Sub", [f, b.cast(zg, f32, FLOAT)], dtype=f32)
    elif form.bits < 8:
        f = b.op("Sub", [f, b.const("zero", np.array(form.zero_level, f32))], dtype=f32)
    s = b.op("Gather", [t.scales, indices], {"axis": 0}, dtype=sdt)
    if sdt != f32:
        s = b.cast(s, f32, FLOAT)
    y = b.op("Mul", [f, s], dtype=f32)
    if nb > 1:
        y = _flatten_tail(b, y, indices, rank, form.shape[1], f32)
    if sdt != f32:              # the form's float16 rounding, explicit (onnxruntime keeps an explicit pair)
        y = b.cast(y, sdt, format_of_dtype(sdt).onnx_type)
    return _to_builder_type(b, y, np.dtype(y.dtype))


# ---------------------------------------------------------------------------------------- one Gather
EMITTERS = {"ort": emit_ort, "portable": emit_portable}


def rewrite_gather(b: GraphBuilder, node: gs.Node, form: QuantizedEmbedding, target: str,
                   tensors=None) -> str | None:
    """Replace ``node`` (a Gather of ``form``'s table in ``b.graph``: the main graph or the body holding it)
    by ``target``'s emission ("ort" or "portable"); its output tensor keeps its name.  ``b`` is a builder
    of that graph whose dtype is the table's float type (one builder per table and graph: its names
    stay unique).  Returns None when done, else the reason (the graph is then unchanged).  ``tensors``
    (``ort_tensors`` / ``portable_tensors`` made with ``b``) share one copy of the table among several
    Gathers; the old table is left for ``graph.cleanup()``."""
    reason = gather_reason(node, form)
    if reason is None and target not in EMITTERS:
        reason = f"unknown embedding target {target!r}; allowed: {sorted(EMITTERS)}"
    if reason is None:
        reason = ort_support(form) if target == "ort" else portable_support(form, b.opset)
    if reason is not None:
        return reason
    indices, out = node.inputs[1], node.outputs[0]
    node.inputs, node.outputs = [], []
    y = EMITTERS[target](b, indices, form, tensors)
    if out.dtype is None:
        out.dtype = b.dtype
    GraphBuilder.route(y, out)
    b.graph.nodes.remove(node)
    return None
