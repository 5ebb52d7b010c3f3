"""ai.bfc.LowBitMatMul (rotated low-bit layer in one native op) against its numpy reference.

* without a rotation the op is integer math up to one float epilogue: every ISA path
  (BFC_KS_ISA = portable / avx2 / avx512, where the CPU has it) equals
  ``bfc.ops.lowbit_matmul_reference`` bit for bit, for 2/3/4 bits, groups that are not
  multiples of 8 and output counts that are not multiples of 16;
* with the butterfly rotation the float rotation may differ in the last bits (FMA order),
  so the output is compared with a relative-error bound (ROT_REL_TOL);
* fuzzed attributes, shapes and dtypes never crash the process (subprocess) and come back
  as onnxruntime errors;
* end to end: ``bfc optimize --structure rotated --target custom-op`` emits one LowBitMatMul
  per layer (one RotateQuantize per input tensor, tests/test_custom_op_rotate_quantize.py) and
  onnxruntime computes what the planner scored (``CustomOp.simulate``).
"""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from bfc import ops, runtime
from bfc.factorize import relative_error
from bfc.lowbit.rotation import ButterflyRotation

pytestmark = pytest.mark.skipif(not runtime.is_available(), reason="needs the bfc custom-op library")

ROT_REL_TOL = 1e-5       # rotation in float32 with another summation order: a few flipped int8 roundings
ISAS = ("portable", "avx2", "avx512")


def _session(model, threads=1):
    return runtime.session(model, threads=threads)


def _isa_ok(isa, monkeypatch):
    if isa not in runtime.supported_isas():
        return False
    monkeypatch.setenv("BFC_KS_ISA", isa)
    return True


def _case(rng, k, n, bits, g, rot, x_shape=None):
    u = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    s = (rng.standard_normal((-(-k // g), n)) * 0.02).astype(np.float16)
    bias = rng.standard_normal(n).astype(np.float32)
    rv, rp = (), None
    if rot:
        r = ButterflyRotation.hadamard_like(k, 3)
        rv, rp = [np.asarray(v, np.float32) for v in r.values], r.chain
    model = ops.make_lowbit_matmul_model(u, s, bits=bits, group_size=g, rot_values=rv, rot_patterns=rp, bias=bias,
                                         x_shape=x_shape, onnx_opset=21)
    factors = [t for v in rv for t in (v, np.ones((1, 1, 1, 1), np.float32))]

    def ref(x):
        return ops.lowbit_matmul_reference(x, bias, ops.lowbit_codes_stream(u, g, bits), s, K=k, N=n, bits=bits,
                                           group_size=g, rot_factors=factors, rot_patterns=rp)
    return model, ref


SHAPES = [(64, 48, 4, 32, 5), (96, 33, 3, 20, 17), (40, 17, 2, 40, 3), (384, 100, 4, 64, 37), (24, 16, 4, 7, 1)]


@pytest.mark.parametrize("isa", ISAS)
def test_integer_path_is_bit_exact_on_every_isa(isa, monkeypatch):
    if not _isa_ok(isa, monkeypatch):
        pytest.skip(f"{isa} not available on this CPU/build")
    rng = np.random.default_rng(11)
    for k, n, bits, g, rows in SHAPES:
        model, ref = _case(rng, k, n, bits, g, rot=False)
        x = rng.standard_normal((rows, k)).astype(np.float32)
        x[0, 0] = 0.0
        y = _session(model).run(None, {"X": x})[0]
        np.testing.assert_array_equal(y, ref(x), err_msg=f"{isa} K={k} N={n} bits={bits} g={g}")


@pytest.mark.parametrize("isa", ISAS)
def test_rotated_layer_matches_reference(isa, monkeypatch):
    if not _isa_ok(isa, monkeypatch):
        pytest.skip(f"{isa} not available on this CPU/build")
    rng = np.random.default_rng(12)
    for k, n, bits, g, rows in [(384, 100, 4, 64, 37), (96, 40, 3, 32, 9), (128, 64, 2, 128, 1)]:
        model, ref = _case(rng, k, n, bits, g, rot=True, x_shape=[2, "rows", k])
        x = rng.standard_normal((2, rows, k)).astype(np.float32)
        y = _session(model).run(None, {"X": x})[0]
        want = ref(x)
        assert y.shape == want.shape == (2, rows, n)
        assert relative_error(want, y) < ROT_REL_TOL


@pytest.mark.parametrize("k", [384, 64, 24, 7])
def test_angle_form_matches_reference(k, monkeypatch):
    """rot_angles = 1: the rotation as stored (fp16 block of factor 0 + one fp16 angle per 2 x 2 block)."""
    monkeypatch.delenv("BFC_KS_ISA", raising=False)
    rng = np.random.default_rng(15)
    n, g = 40, min(32, k)
    rot = ButterflyRotation.hadamard_like(k, 1).stored_as("float16")
    block = np.asarray(rot.values[0]).astype(np.float16)
    angles = [np.asarray(a).astype(np.float16) for a in rot.params.angles]
    u = rng.integers(0, 16, (k, n)).astype(np.uint8)
    s = (rng.standard_normal((-(-k // g), n)) * 0.02).astype(np.float16)
    model = ops.make_lowbit_matmul_model(u, s, bits=4, group_size=g, rot_angles=(block, angles), x_shape=["b", k], onnx_opset=21)
    x = rng.standard_normal((19, k)).astype(np.float32)
    y = _session(model).run(None, {"X": x})[0]
    want = ops.lowbit_matmul_reference(x, None, ops.lowbit_codes_stream(u, g, 4), s, K=k, N=n, bits=4,
                                       group_size=g, rot_factors=[block, *angles], rot_angles=True)
    assert relative_error(want, y) < ROT_REL_TOL
    # the angle form computes the same Q as the planner's rotation (values in float64 from the same angles)
    xq = ops.angle_rotation_factors(k, block, angles)
    dense = ops.ks_matmul_reference(np.eye(k, dtype=np.float32), None, *xq)
    assert np.abs(dense - rot.to_dense()).max() < 1e-6
    np.testing.assert_array_equal(ops.reference_evaluator(model).run(None, {"X": x})[0], want)


def test_zero_rows_and_two_threads(monkeypatch):
    monkeypatch.delenv("BFC_KS_ISA", raising=False)
    rng = np.random.default_rng(13)
    model, ref = _case(rng, 192, 80, 4, 64, rot=True)
    assert _session(model).run(None, {"X": np.zeros((0, 192), np.float32)})[0].shape == (0, 80)
    x = rng.standard_normal((70, 192)).astype(np.float32)
    np.testing.assert_array_equal(_session(model, 2).run(None, {"X": x})[0], _session(model, 1).run(None, {"X": x})[0])


def test_reference_evaluator_runs_the_op():
    rng = np.random.default_rng(14)
    model, ref = _case(rng, 64, 48, 4, 32, rot=False)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(ops.reference_evaluator(model).run(None, {"X": x})[0], ref(x))


FUZZ = r'''
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
from bfc import ops, runtime
from bfc import errors as bfc_errors
from bfc.lowbit.rotation import ButterflyRotation
rng = np.random.default_rng(SEED)
ok = err = 0
for case in range(CASES):
    k = int(rng.choice([8, 24, 64, 96])); n = int(rng.integers(1, 40)); bits = int(rng.choice([2, 3, 4]))
    g = int(rng.integers(1, k + 1))
    rot = bool(rng.integers(0, 2))
    u = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    s = rng.standard_normal((-(-k // g), n)).astype(np.float32)
    r = ButterflyRotation.hadamard_like(k, 0) if rot else None
    if r is not None and rng.integers(0, 2):
        m = ops.make_lowbit_matmul_model(u, s, bits=bits, group_size=g, x_shape=["b", k], rot_angles=(
            np.asarray(r.values[0], np.float16), [np.asarray(a, np.float16) for a in r.params.angles]), onnx_opset=21)
    else:
        m = ops.make_lowbit_matmul_model(u, s, bits=bits, group_size=g, rot_values=[] if r is None else
                                         [np.asarray(v, np.float32) for v in r.values],
                                         rot_patterns=None if r is None else r.chain, x_shape=["b", k], onnx_opset=21)
    node = m.graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    mut = rng.choice(["none"] * 6 + ["bits", "group", "K", "N", "codes_len", "codes_dtype", "scales_shape", "scales_dtype",
                      "rot_chain", "drop_input", "extra_input", "x_rank", "x_dim", "no_attr", "attr_type",
                      "rot_angles_flag", "angle_shape"])
    inits = {t.name: t for t in m.graph.initializer}
    if mut == "bits": attrs["bits"].i = int(rng.choice([0, 1, 5, 8, -3, 2**40]))
    elif mut == "group": attrs["group_size"].i = int(rng.choice([0, -1, k + 1, 2**62]))
    elif mut == "K": attrs["K"].i = int(rng.choice([0, -5, k + 1, 2**62]))
    elif mut == "N": attrs["N"].i = int(rng.choice([0, -5, n + 3, 2**62]))
    elif mut == "codes_len":
        a = numpy_helper.to_array(inits["lb_codes"]); inits["lb_codes"].CopyFrom(numpy_helper.from_array(a[:-1], "lb_codes"))
    elif mut == "codes_dtype":
        a = numpy_helper.to_array(inits["lb_codes"]); inits["lb_codes"].CopyFrom(numpy_helper.from_array(a.astype(np.int8), "lb_codes"))
    elif mut == "scales_shape":
        a = numpy_helper.to_array(inits["lb_scales"]); inits["lb_scales"].CopyFrom(numpy_helper.from_array(a.reshape(-1), "lb_scales"))
    elif mut == "scales_dtype":
        a = numpy_helper.to_array(inits["lb_scales"]); inits["lb_scales"].CopyFrom(numpy_helper.from_array(a.astype(np.float64), "lb_scales"))
    elif mut == "rot_chain":
        node.attribute.append(helper.make_attribute("rot_patterns", [1, 2, 2, k // 2, 1, 3, 3, 1][: int(rng.integers(1, 9))]))
        if "rot_patterns" in attrs: node.attribute.remove(attrs["rot_patterns"])
    elif mut == "rot_angles_flag":
        node.attribute.append(helper.make_attribute("rot_angles", int(rng.choice([1, 2, -1]))))
        if "rot_angles" in attrs: node.attribute.remove(attrs["rot_angles"])
    elif mut == "angle_shape":
        name = node.input[-1]
        if name in inits and name != "lb_scales":
            a = numpy_helper.to_array(inits[name]); inits[name].CopyFrom(numpy_helper.from_array(a.reshape(-1)[: max(1, a.size - 1)], name))
    elif mut == "drop_input": del node.input[-1]
    elif mut == "extra_input": node.input.append("lb_codes")
    elif mut == "x_rank": m.graph.input[0].type.tensor_type.shape.ClearField("dim")
    elif mut == "x_dim": m.graph.input[0].type.tensor_type.shape.dim[-1].dim_value = k + 1
    elif mut == "no_attr": node.attribute.remove(attrs[str(rng.choice(["K", "N", "bits", "group_size"]))])
    elif mut == "attr_type":
        name = str(rng.choice(["K", "bits"])); node.attribute.remove(attrs[name])
        node.attribute.append(helper.make_attribute(name, [1.5, 2.5]))
    x = rng.standard_normal((int(rng.integers(0, 5)), k)).astype(np.float32)
    if mut == "x_dim": x = rng.standard_normal((2, k + 1)).astype(np.float32)
    if mut == "x_rank": x = np.asarray(1.0, np.float32)
    try:
        y = runtime.session(m, threads=int(rng.integers(1, 3))).run(None, {"X": x})[0]
        if mut == "none":
            want = ops.reference_evaluator(m).run(None, {"X": x})[0]
            assert y.shape == want.shape, (y.shape, want.shape)
            assert np.allclose(y, want, rtol=1e-4, atol=1e-4 * (np.abs(want).max() if want.size else 1)), mut
        ok += 1
    except (bfc_errors.ModelError, ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidArgument,
            ort.capi.onnxruntime_pybind11_state.InvalidGraph, ort.capi.onnxruntime_pybind11_state.RuntimeException) as e:
        assert mut != "none", (case, str(e)[:300])
        err += 1
print("RESULT", ok, err)
'''


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzzed_nodes_never_crash(seed):
    code = FUZZ.replace("SEED", str(seed)).replace("CASES", "120")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "BFC_KS_ISA"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok, err = map(int, proc.stdout.split("RESULT")[1].split())
    assert ok > 20 and err > 20, (ok, err)


def test_cli_optimize_rotated_custom_op_runs_in_onnxruntime(tmp_path, monkeypatch):
    """``bfc optimize --structure rotated --bits 4 --target custom-op``: one LowBitMatMul per layer, onnxruntime
    output = the planner's simulation (kernel numerics) and close to the float layer."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_passes_lowbit import K, _model

    from bfc.cli import main
    from bfc.config import OptimizeConfig
    from bfc.passes.pipeline import run_passes
    from bfc.passes.targets import get_target
    path, cal, x = _model(tmp_path, names=("q", "k"))
    monkeypatch.chdir(tmp_path)       # onnxruntime resolves the loaded model's data next to the working directory
    out = tmp_path / "cli.onnx"
    rc = main(["optimize", str(path), "-o", str(out), "--structure", "rotated", "--bits", "4", "--target",
               "custom-op", "--calibration", str(cal), "--max-error", "10", "--no-max-output-error", "--min-size",
               "0", "-q"])
    assert rc == 0
    m = onnx.load(str(out))
    types = [n.op_type for n in m.graph.node]
    # q and k read the same x: one RotateQuantize shared by two prequantized LowBitMatMul nodes
    assert types.count("LowBitMatMul") == 2 and types.count("RotateQuantize") == 1, types
    assert all(a.i == 1 for n in m.graph.node if n.op_type == "LowBitMatMul" for a in n.attribute
               if a.name == "prequantized")
    got = _session(m).run(None, x)[0]
    cfg = OptimizeConfig(structure="rotated", bits=4, target="custom-op", calibration=cal, max_error=10.0,
                         max_output_error=None, min_size=0, verify=False)
    layers = [p.weights for p in run_passes(str(path), cfg).plans]
    sim = get_target("custom-op")
    xs = x["x0"].reshape(-1, K)
    want = sum(sim.simulate(lay)(xs) for lay in layers).reshape(got.shape)
    ideal = sum(lay.apply(xs) for lay in layers).reshape(got.shape)
    assert relative_error(want, got) < ROT_REL_TOL
    assert relative_error(ideal, got) < 0.02     # per-row int8 activations of x Q



def test_shared_and_single_readers(tmp_path, monkeypatch):
    """q and k read x0 (one RotateQuantize, two prequantized nodes), w reads x1 alone (one node, rotation
    inside); onnxruntime computes the planner's simulation of the three layers."""
    sys.path.insert(0, os.path.dirname(__file__))
    from test_passes_lowbit import K, _model

    import bfc
    from bfc.config import OptimizeConfig
    from bfc.passes.pipeline import run_passes
    from bfc.passes.targets import get_target
    path, cal, x = _model(tmp_path, names=("q", "k", "w"), inputs=2)
    monkeypatch.chdir(tmp_path)
    cfg = OptimizeConfig(structure="rotated", bits=4, target="custom-op", calibration=cal, max_error=10.0,
                         max_output_error=None, min_size=0, verify=False)
    out = tmp_path / "m.onnx"
    bfc.optimize(str(path), cfg, output=str(out))
    m = onnx.load(str(out))
    lb = [n for n in m.graph.node if n.op_type == "LowBitMatMul"]
    rq = [n for n in m.graph.node if n.op_type == "RotateQuantize"]
    assert len(lb) == 3 and len(rq) == 1 and list(rq[0].input)[0] == "x0"
    pre = {n.name: {a.name for a in n.attribute} for n in lb}
    assert sorted(n.input[0] == rq[0].output[0] for n in lb) == [False, True, True]
    one = [n for n in lb if n.input[0] == "x1"]
    assert len(one) == 1
    attrs_one = pre[one[0].name]
    assert "prequantized" not in attrs_one and {"rot_angles", "rot_patterns"} & attrs_one, attrs_one
    got = _session(m).run(None, x)[0]
    sim = get_target("custom-op")
    plans = {p.site.nodes[0].name: p.weights for p in run_passes(str(path), cfg).plans}
    want = sum(sim.simulate(plans[f"mm_{n}"])(x["x1" if n == "w" else "x0"].reshape(-1, K))
               for n in ("q", "k", "w")).reshape(got.shape)
    assert relative_error(want, got) < ROT_REL_TOL
