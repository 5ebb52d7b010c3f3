"""int4 KS factors: the format, the optimal scale search vs absmax RTN, packed bytes, ONNX INT4
emission (portable / ort targets, DequantizeLinear-21) and the planner with precision="int4"."""
import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.config import OptimizeConfig, Precision
from bfc.errors import UnsupportedError
from bfc.factorize import relative_error
from bfc.factorize.result import KSFactorization
from bfc.ks import butterfly_chain, chainable_chain, monarch_chain
from bfc.passes.model_io.session import session
from bfc.passes.pipeline import run_passes
from bfc.passes.targets import get_target
from bfc.quant import FORMATS, INT4, Kind, get_format, quantize
from bfc.quant.scales import Granularity, absmax_scale, optimal_int_scale, to_groups

#: optimal (exact per-group scale search) / absmax-RTN product error, mean over seeds
OPT_OVER_RTN_MEAN = 0.95
ORT_RTOL = 1e-5
CHAINS = {"butterfly64": lambda: butterfly_chain(64), "monarch64x96": lambda: monarch_chain(64, 96),
          "chainable-r4": lambda: chainable_chain(96, 128, rank=4)}


def _rand(chain, seed, low_rank=False, perms=False):
    rng = np.random.default_rng(seed)
    m, n = chain.shape
    return KSFactorization(chain, tuple(chain.random_values(rng)),
                           rng.permutation(m) if perms else None, rng.permutation(n) if perms else None,
                           (rng.standard_normal((m, 2)), rng.standard_normal((n, 2))) if low_rank else None)


def test_format_table():
    f = FORMATS["int4"]
    assert f is INT4 is get_format("int4") is Precision.INT4.format
    assert (f.kind, f.bits, f.max, f.dtype, f.onnx_type) == (Kind.INT, 4, 7.0, np.dtype(np.int8), T.INT4)
    assert f.max_index == 7


@pytest.mark.parametrize("gran", ["channel", "block"])
@pytest.mark.parametrize("method", ["rtn", "l2r", "balanced", "pairwise", "auto"])
def test_values_scales_bytes(gran, method):
    f = _rand(monarch_chain(24, 32), 0, low_rank=True, perms=True)
    q = quantize(f, "int4", method=method, granularity=gran)
    assert q.fmt == "int4"
    for p, qf in zip(f.chain, q.factors):
        assert qf.values.dtype == np.int8 and qf.values.shape == p.value_shape
        assert np.abs(qf.values).max() <= 7
        a, d, _, c = p.value_shape
        assert qf.scale.shape == ((a, d, 1, c) if gran == "channel" else (a, d, 1, 1))
    packed = sum((qf.values.size + 1) // 2 + 4 * qf.scale.size for qf in q.factors)
    extra = 4 * sum(m.size for m in f.low_rank) + 8 * (f.row_perm.size + f.col_perm.size)
    assert q.nbytes == packed + extra
    assert q.nbytes < quantize(f, "int8", method=method, granularity=gran).nbytes


def test_odd_value_count_rounds_up():
    chain = chainable_chain(15, 21)
    q = quantize(_rand(chain, 1), "int4", method="rtn")
    assert q.nbytes == sum((qf.values.size + 1) // 2 + 4 * qf.scale.size for qf in q.factors)


def test_optimal_scale_never_worse_than_absmax_per_group():
    v = np.random.default_rng(3).standard_normal((1, 8, 16, 8))
    for gran in (Granularity.CHANNEL, Granularity.BLOCK):
        for s in (absmax_scale(v, gran, INT4), optimal_int_scale(v, gran, INT4)):
            assert s.dtype == np.float32
        err = {}
        for name, s in (("abs", absmax_scale(v, gran, INT4)), ("opt", optimal_int_scale(v, gran, INT4))):
            s64 = s.astype(np.float64)
            err[name] = np.sum(to_groups((v - s64 * np.clip(np.rint(v / s64), -7, 7)) ** 2, gran), axis=1)
        assert np.all(err["opt"] <= err["abs"] * (1 + 1e-12))


def test_optimal_scale_matches_brute_force():
    """Exact search: no scale on a fine grid does better than the chosen one (qmax 7)."""
    rng = np.random.default_rng(5)
    v = rng.standard_normal((1, 12, 6, 1))
    s = optimal_int_scale(v, Granularity.CHANNEL, INT4).astype(np.float64).reshape(-1)
    g = to_groups(v, Granularity.CHANNEL)
    amax = np.abs(g).max(axis=1)
    cand = amax[:, None] / 7 * np.linspace(0.3, 1.6, 20001)[None, :]
    q = np.clip(np.rint(g[:, :, None] / cand[:, None, :]), -7, 7)
    best = np.min(np.sum((g[:, :, None] - cand[:, None, :] * q) ** 2, axis=1), axis=1)
    got = np.sum((g - s[:, None] * np.clip(np.rint(g / s[:, None]), -7, 7)) ** 2, axis=1)
    assert np.all(got <= best * (1 + 1e-6) + 1e-15)


@pytest.mark.parametrize("gran", ["channel", "block"])
@pytest.mark.parametrize("name", list(CHAINS))
def test_optimal_beats_absmax_rtn(name, gran):
    ratios = []
    for seed in range(4):
        f = _rand(CHAINS[name](), seed)
        rtn = quantize(f, "int4", method="rtn", granularity=gran)
        opt = quantize(f, "int4", method="l2r", granularity=gran)
        assert opt.rel_error <= rtn.rel_error * (1 + 1e-12)
        ratios.append(opt.rel_error / rtn.rel_error)
    assert np.mean(ratios) <= OPT_OVER_RTN_MEAN, ratios


def test_int8_unchanged_by_int4():
    f = _rand(monarch_chain(24, 32), 2)
    q = quantize(f, "int8", method="l2r")
    assert q.factors[0].values.dtype == np.int8 and np.abs(q.factors[0].values).max() > 7
    assert q.nbytes == sum(qf.values.size + 4 * qf.scale.size for qf in q.factors)


# ---- graph targets ---------------------------------------------------------------------------
def _model(m, n, opset=21, seed=0, structured=False):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((m, n))
    if structured:          # a Monarch (rank 2) product plus 1% noise: the budget is reachable
        chain = monarch_chain(m, n, rank=2)
        w = chain.to_dense(chain.random_values(rng))
        w += 0.01 * np.linalg.norm(w) / np.sqrt(w.size) * rng.standard_normal((m, n))
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["B", m])], [h.make_tensor_value_info("y", T.FLOAT, None)],
                     [nh.from_array(w.astype(np.float32), "W")])
    mod = h.make_model(g, opset_imports=[h.make_opsetid("", opset)])
    mod.ir_version = 10
    return mod


def test_checks():
    assert get_target("portable").check(INT4, 21) is None
    assert get_target("ort").check(INT4, 21) is None
    assert "opset >= 21" in get_target("portable").check(INT4, 20)
    assert "opset >= 21" in get_target("ort").check(INT4, 19)
    assert get_target("custom-op").check(INT4, 21) == "the KSMatMul kernels take int8/fp8/fp16/fp32 values"
    for fmt in ("int8", "fp8-e4m3", "fp16", "fp32"):
        assert get_target("custom-op").check(get_format(fmt), 21) is None


@pytest.mark.parametrize("target", ["portable", "ort"])
@pytest.mark.parametrize("structure,rank,gran_budget", [("monarch", 2, None), ("butterfly", 1, None),
                                                         ("monarch", 2, 0.3)])
def test_planner_int4_end_to_end(target, structure, rank, gran_budget):
    m, n = (96, 64) if structure == "monarch" else (64, 64)
    mod = _model(m, n, structured=gran_budget is not None)
    cfg = OptimizeConfig(structure=structure, rank=rank, max_error=gran_budget, max_output_error=None, min_size=0, precision="int4",
                         target=target, verify=False)
    state = run_passes(mod, cfg)
    plan = state.plans[0]
    assert plan.rewritten and plan.precision == "int4", plan.reason
    q, out = plan.weights, state.output
    onnx.checker.check_model(out)
    x = np.random.default_rng(7).standard_normal((9, m)).astype(np.float32)
    y = session(out).run(None, {"x": x})[0]
    assert relative_error(q.apply(x.astype(np.float64)), y) < ORT_RTOL
    vals = [t for t in out.graph.initializer if t.data_type == T.INT4]
    assert len(vals) == len(q.chain)
    # packed two per byte: the INT4 initializers' bytes are the values' share of q.nbytes
    packed = sum(len(t.raw_data) for t in vals)
    assert packed == sum((v.size + 1) // 2 for v in q.values)
    assert not any(t.data_type == T.INT8 for t in out.graph.initializer)
    if gran_budget is not None:
        assert plan.error <= gran_budget


def test_int4_below_opset_21_is_refused():
    mod = _model(96, 64, opset=19)
    cfg = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision="int4",
                         target="portable", verify=False)
    with pytest.raises(UnsupportedError, match="opset >= 21"):
        run_passes(mod, cfg)


def test_custom_op_refuses_int4():
    mod = _model(96, 64)
    cfg = OptimizeConfig(structure="monarch", rank=2, max_error=None, max_output_error=None, min_size=0, precision="int4",
                         target="custom-op", verify=False)
    with pytest.raises(UnsupportedError, match="KSMatMul kernels take int8/fp8/fp16/fp32"):
        run_passes(mod, cfg)
