"""Layer-wise reconstruction lowers the output error of quantized factorizations."""
import numpy as np
import pytest

from bfc.errors import InvalidInputError
from bfc.factorize import factorize, relative_error
from bfc.ks import monarch_chain
from bfc.quant import quantize
from bfc.reconstruct import reconstruct


def layer(seed=0, m=64, n=96):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((256, m)) @ (rng.standard_normal((m, m)) * np.exp(-np.arange(m) / 10))
    w = rng.standard_normal((m, n)) / np.sqrt(m)
    return x, w


@pytest.mark.parametrize("fmt,calibrated,gain", [("int8", False, 3.0), ("fp8-e4m3", False, 3.0),
                                                  ("fp8-e5m2", True, 1.1)])
def test_reconstruction_lowers_output_error(fmt, calibrated, gain):
    x, w = layer()
    f = factorize(w, monarch_chain(64, 96, rank=4), calibration=x if calibrated else None)
    q = quantize(f, fmt)
    res = reconstruct(q, w, x, steps=150)
    direct = relative_error(x @ w, x @ res.factorization.to_dense())
    before = relative_error(x @ w, x @ q.to_dense())
    assert res.error_before == pytest.approx(before, rel=1e-9)
    assert res.error_after == pytest.approx(direct, rel=1e-6)
    assert res.error_after * gain < res.error_before, (res.error_before, res.error_after)
    assert res.factorization.factors[0].values.dtype == q.factors[0].values.dtype


def test_reconstruction_keeps_permutations_and_residual():
    x, w = layer(1, 32, 32)
    f = factorize(w, monarch_chain(32), perm="search", residual_rank=2)
    q = quantize(f, "int8")
    res = reconstruct(q, w, x, steps=50)
    assert res.error_after <= res.error_before
    out = res.factorization
    assert np.array_equal(out.row_perm, q.row_perm) and np.array_equal(out.col_perm, q.col_perm)
    assert all(np.array_equal(a, b) for a, b in zip(out.low_rank, q.low_rank))
    direct = relative_error(x @ w, x @ out.to_dense())
    assert res.error_after == pytest.approx(direct, rel=1e-6)


def test_reconstruction_from_the_gram_matrix_equals_from_activations():
    """||X E|| = ||R E|| for R^T R = X^T X: the planner's Gram-only path optimizes the same objective."""
    x, w = layer(2)
    q = quantize(factorize(w, monarch_chain(64, 96, rank=4)), "int8")
    from_x = reconstruct(q, w, x, steps=0)
    from_gram = reconstruct(q, w, gram=x.T @ x, steps=0)
    assert from_gram.error_before == pytest.approx(from_x.error_before, rel=1e-8)
    trained = reconstruct(q, w, gram=x.T @ x, steps=60)
    direct = relative_error(x @ w, x @ trained.factorization.to_dense())
    assert trained.error_after == pytest.approx(direct, rel=1e-6) and trained.error_after < from_x.error_before


def test_reconstruction_rejects_mismatched_activations():
    x, w = layer()
    q = quantize(factorize(w, monarch_chain(64, 96)), "int8")
    with pytest.raises(InvalidInputError, match="last dimension must be 64"):
        reconstruct(q, w, x[:, :10])
