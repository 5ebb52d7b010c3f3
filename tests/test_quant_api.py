"""quantize() contract: stored dtypes, scale shapes, dense/apply conventions, bytes,
validation, stochastic rounding, values at the edge of the fp8 range."""
import ml_dtypes
import numpy as np
import pytest

from bfc.errors import ConfigError, InvalidInputError
from bfc.factorize.result import KSFactorization
from bfc.ks import butterfly_chain, monarch_chain
from bfc.quant import FORMATS, QuantizedFactorization, quantize

DTYPES = {"int8": np.int8, "fp8-e4m3": ml_dtypes.float8_e4m3fn, "fp8-e5m2": ml_dtypes.float8_e5m2,
          "fp16": np.float16, "bf16": ml_dtypes.bfloat16}


def factorization(seed=0, perms=True, low_rank=True):
    chain = monarch_chain(24, 32)
    rng = np.random.default_rng(seed)
    M, N = chain.shape
    return KSFactorization(
        chain, tuple(chain.random_values(rng)),
        row_perm=rng.permutation(M) if perms else None,
        col_perm=rng.permutation(N) if perms else None,
        low_rank=(rng.standard_normal((M, 2)), rng.standard_normal((N, 2))) if low_rank else None)


@pytest.mark.parametrize("fmt", list(DTYPES))
def test_contract(fmt):
    f = factorization()
    q = quantize(f, fmt, method="auto")
    assert isinstance(q, QuantizedFactorization) and q.fmt == fmt
    assert q.method in ("rtn", "pairwise", "l2r", "balanced")
    assert q.row_perm is not None and np.array_equal(q.row_perm, f.row_perm)
    assert all(m.dtype == np.float32 for m in q.low_rank)
    for p, qf in zip(f.chain, q.factors):
        assert qf.values.dtype == DTYPES[fmt] and qf.values.shape == p.value_shape
        assert qf.scale.dtype == np.float32 and qf.scale.ndim == 4 and qf.scale.shape[2] == 1
        assert all(s in (1, v) for s, v in zip(qf.scale.shape, p.value_shape))
        np.testing.assert_array_equal(qf.dequantize(),
                                      qf.values.astype(np.float64) * qf.scale.astype(np.float64))
    # to_dense: independent assembly W = P_r^T (K^_1 K^_2) P_c + U V^T with the fp32 residual
    prod = f.chain.to_dense([qf.dequantize() for qf in q.factors])
    w_hat = np.empty_like(prod)
    w_hat[np.ix_(f.row_perm, f.col_perm)] = prod
    u, v = (m.astype(np.float32).astype(np.float64) for m in f.low_rank)
    w_hat += u @ v.T
    np.testing.assert_allclose(q.to_dense(), w_hat, rtol=1e-13, atol=1e-13)
    x = np.random.default_rng(1).standard_normal((5, f.shape[0]))
    np.testing.assert_allclose(q.apply(x), x @ w_hat, rtol=1e-12, atol=1e-12)
    w = f.to_dense()
    assert q.rel_error == pytest.approx(np.linalg.norm(w - w_hat) / np.linalg.norm(w), rel=1e-9)
    nbytes = sum(qf.values.size * FORMATS[fmt].bits // 8 + qf.scale.size * 4 for qf in q.factors)
    perms = 8 * (f.row_perm.size + f.col_perm.size)           # int64 permutation attributes
    assert q.nbytes == nbytes + sum(m.size * 4 for m in f.low_rank) + perms


@pytest.mark.parametrize("gran,shape", [("factor", lambda a, d, b, c: (1, 1, 1, 1)),
                                        ("block", lambda a, d, b, c: (a, d, 1, 1)),
                                        ("channel", lambda a, d, b, c: (a, d, 1, c))])
@pytest.mark.parametrize("fmt", ["int8", "fp8-e4m3"])
def test_scale_granularity_shapes(gran, shape, fmt):
    f = factorization(perms=False, low_rank=False)
    q = quantize(f, fmt, method="rtn", granularity=gran)
    for p, qf in zip(f.chain, q.factors):
        assert qf.scale.shape == shape(*p.value_shape)


def test_defaults_int8_per_channel_float_per_factor():
    f = factorization(perms=False, low_rank=False)
    p = f.chain[0]
    assert quantize(f, "int8", method="rtn").factors[0].scale.shape == (p.a, p.d, 1, p.c)
    assert quantize(f, "fp16", method="rtn").factors[0].scale.shape == (1, 1, 1, 1)
    assert quantize(f, "fp16", method="rtn").factors[0].scale[0, 0, 0, 0] == 1.0


def test_fp8_edge_of_range_saturates_without_nan():
    """Factors far outside the fp8 range: stored values stay finite (scales use the range)
    and the error stays at the format's level; a plain ml_dtypes cast would give NaN."""
    chain = butterfly_chain(16)
    rng = np.random.default_rng(0)
    vals = [rng.standard_normal(p.value_shape) * s for p, s in zip(chain, [1e6, 1e-7, 3e4, 1.0])]
    f = KSFactorization(chain, tuple(vals))
    assert np.isnan(vals[0].astype(ml_dtypes.float8_e4m3fn).astype(np.float64)).any()
    for fmt in ("fp8-e4m3", "fp8-e5m2"):
        for m in ("rtn", "l2r", "pairwise"):
            q = quantize(f, fmt, method=m)
            for qf in q.factors:
                v = qf.values.astype(np.float64)
                assert np.all(np.isfinite(v)) and np.abs(v).max() <= FORMATS[fmt].max
            assert q.rel_error < 0.3


def test_stochastic_rounding_seeded():
    f = factorization(perms=False, low_rank=False)
    a = quantize(f, "fp8-e4m3", method="rtn", rounding="stochastic", seed=3)
    b = quantize(f, "fp8-e4m3", method="rtn", rounding="stochastic", seed=3)
    c = quantize(f, "fp8-e4m3", method="rtn", rounding="stochastic", seed=4)
    n = quantize(f, "fp8-e4m3", method="rtn")
    assert all(np.array_equal(x.values, y.values) for x, y in zip(a.factors, b.factors))
    assert not all(np.array_equal(x.values, y.values) for x, y in zip(a.factors, c.factors))
    assert n.rel_error < a.rel_error < 3 * n.rel_error


@pytest.mark.parametrize("kw,match", [({"fmt": "fp4"}, "fp8-e4m3"),
                                      ({"method": "greedy"}, "l2r"),
                                      ({"rounding": "up"}, "stochastic"),
                                      ({"granularity": "row"}, "channel"),
                                      ({"method": "l2r", "rounding": "stochastic"}, "rtn")])
def test_config_errors_name_the_allowed_set(kw, match):
    args = {"fmt": "fp16", **kw}
    with pytest.raises(ConfigError, match=match):
        quantize(factorization(), **args)


def test_invalid_inputs():
    f = factorization(perms=False, low_rank=False)
    bad = KSFactorization(f.chain, (f.factors[0] * np.nan, f.factors[1]))
    with pytest.raises(InvalidInputError, match="NaN"):
        quantize(bad, "fp16")
    with pytest.raises(InvalidInputError, match="KSFactorization"):
        quantize([np.ones((1, 1, 2, 2))], "fp16")
