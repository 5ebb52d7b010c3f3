"""Hierarchical factorization: exact recovery, negative controls, projections, residual,
calibration-aware variant, selection and bad input."""
import numpy as np
import pytest
from scipy.linalg import hadamard  # declared in the test extra

from bfc.errors import BfcError, ChainError, InvalidInputError
from bfc.factorize import bitrev_perm, chain_for, cheapest, factorize, inverse_perm, relative_error, weighted_error
from bfc.ks import Chain, butterfly_chain, chainable_chain, monarch_chain

EXACT = 1e-12
ORDERS = ["balanced", "left-to-right"]


def dft(n):
    return np.fft.fft(np.eye(n))


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("n", [16, 64, 256, 1024])
def test_hadamard_and_permuted_dft_recovered_exactly(n, order):
    assert factorize(hadamard(n), butterfly_chain(n), order=order).rel_error < EXACT
    f = factorize(dft(n), butterfly_chain(n), order=order, perm="bitrev")
    assert f.rel_error < EXACT
    np.testing.assert_allclose(f.to_dense(), dft(n), atol=1e-9)


@pytest.mark.parametrize("n", [16, 256])
def test_dft_without_permutation_fails(n):
    # negative control: the DFT itself is not a butterfly (0.87-0.99 in the reference figures)
    assert factorize(dft(n), butterfly_chain(n)).rel_error > 0.5


def test_random_permutation_is_applied_not_transposed():
    # bit-reversal is an involution; a random permutation catches a P / P^T mix-up
    rng = np.random.default_rng(0)
    ch = butterfly_chain(32)
    b = ch.to_dense(ch.random_values(rng))
    perm = rng.permutation(32)
    w = b[:, inverse_perm(perm)]            # W = B P, so W[:, perm] = B
    f = factorize(w, ch, perm=perm)
    assert f.rel_error < EXACT
    assert factorize(w, ch, perm=inverse_perm(perm)).rel_error > 0.1
    x = rng.standard_normal((5, 32))
    np.testing.assert_allclose(f.apply(x), x @ w, atol=1e-9)


def test_row_permutation():
    rng = np.random.default_rng(1)
    ch = monarch_chain(24, 36)
    b = ch.to_dense(ch.random_values(rng))
    rp = rng.permutation(24)
    w = b[inverse_perm(rp)]
    f = factorize(w, ch, row_perm=rp)
    assert f.rel_error < EXACT
    np.testing.assert_allclose(f.apply(np.eye(24)), w, atol=1e-9)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("ortho", [True, False])
@pytest.mark.parametrize("chain", [butterfly_chain(16), butterfly_chain(256), chainable_chain(384, 96, 2, 3),
                                   chainable_chain(48, 1536, 1, 4), monarch_chain(96, 64, rank=3)],
                         ids=["bf16", "bf256", "384x96r2", "48x1536", "monarch-r3"])
def test_random_exact_products_recovered(chain, order, ortho):
    w = chain.to_dense(chain.random_values(7))
    f = factorize(w, chain, order=order, orthonormalize=ortho)
    assert f.rel_error < 1e-10
    assert f.shape == w.shape and len(f.factors) == len(chain)


def test_exact_monarch_is_a_fixed_point_and_projection_is_optimal():
    rng = np.random.default_rng(2)
    ch = monarch_chain(64, 48)
    w = ch.to_dense(ch.random_values(rng))
    f = factorize(w, ch)
    assert f.rel_error < EXACT
    again = factorize(f.to_dense(), ch)
    np.testing.assert_allclose(again.to_dense(), f.to_dense(), atol=1e-12)
    # generic matrix: error^2 = sum over the blocks of the discarded singular values^2
    g = rng.standard_normal((64, 48))
    p, q = ch[0].b, ch[1].a
    blocks = g.reshape(p, 64 // p, q, 48 // q).transpose(1, 2, 0, 3)   # (m/p, q) blocks of p x n/q
    s = np.linalg.svd(blocks, compute_uv=False)
    expected = np.sqrt((s[..., 1:] ** 2).sum() / (g ** 2).sum())
    assert factorize(g, ch).rel_error == pytest.approx(expected, rel=1e-10)


def test_error_non_increasing_in_rank():
    g = np.random.default_rng(3).standard_normal((96, 96))
    errs = [factorize(g, monarch_chain(96, rank=r)).rel_error for r in (1, 2, 3, 4, 6, 8)]
    assert all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-12  # rank 8 blocks are full rank here


@pytest.mark.parametrize("m,n", [(384, 1536), (1536, 384), (384, 384), (3 * 64, 5 * 16)])
def test_non_square_3x2k_shapes(m, n):
    ch = chain_for("monarch", m, n, rank=2)
    w = ch.to_dense(ch.random_values(4))
    assert factorize(w, ch).rel_error < 1e-10
    bf = chain_for("butterfly", m, n)
    assert bf.shape == (m, n) and factorize(bf.to_dense(bf.random_values(5)), bf).rel_error < 1e-10


def test_low_rank_residual_beats_plain_and_recovers_sparse_plus_low_rank():
    rng = np.random.default_rng(5)
    ch = monarch_chain(64)
    u, v = rng.standard_normal((64, 2)), rng.standard_normal((64, 2))
    w = ch.to_dense(ch.random_values(rng)) + u @ v.T
    plain = factorize(w, ch)
    res = factorize(w, ch, residual_rank=2, residual_iters=30)
    assert res.low_rank is not None and res.low_rank[0].shape == (64, 2)
    assert res.rel_error < 0.5 * plain.rel_error
    x = rng.standard_normal((3, 64))
    np.testing.assert_allclose(res.apply(x), x @ res.to_dense(), atol=1e-9)
    g = rng.standard_normal((64, 64))
    assert factorize(g, ch, residual_rank=4).rel_error < factorize(g, ch).rel_error


def test_calibration_aware_beats_plain_on_correlated_activations():
    rng = np.random.default_rng(6)
    m, n = 96, 64
    mix = rng.standard_normal((m, m)) * np.exp(-np.arange(m) / 8)[None, :]   # strongly correlated
    x = rng.standard_normal((512, m)) @ mix.T
    w = rng.standard_normal((m, n))
    ch = monarch_chain(m, n, rank=2)
    plain = factorize(w, ch)
    calib = factorize(w, ch, calibration=x)
    gram = x.T @ x
    e_plain, e_cal = weighted_error(w, plain.to_dense(), gram), weighted_error(w, calib.to_dense(), gram)
    direct = np.linalg.norm(x @ (w - calib.to_dense())) / np.linalg.norm(x @ w)
    assert calib.info["output_error"] == pytest.approx(direct, rel=1e-3)
    assert e_cal < 0.8 * e_plain, (e_cal, e_plain)


def test_permutation_search_finds_bitrev_for_dft():
    n = 64
    f = factorize(dft(n), butterfly_chain(n), perm="search")
    assert f.info["perm"] == "bitrev" and f.rel_error < EXACT
    assert np.array_equal(f.col_perm, bitrev_perm(n))


def test_cheapest_meets_budget_and_prefers_fewer_params():
    rng = np.random.default_rng(8)
    ch = monarch_chain(64, rank=2)
    w = ch.to_dense(ch.random_values(rng)) + 1e-3 * rng.standard_normal((64, 64))
    f = cheapest(w, 0.01)
    assert f is not None and f.rel_error <= 0.01
    assert f.chain.nnz <= ch.nnz
    assert cheapest(rng.standard_normal((64, 64)), 1e-3) is None   # nothing cheaper than dense


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 2, 2)), "2-D"),
    (np.zeros((0, 4)), "empty"),
    (np.array([[1.0, np.nan], [0, 1]]), "NaN/Inf"),
    (np.array([[1.0, np.inf], [0, 1]]), "NaN/Inf"),
    (np.zeros((4, 8)), "shape"),
])
def test_bad_input_raises_named_errors(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        factorize(bad, butterfly_chain(4) if bad.ndim == 2 and bad.shape != (4, 8) else Chain([(1, 4, 4, 1)]))


def test_bad_options_raise():
    w = np.ones((4, 4))
    with pytest.raises(ChainError, match="shape"):
        factorize(w, butterfly_chain(8))
    with pytest.raises(InvalidInputError, match="order"):
        factorize(w, butterfly_chain(4), order="random")
    with pytest.raises(InvalidInputError, match="permutation"):
        factorize(w, butterfly_chain(4), perm=[0, 0, 1, 2])
    with pytest.raises(BfcError, match="calibration"):
        factorize(w, butterfly_chain(4), calibration=np.ones((3, 5)))
    with pytest.raises(ChainError, match="not chainable"):
        factorize(np.ones((2, 2)), Chain([(2, 1, 1, 1), (1, 2, 2, 1)]))


# ---- scale: no dense factor, no K x K temporaries ----------------------------------------
WIDE_PEAK_BYTES = 400 << 20      # 25088 x 64 with calibration: a dense Gram alone is 5 GB


@pytest.mark.parametrize("chain", [butterfly_chain(32), monarch_chain(24, 36, rank=2),
                                   chainable_chain(12, 18, rank=2, n_factors=3),
                                   chainable_chain(64, 48, n_factors=4)], ids=str)
def test_structured_product_and_column_chunks_equal_the_dense_product(chain):
    from bfc.factorize.hierarchical import product_values
    values = chain.random_values(21)
    ref = chain.to_dense(values)
    pattern, v = product_values(chain, values)
    np.testing.assert_allclose(pattern.to_dense(v), ref, atol=1e-12)
    rng = np.random.default_rng(22)
    m, n = chain.shape
    f = factorize(ref + 0.1 * rng.standard_normal((m, n)), chain, perm=rng.permutation(n),
                  row_perm=rng.permutation(m), residual_rank=1)
    full = f.to_dense()
    direct = f.chain.to_dense(f.factors)[inverse_perm(f.row_perm)][:, inverse_perm(f.col_perm)]
    u, vv = f.low_rank
    np.testing.assert_allclose(full, direct + u @ vv.T, atol=1e-12)
    for chunk in (1, 5, n):
        np.testing.assert_allclose(f.to_dense(chunk=chunk), full, atol=1e-12)
    seen = np.concatenate([cols for cols, _ in f.iter_columns(7)])
    assert np.array_equal(np.sort(seen), np.arange(n))


def test_wide_calibrated_layer_keeps_a_diagonal_gram_and_bounded_memory():
    """25088 x 64 (a VGG classifier input): the Gram matrix of the inputs is diagonal
    (sum_i g_i ||e_i||^2), the factorization and its int8 quantization stay far below the
    cost of one K x K matrix, and the fit beats the plain one on that objective."""
    import tracemalloc

    from bfc.factorize import activation_gram
    from bfc.quant import quantize
    rng = np.random.default_rng(23)
    m, n = 25088, 64
    w = rng.standard_normal((m, n)) / np.sqrt(m)
    x = rng.standard_normal((64, m)) * np.exp(rng.standard_normal(m))
    ch = chain_for("monarch", m, n)
    tracemalloc.start()
    f = factorize(w, ch, calibration=x)
    q = quantize(f, "int8")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < WIDE_PEAK_BYTES
    g = activation_gram(x)
    assert g.shape == (m,) and f.info["calibration"] == "diagonal gram"
    plain = factorize(w, ch)
    assert weighted_error(w, f.to_dense(), g) < weighted_error(w, plain.to_dense(), g)
    assert np.isfinite(q.rel_error)


def test_diagonal_gram_error_is_the_dense_formula_with_a_diagonal_matrix():
    rng = np.random.default_rng(24)
    w, w_hat = rng.standard_normal((30, 7)), rng.standard_normal((30, 7))
    g = rng.uniform(0.1, 2, 30)
    assert weighted_error(w, w_hat, g) == pytest.approx(weighted_error(w, w_hat, np.diag(g)), rel=1e-12)


def test_refinement_only_under_the_dense_cap():
    """The block-coordinate CG forms dense A^T C A and B B^T; above DENSE_CAP entries the
    pre-whitened fit is returned (and says so) instead of allocating them."""
    from bfc.factorize.calibrated import refine_fits
    assert refine_fits(monarch_chain(64, 64, rank=2))
    assert not refine_fits(chain_for("monarch", 2048, 5632, 4))      # A^T C A: 16384^2
    rng = np.random.default_rng(25)
    w = rng.standard_normal((64, 96))
    x = rng.standard_normal((200, 64)) @ rng.standard_normal((64, 64))
    small = factorize(w, monarch_chain(64, 96), calibration=x)
    assert small.info["calibration"] == "refined"


def test_relative_error_is_the_plain_weighted_error():
    """relative_error(ref, got) = ||got - ref|| / ||ref|| in float64 (float32 inputs are widened first),
    equal to weighted_error without a Gram matrix; a zero reference gives the absolute error."""
    rng = np.random.default_rng(31)
    ref, got = rng.standard_normal((40, 24)), rng.standard_normal((40, 24))
    want = np.sqrt(np.sum((got - ref) ** 2) / np.sum(ref ** 2))
    assert relative_error(ref, got) == pytest.approx(want, rel=1e-12)
    assert relative_error(ref, got) == pytest.approx(weighted_error(ref, got), rel=1e-12)
    r32, g32 = ref.astype(np.float32), got.astype(np.float32)
    wide = np.linalg.norm(g32.astype(np.float64) - r32) / np.linalg.norm(r32.astype(np.float64))
    assert relative_error(r32, g32) == wide
    assert relative_error(np.zeros(5), np.full(5, 2.0)) == pytest.approx(np.sqrt(20.0), rel=1e-12)
