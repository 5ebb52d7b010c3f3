"""Low-rank correction and the rotate_quantize front function."""
import numpy as np
import pytest

from bfc.lowbit import (
    best_within,
    correction_options,
    fit_correction,
    quantize_groups,
    rotate_quantize,
    weighted_error,
)

INT8_SLACK = 1.02          # int8 factors: weighted error within 2% of the float Eckart-Young optimum
APPLY_TOL = 1e-10


def problem(k=192, n=128, t=1500, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((k, k)) * (np.arange(1, k + 1) ** -0.5)[:, None]
    x = rng.standard_normal((t, k)) @ a
    x[:, rng.choice(k, 4, replace=False)] *= 8.0
    w = rng.standard_normal((k, n)) * 0.05
    w[rng.choice(k, 4, replace=False)] *= 15.0
    return x, w


def test_correction_is_near_optimal_in_weighted_norm():
    x, w = problem()
    g = x.T @ x
    base = quantize_groups(w, bits=2, group_size=64).dequantize()
    r = w - base
    lam, e = np.linalg.eigh(g)
    lam = lam + 0.01 * np.mean(np.diag(g))
    s = (e * np.sqrt(lam)) @ e.T
    sig = np.linalg.svd(s @ r, compute_uv=False)
    for rank in (4, 16):
        c = fit_correction(r, g, rank)
        got = np.linalg.norm(s @ (r - c.to_dense()))
        optimum = np.sqrt(np.sum(sig[rank:] ** 2))
        assert optimum <= got <= INT8_SLACK * optimum, (rank, got, optimum)
        assert c.u.dtype == np.int8 and c.v.dtype == np.int8
        assert c.nbytes == (w.shape[0] + w.shape[1]) * rank + 8 * rank
        xs = x[:4]
        np.testing.assert_allclose(c.apply(xs), xs @ c.to_dense(), atol=APPLY_TOL)


def test_correction_without_gram_is_truncated_svd():
    rng = np.random.default_rng(3)
    r = rng.standard_normal((64, 40))
    sig = np.linalg.svd(r, compute_uv=False)
    c = fit_correction(r, None, 8)
    assert np.linalg.norm(r - c.to_dense()) <= INT8_SLACK * np.sqrt(np.sum(sig[8:] ** 2))


def test_correction_options_report_bytes_and_error():
    x, w = problem()
    g = x.T @ x
    base = quantize_groups(w, bits=2, group_size=64).dequantize()
    opts = correction_options(w, base, g, ranks=(4, 16, 32))
    assert [o.rank for o in opts] == [0, 4, 16, 32]
    assert opts[0].nbytes == 0 and opts[0].error == pytest.approx(weighted_error(w, base, g))
    errs = [o.error for o in opts]
    assert errs == sorted(errs, reverse=True)
    assert best_within(opts, 0).rank == 0
    assert best_within(opts, opts[2].nbytes).rank == 16


@pytest.mark.parametrize("kw", [{}, {"gptq": False}, {"rotate": False}, {"bits": 3, "symmetric": False},
                                {"correction_rank": 8}, {"group_size": None, "bits": 2}])
def test_layer_apply_dense_and_error(kw):
    x, w = problem(96, 64, 400, 1)
    g = x.T @ x
    layer = rotate_quantize(w, g, **kw)
    xs = x[:7]
    np.testing.assert_allclose(layer.apply(xs), xs @ layer.to_dense(), atol=APPLY_TOL * np.abs(xs @ w).max())
    direct = np.linalg.norm(x @ (w - layer.to_dense())) / np.linalg.norm(x @ w)
    assert layer.error(w, g) == pytest.approx(direct, rel=1e-8)
    if layer.rotation is not None:
        q = layer.rotation.to_dense()
        np.testing.assert_allclose(layer.to_dense() - (0 if layer.correction is None else layer.correction.to_dense()),
                                   q @ layer.weight.dequantize(), atol=1e-12)
    assert layer.nbytes == layer.weight_nbytes + layer.rotation_nbytes


def test_pipeline_ordering_on_outliers():
    """RTN < rotation < rotation + GPTQ < + correction, in activation-weighted error."""
    x, w = problem(192, 128, 1500, 2)
    g = x.T @ x
    e_plain = rotate_quantize(w, g, rotate=False, gptq=False).error(w, g)
    e_rot = rotate_quantize(w, g, gptq=False).error(w, g)
    e_gptq = rotate_quantize(w, g).error(w, g)
    e_corr = rotate_quantize(w, g, correction_rank=8).error(w, g)
    assert e_corr < e_gptq < e_rot < e_plain, (e_plain, e_rot, e_gptq, e_corr)


def test_learned_layer_runs():
    pytest.importorskip("torch")
    x, w = problem(96, 64, 400, 1)
    g = x.T @ x
    base = rotate_quantize(w, g, bits=2, gptq=False)
    learned = rotate_quantize(w, g, bits=2, gptq=False, learn=True, learn_steps=40)
    q = learned.rotation.to_dense()
    assert np.abs(q.T @ q - np.eye(96)).max() < 1e-6
    assert learned.error(w, g) <= base.error(w, g) * 1.05
