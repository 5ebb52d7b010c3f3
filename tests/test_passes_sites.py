"""Every site form on tiny inline models, through every target, checked numerically.

The reference is the *original* model with each rewritten weight replaced by the dense
W_hat of its plan, run in onnxruntime; the rewritten model (portable and custom-op
targets) must compute the same function to float32 round-off.  The rewritten model is
also run through ``bfc.ops.reference_evaluator`` (onnx's ReferenceEvaluator with the
numpy KSMatMul) and must agree with onnxruntime.
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
from bfc.errors import ModelError, UnsupportedError
from bfc.factorize import relative_error
from bfc.ops import reference_evaluator
from bfc.passes import layer_runner
from bfc.passes.find_sites import find_sites
from bfc.passes.model_io.session import run, session
from bfc.passes.pipeline import run_passes

REWRITE_RTOL = 2e-5          # rewritten graph vs the same W_hat as a dense MatMul, float32
EVALUATOR_RTOL = 1e-5        # onnxruntime vs onnx's ReferenceEvaluator on the same rewritten model
RNG = np.random.default_rng(0)
CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision="fp32",
                     verify=False)
TARGETS = ["portable", pytest.param("custom-op", marks=pytest.mark.skipif(
    not runtime.is_available(), reason="bfc custom-op library not built"))]


def model(nodes, inputs, outputs, inits, opset=21):
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    m.ir_version = 10
    return onnx.shape_inference.infer_shapes(m)    # outputs declared as vi(name, None) get their shapes


def vi(name, shape, dtype=T.FLOAT):
    return h.make_tensor_value_info(name, dtype, shape)


def w(shape, dtype=np.float32):
    return RNG.standard_normal(shape).astype(dtype)


def optimize_parts(m, cfg=CFG):
    state = run_passes(m, cfg)
    return state.output, state.plans


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
    evaluated = reference_evaluator(out).run(None, feeds)
    for g, r, e in zip(got, want, evaluated):
        assert g.shape == r.shape == e.shape
        assert relative_error(r, g) < rtol
        assert relative_error(e, g) < max(rtol, EVALUATOR_RTOL)
    return out, plans


@pytest.mark.parametrize("shape", [[5, 48], [2, 3, 48], [2, 2, 3, 48], [48]])
@pytest.mark.parametrize("target", TARGETS)
def test_matmul_any_rank(shape, target):
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", shape)], [vi("y", None)],
              [nh.from_array(w((48, 80)), "W")])
    out, plans = check_equivalent(m, {"x": w(shape)}, CFG.replace(target=target))
    assert plans[0].structure == "monarch r2"
    assert all(n.name.startswith("bfc/") for n in out.graph.node)
    if target == "custom-op":
        assert [n.op_type for n in out.graph.node if n.domain == "ai.bfc"] == ["KSMatMul"]


@pytest.mark.parametrize("target", TARGETS)
def test_matmul_dynamic_rank3_input_shapes(target):
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["B", "S", 64])], [vi("y", None)],
              [nh.from_array(w((64, 64)), "W")])
    out, _ = optimize_parts(m, CFG.replace(target=target))
    sess = session(out)
    for b, s in ((1, 1), (3, 7)):
        assert sess.run(None, {"x": w((b, s, 64))})[0].shape == (b, s, 64)


@pytest.mark.parametrize("alpha,beta,trans_a,trans_b,bias", [
    (1.0, 1.0, 0, 0, (80,)), (0.5, 2.0, 0, 1, (80,)), (1.5, 0.25, 1, 1, (1, 80)),
    (1.0, 3.0, 1, 0, (6, 80)), (2.0, 1.0, 0, 1, ()), (1.0, 1.0, 0, 0, None)])
@pytest.mark.parametrize("target", TARGETS)
def test_gemm_forms(alpha, beta, trans_a, trans_b, bias, target):
    wt = w((80, 48) if trans_b else (48, 80))
    ins = ["a", "B"] + ([] if bias is None else ["C"])
    inits = [nh.from_array(wt, "B")] + ([] if bias is None else [nh.from_array(w(bias), "C")])
    node = h.make_node("Gemm", ins, ["y"], name="gemm", alpha=alpha, beta=beta, transA=trans_a, transB=trans_b)
    m = model([node], [vi("a", [48, 6] if trans_a else [6, 48])], [vi("y", None)], inits)
    check_equivalent(m, {"a": w((48, 6) if trans_a else (6, 48))}, CFG.replace(target=target))


@pytest.mark.parametrize("target", TARGETS)
def test_gemm_runtime_bias_with_beta(target):
    node = h.make_node("Gemm", ["a", "B", "c"], ["y"], name="gemm", beta=0.5, transB=1)
    m = model([node], [vi("a", [4, 48]), vi("c", [80])], [vi("y", None)], [nh.from_array(w((80, 48)), "B")])
    check_equivalent(m, {"a": w((4, 48)), "c": w((80,))}, CFG.replace(target=target))


@pytest.mark.parametrize("target", TARGETS)
def test_constant_node_weight(target):
    const = h.make_node("Constant", [], ["W"], value=nh.from_array(w((48, 80)), "W"))
    m = model([const, h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [3, 48])], [vi("y", None)], [])
    _, plans = check_equivalent(m, {"x": w((3, 48))}, CFG.replace(target=target))
    assert plans[0].rewritten


@pytest.mark.parametrize("target", TARGETS)
def test_shared_weight_is_factorized_once(target):
    nodes = [h.make_node("MatMul", ["x", "W"], ["y1"], name="mm1"), h.make_node("Relu", ["y1"], ["r"]),
             h.make_node("MatMul", ["r", "W2"], ["y2"], name="mm2"), h.make_node("MatMul", ["x", "W"], ["y3"], name="mm3")]
    m = model(nodes, [vi("x", [3, 64])], [vi("y2", None), vi("y3", None)],
              [nh.from_array(w((64, 64)), "W"), nh.from_array(w((64, 64)), "W2")])
    out, plans = check_equivalent(m, {"x": w((3, 64))}, CFG.replace(target=target))
    assert [len(p.site.nodes) for p in plans] == [2, 1]
    factor_inits = [t.name for t in out.graph.initializer if "/w_" in t.name or "/values" in t.name]
    assert len(factor_inits) == 4          # two factors for W (shared by mm1, mm3) + two for W2


@pytest.mark.parametrize("target", TARGETS)
def test_fp16_model(target):
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [4, 64], T.FLOAT16)],
              [vi("y", None, T.FLOAT16)], [nh.from_array(w((64, 64), np.float16), "W")])
    out, _ = check_equivalent(m, {"x": w((4, 64), np.float16)}, cfg=CFG.replace(precision="fp16", target=target), rtol=3e-3)
    assert out.graph.output[0].type.tensor_type.elem_type == T.FLOAT16


def _reasons(m):
    return {s.name: s.reason for s in find_sites(gs.import_onnx(m))}


def test_unsupported_forms_get_reasons():
    then = h.make_graph([h.make_node("MatMul", ["x", "Wi"], ["z"], name="inner")], "then", [], [vi("z", None)],
                        [nh.from_array(w((64, 64)), "Wi")])
    nodes = [h.make_node("MatMul", ["x", "W"], ["y"], name="ok"),
             h.make_node("MatMul", ["x", "x2"], ["y2"], name="runtime"),
             h.make_node("MatMul", ["Wc", "x3"], ["y3"], name="first"),
             h.make_node("If", ["cond"], ["y4"], name="branch", then_branch=then, else_branch=then)]
    m = model(nodes, [vi("x", [64, 64]), vi("x2", [64, 64]), vi("x3", [2, 64, 64]), vi("cond", [], T.BOOL)],
              [vi("y", None), vi("y2", None), vi("y3", None), vi("y4", None)],
              [nh.from_array(w((64, 64)), "W"), nh.from_array(w((64, 64)), "Wc")])
    r = _reasons(m)
    assert r["ok"] is None
    assert "computed at run time" in r["runtime"]
    assert "first input" in r["first"]       # y = W @ x is rewritten for a 2-D x only
    assert r["inner"] is None                 # subgraph sites are rewritten (tests/test_passes_subgraphs.py)


def test_nan_weight_is_a_model_error():
    bad = w((64, 64))
    bad[3, 4] = np.nan
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 64])], [vi("y", None)],
              [nh.from_array(bad, "W")])
    with pytest.raises(ModelError, match="NaN or Inf"):
        find_sites(gs.import_onnx(m))


@pytest.mark.parametrize("target", ["portable", "custom-op"])
def test_fp8_needs_opset_19_checked_before_planning(target, monkeypatch):
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", [2, 64])], [vi("y", None)],
              [nh.from_array(w((64, 64)), "W")], opset=17)
    monkeypatch.setattr(layer_runner, "plan_site", lambda *a, **k: pytest.fail("planned before the check"))
    with pytest.raises(UnsupportedError, match="opset >= 19"):
        optimize_parts(m, CFG.replace(precision="fp8-e4m3", target=target))


INT8_CFG = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision="int8",
                          verify=False)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", [[5, 48], [2, 3, 48]])
def test_int8_layers_match_the_reference_evaluator(target, shape):
    """int8 factors: onnxruntime equals the numpy reference of each op (the custom op's per-row
    activation quantization included) on the rewritten model."""
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", shape)], [vi("y", None)],
              [nh.from_array(w((48, 80)), "W")])
    out, _ = optimize_parts(m, INT8_CFG.replace(target=target))
    x = w(shape)
    got = session(out).run(None, {"x": x})[0]
    assert relative_error(reference_evaluator(out).run(None, {"x": x})[0], got) < 1e-5


def _layer_error(out, m, x) -> float:
    """Verified relative output error of the whole (one-layer) model on inputs x, in onnxruntime."""
    return relative_error(session(m).run(None, {"x": x})[0], session(out).run(None, {"x": x})[0])


@pytest.mark.parametrize("target", TARGETS)
def test_error_budget_holds_for_the_target_numerics(target, tmp_path):
    """With --max-error E and calibration data, the verified output error of each target's layer is
    within E: the planner scores the custom op with its per-row int8 activations, not in float."""
    from bfc.factorize import chain_for
    budget = 0.02
    chain = chain_for("monarch", 64, 64, 2)                  # an exactly Monarch-structured weight
    wt = chain.to_dense([RNG.standard_normal(p.value_shape) for p in chain])
    m = model([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [vi("x", ["B", 64])], [vi("y", None)],
              [nh.from_array(wt.astype(np.float32), "W")])
    x = (RNG.standard_normal((256, 64)) * np.linspace(0.1, 3, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    cfg = OptimizeConfig(structure="auto", precision="int8", max_error=budget, min_size=0, verify=False,
                         calibration=tmp_path / "calib.npz", target=target)
    out, plans = optimize_parts(m, cfg)
    assert plans[0].rewritten, plans[0].reason
    assert abs(_layer_error(out, m, x) - plans[0].error) < 0.2 * plans[0].error    # the planner measured it
    assert _layer_error(out, m, x) <= budget
