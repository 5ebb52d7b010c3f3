"""KS patterns, chains, layout and converters, checked against dense matrices."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bfc.errors import BfcError, ChainError
from bfc.ks import (
    Chain,
    KSPattern,
    butterfly_chain,
    chain_from_blocks,
    chainable_chain,
    monarch_chain,
    prime_factors,
    split_factors,
)


def test_layout_matches_documented_index_formula():
    p = KSPattern(2, 3, 4, 5)
    v = np.random.default_rng(0).standard_normal(p.value_shape)
    dense = p.to_dense(v)
    for i in range(p.a):
        for l in range(p.d):
            for j in range(p.b):
                for k in range(p.c):
                    assert dense[i * p.b * p.d + j * p.d + l, i * p.c * p.d + k * p.d + l] == v[i, l, j, k]
    assert np.count_nonzero(dense) == p.nnz == 120
    assert np.array_equal(dense != 0, p.support())
    assert np.array_equal(p.from_dense(dense), v)


def test_square_dyadic_patterns_and_nnz():
    ch = butterfly_chain(1024)
    assert len(ch) == 10
    assert ch[0] == KSPattern(1, 2, 2, 512) and ch[-1] == KSPattern(512, 2, 2, 1)
    assert all(p.nnz == 2 * 1024 for p in ch)
    assert ch.nnz == 20480  # pyfaust.wht(1024).nnz_sum()
    assert ch.is_chainable and set(ch.ranks) == {1}


def test_monarch_matches_lazylinop_doctests():
    assert tuple(monarch_chain(21, 16)) == (KSPattern(1, 3, 4, 7), KSPattern(4, 7, 4, 1))
    assert tuple(monarch_chain(12, 16, p=2, q=4)) == (KSPattern(1, 2, 4, 6), KSPattern(4, 6, 4, 1))


@pytest.mark.parametrize("m,n,rank,k", [(384, 1536, 1, 2), (1536, 384, 2, 3), (384, 384, 4, 2),
                                         (96, 48, 1, 5), (7, 11, 1, 2)])
def test_chainable_chain_any_shape(m, n, rank, k):
    ch = chainable_chain(m, n, rank=rank, n_factors=k)
    assert ch.shape == (m, n) and ch.is_chainable
    assert all(r == rank for r in ch.ranks)


def test_prime_splits():
    assert prime_factors(384) == [3] + [2] * 7
    assert np.prod(split_factors(1536, 3)) == 1536
    assert split_factors(1024, 2) == [32, 32]


@settings(max_examples=60, deadline=None)
@given(bs=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_chain_algebra(bs, data):
    cs = data.draw(st.lists(st.integers(1, 4), min_size=len(bs), max_size=len(bs)))
    rank = data.draw(st.integers(1, 3))
    ch = chain_from_blocks(bs, cs, rank)
    assert ch.is_chainable
    values = ch.random_values(data.draw(st.integers(0, 2**16)))
    dense = ch.to_dense(values)
    prod = np.eye(ch.shape[0])
    for p, v in zip(ch, values):
        prod = prod @ p.to_dense(v)
    np.testing.assert_allclose(dense, prod, atol=1e-10)
    x = np.random.default_rng(1).standard_normal((3, 2, ch.shape[0]))
    np.testing.assert_allclose(ch.apply(values, x), x @ dense, atol=1e-10)
    # every run of consecutive factors is supported on its product pattern
    lo = data.draw(st.integers(0, len(ch) - 1))
    hi = data.draw(st.integers(lo, len(ch) - 1))
    sub = Chain(ch.patterns[lo:hi + 1]).to_dense(values[lo:hi + 1])
    assert not (sub != 0)[~ch.product_pattern(lo, hi).support()].any()


def test_bad_chains_raise_chain_errors():
    with pytest.raises(ChainError, match="factor 0 has 4 columns but factor 1 has 6 rows"):
        Chain([(1, 2, 2, 2), (1, 6, 2, 1)])
    with pytest.raises(ChainError, match="positive integer"):
        KSPattern(0, 1, 1, 1)
    with pytest.raises(ChainError, match="power-of-two"):
        butterfly_chain(12)
    with pytest.raises(ChainError, match="not chainable"):
        Chain([(2, 1, 1, 1), (1, 2, 2, 1)]).ranks
    with pytest.raises(BfcError, match="shape"):
        KSPattern(1, 2, 2, 1).to_dense(np.zeros((2, 2)))


def test_lazylinop_roundtrip():
    pytest.importorskip("lazylinop.butterfly", reason="lazylinop not installed (pip install '.[anchors]')")
    from bfc.ks.convert import from_lazylinop, to_lazylinop
    ch = chainable_chain(12, 18, rank=2)
    v = ch.random_values(0)
    op = to_lazylinop(ch, v)
    np.testing.assert_allclose(op.toarray(), ch.to_dense(v), atol=1e-12)
    ch2, v2 = from_lazylinop(op)
    assert ch2 == ch
    np.testing.assert_allclose(ch2.to_dense(v2), ch.to_dense(v), atol=1e-12)


def test_pyfaust_roundtrip_and_butterfly_output():
    pyfaust = pytest.importorskip("pyfaust.fact", reason="pyfaust not installed (pip install '.[anchors]')")
    from bfc.ks.convert import from_faust, to_faust
    ch = monarch_chain(24, 20, rank=2)
    v = ch.random_values(3)
    F = to_faust(ch, v)
    np.testing.assert_allclose(F.toarray(), ch.to_dense(v), atol=1e-12)
    ch2, v2 = from_faust(F)
    np.testing.assert_allclose(ch2.to_dense(v2), ch.to_dense(v), atol=1e-12)
    # a real pyfaust butterfly: every factor is recognised as a KS factor
    import pyfaust as pf
    H = pf.wht(32).toarray()
    G = pyfaust.butterfly(H, type="bbtree")
    ch3, v3 = from_faust(G)
    assert ch3.nnz <= 2 * 32 * 5 + 32
    np.testing.assert_allclose(ch3.to_dense(v3), H, atol=1e-10)
