"""Orthogonal butterfly rotations: KS chain structure, orthogonality, apply vs dense,
Hadamard at angle pi/4, outlier spreading, and the learned rotation (torch)."""
import numpy as np
import pytest

from bfc.ks import KSPattern
from bfc.lowbit import (
    ButterflyRotation,
    RotationParams,
    quantize_groups,
    rotation_chain,
    weighted_error,
)
from bfc.lowbit.rotation import split_size

ORTHO_TOL = 1e-6
APPLY_TOL = 1e-10
ROTATION_GAIN = 2.0        # rotated int4 error at least 2x below plain int4 (planted outliers)
LEARN_GAIN = 0.9           # learned rotation: activation-weighted error <= 90% of the Hadamard-like one
SIZES = [96, 256, 384, 768, 1536]


def random_params(k, seed):
    """Random angles and Cayley parameters (not just the initialization)."""
    rng = np.random.default_rng(seed)
    p = RotationParams.hadamard_like(k, seed)
    skew = rng.standard_normal(p.skew.shape)
    skew = skew - np.swapaxes(skew, -1, -2)
    return RotationParams(p.signs, skew, tuple(rng.uniform(-np.pi, np.pi, a.shape) for a in p.angles))


@pytest.mark.parametrize("k", SIZES)
@pytest.mark.parametrize("kind", ["hadamard_like", "random"])
def test_orthogonal_and_apply_matches_dense(k, kind):
    rot = ButterflyRotation.hadamard_like(k, seed=1) if kind == "hadamard_like" else \
        ButterflyRotation.from_params(random_params(k, 2))
    q = rot.to_dense()
    assert np.abs(q.T @ q - np.eye(k)).max() < ORTHO_TOL
    assert np.abs(q @ q.T - np.eye(k)).max() < ORTHO_TOL
    x = np.random.default_rng(k).standard_normal((6, k))
    np.testing.assert_allclose(rot.apply(x), x @ q, atol=APPLY_TOL, rtol=0)
    np.testing.assert_allclose(rot.apply_transpose(x), x @ q.T, atol=APPLY_TOL, rtol=0)
    w = np.random.default_rng(0).standard_normal((k, 5))
    np.testing.assert_allclose(rot.rotate_weight(w), q.T @ w, atol=APPLY_TOL, rtol=0)


@pytest.mark.parametrize("k", SIZES)
def test_is_a_chainable_ks_chain(k):
    m, e = split_size(k)
    chain = rotation_chain(k)
    assert m * 2 ** e == k and m % 2 == 1
    assert chain.is_chainable and chain.shape == (k, k) and len(chain) == e + 1
    assert chain[0] == KSPattern(1, m, m, 2 ** e)
    assert all(chain[l] == KSPattern(m * 2 ** (l - 1), 2, 2, 2 ** (e - l)) for l in range(1, e + 1))
    rot = ButterflyRotation.hadamard_like(k)
    assert [v.shape for v in rot.values] == [p.value_shape for p in chain]
    np.testing.assert_allclose(chain.to_dense(list(rot.values)), rot.to_dense(), atol=1e-14)


@pytest.mark.parametrize("k", [2, 16, 256])
def test_pi_over_4_is_walsh_hadamard(k):
    h2 = np.array([[1.0, 1.0], [1.0, -1.0]])
    h = np.ones((1, 1))
    while h.shape[0] < k:
        h = np.kron(h, h2)
    np.testing.assert_allclose(ButterflyRotation.hadamard_like(k, seed=None).to_dense(), h / np.sqrt(k), atol=1e-14)
    signs = RotationParams.hadamard_like(k, seed=5).signs
    np.testing.assert_allclose(ButterflyRotation.hadamard_like(k, seed=5).to_dense(),
                               signs[:, None] * h / np.sqrt(k), atol=1e-14)


def test_hadamard_like_is_incoherent():
    """Every entry of Q has magnitude <= (2/3) / sqrt(2^k) for K = 3 * 2^k."""
    for k in (96, 384, 1536):
        q = ButterflyRotation.hadamard_like(k).to_dense()
        assert np.abs(q).max() <= (2 / 3) / np.sqrt(k // 3) + 1e-12


def planted_outliers(k=384, n=256, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)) * 0.02
    w[rng.choice(k, 4, replace=False)] *= 25.0                     # outlier input rows
    w[:, rng.choice(n, 4, replace=False)] *= 8.0                   # outlier columns
    r, c = rng.integers(0, k, 30), rng.integers(0, n, 30)
    w[r, c] = rng.choice([-1.0, 1.0], 30) * 2.0                    # isolated spikes
    return w


def test_rotation_beats_plain_int4_on_outliers():
    w = planted_outliers()
    rot = ButterflyRotation.hadamard_like(w.shape[0], seed=0)
    plain = weighted_error(w, quantize_groups(w, bits=4, group_size=64).dequantize())
    wr = rot.rotate_weight(w)
    rotated = weighted_error(wr, quantize_groups(wr, bits=4, group_size=64).dequantize())
    assert rotated * ROTATION_GAIN <= plain, (plain, rotated)


def test_learned_rotation_improves_and_stays_orthogonal():
    pytest.importorskip("torch")
    from bfc.lowbit import LowBitFormat
    from bfc.lowbit.layer import rotated_gram
    from bfc.lowbit.rotation_learn import learn_rotation
    rng = np.random.default_rng(0)
    k, n = 96, 192
    x = rng.standard_normal((1024, k)) @ (rng.standard_normal((k, k)) * np.linspace(1, 0.05, k)[:, None])
    x[:, rng.choice(k, 3, replace=False)] *= 10.0
    g = x.T @ x
    w = planted_outliers(k, n, 1)
    fmt = LowBitFormat(bits=2, group_size=32)

    def err(rot):
        wr, gr = rot.rotate_weight(w), rotated_gram(rot, g)
        return weighted_error(wr, quantize_groups(wr, fmt, h=np.diag(gr)).dequantize(), gr)

    init = ButterflyRotation.hadamard_like(k, seed=0)
    params, hist = learn_rotation(w, g, fmt, init=init.params, steps=60, seed=0)
    _, hist2 = learn_rotation(w, g, fmt, init=init.params, steps=60, seed=0)
    assert hist == hist2                                            # deterministic
    learned = ButterflyRotation.from_params(params)
    q = learned.to_dense()
    assert np.abs(q.T @ q - np.eye(k)).max() < ORTHO_TOL
    assert min(hist) < hist[0]
    assert err(learned) <= LEARN_GAIN * err(init), (err(learned), err(init))


def test_learning_starts_from_the_given_rotation():
    """Step 0 scores the initialization itself (also a non-zero Cayley init), and the best
    step is returned: one step gives back the initial Q (up to the float32 parameters)."""
    pytest.importorskip("torch")
    from bfc.lowbit.rotation_learn import learn_rotation
    init = random_params(96, 4)
    w = np.random.default_rng(0).standard_normal((96, 32))
    for steps in (0, 1):
        params, hist = learn_rotation(w, None, init=init, steps=steps)
        assert len(hist) == steps
        np.testing.assert_allclose(ButterflyRotation.from_params(params).to_dense(),
                                   ButterflyRotation.from_params(init).to_dense(), atol=1e-6)
