"""bfc.passes.allocate: the Lagrangian allocation against brute force, back-off, verified allocation."""
import itertools
import math

import numpy as np
import pytest

from bfc.passes.allocate import Allocation, Candidate, allocate, allocate_verified, back_off, contribution, hull

EXACT_FRACTION = 0.95     # measured 0.99 (297 of 300 instances below; 495 of 500 over seeds 0..499)


def _instance(seed: int, latency: bool = False):
    """3-6 layers x 2-5 candidates; candidate 0 is unchanged (error 0, dense bytes); some
    candidates are larger than dense (dominated), errors log-uniform in [1e-3, 0.5]."""
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(int(rng.integers(3, 7))):
        dense = int(rng.integers(1000, 100000))
        s = float(np.exp(rng.normal(0, 1)))
        lat = (lambda b: float(b) * 1e-9 * rng.uniform(0.5, 2)) if latency else (lambda b: None)
        row = [Candidate("unchanged", "unchanged", dense, dense, 0.0, 0.0, lat(dense))]
        for j in range(int(rng.integers(1, 5))):
            b = int(dense * rng.uniform(0.05, 1.1))
            e = float(np.exp(rng.uniform(np.log(1e-3), np.log(0.5))))
            row.append(Candidate.scored(f"c{j}", "f", b, b, e, s, lat(b)))
        layers.append(row)
    top = math.sqrt(sum(max(c.cost for c in row) for row in layers))
    return layers, float(rng.uniform(0, 1) * top)


def _brute(layers, budget, objective="bytes"):
    best = None
    for choice in itertools.product(*[range(len(r)) for r in layers]):
        if math.sqrt(math.fsum(layers[l][c].cost for l, c in enumerate(choice))) <= budget:
            o = math.fsum(getattr(layers[l][c], objective) for l, c in enumerate(choice))
            if best is None or o < best:
                best = o
    return best


@pytest.mark.parametrize("objective", ["bytes", "latency"])
def test_matches_brute_force(objective):
    """Always feasible; never better than the optimum (a check of the brute force); at most one
    layer's objective range above it (the Lagrangian bound, module doc); exact on most instances."""
    exact, n = 0, 300 if objective == "bytes" else 100
    for seed in range(n):
        layers, budget = _instance(seed, latency=objective == "latency")
        a = allocate(layers, budget, objective)
        opt = _brute(layers, budget, objective)
        assert opt is not None and a.feasible                       # all-unchanged is always feasible here
        assert a.predicted_error <= budget
        assert math.isclose(a.predicted_error, math.sqrt(sum(c.cost for c in a.chosen(layers))), rel_tol=1e-12)
        assert math.isclose(a.objective, sum(getattr(c, objective) for c in a.chosen(layers)), rel_tol=1e-12)
        span = max(max(getattr(c, objective) for c in r) - min(getattr(c, objective) for c in r) for r in layers)
        assert opt * (1 - 1e-12) <= a.objective <= opt + span
        exact += math.isclose(a.objective, opt, rel_tol=1e-12)
    assert exact >= EXACT_FRACTION * n, f"exact on {exact} of {n}"


def test_budget_zero_is_all_unchanged():
    for seed in range(20):
        layers, _ = _instance(seed)
        rng = np.random.default_rng(seed)
        layers = [list(np.roll(np.array(r, dtype=object), int(rng.integers(len(r))))) for r in layers]
        a = allocate(layers, 0.0)
        assert all(c.label == "unchanged" for c in a.chosen(layers))
        assert a.predicted_error == 0.0 and a.feasible


def test_no_budget_takes_the_smallest():
    layers, _ = _instance(3)
    a = allocate(layers, math.inf)
    assert a.objective == sum(min(c.bytes for c in r) for r in layers)


def test_infeasible_returns_most_accurate():
    layers = [[Candidate.scored("a", "f", 10, 10, 0.1, 1.0), Candidate.scored("b", "f", 5, 5, 0.2, 1.0)]] * 2
    a = allocate(layers, 0.05)
    assert not a.feasible and a.choice == (0, 0)


def test_deterministic_ties():
    c = Candidate.scored("x", "f", 10, 10, 0.1, 1.0)
    layers = [[Candidate("u", "unchanged", 20, 20, 0.0, 0.0), c, c, c]] * 3
    assert allocate(layers, 1.0).choice == (1, 1, 1)
    assert allocate(layers, 0.15).choice in {(1, 1, 0), (1, 0, 1), (0, 1, 1)}
    assert allocate(layers, 0.15) == allocate(layers, 0.15)


def test_hull():
    # (objective, cost): 0 unchanged; 1 on the hull; 2 above the chord 1-3; 3 on the hull; 4 dominated (more of both)
    pts = [(100.0, 0.0), (60.0, 1.0), (50.0, 3.0), (20.0, 4.0), (70.0, 5.0)]
    assert hull(pts) == [0, 1, 3]


def _layer(dense, *pairs):
    row = [Candidate("unchanged", "unchanged", dense, dense, 0.0, 0.0)]
    row += [Candidate(f"b{b}", "f", b, b, math.sqrt(k), k) for b, k in pairs]
    return row


def test_back_off_moves_to_the_next_hull_point():
    # layer 0 hull: unchanged(100, 0) -> 60 @ 1 -> 20 @ 4 (50 @ 3 is above the hull); layer 1: 100 -> 10 @ 0.5
    layers = [_layer(100, (60, 1.0), (50, 3.0), (20, 4.0)), _layer(100, (10, 0.5))]
    a = Allocation((3, 1), 30.0, math.sqrt(4.5), budget=1.0)
    # layer 0 removes 3 cost per 40 bytes regained (0.075), layer 1 0.5 per 90 (0.0056): layer 0 moves, to b60 not b50
    b = back_off(a, layers)
    assert b.choice == (1, 1) and b.objective == 70 and math.isclose(b.predicted_error, math.sqrt(1.5))
    c = back_off(b, layers)                           # now 1 per 40 (0.025) vs 0.0056: layer 0 to unchanged, its next
    assert c.choice == (0, 1)
    d = back_off(a, layers, target=1.0)               # until sqrt(cost) <= 1: both moves of layer 0, layer 1 stays
    assert d.choice == (0, 1) and d.feasible
    assert back_off(Allocation((0, 0), 200.0, 0.0, 1.0), layers).choice == (0, 0)   # nothing left to move


def test_back_off_from_a_point_off_the_hull():
    layers = [_layer(100, (60, 1.0), (50, 3.0), (20, 4.0))]
    assert back_off(Allocation((2,), 50.0, math.sqrt(3), 1.0), layers).choice == (1,)


@pytest.mark.parametrize("factor", [1.3, 0.8, 3.0])
def test_allocate_verified_converges(factor):
    for seed in range(30):
        layers, budget = _instance(seed)

        def measure(a: Allocation) -> float:      # the real model: factor x the first-order prediction
            return factor * math.sqrt(sum(c.cost for c in a.chosen(layers)))

        r = allocate_verified(layers, budget, measure, max_rounds=10)
        assert r.met and r.measured[-1] <= budget
        assert len(r.rounds) == len(r.measured) <= 10
        assert r.rounds[-1] == r.allocation
        if factor <= 1:
            assert len(r.rounds) == 1
        else:
            assert len(r.rounds) <= 2      # one miss calibrates the scale exactly; the back-off then meets it
        for prev, nxt in zip(r.rounds, r.rounds[1:]):   # back-off only makes layers more accurate
            assert all(layers[l][j].cost <= layers[l][i].cost for l, (i, j) in enumerate(zip(prev.choice, nxt.choice)))


def test_allocate_verified_gives_up():
    layers, budget = _instance(1)
    r = allocate_verified(layers, budget, lambda a: budget * 2 + 1, max_rounds=4)
    assert not r.met and len(r.measured) <= 4


def test_checks():
    c = Candidate("u", "unchanged", 1, 1, 0.0, 0.0)
    with pytest.raises(ValueError, match="latency"):
        allocate([[c]], 0.1, "latency")
    with pytest.raises(ValueError, match="objective"):
        allocate([[c]], 0.1, "flops")
    with pytest.raises(ValueError, match="no candidate"):
        allocate([[]], 0.1)
    with pytest.raises(ValueError, match="budget"):
        allocate([[c]], -1.0)
    assert contribution(2.0, 0.1) == pytest.approx(0.04)
