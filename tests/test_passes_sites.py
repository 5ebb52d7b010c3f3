"""Every site form on tiny inline models, checked numerically against onnxruntime.

The reference is the *original* model with each rewritten weight replaced by the dense
W_hat of its plan, run in onnxruntime; the rewritten (portable) model must compute the
same function to float32 round-off.
"""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T, helper as h, numpy_helper as nh

from bfc.config import OptimizeConfig
from bfc.errors import ModelError, UnsupportedError
from bfc.passes.cleanup import export
from bfc.passes.find_sites import find_sites
from bfc.passes.plan import plan_sites
from bfc.passes.rewrite_portable import rewrite_portable
from bfc.passes.session import run, session

REWRITE_RTOL = 2e-5          # rewritten graph vs the same W_hat as a dense MatMul, float32
RNG = np.random.default_rng(0)
CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, min_size=0, precision="fp32", verify=False)


def model(nodes, inputs, outputs, inits, opset=21):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def w(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def optimize_parts(m, cfg=CFG):
    graph = gs.import_onnx(m)
    sites = find_sites(graph)
    plans = plan_sites(sites, cfg)
    rewrite_portable(graph, plans, 21)
    out = export(graph, m, [p.site.name for p in plans if p.rewritten])
    return out, plans


def reference_model(m, plans):
    """The original model with each rewritten weight set to its dense W_hat."""
    ref = onnx.ModelProto()
    ref.CopyFrom(m)
    inits = {t.name: t for t in ref.graph.initializer}
    consts = {n.output[0]: n for n in ref.graph.node if n.op_type == "Constant"}
    for p in plans:
        if not p.rewritten:
            continue
        dense = p.weights.to_dense().astype(p.site.weight.dtype)
        trans_b = any(n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)
                      for n in ref.graph.node if p.site.weight_name in n.input[1:2])
        arr = np.ascontiguousarray(dense.T if trans_b else dense)
        if p.site.weight_name in inits:
            inits[p.site.weight_name].CopyFrom(nh.from_array(arr, p.site.weight_name))
        else:
            consts[p.site.weight_name].attribute[0].t.CopyFrom(nh.from_array(arr, p.site.weight_name))
    return ref


def check_equivalent(m, feeds, cfg=CFG, rtol=REWRITE_RTOL):
    out, plans = optimize_parts(m, cfg)
    assert any(p.rewritten for p in plans)
    got = run(session(out), feeds)
    want = run(session(reference_model(m, plans)), feeds)
    for g, r in zip(got, want):
        assert g.shape == r.shape
        err = np.linalg.norm(g.astype(np.float64) - r) / np.linalg.norm(r)
        assert err < rtol, err
    return out, plans


@pytest.mark.parametrize("shape", [[5, 48], [2, 3, 48], [2, 2, 3, 48], [48]])
def test_matmul_any_rank(shape):
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", shape)], [vi("y", None)],
              [nh.from_array(w((48, 80)), "W")])
    out, plans = check_equivalent(m, {"x": w(shape)})
    assert plans[0].structure == "monarch r2"
    assert all(n.name.startswith("bfc/") for n in out.graph.node)


def test_matmul_dynamic_rank3_input_shapes():
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["B", "S", 64])], [vi("y", None)],
              [nh.from_array(w((64, 64)), "W")])
    out, _ = optimize_parts(m)
    sess = session(out)
    for b, s in ((1, 1), (3, 7)):
        assert sess.run(None, {"x": w((b, s, 64))})[0].shape == (b, s, 64)


@pytest.mark.parametrize("alpha,beta,trans_a,trans_b,bias", [
    (1.0, 1.0, 0, 0, (80,)), (0.5, 2.0, 0, 1, (80,)), (1.5, 0.25, 1, 1, (1, 80)),
    (1.0, 3.0, 1, 0, (6, 80)), (2.0, 1.0, 0, 1, ()), (1.0, 1.0, 0, 0, None)])
def test_gemm_forms(alpha, beta, trans_a, trans_b, bias):
    wt = w((80, 48) if trans_b else (48, 80))
    ins = ["a", "B"] + ([] if bias is None else ["C"])
    inits = [nh.from_array(wt, "B")] + ([] if bias is None else [nh.from_array(w(bias), "C")])
    node = h.make_node("Gemm", ins, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    m = model([node], [vi("a", [48, 6] if trans_a else [6, 48])], [vi("y", None)], inits)
    check_equivalent(m, {"a": w((48, 6) if trans_a else (6, 48))})


def test_gemm_runtime_bias_with_beta():
    node = h.make_node("Gemm", ["a", "B", "c"], ["y"], name="gemm", beta=0.5, transB=1)
    m = model([node], [vi("a", [4, 48]), vi("c", [80])], [vi("y", None)], [nh.from_array(w((80, 48)), "B")])
    check_equivalent(m, {"a": w((4, 48)), "c": w((80,))})


def test_constant_node_weight():
    const = h.make_node("Constant", [], ["W"], value=nh.from_array(w((48, 80)), "W"))
    m = model([const, h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [3, 48])], [vi("y", None)], [])
    _, plans = check_equivalent(m, {"x": w((3, 48))})
    assert plans[0].rewritten


def test_shared_weight_is_factorized_once():
    nodes = [h.make_node("MatMul", ["x", "W"], ["y1"], name="mm1"), h.make_node("Relu", ["y1"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y2"], name="mm2"), h.make_node("MatMul", ["x", "W"], ["y3"], name="mm3")]
    m = model(nodes, [vi("x", [3, 64])], [vi("y2", None), vi("y3", None)],
              [nh.from_array(w((64, 64)), "W"), nh.from_array(w((64, 64)), "W2")])
    out, plans = check_equivalent(m, {"x": w((3, 64))})
    assert [len(p.site.nodes) for p in plans] == [2, 1]
    factor_inits = [t.name for t in out.graph.initializer if "/w_" in t.name]
    assert len(factor_inits) == 4          # two factors for W (shared by mm1, mm3) + two for W2


def test_fp16_model():
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [4, 64], T.FLOAT16)],
              [vi("y", None, T.FLOAT16)], [nh.from_array(w((64, 64), np.float16), "W")])
    out, _ = check_equivalent(m, {"x": w((4, 64), np.float16)}, cfg=CFG.replace(precision="fp16"), rtol=3e-3)
    assert out.graph.output[0].type.tensor_type.elem_type == T.FLOAT16


def _reasons(m):
    return {s.name: s.reason for s in find_sites(gs.import_onnx(m))}


def test_unsupported_forms_get_reasons():
    then = h.make_graph([h.make_node("MatMul", ["x", "Wi"], ["z"], name="inner")], "then", [], [vi("z", None)],
                        [nh.from_array(w((64, 64)), "Wi")])
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="ok"),
             h.make_node("MatMul", ["x", "x2"], ["y2"], name="runtime"),
             h.make_node("MatMul", ["Wc", "x"], ["y3"], name="first"),
             h.make_node("If", ["cond"], ["y4"], name="branch", then_branch=then, else_branch=then)]
    m = model(nodes, [vi("x", [64, 64]), vi("x2", [64, 64]), vi("cond", [], T.BOOL)],
              [vi("y", None), vi("y2", None), vi("y3", None), vi("y4", None)],
              [nh.from_array(w((64, 64)), "W"), nh.from_array(w((64, 64)), "Wc")])
    r = _reasons(m)
    assert r["ok"] is None
    assert "computed at run time" in r["runtime"]
    assert "first input" in r["first"]
    assert "subgraph" in r["inner"]


def test_nan_weight_is_a_model_error():
    bad = w((64, 64))
    bad[3, 4] = np.nan
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 64])], [vi("y", None)],
              [nh.from_array(bad, "W")])
    with pytest.raises(ModelError, match="NaN or Inf"):
        find_sites(gs.import_onnx(m))


def test_fp8_needs_opset_19():
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 64])], [vi("y", None)],
              [nh.from_array(w((64, 64)), "W")], opset=17)
    graph = gs.import_onnx(m)
    plans = plan_sites(find_sites(graph), CFG.replace(precision="fp8-e4m3"))
    with pytest.raises(UnsupportedError, match="opset >= 19"):
        rewrite_portable(graph, plans, 17)
