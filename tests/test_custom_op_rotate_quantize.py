"""ai.bfc.RotateQuantize + LowBitMatMul's prequantized form (the fused custom-op layers).

``q, s = RotateQuantize(x; Q)`` computes the rotation and the per-row int8 quantization once per
input tensor; ``LowBitMatMul(q, bias, codes, scales, s; prequantized = 1)`` is the GEMM of the
one-node ``LowBitMatMul(x, bias, codes, scales, Q)``.  Checked through onnxruntime:

* the shared form equals the one-node form bit for bit, for three layers reading one x (Q, K, V
  with different N / bits / groups), both rotation forms (rot_patterns, rot_angles), 1 / 2 rows
  (row-by-row rotation) and many rows (the chain), every ISA the CPU has, 1 and 2 threads;
* the prequantized GEMM equals ``bfc.ops.lowbit_matmul_reference(q, ..., x_scale=s)`` bit for bit
  (integer path + the float epilogue), and RotateQuantize equals ``rotate_quantize_reference``
  within float rounding of the rotation (Q_FLIP_FRACTION of codes off by one at most);
* the onnx ReferenceEvaluator runs the shared graph with bfc.ops' numpy ops;
* fuzzed attributes, inputs and shapes of both nodes never crash the process (subprocess) and
  come back as onnxruntime errors naming the op.
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc import ops, runtime
from bfc.lowbit.rotation import ButterflyRotation

pytestmark = pytest.mark.skipif(not runtime.is_available(), reason="needs the bfc custom-op library")

ISAS = ("portable", "avx2", "avx512")
Q_FLIP_FRACTION = 1e-3   # int8 codes of x Q that a float32 rotation in another order may round the other way
S_REL_TOL = 1e-5         # row scales amax/127 of the same rotation


def _layers(rng, k, specs):
    out = []
    for n, bits, g in specs:
        u = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
        s = (rng.standard_normal((-(-k // g), n)) * 0.02).astype(np.float16)
        out.append((u, s, rng.standard_normal(n).astype(np.float32), bits, g))
    return out


def _rotation(k, angles):
    """(rotation inputs, attributes, reference kwargs) of a butterfly rotation of size k."""
    if angles:
        r = ButterflyRotation.hadamard_like(k, 1).stored_as("float16")
        rot = [np.asarray(r.values[0]).astype(np.float16)] + [np.asarray(a).astype(np.float16) for a in r.params.angles]
        return rot, {"rot_angles": 1}, {"rot_factors": rot, "rot_angles": True}
    r = ButterflyRotation.hadamard_like(k, 3)
    rot = [t for v in r.values for t in (np.asarray(v, np.float32), np.ones((1, 1, 1, 1), np.float32))]
    return rot, {"rot_patterns": ops.patterns_attribute(r.chain)}, {"rot_factors": rot, "rot_patterns": r.chain}


def _graph(k, layers, rot, rot_attrs, shared):
    """Three LowBitMatMul layers reading X: shared (one RotateQuantize, prequantized nodes) or one node each."""
    inits = [numpy_helper.from_array(t, f"rot{i}") for i, t in enumerate(rot)]
    rot_names = [f"rot{i}" for i in range(len(rot))]
    nodes, outs = [], []
    if shared:
        nodes.append(helper.make_node("RotateQuantize", ["X", *rot_names], ["q", "s"], domain=ops.DOMAIN, K=k,
                                      **rot_attrs))
    for j, (u, s, bias, bits, g) in enumerate(layers):
        n = u.shape[1]
        inits += [numpy_helper.from_array(ops.lowbit_codes_stream(u, g, bits), f"c{j}"),
                  numpy_helper.from_array(s, f"s{j}"), numpy_helper.from_array(bias, f"b{j}")]
        attrs = {"K": k, "N": n, "bits": bits, "group_size": g}
        if shared:
            nodes.append(helper.make_node("LowBitMatMul", ["q", f"b{j}", f"c{j}", f"s{j}", "s"], [f"Y{j}"],
                                          domain=ops.DOMAIN, prequantized=1, **attrs))
        else:
            nodes.append(helper.make_node("LowBitMatMul", ["X", f"b{j}", f"c{j}", f"s{j}", *rot_names], [f"Y{j}"],
                                          domain=ops.DOMAIN, **attrs, **rot_attrs))
        outs.append(helper.make_tensor_value_info(f"Y{j}", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "r", k])],
                              outs, inits)
    return helper.make_model(graph, opset_imports=ops.opset_imports(21), ir_version=ops.DEFAULT_IR_VERSION)


def _debug_outputs(model):
    """model with q and s as extra graph outputs"""
    m = type(model)()
    m.CopyFrom(model)
    m.graph.output.extend([helper.make_tensor_value_info("q", TensorProto.INT8, None),
                           helper.make_tensor_value_info("s", TensorProto.FLOAT, None)])
    return m


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("angles", [False, True])
def test_shared_rotate_quantize_equals_one_node_layers(isa, angles, monkeypatch):
    if isa not in runtime.supported_isas():
        pytest.skip(f"{isa} not available on this CPU/build")
    monkeypatch.setenv("BFC_KS_ISA", isa)
    rng = np.random.default_rng(20)
    k = 384 if angles else 96
    layers = _layers(rng, k, [(100, 4, 64), (33, 3, 20), (16, 2, k)])
    rot, rot_attrs, ref_kw = _rotation(k, angles)
    shared = _graph(k, layers, rot, rot_attrs, True)
    single = _graph(k, layers, rot, rot_attrs, False)
    for lead in [(1, 1), (1, 2), (2, 37)]:
        x = rng.standard_normal(lead + (k,)).astype(np.float32)
        for threads in (1, 2):
            got = runtime.session(_debug_outputs(shared), threads=threads).run(None, {"X": x})
            want = runtime.session(single, threads=threads).run(None, {"X": x})
            for j in range(3):
                np.testing.assert_array_equal(got[j], want[j], err_msg=f"layer {j} rows {lead} threads {threads}")
        q, s = got[3], got[4]
        assert q.dtype == np.int8 and q.shape == x.shape and s.shape == lead + (1,)
        # the GEMM half: bit for bit the numpy spec given the node's q and s
        for j, (u, sc, bias, bits, g) in enumerate(layers):
            ref = ops.lowbit_matmul_reference(q, bias, ops.lowbit_codes_stream(u, g, bits), sc, K=k, N=u.shape[1],
                                              bits=bits, group_size=g, x_scale=s)
            np.testing.assert_array_equal(got[j], ref)
        # the rotation half: the numpy rotation up to float32 summation order
        q_ref, s_ref = ops.rotate_quantize_reference(x, K=k, **ref_kw)
        diff = np.abs(q.astype(np.int32) - q_ref.astype(np.int32))
        assert diff.max() <= 1 and np.count_nonzero(diff) <= max(1, Q_FLIP_FRACTION * q.size), np.count_nonzero(diff)
        assert np.max(np.abs(s - s_ref) / np.maximum(s_ref, 1e-30)) < S_REL_TOL


def test_reference_evaluator_runs_the_shared_graph():
    rng = np.random.default_rng(21)
    k = 64
    layers = _layers(rng, k, [(24, 4, 32), (7, 2, 64), (40, 3, 16)])
    rot, rot_attrs, _ = _rotation(k, False)
    shared, single = _graph(k, layers, rot, rot_attrs, True), _graph(k, layers, rot, rot_attrs, False)
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    got = ops.reference_evaluator(shared).run(None, {"X": x})
    want = ops.reference_evaluator(single).run(None, {"X": x})
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_zero_rows():
    rng = np.random.default_rng(22)
    k = 64
    layers = _layers(rng, k, [(24, 4, 32)])
    rot, rot_attrs, _ = _rotation(k, True)
    y = runtime.session(_debug_outputs(_graph(k, layers, rot, rot_attrs, True))).run(
        None, {"X": np.zeros((0, 3, k), np.float32)})
    assert y[0].shape == (0, 3, 24) and y[1].shape == (0, 3, k) and y[2].shape == (0, 3, 1)


FUZZ = r'''
import numpy as np, onnxruntime as ort
from onnx import helper, numpy_helper
import sys
sys.path.insert(0, TESTS)
from test_custom_op_rotate_quantize import _graph, _layers, _rotation
from bfc import ops, runtime
rng = np.random.default_rng(SEED)
MUTS = ["none"] * 5 + ["rq_K", "rq_no_rot", "rq_rot_patterns", "rq_drop_rot", "rq_extra", "rq_angle_shape",
                       "pq_flag", "pq_rot_attr", "pq_no_scale", "pq_scale_shape", "pq_scale_dtype", "pq_extra",
                       "pq_float_x", "pq_attr_type", "x_dim", "x_scalar", "rq_attr_type"]
ok = err = 0
seen = set()
for case in range(CASES):
    k = int(rng.choice([8, 24, 64, 96])); angles = bool(rng.integers(0, 2))
    layers = _layers(rng, k, [(int(rng.integers(1, 40)), int(rng.choice([2, 3, 4])), int(rng.integers(1, k + 1)))])
    rot, rot_attrs, _ = _rotation(k, angles)
    m = _graph(k, layers, rot, rot_attrs, True)
    rq, lb = m.graph.node[0], m.graph.node[1]
    ra = {a.name: a for a in rq.attribute}; la = {a.name: a for a in lb.attribute}
    inits = {t.name: t for t in m.graph.initializer}
    mut = str(rng.choice(MUTS)); seen.add(mut)
    x = rng.standard_normal((1, int(rng.integers(0, 6)), k)).astype(np.float32)
    if mut == "rq_K": ra["K"].i = int(rng.choice([0, -3, k + 1, 2**62]))
    elif mut == "rq_no_rot":
        for a in list(rq.attribute):
            if a.name != "K": rq.attribute.remove(a)
    elif mut == "rq_rot_patterns":
        for a in list(rq.attribute):
            if a.name != "K": rq.attribute.remove(a)
        rq.attribute.append(helper.make_attribute("rot_patterns", [1, 2, 2, k // 2, 1, 3, 3, 1][: int(rng.integers(1, 9))]))
    elif mut == "rq_drop_rot": del rq.input[-1]
    elif mut == "rq_extra": rq.input.append(rq.input[-1])
    elif mut == "rq_angle_shape":
        name = rq.input[-1]
        a = numpy_helper.to_array(inits[name]); inits[name].CopyFrom(numpy_helper.from_array(a.reshape(-1)[: max(1, a.size - 1)], name))
    elif mut == "rq_attr_type": rq.attribute.remove(ra["K"]); rq.attribute.append(helper.make_attribute("K", [1.5, 2.5]))
    elif mut == "pq_flag": la["prequantized"].i = int(rng.choice([0, 2, -1]))
    elif mut == "pq_rot_attr": lb.attribute.append(helper.make_attribute("rot_angles", 1))
    elif mut == "pq_no_scale": del lb.input[-1]
    elif mut == "pq_scale_shape":
        m.graph.node.insert(1, helper.make_node("Reshape", ["s", "flat"], ["s_flat"]))
        m.graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), "flat"))
        lb.input[4] = "s_flat"
    elif mut == "pq_scale_dtype":
        m.graph.node.insert(1, helper.make_node("Cast", ["s"], ["s64"], to=11)); lb.input[4] = "s64"
    elif mut == "pq_extra": lb.input.append("s")
    elif mut == "pq_float_x": lb.input[0] = "X"
    elif mut == "pq_attr_type": lb.attribute.remove(la["prequantized"]); lb.attribute.append(helper.make_attribute("prequantized", [1.5]))
    elif mut == "x_dim":
        m.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = k + 1
        x = rng.standard_normal((1, 2, k + 1)).astype(np.float32)
    elif mut == "x_scalar":
        m.graph.input[0].type.tensor_type.shape.ClearField("dim"); x = np.asarray(1.0, np.float32)
    print("case", case, mut, flush=True)
    try:
        y = runtime.session(m, threads=int(rng.integers(1, 3))).run(None, {"X": x})[0]
    except Exception as e:
        assert mut != "none", (case, str(e)[:300])
        msg = str(e)
        assert "RotateQuantize" in msg or "LowBitMatMul" in msg or "INVALID" in msg or "Type" in msg or "rank" in msg, (case, mut, msg[:300])
        err += 1
        continue
    assert mut in ("none", "pq_flag_ok"), (case, mut, "was not rejected")
    want = ops.reference_evaluator(m).run(None, {"X": x})[0]
    assert y.shape == want.shape, (y.shape, want.shape)
    assert np.allclose(y, want, rtol=1e-4, atol=1e-4 * (np.abs(want).max() if want.size else 1)), case
    ok += 1
print("RESULT", ok, err, len(seen))
'''


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_shared_nodes_never_crash(seed):
    code = (FUZZ.replace("SEED", str(seed)).replace("CASES", "120")
            .replace("TESTS", repr(os.path.dirname(os.path.abspath(__file__)))))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "BFC_KS_ISA"})
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    assert proc.returncode >= 0, f"native library crashed the process (signal {-proc.returncode}) at {last}"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ok, err, kinds = map(int, proc.stdout.split("RESULT")[1].split())
    assert ok > 15 and err > 50 and kinds >= 15, (ok, err, kinds)
