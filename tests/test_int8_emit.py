"""Integer-MatMul emission (passes/int8_emit.py) against its numpy references (bfc/lowbit/int8_fold.py).

onnxruntime's outputs equal the references: the integer parts (x_u8, zero point, MatMulInteger's int32,
the folded int8 weight) exactly, the float outputs to float rounding; the folded-codes subgraph is
constant-folded at session creation into one int8 initializer.
"""
import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
gs = pytest.importorskip("onnx_graphsurgeon")
from onnx import numpy_helper

from bfc.lowbit.groups import quantize_groups
from bfc.lowbit.int8_fold import (
           dequantize_codes,
           dynamic_quantize,
           fold_codes,
           int8_matmul,
           quantize_columns,
)
from bfc.ops import lowbit_codes_stream
from bfc.passes.graph_builder import GraphBuilder
from bfc.passes.int8_emit import emit_folded_codes, emit_int8_matmul

REL_TOL = 1e-5
OPSET = 21


def _u8s8_exact() -> bool:
    """onnxruntime's u8s8 GEMM is exact except on x86 with AVX2 but no VNNI/AMX (saturating vpmaddubsw)."""
    import platform
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        from pathlib import Path
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) or "avx2" not in flags


exact_gemm = pytest.mark.skipif(not _u8s8_exact(), reason="u8s8 GEMM may saturate on AVX2 without VNNI "
                                                          "(bfc.lowbit.int8_fold caveat)")


def export(graph):
    m = gs.export_onnx(graph)
    m.opset_import[0].version = OPSET
    m.ir_version = 10
    return m


def session(model, optimize=True, optimized_path=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def layer_model(k, in_shape, body, dtype=np.float32, extra_outputs=False):
    """x [in_shape] -> body(b, x) -> y; with extra_outputs, body returns (y, [more tensors])."""
    x = gs.Variable("x", dtype, in_shape)
    graph = gs.Graph(inputs=[x], opset=OPSET)
    b = GraphBuilder(graph, "bfc/t", dtype, OPSET)
    out = body(b, x)
    y, more = out if extra_outputs else (out, [])
    y.name = "y"
    graph.outputs = [y] + list(more)
    return export(graph)


def quantized(k, n, bits, g, seed):
    rng = np.random.default_rng(seed)
    gq = quantize_groups(rng.standard_normal((k, n)), bits=bits, group_size=g)
    return gq, lowbit_codes_stream(gq.codes(), gq.group_size, bits)


# ---- numpy references -------------------------------------------------------------------
def test_dynamic_quantize_matches_onnxruntime():
    from onnx import TensorProto, helper
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(v, t, None) for v, t in
                               (("y", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))])
    sess = session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), optimize=False)
    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 300)).astype(np.float32)
    lattice = (rng.integers(-40, 200, (64, 300)) * np.float32(0.5)).astype(np.float32)   # many ties
    cases = [base, base + 3, base - 3, np.abs(base), np.zeros((4, 5), np.float32), lattice, lattice * 1e-3,
             np.array([[7.5, -0.5]], np.float32)]
    for x in cases:
        y, s, z = sess.run(None, {"x": x})
        ry, rs, rz = dynamic_quantize(x)
        assert s == rs and z == rz
        np.testing.assert_array_equal(y, ry)


def test_quantize_columns_definition():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((50, 7)).astype(np.float32)
    w[:, 3] = 0
    q, s = quantize_columns(w)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (7,)
    assert np.abs(q).max() == 127 and q[:, 3].tolist() == [0] * 50
    np.testing.assert_array_equal(np.abs(q).max(axis=0)[[0, 1, 2, 4, 5, 6]], 127)
    assert np.abs(q * s - w).max() <= s.max() / 2 * (1 + 1e-6)


def test_fold_codes_error_is_a_small_addition():
    """The docstring's estimate: per-column int8 of a rotated-like 3-bit weight adds ~0.1% variance."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((512, 64))
    gq = quantize_groups(w, bits=3, group_size=64)
    deq = gq.dequantize()
    q, s = fold_codes(deq)
    e_low, e_fold = np.linalg.norm(w - deq), np.linalg.norm(w - q * s.astype(np.float64))
    assert e_fold <= e_low * 1.005
    np.testing.assert_array_equal(dequantize_codes(gq.codes(), gq.scales, 3, gq.group_size), deq.astype(np.float32))


# ---- emitted subgraphs ---------------------------------------------------------------------
@exact_gemm
@pytest.mark.parametrize("in_shape", [[1, 128, 96], [128, 96]])
def test_int8_matmul_stored_weight(in_shape):
    k, n = 96, 40
    rng = np.random.default_rng(3)
    w8, c8 = quantize_columns(rng.standard_normal((k, n)))
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal(in_shape).astype(np.float32) + 0.3
    for bb in (None, bias):
        model = layer_model(k, in_shape, lambda b, x, bb=bb: emit_int8_matmul(b, x, w8, c8, bb))
        y = session(model).run(None, {"x": x})[0]
        ref = int8_matmul(x, w8, c8) + (0 if bb is None else bb)
        assert y.shape == tuple(in_shape[:-1]) + (n,)
        assert np.abs(y - ref).max() <= REL_TOL * np.linalg.norm(ref) / np.sqrt(ref.size)


@exact_gemm
def test_int8_matmul_integer_parts_exact():
    """With the int32 accumulator as a graph output (no fusion), every integer tensor equals the reference."""
    k, n = 96, 40
    rng = np.random.default_rng(4)
    w8, c8 = quantize_columns(rng.standard_normal((k, n)))
    x = rng.standard_normal((2, 64, k)).astype(np.float32)

    def body(b, x):
        y = emit_int8_matmul(b, x, w8, c8)
        mm = next(nd for nd in b.graph.nodes if nd.op == "MatMulInteger")
        dq = next(nd for nd in b.graph.nodes if nd.op == "DynamicQuantizeLinear")
        return y, [mm.outputs[0], *dq.outputs]
    model = layer_model(k, [2, 64, k], body, extra_outputs=True)
    y, acc, xq, xs, xz = session(model).run(None, {"x": x})
    rq, rs, rz = dynamic_quantize(x)
    np.testing.assert_array_equal(xq, rq)
    assert xs == rs and xz == rz
    np.testing.assert_array_equal(acc, (rq.astype(np.int64) - int(rz)) @ w8.astype(np.int64))
    np.testing.assert_array_equal(y, int8_matmul(x, w8, c8))


@exact_gemm
def test_int8_matmul_fp16_builder():
    k, n = 64, 16
    rng = np.random.default_rng(5)
    w8, c8 = quantize_columns(rng.standard_normal((k, n)))
    x = rng.standard_normal((8, k)).astype(np.float16)
    model = layer_model(k, [8, k], lambda b, x: emit_int8_matmul(b, x, w8, c8), dtype=np.float16)
    y = session(model).run(None, {"x": x})[0]
    assert y.dtype == np.float16
    ref = int8_matmul(x.astype(np.float32), w8, c8).astype(np.float16)
    np.testing.assert_allclose(y.astype(np.float32), ref.astype(np.float32), rtol=1e-3, atol=1e-3)


def folded_weight_model(gq, stream, k, n):
    graph = gs.Graph(inputs=[], opset=OPSET)
    b = GraphBuilder(graph, "bfc/t", np.float32, OPSET)
    w, c = emit_folded_codes(b, stream, gq.scales, gq.bits, gq.group_size, k, n)
    w.name, c.name = "w", "c"
    graph.outputs = [w, c]
    return export(graph)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("n", [24, 20, 6])
def test_folded_codes_equal_fold_codes(bits, g, n):
    """The subgraph, executed node by node (no optimization), gives fold_codes' weight bit for bit;
    K = 200 is not a multiple of any group (the last group padded with the zero level, as groups.py
    stores it); n = 20 / 6 exercise the flat (non row-wise) unpacking where n is not a multiple of the
    codes per chunk."""
    k = 200
    gq, stream = quantized(k, n, bits, g, seed=bits * 1000 + g + n)
    rw, rc = fold_codes(gq.dequantize())
    w, c = session(folded_weight_model(gq, stream, k, n), optimize=False).run(None, {})
    assert w.dtype == np.int8 and w.shape == (k, n) and c.shape == (n,)
    np.testing.assert_array_equal(w, rw)
    np.testing.assert_array_equal(c, rc)


@exact_gemm
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("in_shape", [[1, 128, 200], [128, 200]])
def test_folded_layer_is_constant_folded(bits, in_shape, tmp_path):
    """Default session: the whole weight subgraph folds into one int8 initializer equal to fold_codes, the
    layer runs as one DynamicQuantizeMatMul, and y equals int8_matmul with the folded weight."""
    k, n, g = 200, 24, 64
    gq, stream = quantized(k, n, bits, g, seed=bits)
    rw, rc = fold_codes(gq.dequantize())
    model = layer_model(k, in_shape, lambda b, x: emit_int8_matmul(
        b, x, *emit_folded_codes(b, stream, gq.scales, bits, gq.group_size, k, n)))
    opt = tmp_path / "opt.onnx"
    sess = session(model, optimized_path=opt)
    x = np.random.default_rng(6).standard_normal(in_shape).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = int8_matmul(x, rw, rc)
    assert np.abs(y - ref).max() <= REL_TOL * np.linalg.norm(ref) / np.sqrt(ref.size)
    folded = onnx.load(opt)
    assert [nd.op_type for nd in folded.graph.node] == ["DynamicQuantizeMatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in folded.graph.initializer}
    int8s = [a for a in inits.values() if a.dtype == np.int8 and a.shape == (k, n)]
    assert len(int8s) == 1
    np.testing.assert_array_equal(int8s[0], rw)
    assert sum(a.nbytes for a in inits.values()) == k * n + 4 * n


def test_folded_codes_from_tensors():
    """Stream and scales given as graph constants (any shape) instead of arrays."""
    k, n, bits = 200, 24, 3
    gq, stream = quantized(k, n, bits, 64, seed=9)
    graph = gs.Graph(inputs=[], opset=OPSET)
    b = GraphBuilder(graph, "bfc/t", np.float32, OPSET)
    w, c = emit_folded_codes(b, b.const("codes", stream), b.const("scales", gq.scales), bits, 64, k, n)
    w.name, c.name = "w", "c"
    graph.outputs = [w, c]
    w, c = session(export(graph), optimize=False).run(None, {})
    rw, rc = fold_codes(gq.dequantize())
    np.testing.assert_array_equal(w, rw)
    np.testing.assert_array_equal(c, rc)


def test_folded_codes_rejects_bad_input():
    graph = gs.Graph(inputs=[], opset=OPSET)
    b = GraphBuilder(graph, "bfc/t", np.float32, OPSET)
    gq, stream = quantized(64, 8, 4, 32, seed=0)
    with pytest.raises(ValueError):
        emit_folded_codes(b, stream[:-1], gq.scales, 4, 32, 64, 8)
    with pytest.raises(ValueError):
        emit_folded_codes(GraphBuilder(graph, "bfc/t", np.float32, 17), stream, gq.scales, 4, 32, 64, 8)
