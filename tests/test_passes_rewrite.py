"""Each target's rewrite vs the numpy reference of the factorized, quantized layer, in onnxruntime."""
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc import runtime
from bfc.config import OptimizeConfig
from bfc.factorize import chain_for, factorize, relative_error
from bfc.ops import fp8_bf16_active, reference_evaluator
from bfc.passes.export import export
from bfc.passes.find_sites import find_sites
from bfc.passes.model_io.session import session
from bfc.passes.pipeline import run_passes
from bfc.passes.products import LayerPlan
from bfc.passes.rewrite import rewrite
from bfc.passes.targets import get_target
from bfc.quant import cast

FP32_RTOL = 2e-5        # onnxruntime float32 vs numpy float64 reference of the same factors
RNG = np.random.default_rng(1)
TARGETS = ["portable", pytest.param("custom-op", marks=pytest.mark.skipif(
    not runtime.is_available(), reason="bfc custom-op library not built"))]


def matmul_model(m, n, opset=21, shape=("B", None)):
    shape = [shape[0], m] if shape[1] is None else list(shape)
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, shape)], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(RNG.standard_normal((m, n)).astype(np.float32), "W")])
    mod = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    mod.ir_version = 10
    return mod


def rewrite_with(mod, q, target="portable"):
    graph = gs.import_onnx(mod)
    site = find_sites(graph)[0]
    plan = LayerPlan(site, weights=q, structure="test", precision=q.fmt)
    rewrite(graph, [plan], get_target(target), mod.opset_import[0].version)
    return export(graph, mod, [site.name])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "fp8-e4m3", "fp8-e5m2"])
def test_precisions_match_numpy_reference(precision, target):
    """Portable and float formats compute the float product q.apply; the custom op's int8 layer
    computes the per-row-quantized function its target states (``simulate``)."""
    mod = matmul_model(96, 64)
    cfg = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision=precision,
                         quant_method="rtn", target=target, verify=False)
    state = run_passes(mod, cfg)
    q, out = state.plans[0].weights, state.output
    assert q.values[0].dtype.itemsize == {"fp32": 4, "fp16": 2}.get(precision, 1)
    x = RNG.standard_normal((7, 96)).astype(np.float32)
    y = session(out).run(None, {"x": x})[0]
    simulate = get_target(target).simulate(q)
    want = q.apply(x.astype(np.float64)) if simulate is None else simulate(x)
    assert relative_error(want, y) < (1e-3 if precision == "fp16" else FP32_RTOL)
    bf16 = target == "custom-op" and precision.startswith("fp8") and fp8_bf16_active()   # the kernel's numerics
    assert relative_error(reference_evaluator(out, fp8_bf16=bf16).run(None, {"x": x})[0], y) < FP32_RTOL
    stored = {t.data_type for t in out.graph.initializer if "/q_" in t.name or "/w_" in t.name
              or "/values" in t.name}
    want = {"fp32": T.FLOAT, "fp16": T.FLOAT16, "int8": T.INT8, "fp8-e4m3": T.FLOAT8E4M3FN,
            "fp8-e5m2": T.FLOAT8E5M2}[precision]
    assert stored == {want}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("structure,m,n,rank", [("butterfly", 64, 64, 1), ("chain3", 48, 80, 2),
                                                ("monarch", 60, 36, 3), ("butterfly", 32, 128, 1)])
def test_structures_match_factorization_apply(structure, m, n, rank, target):
    mod = matmul_model(m, n)
    w = nh.to_array(mod.graph.initializer[0]).astype(np.float64)
    f = factorize(w, chain_for(structure, m, n, rank))
    out = rewrite_with(mod, cast(f, "fp32"), target)
    x = RNG.standard_normal((5, m))
    y = session(out).run(None, {"x": x.astype(np.float32)})[0]
    assert relative_error(f.apply(x), y) < FP32_RTOL


@pytest.mark.parametrize("target", TARGETS)
def test_permutations_and_low_rank_are_folded(target):
    m, n = 64, 48
    mod = matmul_model(m, n)
    w = nh.to_array(mod.graph.initializer[0]).astype(np.float64)
    f = factorize(w, chain_for("monarch", m, n, 2), perm=RNG.permutation(n), row_perm=RNG.permutation(m),
                  residual_rank=3)
    assert f.row_perm is not None and f.col_perm is not None and f.low_rank is not None
    out = rewrite_with(mod, cast(f, "fp32"), target)
    x = RNG.standard_normal((9, m))
    y = session(out).run(None, {"x": x.astype(np.float32)})[0]
    assert relative_error(f.apply(x), y) < FP32_RTOL
    ops = [nd.op_type for nd in out.graph.node]
    if target == "portable":
        assert ops.count("Transpose") == 2              # only the entry and exit 2-D transposes
        assert ops.count("Gather") <= len(f.chain) + 1  # perms ride on the layout gathers
    else:
        assert ops.count("KSMatMul") == 1 and "Gather" not in ops and "Transpose" not in ops


def test_int8_on_opset_13_uses_per_axis_dequantize():
    mod = matmul_model(64, 64, opset=13)
    cfg = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, quant_method="rtn",
                         verify=False)
    state = run_passes(mod, cfg)
    plans, out = state.plans, state.output
    assert out.opset_import[0].version == 13
    dq = [nd for nd in out.graph.node if nd.op_type == "DequantizeLinear"]
    assert dq and all({a.name for a in nd.attribute} <= {"axis"} for nd in dq)
    x = RNG.standard_normal((3, 64))
    y = session(out).run(None, {"x": x.astype(np.float32)})[0]
    assert relative_error(plans[0].weights.apply(x), y) < FP32_RTOL


def test_output_is_checked_and_loadable_by_ort_ir():
    out = rewrite_with(matmul_model(64, 64), cast(
        factorize(RNG.standard_normal((64, 64)), chain_for("monarch", 64, 64)), "fp32"))
    onnx.checker.check_model(out)
    assert out.ir_version <= 13
    session(out)
