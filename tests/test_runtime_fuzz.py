"""Hypothesis fuzzing of KSMatMul shapes, dtypes and attributes through real ORT sessions.

The cases run in a subprocess: a crash of the native library (segfault, abort) makes the
subprocess die by a signal and fails the test.  Valid cases must match the numpy
reference; every broken case must come back as an onnxruntime exception.
"""
import subprocess
import sys

import numpy as np
import pytest

from bfc import runtime

N_EXAMPLES = 250
FLOAT_REL_TOL = 2e-5
INT8_EMULATED_SQNR_DB = 40  # tiny random chains: occasional rounding flips weigh more

MUTATIONS = ["none", "none", "none", "bad_chain", "values_shape", "values_dtype", "scale_shape", "scale_dtype",
             "in_perm", "out_perm", "x_dim", "bias_shape", "patterns_len", "pattern_zero", "pattern_negative"]


def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def _case(data):
    """Draws one model + input; returns (model, x, expect_ok, reference or None)."""
    from hypothesis import strategies as st
    from onnx import TensorProto, helper, numpy_helper

    from bfc import ops

    L = data.draw(st.integers(1, 3))
    pats = [tuple(data.draw(st.integers(1, 4)) for _ in range(4))]
    for _ in range(L - 1):
        a0, b0, c0, d0 = pats[-1]
        out = a0 * c0 * d0
        a = data.draw(st.sampled_from(_divisors(out)))
        d = data.draw(st.sampled_from(_divisors(out // a)))
        pats.append((a, out // (a * d), data.draw(st.integers(1, 4)), d))
    M = pats[0][0] * pats[0][1] * pats[0][3]
    N = pats[-1][0] * pats[-1][2] * pats[-1][3]
    mut = data.draw(st.sampled_from(MUTATIONS))
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    fmts = [data.draw(st.sampled_from(list(ops.VALUE_TYPES))) for _ in pats]
    values, scales = [], []
    for (a, b, c, d), fmt in zip(pats, fmts):
        q, _ = ops.quantize_factor(rng.standard_normal((a, d, b, c)), fmt, "tensor")
        sshape = data.draw(st.sampled_from([(1, 1, 1, 1), (a, d, 1, 1), (a, d, 1, c), (1, 1, 1, c), (a, 1, 1, 1)]))
        values.append(q)
        scales.append((rng.random(sshape) + 0.5).astype(np.float32))
    in_perm = rng.permutation(M) if data.draw(st.booleans()) else None
    out_perm = rng.permutation(N) if data.draw(st.booleans()) else None
    bias = rng.standard_normal(N).astype(np.float32) if data.draw(st.booleans()) else None
    lead = tuple(data.draw(st.lists(st.integers(0, 5), min_size=0, max_size=2)))
    if not lead:
        lead = (data.draw(st.integers(0, 40)),)
    x_last = M
    flat = [v for p in pats for v in p]
    l = data.draw(st.integers(0, L - 1))
    a, b, c, d = pats[l]
    if mut == "bad_chain" and L > 1:
        flat[4 * l + 1 + (l == 0)] += 1
    elif mut == "values_shape":
        values[l] = np.zeros((a, d, b + 1, c), np.float32)
    elif mut == "values_dtype":
        values[l] = values[l].astype(data.draw(st.sampled_from([np.int32, np.float64, np.uint8, np.int16])))
    elif mut == "scale_shape":
        scales[l] = np.ones(data.draw(st.sampled_from([(1, 1, 2, 1), (1, 1, 1), (a + 1, d, 1, 1), (1,) * 5])),
                            np.float32)
    elif mut == "scale_dtype":
        scales[l] = scales[l].astype(np.float16)
    elif mut == "in_perm":
        in_perm = np.concatenate([np.arange(M), [0]]) if data.draw(st.booleans()) else np.full(M, M)
    elif mut == "out_perm":
        out_perm = np.arange(N)[:-1] if N > 1 else np.array([-1])
    elif mut == "x_dim":
        x_last = M + data.draw(st.sampled_from([-1, 1])) if M > 1 else M + 1
    elif mut == "bias_shape":
        bias = np.ones(N + 1, np.float32)
    elif mut == "patterns_len":
        flat = flat[:-1]
    elif mut == "pattern_zero":
        flat[data.draw(st.integers(0, len(flat) - 1))] = 0
    elif mut == "pattern_negative":
        flat[data.draw(st.integers(0, len(flat) - 1))] = -3
    else:
        mut = "none"
    x = rng.standard_normal(lead + (x_last,)).astype(np.float32)
    inits, names = [], []
    for i, (v, s) in enumerate(zip(values, scales)):  # no dtype normalization: mutations must survive
        inits += [numpy_helper.from_array(np.asarray(v), f"v{i}"), numpy_helper.from_array(np.asarray(s), f"s{i}")]
        names += [f"v{i}", f"s{i}"]
    bias_name = ""
    if bias is not None:
        bias_name = "bias"
        inits.append(numpy_helper.from_array(bias, "bias"))
    attrs = {"patterns": flat}
    if in_perm is not None:
        attrs["in_perm"] = [int(v) for v in in_perm]
    if out_perm is not None:
        attrs["out_perm"] = [int(v) for v in out_perm]
    node = helper.make_node("KSMatMul", ["X", bias_name, *names], ["Y"], domain="ai.bfc", **attrs)
    graph = helper.make_graph(
        [node], "fuzz", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * len(lead) + [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=ops.opset_imports(), ir_version=ops.DEFAULT_IR_VERSION)
    ref = None
    if mut == "none":
        factors = [t for v, s in zip(values, scales) for t in (v, s)]
        ref = ops.ks_matmul_reference(x, bias, factors, flat, in_perm, out_perm)
    return model, x, mut, ref, fmts


def _worker(n_examples):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    counts = {}

    @settings(max_examples=n_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        model, x, mut, ref, fmts = _case(data)
        threads = data.draw(st.sampled_from([1, 2]))
        try:
            y = runtime.session(model, threads=threads).run(None, {"X": x})[0]
        except Exception as exc:  # onnxruntime's exception types
            assert mut != "none", f"valid case failed: {exc}"
            assert "KSMatMul" in str(exc) or "INVALID" in str(exc) or "rank" in str(exc), str(exc)
            counts[mut] = counts.get(mut, 0) + 1
            return
        assert mut in ("none", "bad_chain"), f"mutation {mut} was not rejected"
        if mut == "bad_chain":  # a mutation that happened to keep the chain valid is fine
            return
        assert y.shape == ref.shape
        if y.size:
            err = ref.astype(np.float64) - y
            if "int8" in fmts:
                noise = float(np.sum(err ** 2))
                sig = float(np.sum(ref.astype(np.float64) ** 2))
                assert noise == 0 or sig / noise > 10 ** (INT8_EMULATED_SQNR_DB / 10) or sig < 1e-12, (sig, noise)
            else:
                assert np.linalg.norm(err) <= FLOAT_REL_TOL * max(np.linalg.norm(ref), 1e-6)
        counts["ok"] = counts.get("ok", 0) + 1

    run()
    print("fuzz outcomes:", dict(sorted(counts.items())))


@pytest.mark.skipif(not runtime.is_available(), reason="bfc custom-op library not built")
def test_fuzz_shapes_and_attributes_in_subprocess():
    pytest.importorskip("hypothesis")
    proc = subprocess.run([sys.executable, __file__, str(N_EXAMPLES)], capture_output=True, text=True, timeout=300)
    assert proc.returncode >= 0, f"native library crashed the process (signal {-proc.returncode}):\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "fuzz outcomes" in proc.stdout


if __name__ == "__main__":
    import os

    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    _worker(int(sys.argv[1]) if len(sys.argv) > 1 else N_EXAMPLES)
