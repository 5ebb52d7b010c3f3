"""bfc.ops without the native library: builders, quantization helper, numpy reference."""
import numpy as np
import pytest

from bfc import ops
from bfc.errors import ChainError, ConfigError, InvalidInputError
from bfc.factorize import relative_error
from bfc.factorize.result import KSFactorization, inverse_perm
from bfc.ks.chain import butterfly_chain, chainable_chain, monarch_chain

REF_REL_TOL = 1e-5  # float32 output of a float64 computation


def test_reference_matches_factorization_apply_with_perms():
    rng = np.random.default_rng(0)
    chain = chainable_chain(24, 36, rank=2, n_factors=3)
    vals = chain.random_values(rng)
    M, N = chain.shape
    fact = KSFactorization(chain, tuple(vals), row_perm=rng.permutation(M), col_perm=rng.permutation(N))
    x = rng.standard_normal((5, M))
    in_perm, out_perm = ops.perms_from_factorization(fact)
    assert np.array_equal(out_perm, inverse_perm(fact.col_perm))
    factors = [t for v in vals for t in (v.astype(np.float32), np.ones((1, 1, 1, 1), np.float32))]
    y = ops.ks_matmul_reference(x, None, factors, chain, in_perm, out_perm)
    assert relative_error(fact.apply(x), y) < REF_REL_TOL
    # and against the dense matrix
    assert relative_error(x @ fact.to_dense(), y) < REF_REL_TOL


@pytest.mark.parametrize("fmt", list(ops.VALUE_TYPES))
@pytest.mark.parametrize("gran", ops.GRANULARITIES)
def test_quantize_factor_shapes_and_error(fmt, gran):
    rng = np.random.default_rng(1)
    v = rng.standard_normal((2, 3, 4, 5))
    q, s = ops.quantize_factor(v, fmt, gran)
    assert q.shape == v.shape and s.ndim == 4 and s.shape[2] == 1
    rel = relative_error(v, ops.dequantize_factor(q, s))
    assert rel < {"int8": 0.02, "fp8-e4m3": 0.06, "fp8-e5m2": 0.12, "fp16": 1e-3, "fp32": 1e-7}[fmt]


def test_quantize_factor_rejects_bad_config():
    with pytest.raises(ConfigError):
        ops.quantize_factor(np.ones((1, 1, 2, 2)), "int4")
    with pytest.raises(ConfigError):
        ops.quantize_factor(np.ones((1, 1, 2, 2)), "int8", "row")


def test_reference_evaluator_runs_model_and_int8_emulation_is_close():
    rng = np.random.default_rng(2)
    chain = monarch_chain(64, 48)
    vals = chain.random_values(rng)
    qs = [ops.quantize_factor(v, "int8") for v in vals]
    bias = rng.standard_normal(48)
    model = ops.make_ks_matmul_model(chain, [q for q, _ in qs], [s for _, s in qs], bias=bias,
                                     x_shape=["B", "T", 64], onnx_opset=21)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = ops.reference_evaluator(model).run(None, {"X": x})[0]
    assert y.shape == (2, 3, 48) and y.dtype == np.float32
    factors = [t for q, s in qs for t in (q, s)]
    exact = ops.ks_matmul_reference(x, bias, factors, chain, emulate_int8=False)
    sqnr = 10 * np.log10(np.sum(exact ** 2) / np.sum((y - exact) ** 2))
    assert sqnr > 30


def test_node_builder_and_checker():
    import onnx

    chain = butterfly_chain(8)
    vals = [v.astype(np.float32) for v in chain.random_values(0)]
    model = ops.make_ks_matmul_model(chain, vals, [np.ones((1, 1, 1, 1))] * 3, in_perm=np.arange(8)[::-1], onnx_opset=21)
    onnx.checker.check_model(model)
    node = model.graph.node[0]
    assert (node.domain, node.op_type) == ("ai.bfc", "KSMatMul")
    attrs = {a.name: list(a.ints) for a in node.attribute}
    assert attrs["patterns"] == [1, 2, 2, 4, 2, 2, 2, 2, 4, 2, 2, 1]
    assert attrs["in_perm"] == list(range(8))[::-1] and "out_perm" not in attrs
    assert list(node.input[:2]) == ["X", ""]


def test_reference_errors():
    chain = monarch_chain(16)
    f = [np.ones(p.value_shape, np.float32) for p in chain]
    factors = [f[0], np.ones((1, 1, 1, 1)), f[1], np.ones((1, 1, 1, 1))]
    with pytest.raises(InvalidInputError, match="last dimension"):
        ops.ks_matmul_reference(np.ones((2, 15)), None, factors, chain)
    with pytest.raises(InvalidInputError, match="permutation"):
        ops.ks_matmul_reference(np.ones((2, 16)), None, factors, chain, in_perm=[0] * 16)
    with pytest.raises(InvalidInputError, match="scale"):
        bad = [f[0], np.ones((1, 1, 2, 1)), f[1], np.ones((1, 1, 1, 1))]
        ops.ks_matmul_reference(np.ones((2, 16)), None, bad, chain)
    with pytest.raises(ChainError):
        ops.ks_matmul_reference(np.ones((2, 16)), None, factors, [1, 4, 4, 4, 1, 3, 4, 4])
