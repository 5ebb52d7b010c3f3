"""Weight forms of real-world exports, through both targets, checked numerically.

Each weight reaches its MatMul/Gemm through a chain of constant-only nodes (Identity,
Transpose, Cast, Reshape, Flatten, (Un)Squeeze, DequantizeLinear, Mul/Div) that the sites
pass folds.  The reference is the original model with each rewritten node's weight input
replaced by an initializer holding the plan's dense W_hat (in the node's own layout), run
in onnxruntime; the optimized model must compute the same function to float round-off,
and onnx's ReferenceEvaluator (``bfc.ops.reference_evaluator``) must agree with it.
Also: exactly Monarch-structured weights behind a chain are recovered (the optimized
model equals the original), quantized matmuls get their reason, shared (unnamed, external
data) weights are factorized once, opset 11 models are upgraded, fp16 models at opset 17
get valid int8 DequantizeLinear scales.
"""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc import runtime
from bfc.config import OptimizeConfig
from bfc.factorize import chain_for, relative_error
from bfc.ops import reference_evaluator
from bfc.passes.find_sites import QUANTIZED_REASON, find_sites, node_key
from bfc.passes.model_io.session import run, session
from bfc.passes.pipeline import optimize, run_passes

RTOL = 2e-5
RNG = np.random.default_rng(7)
CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision="fp32",
                     verify=False)
TARGETS = ["portable", pytest.param("custom-op", marks=pytest.mark.skipif(
    not runtime.is_available(), reason="bfc custom-op library not built"))]


def model(nodes, inputs, outputs, inits, opset=21, infer=True):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10 if opset >= 21 else 8
    return onnx.shape_inference.infer_shapes(m) if infer else m


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def w(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def _all_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)
            for g in a.graphs:
                yield from _all_nodes(g)


def reference_model(m, plans):
    """The original model with every rewritten node reading its plan's dense W_hat (a new main-graph
    initializer, visible in subgraphs as an outer-scope value)."""
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    for i, p in enumerate(plans):
        if not p.rewritten:
            continue
        dense = p.weights.to_dense().astype(p.site.weight.dtype)
        for sn in p.site.nodes:
            for n in _all_nodes(ref.graph):
                key = n.name or f"{n.op_type}:{n.output[0]}"
                if key != sn.name or n.op_type != sn.op:
                    continue
                name = f"ref_w{i}_{len(ref.graph.initializer)}"
                trans_b = n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
                arr = dense.T if (trans_b or sn.trans_out) else dense
                ref.graph.initializer.append(nh.from_array(np.ascontiguousarray(arr), name))
                n.input[0 if sn.trans_out else 1] = name
    return ref


def check(m, feeds, cfg=CFG, rtol=RTOL, evaluator=True):
    """``evaluator=False``: onnx's ReferenceEvaluator has no DequantizeLinear below opset 19."""
    state = run_passes(m, cfg)
    out, plans = state.output, state.plans
    assert any(p.rewritten for p in plans), [p.reason for p in plans]
    got = run(session(out), feeds)
    want = run(session(reference_model(m, plans)), feeds)
    evaluated = reference_evaluator(out).run(None, feeds) if evaluator else got
    for g, r, e in zip(got, want, evaluated):
        assert g.shape == r.shape == e.shape
        assert relative_error(r, g) < rtol
        assert relative_error(e, g) < max(rtol, 1e-5)
    return out, plans, state


def matmul_model(chain_nodes, inits, x_shape=(5, 48), weight="Wf", opset=21, dtype=T.FLOAT):
    nodes = chain_nodes + [h.make_node("MatMul", ["x", weight], ["y"], name="mm")]
    return model(nodes, [vi("x", list(x_shape), dtype)], [vi("y", None, dtype)], inits, opset)


def c64(values, name):
    return nh.from_array(np.asarray(values, np.int64), name)


W48x80 = w((48, 80))
QW = RNG.integers(-100, 100, (48, 80)).astype(np.int8)
QW_U8 = RNG.integers(0, 255, (48, 80)).astype(np.uint8)
FORMS = {
    "identity": ([h.make_node("Identity", ["W"], ["Wf"])], [nh.from_array(W48x80, "W")]),
    "transpose": ([h.make_node("Transpose", ["Wt"], ["Wf"], perm=[1, 0])],
                  [nh.from_array(np.ascontiguousarray(W48x80.T), "Wt")]),
    "cast-fp16": ([h.make_node("Cast", ["W16"], ["Wf"], to=T.FLOAT)], [nh.from_array(W48x80.astype(np.float16), "W16")]),
    "reshape": ([h.make_node("Reshape", ["Wflat", "shape"], ["Wf"])],
                [nh.from_array(W48x80.reshape(-1), "Wflat"), c64([48, -1], "shape")]),
    "flatten": ([h.make_node("Flatten", ["W3"], ["Wf"], axis=1)], [nh.from_array(W48x80.reshape(48, 8, 10), "W3")]),
    "unsqueeze-squeeze": ([h.make_node("Unsqueeze", ["W", "ax"], ["W3"]), h.make_node("Squeeze", ["W3", "ax"], ["Wf"])],
                          [nh.from_array(W48x80, "W"), c64([0], "ax")]),
    "dq-per-tensor": ([h.make_node("DequantizeLinear", ["Q", "s", "z"], ["Wf"])],
                      [nh.from_array(QW_U8, "Q"), nh.from_array(np.array(0.02, np.float32), "s"),
                       nh.from_array(np.array(128, np.uint8), "z")]),
    "dq-per-axis": ([h.make_node("DequantizeLinear", ["Q", "s", "z"], ["Wf"], axis=1)],
                    [nh.from_array(QW, "Q"), nh.from_array((RNG.random(80) * 0.05 + 0.01).astype(np.float32), "s"),
                     nh.from_array(RNG.integers(-3, 3, 80).astype(np.int8), "z")]),
    "dq-blocked": ([h.make_node("DequantizeLinear", ["Q", "s"], ["Wf"], axis=0, block_size=16)],
                   [nh.from_array(QW, "Q"), nh.from_array((RNG.random((3, 80)) * 0.05 + 0.01).astype(np.float32), "s")]),
    "mul-div": ([h.make_node("Mul", ["W", "k"], ["Wm"]), h.make_node("Div", ["Wm", "k2"], ["Wf"])],
                [nh.from_array(W48x80, "W"), nh.from_array(np.array(0.5, np.float32), "k"),
                 nh.from_array(np.full((1, 80), 2.0, np.float32), "k2")]),
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("target", TARGETS)
def test_weight_chain_is_folded_and_rewritten(form, target):
    nodes, inits = FORMS[form]
    m = matmul_model(nodes, inits)
    out, plans, _ = check(m, {"x": w((5, 48))}, CFG.replace(target=target))
    p = plans[0]
    assert p.rewritten and p.site.shape == (48, 80)
    assert "folded from" in p.note
    if form.startswith("dq"):
        assert "dequantized values are re-factorized" in p.note
    assert not any(n.op_type in ("DequantizeLinear", "Cast", "Squeeze", "Flatten") and not n.name.startswith("bfc/")
                   for n in out.graph.node)          # the chain is gone with its only consumer


def test_folded_values_follow_onnx():
    """The folded site weight equals what onnxruntime computes for the chain's output."""
    for form, (nodes, inits) in FORMS.items():
        m = model(nodes, [], [vi("Wf", None)], inits)
        want = session(m).run(None, {})[0]
        sites = find_sites(gs.import_onnx(matmul_model(nodes, inits)))
        np.testing.assert_array_equal(sites[0].weight, want, err_msg=form)
        assert sites[0].weight.dtype == want.dtype


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_weight_on_first_input(target, calibrated, tmp_path):
    """y = W @ x (2-D x) is rewritten as (x^T W^T)^T; calibration sees the rows of x^T."""
    m = model([h.make_node("MatMul", ["W", "x"], ["y"], name="wx")], [vi("x", [48, 6])], [vi("y", None)],
              [nh.from_array(w((80, 48)), "W")])
    cfg = CFG.replace(target=target)
    if calibrated:
        np.savez(tmp_path / "c.npz", x=w((48, 6)))
        cfg = cfg.replace(calibration=tmp_path / "c.npz")
    out, plans, _ = check(m, {"x": w((48, 6))}, cfg)
    assert plans[0].site.shape == (48, 80) and "(x^T W^T)^T" in plans[0].note
    assert plans[0].error_kind == ("output" if calibrated else "weight")
    assert session(out).run(None, {"x": w((48, 6))})[0].shape == (80, 6)


@pytest.mark.parametrize("target", TARGETS)
def test_gemm_fp16_with_bias(target):
    node = h.make_node("Gemm", ["a", "B", "C"], ["y"], name="gemm", transB=1)
    m = model([node], [vi("a", [6, 64], T.FLOAT16)], [vi("y", None, T.FLOAT16)],
              [nh.from_array(w((80, 64), np.float16), "B"), nh.from_array(w((80,), np.float16), "C")])
    out, _, _ = check(m, {"a": w((6, 64), np.float16)}, CFG.replace(precision="fp16", target=target), rtol=3e-3)
    assert out.graph.output[0].type.tensor_type.elem_type == T.FLOAT16


def _monarch_int(scale=1.0):
    """An exactly Monarch-structured 64x64 weight with small integer entries (times ``scale``)."""
    chain = chain_for("monarch", 64, 64, 2)
    return chain.to_dense([RNG.integers(-1, 2, p.value_shape).astype(np.float64) for p in chain]) * scale


EXACT = {
    "transpose": lambda d: ([h.make_node("Transpose", ["Wt"], ["Wf"])],
                            [nh.from_array(np.ascontiguousarray(d.T).astype(np.float32), "Wt")]),
    "identity": lambda d: ([h.make_node("Identity", ["W"], ["Wf"])], [nh.from_array(d.astype(np.float32), "W")]),
    "cast": lambda d: ([h.make_node("Cast", ["W16"], ["Wf"], to=T.FLOAT)], [nh.from_array(d.astype(np.float16), "W16")]),
    "dq": lambda d: ([h.make_node("DequantizeLinear", ["Q", "s"], ["Wf"])],
                     [nh.from_array(np.rint(d / 0.25).astype(np.int8), "Q"), nh.from_array(np.array(0.25, np.float32), "s")]),
}


@pytest.mark.parametrize("form", list(EXACT))
@pytest.mark.parametrize("target", TARGETS)
def test_exact_monarch_behind_a_chain_is_recovered(form, target):
    dense = _monarch_int(0.25)
    nodes, inits = EXACT[form](dense)
    m = matmul_model(nodes, inits, x_shape=(4, 64))
    x = w((4, 64))
    out, plans, _ = check(m, {"x": x}, CFG.replace(target=target))
    assert plans[0].error < 1e-5
    # against x @ W in float64: onnxruntime runs the original DequantizeLinear -> MatMul with int8 activations
    assert relative_error(x.astype(np.float64) @ dense, session(out).run(None, {"x": x})[0]) < 1e-5


def test_quantized_matmuls_get_the_reason():
    nodes = [h.make_node("MatMulInteger", ["xq", "Wq"], ["yi"], name="mmi"),
             h.make_node("MatMulNBits", ["x", "B4", "s4"], ["y4"], name="nbits", domain="com.microsoft",
                         K=64, N=32, bits=4, block_size=32)]
    g = h.make_graph(nodes, "g", [vi("xq", [2, 64], T.UINT8), vi("x", [2, 64])],
                     [vi("yi", [2, 32], T.INT32), vi("y4", [2, 32])],
                     [nh.from_array(RNG.integers(-5, 5, (64, 32)).astype(np.int8), "Wq"),
                      nh.from_array(RNG.integers(0, 255, (32, 2, 16)).astype(np.uint8), "B4"),
                      nh.from_array(np.ones(64, np.float32), "s4")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)])
    reasons = {s.name: s.reason for s in find_sites(gs.import_onnx(m))}
    assert reasons == {"mmi": QUANTIZED_REASON, "nbits": QUANTIZED_REASON}


def _shared_unnamed(transposed_copies=False):
    if transposed_copies:     # one Transpose per consumer over one stored [out, in] weight
        nodes = [h.make_node("Transpose", ["Wt"], ["W1"]), h.make_node("Transpose", ["Wt"], ["W2"]),
                 h.make_node("MatMul", ["x", "W1"], ["y1"]), h.make_node("Relu", ["y1"], ["r"]),
                 h.make_node("MatMul", ["r", "W2"], ["y"])]
        inits = [nh.from_array(w((64, 64)), "Wt")]
    else:
        nodes = [h.make_node("MatMul", ["x", "W"], ["y1"]), h.make_node("Relu", ["y1"], ["r"]),
                 h.make_node("MatMul", ["r", "W"], ["y"])]
        inits = [nh.from_array(w((64, 64)), "W")]
    return model(nodes, [vi("x", [3, 64])], [vi("y", None)], inits, opset=17)


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("target", TARGETS)
def test_shared_weight_unnamed_nodes_factorized_once(copies, target):
    m = _shared_unnamed(copies)
    out, plans, _ = check(m, {"x": w((3, 64))}, CFG.replace(target=target))
    assert len(plans) == 1 and len(plans[0].site.nodes) == 2
    assert all(n.name.startswith("bfc/") or n.op_type == "Relu" for n in out.graph.node)


@pytest.mark.parametrize("target", TARGETS)
def test_external_data_shared_unnamed_weight(target, tmp_path):
    m = _shared_unnamed()
    src = tmp_path / "m.onnx"
    onnx.save(m, str(src), save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
              size_threshold=0)
    before = (src.read_bytes(), (tmp_path / "m.data").read_bytes())
    _, report = optimize(src, CFG.replace(target=target, verify=True), output=tmp_path / "o.onnx")
    assert [r.nodes for r in report.layers] == [2] and report.layers[0].reason is None
    assert report.not_verified is None
    assert before == (src.read_bytes(), (tmp_path / "m.data").read_bytes())


def _opset11():
    nodes = [h.make_node("MatMul", ["x", "W"], ["h1"], name="mm"),
             h.make_node("Unsqueeze", ["h1"], ["h2"], axes=[0]),
             h.make_node("Squeeze", ["h2"], ["h3"], axes=[0]),
             h.make_node("Gemm", ["h3", "B", "C"], ["y"], name="gemm", transB=1)]
    return model(nodes, [vi("x", [4, 64])], [vi("y", [4, 48])],
                 [nh.from_array(w((64, 64)), "W"), nh.from_array(w((48, 64)), "B"), nh.from_array(w((48,)), "C")],
                 opset=11, infer=False)


@pytest.mark.parametrize("target", TARGETS)
def test_opset_11_model_is_upgraded(target, tmp_path):
    m = _opset11()
    out, plans, state = check(m, {"x": w((4, 64))}, CFG.replace(target=target))
    assert all(p.rewritten for p in plans)
    assert [i.version for i in out.opset_import if i.domain == ""] == [13]
    assert any("opset 11 to 13" in n for n in state.notes)
    src = tmp_path / "old.onnx"
    onnx.save(m, str(src))
    _, report = optimize(src, CFG.replace(target=target, verify=True), output=tmp_path / "new.onnx")
    assert report.not_verified is None and all(r.reason is None for r in report.layers)


def test_unconvertible_old_opset_is_one_line_error(monkeypatch):
    from onnx import version_converter

    from bfc.errors import UnsupportedError

    def fail(model, version):
        raise RuntimeError("No Adapter For Foo\nmore")
    monkeypatch.setattr(version_converter, "convert_version", fail)
    with pytest.raises(UnsupportedError, match=r"opset 11 .*No Adapter For Foo\); re-export") as e:
        run_passes(_opset11(), CFG)
    assert "\n" not in str(e.value)


def test_fp16_model_opset17_int8_portable_runs():
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [4, 64], T.FLOAT16)],
              [vi("y", None, T.FLOAT16)], [nh.from_array(w((64, 64), np.float16), "W")], opset=17)
    cfg = CFG.replace(precision="int8", target="portable")
    out, plans, _ = check(m, {"x": w((4, 64), np.float16)}, cfg, rtol=3e-3, evaluator=False)
    assert plans[0].precision == "int8"
    inits = {t.name: t for t in out.graph.initializer}
    scales = [inits[n.input[1]] for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert scales and all(s.data_type == T.FLOAT for s in scales)     # fp16 scales need opset 19
    onnx.checker.check_model(out, full_check=True)


def test_site_key_is_node_key():
    """Reports name unnamed nodes op:first-output; the reference above relies on it."""
    n = gs.Node("MatMul", inputs=[gs.Variable("a"), gs.Variable("b")], outputs=[gs.Variable("o")])
    assert node_key(n) == "MatMul:o"


def test_a_rewrite_larger_than_the_input_is_not_written(tmp_path):
    """An int8 weight behind DequantizeLinear (48x80: 3.8 kB) rewritten as a float32 Monarch chain would grow the
    file: ``optimize`` writes the input's own bytes and every layer is reported dense with the reason."""
    nodes, inits = FORMS["dq-per-axis"]
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(matmul_model(nodes, inits), str(src))
    _, report = optimize(str(src), CFG, output=out)
    assert out.read_bytes() == src.read_bytes()
    assert report.model_bytes_after == report.model_bytes_before
    assert all(r.structure == "dense" and "larger than the input" in r.reason for r in report.layers)
    planned = run_passes(str(src), CFG)                # the plan itself did rewrite it (and grew the model)
    assert planned.plans[0].rewritten and planned.rewritten.nbytes > src.stat().st_size
