"""Optimal rank-one quantization (Alg. 5.1) against independent brute force.

The reference enumerates every representable value of the format (bit patterns through
ml_dtypes), rounds by nearest search (ties to the even code, saturating), and evaluates
every piece of lam -> Q(lam x) between sorted midpoints: an exact search that shares no
code with bfc.quant.
"""
import numpy as np
import pytest

from bfc.quant import FORMATS, optimal_int_scale, optimal_rank_one, rank_one_rtn
from bfc.quant.scales import Granularity, absmax_scale

FLOATS = ["fp16", "bf16", "fp8-e4m3", "fp8-e5m2"]
REL = 1e-9          # equal up to fp64 noise


def grid_of(fmt):
    bits = np.arange(2 ** fmt.bits, dtype=np.uint64).astype(np.uint16 if fmt.bits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):
        vals = bits.view(fmt.dtype).astype(np.float64)
    keep = np.isfinite(vals) & (vals >= 0) & ~np.signbit(vals)
    order = np.argsort(vals[keep])
    return vals[keep][order], (bits[keep][order] & 1).astype(bool)


def ref_round(grid, odd, v):
    a = np.minimum(np.abs(v), grid[-1])
    i = np.clip(np.searchsorted(grid, a), 1, grid.size - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (hi - a < a - lo) | ((hi - a == a - lo) & odd[i - 1])
    return np.copysign(np.where(pick_hi, hi, lo), v)


def brute_force(fmt, x, y):
    """Exact min over lam in [1, 2) of ||x y^T - Q(lam x) Q(mu y)^T||^2 (y=None: one-sided)."""
    grid, odd = grid_of(fmt)
    mids = 0.5 * (grid[1:] + grid[:-1])
    bps = np.concatenate([mids / abs(xi) for xi in x if xi != 0])
    bps = np.unique(bps[(bps > 1) & (bps < 2)])
    edges = np.concatenate([[1.0], bps, [2.0]])
    lams = np.concatenate([[1.0], 0.5 * (edges[1:] + edges[:-1])])
    xh = ref_round(grid, odd, lams[:, None] * x)
    nh = np.sum(xh * xh, axis=1)
    mu = np.where(nh > 0, xh @ x / np.where(nh > 0, nh, 1), 1.0)
    if y is None:
        return np.min(np.sum((x - mu[:, None] * xh) ** 2, axis=1))
    yh = ref_round(grid, odd, mu[:, None] * y)
    diff = x[None, :, None] * y[None, None, :] - xh[:, :, None] * yh[:, None, :]
    return np.min(np.sum(diff ** 2, axis=(1, 2)))


@pytest.mark.parametrize("name", FLOATS)
@pytest.mark.parametrize("m", [2, 3])
def test_equals_exact_brute_force(name, m):
    fmt = FORMATS[name]
    rng = np.random.default_rng(m)
    P = 6 if name == "fp16" else 12
    x = rng.standard_normal((P, m)) * np.exp2(rng.integers(-2, 3, (P, m)))
    y = rng.standard_normal((P, 3))
    joint = optimal_rank_one(x, y, fmt)
    one = optimal_rank_one(x, None, fmt, quantize_y=False)
    for p in range(P):
        bf = brute_force(fmt, x[p], y[p])
        assert joint.err[p] == pytest.approx(bf, rel=REL, abs=1e-30)
        bf1 = brute_force(fmt, x[p], None)
        assert one.err[p] == pytest.approx(bf1, rel=REL, abs=1e-30)


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2"])
def test_exponent_range_edges_equal_brute_force(name):
    """Entries that saturate at lam > 1 and entries in the subnormal range."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(5)
    sub = fmt.table()[fmt.half]                       # smallest normal
    for m in (2, 3):
        x = np.column_stack([fmt.max * rng.uniform(0.55, 0.95, 8),
                             sub * rng.uniform(0.05, 3, 8),
                             fmt.max * rng.uniform(0.01, 0.9, 8)])[:, :m]
        y = rng.standard_normal((8, 2))
        r = optimal_rank_one(x, y, fmt)
        assert np.all(np.isfinite(r.x_hat)) and np.all(np.abs(r.x_hat) <= fmt.max)
        for p in range(8):
            assert r.err[p] == pytest.approx(brute_force(fmt, x[p], y[p]), rel=REL, abs=1e-30)


def test_matches_a_dense_lambda_grid_and_reference_figures():
    """fp16, (m, n) = (3, 4): the 50k-point lam grid never beats the search, and the mean
    errors land near the reference figures (RTN 2.77e-4, optimal 4.63e-5; algorithms.md 3.2)."""
    fmt = FORMATS["fp16"]
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((20, 3)), rng.standard_normal((20, 4))
    r = optimal_rank_one(x, y, fmt)
    lams = np.linspace(1, 2, 50001)[:-1]
    grid, odd = grid_of(fmt)
    for p in range(20):
        xh = ref_round(grid, odd, lams[:, None] * x[p])
        mu = xh @ x[p] / np.sum(xh * xh, axis=1)
        yh = ref_round(grid, odd, mu[:, None] * y[p])
        e = np.sum((x[p][None, :, None] * y[p][None, None] - xh[:, :, None] * yh[:, None]) ** 2, axis=(1, 2))
        assert r.err[p] <= e.min() * (1 + REL)
    norm = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    _, _, e_rtn = rank_one_rtn(x, y, fmt)
    rtn, opt = np.mean(np.sqrt(e_rtn) / norm), np.mean(np.sqrt(r.err) / norm)
    assert 1.4e-4 < rtn < 5.5e-4 and 2.3e-5 < opt < 9.3e-5 and opt < rtn / 3
    assert abs(r.n_candidates - 3 * 2 ** 10) < 16           # ~ m 2^(t-1) breakpoints


@pytest.mark.parametrize("name", FLOATS + ["int8"])
def test_optimal_never_worse_than_rtn(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(3)
    for m, n in [(2, 2), (2, 5), (4, 3)]:
        x = rng.standard_normal((300, m)) * np.exp2(rng.integers(-3, 3, (300, 1)))
        y = rng.standard_normal((300, n))
        s = 1.0 if fmt.is_float else 0.05
        r = optimal_rank_one(x, y, fmt, s, s)
        _, _, e_rtn = rank_one_rtn(x, y, fmt, s, s)
        assert np.all(r.err <= e_rtn * (1 + 1e-12) + 1e-300)
        assert np.mean(r.err) < np.mean(e_rtn)


@pytest.mark.parametrize("name", FLOATS)
def test_invariant_to_power_of_two_rescaling(name):
    fmt = FORMATS[name]
    rng = np.random.default_rng(4)
    # magnitudes in [0.5, 4): every value stays in the normal range after the rescaling
    x, y = (rng.choice([-1, 1], (2, 200, 2)) * rng.uniform(0.5, 4, (2, 200, 2)))
    r = optimal_rank_one(x, y, fmt)
    r2 = optimal_rank_one(x * 8.0, y / 4.0, fmt)
    np.testing.assert_array_equal(r2.x_hat, r.x_hat * 8.0)
    np.testing.assert_array_equal(r2.y_hat, r.y_hat / 4.0)
    np.testing.assert_allclose(r2.err, r.err * 4.0, rtol=1e-12, atol=1e-300)


def test_exact_pieces_are_found_and_ties_break_to_the_smallest_lambda():
    """x = (1, -1)/sqrt(2): every lam gives x_hat parallel to x, so one-sided the error is 0
    everywhere and lam = 1 is chosen.  Jointly only lam = sqrt(2) (x_hat = (1, -1),
    y_hat = y/sqrt(2) = (1/2, 1/2)) is exact, and the search finds it."""
    fmt = FORMATS["fp16"]
    x = np.array([[1.0, -1.0]]) / np.sqrt(2)
    y = np.array([[1.0, 1.0]]) / np.sqrt(2)
    one = optimal_rank_one(x, None, fmt, quantize_y=False)
    assert one.lam[0] == 1.0 and one.err[0] < 1e-30
    r = optimal_rank_one(x, y, fmt)
    assert r.err[0] < 1e-30
    np.testing.assert_array_equal(np.abs(r.x_hat * r.y_hat[:, ::-1]), [[0.5, 0.5]])
    _, _, e_rtn = rank_one_rtn(x, y, fmt)
    assert e_rtn[0] > 1e-12


def test_int8_scale_search_beats_absmax_and_matches_a_scale_grid():
    rng = np.random.default_rng(6)
    v = rng.standard_normal((1, 1, 5, 40))           # channels of 5 values (axis 2 = b)
    g = Granularity.CHANNEL
    s_opt = optimal_int_scale(v, g).astype(np.float64)
    s_abs = absmax_scale(v, g).astype(np.float64)

    def err(s):
        q = np.clip(np.rint(v / s), -127, 127)
        return np.sum((v - s * q) ** 2, axis=2)

    e_opt, e_abs = err(s_opt), err(s_abs)
    assert np.all(e_opt <= e_abs * (1 + 1e-12))
    assert np.mean(e_opt) < 0.7 * np.mean(e_abs)
    # independent: a dense grid of scales around absmax never beats the search (fp32 scales)
    grid = s_abs * np.linspace(0.2, 1.6, 20001)[:, None, None, None, None]
    q = np.clip(np.rint(v / grid), -127, 127)
    e_grid = np.sum((v - grid * q) ** 2, axis=3).min(axis=0)
    assert np.all(e_opt <= e_grid * (1 + 1e-6))


# ---- scale: bounded memory, exactness of the pruned searches ----------------------------
MAX_TEMP_BYTES = 64 << 20        # cap on the search's temporaries (issue "Scale", item 1)


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2", "bf16"])
def test_longer_pieces_equal_brute_force(name):
    """m = 5 entries against n = 12: the lazily evaluated full errors (visited in order of
    their lower bound, batch by batch) reach the exact optimum of every piece."""
    fmt = FORMATS[name]
    rng = np.random.default_rng(11)
    P = 10
    x = rng.standard_normal((P, 5)) * np.exp2(rng.integers(-2, 3, (P, 5)))
    y = rng.standard_normal((P, 12))
    r = optimal_rank_one(x, y, fmt)
    for p in range(P):
        assert r.err[p] == pytest.approx(brute_force(fmt, x[p], y[p]), rel=REL, abs=1e-30)


def test_fp8_search_memory_is_bounded():
    """A Monarch-sized pair (P = 4096 pieces of 32 x 88, fp8-e4m3): the peak of traced
    allocations stays under the cap (it was ~6 GB before the bounded evaluation)."""
    import tracemalloc
    fmt = FORMATS["fp8-e4m3"]
    rng = np.random.default_rng(12)
    x, y = rng.standard_normal((4096, 32)), rng.standard_normal((4096, 88))
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    r = optimal_rank_one(x, y, fmt)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    assert peak < MAX_TEMP_BYTES + 3 * x.nbytes + 3 * y.nbytes      # outputs are O(P (m + n))
    _, _, e_rtn = rank_one_rtn(x, y, fmt)
    assert np.all(r.err <= e_rtn * (1 + 1e-12))


def exhaustive_int_error(v):
    """min over every piece of rho -> Q(rho |v|) of ||v - s q||^2 with the best s, by direct
    evaluation at every piece midpoint (no sweep, no pruning)."""
    a = np.abs(v)
    bps = np.unique(np.concatenate([(np.arange(127) + 0.5) / ai for ai in a if ai > 0]))
    mids = np.concatenate([0.5 * (bps[1:] + bps[:-1]), [bps[-1] * 2]])
    q = np.minimum(np.rint(mids[:, None] * a), 127)
    nq = np.sum(q * q, axis=1)
    dot = q @ a
    return np.min(np.where(nq > 0, a @ a - dot * dot / np.where(nq > 0, nq, 1), np.inf))


def test_int8_pruned_scale_search_is_exact():
    """Gaussian, heavy-tailed (one outlier per group: clipping wins), scaled and
    grid-aligned groups: the scale found is as good as the exhaustive optimum (up to the
    fp32 rounding of s) and never worse than absmax."""
    rng = np.random.default_rng(13)
    groups = [rng.standard_normal(24), rng.standard_t(1.5, 24), rng.standard_normal(24) * 1e-3,
              np.r_[rng.standard_normal(23) * 0.01, 5.0], np.round(rng.standard_normal(24) * 3) / 3,
              np.r_[np.zeros(20), rng.standard_normal(4)]]
    v = np.stack(groups, axis=1)[None, None]            # (1, 1, 24, G): channels along c
    s = optimal_int_scale(v, Granularity.CHANNEL).astype(np.float64).ravel()
    s_abs = absmax_scale(v, Granularity.CHANNEL).astype(np.float64).ravel()
    for j, g in enumerate(groups):
        e = np.sum((g - s[j] * np.clip(np.rint(g / s[j]), -127, 127)) ** 2)
        e_abs = np.sum((g - s_abs[j] * np.clip(np.rint(g / s_abs[j]), -127, 127)) ** 2)
        best = exhaustive_int_error(g)
        assert e <= e_abs * (1 + 1e-12)
        assert e <= best * (1 + 1e-5) + 1e-12 * (g @ g)   # fp32 s: ~6e-8 relative; oracle cancels


@pytest.mark.parametrize("name", ["fp8-e4m3", "fp8-e5m2", "bf16"])
def test_rounding_equals_bit_pattern_reference_next_to_midpoints(name):
    """Round to nearest even against the enumeration of every bit pattern (``ref_round``),
    including the fp64 neighbours of every midpoint, subnormals and saturation."""
    from bfc.quant.rounding import round_nearest
    fmt = FORMATS[name]
    grid, odd = grid_of(fmt)
    mids = 0.5 * (grid[1:] + grid[:-1])
    v = np.concatenate([grid, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf),
                        [fmt.max * 1.5, 1e300]])
    v = np.concatenate([v, -v])
    np.testing.assert_array_equal(round_nearest(fmt, v), ref_round(grid, odd, v))
