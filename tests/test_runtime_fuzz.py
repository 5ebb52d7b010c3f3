"""Fuzzing of KSMatMul shapes, dims, dtypes and attributes through real ORT sessions.

Two fuzzers, each running its cases in a subprocess: a crash of the native library
(segfault, abort, also inside onnxruntime's shape inference of the ops that follow) makes
the subprocess die by a signal and fails the test.  Valid cases must match the numpy
reference (bfc.ops); every broken case must come back as an onnxruntime exception.

* hypothesis (derandomized): chains, value formats, scale shapes, node mutations;
* graph fuzz (numpy, fixed integer seeds): declared X ranks and dims (known, 0, huge,
  named, unnamed, negative), wrong last dims, scalar X, followed by Slice / Shape ->
  Reshape consumers, plus attribute, dtype and input-count mutations; sessions with and
  without graph optimizations; the inferred output shape must never hold a negative dim;
* LowBitMatMul GEMV fuzz (fixed integer seeds): 0..12 rows (the 1..8-row kernels that stream
  the weights once, and the batch path's tails) in X of rank 1..3, ragged groups, 1..200
  outputs (several 64-output panels, partial ones), float16 / float32 scales, every ISA the
  CPU has, 1 or 2 threads; valid cases equal the numpy spec bit for bit, mutated attributes,
  initializers, inputs and run-time shapes come back as errors.
"""
import ast
import subprocess
import sys

import numpy as np
import pytest

from bfc import runtime

N_EXAMPLES = 250
FLOAT_REL_TOL = 2e-5
BF16_EMULATED_REL_TOL = 3e-4  # fp8 on avx512bf16 vs the reference rounding the same activations to bf16
_BF16 = None


def _fp8_bf16():
    """Whether this process's KSMatMul kernels run fp8 as bf16 dot products (bfc.ops numerics)."""
    global _BF16
    if _BF16 is None:
        from bfc import ops
        _BF16 = ops.fp8_bf16_active()
    return _BF16


def _float_tol(fmts):
    return BF16_EMULATED_REL_TOL if _fp8_bf16() and any(str(f).startswith("fp8") for f in fmts) else FLOAT_REL_TOL
INT8_EMULATED_SQNR_DB = 40  # tiny random chains: occasional rounding flips weigh more

MUTATIONS = ["none", "none", "none", "bad_chain", "values_shape", "values_dtype", "scale_shape", "scale_dtype",
             "in_perm", "out_perm", "x_dim", "bias_shape", "patterns_len", "pattern_zero", "pattern_negative"]


def _ks_node(values, scales, bias, flat, in_perm, out_perm, out: str, extra_inputs: int = 0):
    """(KSMatMul node X -> out, its initializers), values/scales kept as given (mutations must survive);
    extra_inputs > 0 appends an input, < 0 drops the last one."""
    from onnx import helper, numpy_helper
    inits, names = [], []
    for i, (v, s) in enumerate(zip(values, scales)):
        inits += [numpy_helper.from_array(np.asarray(v), f"v{i}"), numpy_helper.from_array(np.asarray(s), f"s{i}")]
        names += [f"v{i}", f"s{i}"]
    if extra_inputs > 0:
        inits.append(numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "extra"))
        names.append("extra")
    elif extra_inputs < 0:
        names = names[:-1]
    bias_name = ""
    if bias is not None:
        bias_name = "bias"
        inits.append(numpy_helper.from_array(bias, "bias"))
    attrs = {"patterns": flat}
    if in_perm is not None:
        attrs["in_perm"] = [int(v) for v in in_perm]
    if out_perm is not None:
        attrs["out_perm"] = [int(v) for v in out_perm]
    return helper.make_node("KSMatMul", ["X", bias_name, *names], [out], domain="ai.bfc", **attrs), inits

def _divisors(n):
    return [k for k in range(1, n + 1) if n % k == 0]


def _case(data):
    """Draws one model + input; returns (model, x, expect_ok, reference or None)."""
    from hypothesis import strategies as st
    from onnx import TensorProto, helper

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
    node, inits = _ks_node(values, scales, bias, flat, in_perm, out_perm, "Y")
    graph = helper.make_graph(
        [node], "fuzz", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * len(lead) + [None])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=ops.opset_imports(21), ir_version=ops.DEFAULT_IR_VERSION)
    ref = None
    if mut == "none":
        factors = [t for v, s in zip(values, scales) for t in (v, s)]
        ref = ops.ks_matmul_reference(x, bias, factors, flat, in_perm, out_perm, fp8_bf16=_fp8_bf16())
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
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
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
                assert np.linalg.norm(err) <= _float_tol(fmts) * max(np.linalg.norm(ref), 1e-6)
        counts["ok"] = counts.get("ok", 0) + 1

    run()
    print("fuzz outcomes:", dict(sorted(counts.items())))


# ---- graph fuzz: declared dims, consumers, mutations (fixed integer seeds) ----------------
GRAPH_SEEDS = range(300)
HUGE_DIM = 2**40
# mutations that make the node or its inputs invalid (each one always is)
GRAPH_MUTATIONS = ["patterns_len", "pattern_value", "values_dtype", "values_shape", "scale_dtype", "scale_shape",
                   "in_perm", "out_perm", "bias_shape", "input_count", "x_last", "x_scalar"]


def _graph_case(seed):
    """One model + input from an integer seed: (model, x or None, expect, check) where expect is
    'ok' (must run and match), 'error' (must raise), 'any' (either; a success must match) and
    check(y, h) compares the outputs with the reference."""
    from onnx import TensorProto, helper, numpy_helper

    from bfc import ops

    rng = np.random.default_rng(seed)
    pats = [tuple(int(v) for v in rng.integers(1, 5, 4))]
    for _ in range(int(rng.integers(0, 3))):
        out = pats[-1][0] * pats[-1][2] * pats[-1][3]
        a = int(rng.choice(_divisors(out)))
        d = int(rng.choice(_divisors(out // a)))
        pats.append((a, out // (a * d), int(rng.integers(1, 5)), d))
    M, N = pats[0][0] * pats[0][1] * pats[0][3], pats[-1][0] * pats[-1][2] * pats[-1][3]
    fmts = [str(rng.choice(list(ops.VALUE_TYPES))) for _ in pats]
    values, scales = [], []
    for (a, b, c, d), fmt in zip(pats, fmts):
        values.append(ops.quantize_factor(rng.standard_normal((a, d, b, c)), fmt, "tensor")[0])
        scales.append((rng.random((a, d, 1, c)) + 0.5).astype(np.float32))
    flat = [v for p in pats for v in p]
    in_perm = rng.permutation(M) if rng.random() < 0.5 else None
    out_perm = rng.permutation(N) if rng.random() < 0.5 else None
    bias = rng.standard_normal(N).astype(np.float32) if rng.random() < 0.5 else None
    # declared X: rank 1..4, leading dims known / 0 / huge / named / unnamed / negative
    rank = int(rng.integers(1, 5))
    kinds = [str(rng.choice(["known", "known", "zero", "huge", "named", "unnamed", "negative"])) for _ in range(rank - 1)]
    actual = [int(rng.integers(0, 4)) if k == "zero" else int(rng.integers(1, 6)) for k in kinds]
    actual = [0 if k == "zero" else v for k, v in zip(kinds, actual)]
    declared = [v if k in ("known", "zero") else HUGE_DIM if k == "huge" else f"s{i}" if k == "named"
                else None if k == "unnamed" else -1 for i, (k, v) in enumerate(zip(kinds, actual))]
    declared.append(str(rng.choice(["M", "named", "unnamed"])))
    declared[-1] = M if declared[-1] == "M" else "m" if declared[-1] == "named" else None
    x_shape = actual + [M]
    expect = "any" if "negative" in kinds else "ok"
    mut = str(rng.choice(GRAPH_MUTATIONS)) if rng.random() < 0.6 else "none"
    l = int(rng.integers(0, len(pats)))
    a, b, c, d = pats[l]
    extra_inputs = 0
    if mut == "patterns_len":
        flat = flat[:-int(rng.integers(1, 4))] if rng.random() < 0.5 else flat + [1] * int(rng.integers(1, 4))
    elif mut == "pattern_value":
        flat[int(rng.integers(0, len(flat)))] = int(rng.choice([0, -1, -7, 2**31, 2**62]))
    elif mut == "values_dtype":
        values[l] = values[l].astype(rng.choice([np.int32, np.float64, np.uint8, np.int16, np.bool_]))
    elif mut == "values_shape":
        values[l] = np.zeros([(a, d, b + 1, c), (a, d, b * c), (a, d, b, c, 1)][int(rng.integers(0, 3))], np.float32)
    elif mut == "scale_dtype":
        scales[l] = scales[l].astype(rng.choice([np.float16, np.float64]))
    elif mut == "scale_shape":
        scales[l] = np.ones([(1, 1, 2, 1), (1, 1, 1), (1,) * 5, (a + 1, d, 1, 1), ()][int(rng.integers(0, 5))],
                            np.float32)
    elif mut == "in_perm":
        in_perm = [np.concatenate([np.arange(M), [0]]), np.full(M, M), -np.arange(M) - 1][int(rng.integers(0, 3))]
    elif mut == "out_perm":
        out_perm = np.arange(N)[:-1] if N > 1 else np.array([-1])
    elif mut == "bias_shape":
        bias = np.ones([(N + 1,), (1, N), ()][int(rng.integers(0, 3))], np.float32)
    elif mut == "input_count":
        extra_inputs = 1 if rng.random() < 0.5 else -1
    elif mut == "x_last":
        x_shape[-1] = M + 1 if M == 1 or rng.random() < 0.5 else M - 1
        declared[-1] = x_shape[-1] if rng.random() < 0.5 else None
    elif mut == "x_scalar":
        x_shape, declared = [], []
    if mut != "none":
        expect = "error"
    x = rng.standard_normal(x_shape).astype(np.float32)
    node, inits = _ks_node(values, scales, bias, flat, in_perm, out_perm, "H", extra_inputs)
    nodes = [node]
    consumer = str(rng.choice(["none", "slice", "reshape"])) if len(x_shape) >= 1 else "none"
    axis = int(rng.integers(0, len(x_shape))) if x_shape else 0
    const = lambda n, v: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    if consumer == "slice":  # Y = H[..., 0:1, ...] along axis (ONNX Slice inference clamps with the dim)
        inits += [const("st", [0]), const("en", [1]), const("ax", [axis])]
        nodes.append(helper.make_node("Slice", ["H", "st", "en", "ax"], ["Y"]))
    elif consumer == "reshape":  # Y = Reshape(H, Shape(H)[:-1] + [N]) (shape data propagation)
        inits += [const("z", [0]), const("e", [-1]), const("n", [N])]
        nodes += [helper.make_node("Shape", ["H"], ["sh"]), helper.make_node("Slice", ["sh", "z", "e"], ["lead"]),
                  helper.make_node("Concat", ["lead", "n"], ["tgt"], axis=0),
                  helper.make_node("Reshape", ["H", "tgt"], ["Y"])]
    else:
        nodes.append(helper.make_node("Identity", ["H"], ["Y"]))
    graph = helper.make_graph(nodes, "graph_fuzz", [helper.make_tensor_value_info("X", TensorProto.FLOAT, declared)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("H", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=ops.opset_imports(21), ir_version=ops.DEFAULT_IR_VERSION)
    # a huge declared dim: session creation and shape inference only (X errors show at run time)
    run = "huge" not in kinds or mut.startswith("x_")

    def check(y, h):
        factors = [t for v, s in zip(values, scales) for t in (v, s)]
        ref = ops.ks_matmul_reference(x, bias, factors, flat, in_perm, out_perm, fp8_bf16=_fp8_bf16())
        assert h.shape == ref.shape, (h.shape, ref.shape)
        if consumer == "slice":
            ref_y = ref[(slice(None),) * axis + (slice(0, 1),)]
        else:
            ref_y = ref
        assert y.shape == ref_y.shape and np.array_equal(y, h[(slice(None),) * axis + (slice(0, 1),)]
                                                          if consumer == "slice" else h)
        if h.size:
            err = float(np.linalg.norm(ref.astype(np.float64) - h))
            if "int8" in fmts:
                sig = float(np.linalg.norm(ref.astype(np.float64)))
                assert err == 0 or sig < 1e-6 or 20 * np.log10(sig / err) > INT8_EMULATED_SQNR_DB, (sig, err)
            else:
                assert err <= _float_tol(fmts) * max(float(np.linalg.norm(ref)), 1e-6), err

    return model, (x if run else None), expect, check, mut, N


def _graph_worker(seeds):
    import onnxruntime as ort

    counts = {}
    levels = [ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL]
    for seed in seeds:
        print("case", seed, flush=True)  # the last line names the case if the process dies
        model, x, expect, check, mut, N = _graph_case(seed)
        try:
            sess = runtime.session(model, threads=1 + seed % 2, optimization_level=levels[seed % 2])
            h_shape = [o.shape for o in sess.get_outputs() if o.name == "H"][0]
            # inferred dims are names, None or non-negative values, with N last
            assert all(not isinstance(v, int) or v >= 0 for v in h_shape or []), (seed, h_shape)
            if h_shape:
                assert h_shape[-1] == N, (seed, h_shape)
            outs = sess.run(None, {"X": x}) if x is not None else None
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
            assert expect != "ok", f"seed {seed}: valid case failed: {exc}"
            counts[mut] = counts.get(mut, 0) + 1
            continue
        assert expect != "error", f"seed {seed}: mutation {mut} was not rejected"
        if outs is not None:
            check(*outs)
        counts["ok"] = counts.get("ok", 0) + 1
    print("graph fuzz outcomes:", dict(sorted(counts.items())))


# ---- LowBitMatMul GEMV fuzz (fixed integer seeds) ------------------------------------------
LOWBIT_SEEDS = range(240)
LOWBIT_MUTATIONS = ["bits", "group", "K", "N", "codes_len", "codes_dtype", "scales_shape", "scales_dtype",
                    "bias_shape", "input_count", "x_last", "x_scalar", "no_attr", "attr_type"]


def _lowbit_case(seed):
    """(model, x, mut, isa, threads, ref or None) from an integer seed; mut 'none' must run and match."""
    from onnx import helper, numpy_helper

    from bfc import ops

    rng = np.random.default_rng(10_000 + seed)
    k = int(rng.choice([5, 16, 33, 64, 100, 257]))
    n = int(rng.choice([1, 7, 16, 63, 64, 65, 130, 200]))
    bits = int(rng.choice([2, 3, 4]))
    g = int(rng.choice([k, max(1, k // 3), int(rng.integers(1, k + 1)), min(k, 64), min(k, 32)]))
    sdt = [np.float16, np.float32][int(rng.integers(0, 2))]
    u = rng.integers(0, 1 << bits, (k, n)).astype(np.uint8)
    s = (rng.standard_normal((-(-k // g), n)) * 0.05).astype(sdt)
    if sdt is np.float32 and rng.integers(0, 2):
        s = s.astype(np.float16).astype(np.float32)        # float16-exact float32 scales
    bias = rng.standard_normal(n).astype(np.float32) if rng.integers(0, 2) else None
    model = ops.make_lowbit_matmul_model(u, s, bits=bits, group_size=g, bias=bias, x_shape=None, onnx_opset=21)
    for vi in (model.graph.input[0], model.graph.output[0]):   # any rank (shape inference from the op)
        vi.type.tensor_type.ClearField("shape")
    node = model.graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    inits = {t.name: t for t in model.graph.initializer}
    rows = int(rng.choice([0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 8, 9, 12]))
    lead = [[rows], [1, rows], [rows, 1], []][int(rng.integers(0, 4))] if rows == 1 else \
        [[rows], [1, rows]][int(rng.integers(0, 2))]
    x = rng.standard_normal(lead + [k]).astype(np.float32)
    mut = "none" if seed % 3 else LOWBIT_MUTATIONS[(seed // 3) % len(LOWBIT_MUTATIONS)]
    if mut == "bits":
        attrs["bits"].i = int(rng.choice([0, 1, 5, 8, -3, 2**40]))
    elif mut == "group":
        attrs["group_size"].i = int(rng.choice([0, -1, k + 1, 2**62]))
    elif mut == "K":
        attrs["K"].i = int(rng.choice([0, -5, k + 1, 2**62]))
    elif mut == "N":
        attrs["N"].i = int(rng.choice([0, -5, n + 3, 2**62]))
    elif mut == "codes_len":
        a = numpy_helper.to_array(inits["lb_codes"])
        a = a[:-1] if rng.integers(0, 2) else np.concatenate([a, a[:1]])
        inits["lb_codes"].CopyFrom(numpy_helper.from_array(a, "lb_codes"))
    elif mut == "codes_dtype":
        a = numpy_helper.to_array(inits["lb_codes"])
        inits["lb_codes"].CopyFrom(numpy_helper.from_array(a.astype([np.int8, np.int32][int(rng.integers(0, 2))]), "lb_codes"))
    elif mut == "scales_shape":
        a = numpy_helper.to_array(inits["lb_scales"])
        a = a.reshape(-1) if rng.integers(0, 2) else np.concatenate([a, a[:1]])
        inits["lb_scales"].CopyFrom(numpy_helper.from_array(a, "lb_scales"))
    elif mut == "scales_dtype":
        a = numpy_helper.to_array(inits["lb_scales"])
        inits["lb_scales"].CopyFrom(numpy_helper.from_array(a.astype([np.float64, np.int8][int(rng.integers(0, 2))]), "lb_scales"))
    elif mut == "bias_shape":
        name = "lb_bias"
        b = np.ones(n + 1, np.float32)
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(b, name))
        else:
            model.graph.initializer.append(numpy_helper.from_array(b, name))
            node.input[1] = name
    elif mut == "input_count":
        if rng.integers(0, 2):
            del node.input[-1]
        else:
            node.input.append("lb_codes")
    elif mut == "x_last":
        x = rng.standard_normal(lead + [k + 1]).astype(np.float32)
    elif mut == "x_scalar":
        x = np.asarray(1.0, np.float32)
    elif mut == "no_attr":
        node.attribute.remove(attrs[str(rng.choice(["K", "N", "bits", "group_size"]))])
    elif mut == "attr_type":
        name = str(rng.choice(["K", "bits", "group_size"]))
        node.attribute.remove(attrs[name])
        node.attribute.append(helper.make_attribute(name, [1.5, 2.5]))
    ref = None
    if mut == "none":
        ref = ops.lowbit_matmul_reference(x, bias, ops.lowbit_codes_stream(u, g, bits), s, K=k, N=n, bits=bits,
                                          group_size=g)
    isas = runtime.supported_isas()
    return model, x, mut, isas[seed % len(isas)], 1 + (seed // 2) % 2, ref


def _lowbit_worker(seeds):
    import os

    counts = {}
    for seed in seeds:
        print("case", seed, flush=True)  # the last line names the case if the process dies
        model, x, mut, isa, threads, ref = _lowbit_case(seed)
        os.environ["BFC_KS_ISA"] = isa
        try:
            y = runtime.session(model, threads=threads).run(None, {"X": x})[0]
        except Exception as exc:  # noqa: BLE001 - onnxruntime's exception types
            assert mut != "none", f"seed {seed} ({isa}): valid case failed: {exc}"
            assert "LowBitMatMul" in str(exc) or "INVALID" in str(exc) or "rank" in str(exc), (seed, str(exc)[:300])
            counts[mut] = counts.get(mut, 0) + 1
            continue
        finally:
            os.environ.pop("BFC_KS_ISA", None)
        assert mut == "none", f"seed {seed}: mutation {mut} was not rejected"
        assert y.shape == ref.shape and y.dtype == np.float32, (seed, y.shape, ref.shape)
        assert np.array_equal(y, ref), (seed, isa, float(np.max(np.abs(y - ref))) if y.size else 0.0)
        counts["ok"] = counts.get("ok", 0) + 1
    print("lowbit fuzz outcomes:", dict(sorted(counts.items())))


def _run_child(args):
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, timeout=600)
    last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    assert proc.returncode >= 0, (f"native library crashed the process (signal {-proc.returncode}) at {last}:\n"
                                  f"{proc.stderr[-3000:]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.mark.skipif(not runtime.is_available(), reason="bfc custom-op library not built")
def test_fuzz_shapes_and_attributes_in_subprocess():
    pytest.importorskip("hypothesis")
    assert "fuzz outcomes" in _run_child(["hypothesis", str(N_EXAMPLES)])


@pytest.mark.skipif(not runtime.is_available(), reason="bfc custom-op library not built")
def test_fuzz_graph_dims_and_consumers_in_subprocess():
    out = _run_child(["graph", str(GRAPH_SEEDS.start), str(GRAPH_SEEDS.stop)])
    assert "graph fuzz outcomes" in out
    counts = ast.literal_eval(out.strip().splitlines()[-1].split(":", 1)[1])
    # both valid and rejected cases were reached, and every mutation was drawn
    assert counts.get("ok", 0) >= 50 and set(GRAPH_MUTATIONS) <= set(counts), counts


@pytest.mark.skipif(not runtime.is_available(), reason="bfc custom-op library not built")
def test_fuzz_lowbit_gemv_in_subprocess():
    out = _run_child(["lowbit", str(LOWBIT_SEEDS.start), str(LOWBIT_SEEDS.stop)])
    counts = ast.literal_eval(out.strip().splitlines()[-1].split(":", 1)[1])
    # valid cases ran and matched, and every mutation was drawn and rejected
    assert counts.get("ok", 0) >= 100 and set(LOWBIT_MUTATIONS) <= set(counts), counts


if __name__ == "__main__":
    import os

    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    if sys.argv[1] == "graph":
        _graph_worker(range(int(sys.argv[2]), int(sys.argv[3])))
    elif sys.argv[1] == "lowbit":
        _lowbit_worker(range(int(sys.argv[2]), int(sys.argv[3])))
    else:
        _worker(int(sys.argv[2]) if len(sys.argv) > 2 else N_EXAMPLES)
