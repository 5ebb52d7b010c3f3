"""Allocate: one format per layer for the whole model, the fewest bytes (or the least latency) under an error budget.

Pure functions of per-layer candidate lists; nothing here reads or runs a model.

Problem (HAWQ-V3's mixed-precision problem; HAWQ-V3 solves it with an ILP, here a Lagrangian).
Layer l = 1..L has candidates c = 0..n_l-1, each with an objective o(l,c) (file ``bytes``,
``resident_bytes`` or ``latency``) and a cost k(l,c) = (s_l * e(l,c))^2, where e(l,c) is the
layer's own relative output error and s_l the sensitivity of the whole-model relative output
error to it (``bfc.passes.sensitivity``).  Independent errors add in quadrature, so the
predicted whole-model error of a choice c = (c_1..c_L) is  E(c) = sqrt(sum_l k(l, c_l)),  and
with the budget B on E:

    minimize  O(c) = sum_l o(l, c_l)   subject to   K(c) = sum_l k(l, c_l) <= C = B^2.

Lagrangian relaxation.  For lambda >= 0,

    g(lambda) = sum_l min_c [o(l,c) + lambda k(l,c)] - lambda C  <=  O(c*)   (weak duality),

and the inner minimum separates per layer.  Its minimizer c(lambda) has K(c(lambda)) falling
as lambda grows (lambda -> inf: each layer's most accurate candidate; lambda = 0: the smallest);
a feasible c(lambda) is optimal for its own budget K(c(lambda)).  lambda is bisected on a log
scale between bounds taken from the candidates' exchange rates (below the smallest nothing
changes, above the largest neither); the best feasible minimizer seen is kept.

Per layer only the lower convex hull of the points (k, o) can be a minimizer: the hull
vertices h_0, h_1, ... sorted by increasing cost (decreasing objective), with exchange rates
r_j = (o(h_{j-1}) - o(h_j)) / (k(h_j) - k(h_{j-1})) decreasing in j.  c(lambda) is, per layer, the
last vertex with r_j > lambda, so the Lagrangian path is the greedy that takes hull moves in
decreasing r (exact for the relaxation where one layer may sit between two vertices: the LP
optimum).  Between two breakpoints a budget can leave slack; the repair/improve step spends it:
repeatedly take, over all layers and candidates, the single-layer change that lowers O, keeps
K <= C and has the best saving per added cost (a change that adds no cost first); from a hull
vertex that is the next hull vertex, so this continues the greedy past the layer where it
stopped.  The result is feasible whenever any choice is (the all-most-accurate choice is the
lambda -> inf end), and O(result) <= O(c*) + max_l (max_c o(l,c) - min_c o(l,c)) (the LP
optimum is a lower bound, the greedy stops at most one move short of it).

Back-off (``back_off``) is the greedy in reverse: when a verified error misses, the layers
with the largest cost removed per objective unit regained, k(cur) - k(next), / o(next) - o(cur),
move to the next more accurate vertex of their own hull (never straight to the unchanged
candidate unless it is that vertex).  ``allocate_verified`` loops allocate -> measure (the
caller runs the real model) -> back off, calibrating the first-order model after a miss:
costs are scaled by (measured / predicted)^2, so the predicted error is measured / predicted
times larger.

Deterministic: sums are ``math.fsum``, ties broken by the lower index (layer, then candidate).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

OBJECTIVES = ("bytes", "resident_bytes", "latency")


@dataclass(frozen=True)
class Candidate:
    """One format for one layer.

    ``error``: the layer's own relative output error; ``cost``: its contribution to the
    whole-model squared relative error, (sensitivity * error)^2 (``Candidate.scored`` computes
    it).  The unchanged layer is a candidate with error 0, cost 0 and the dense bytes.
    ``latency`` (seconds) is optional; only ``objective="latency"`` needs it.
    """
    label: str
    family: str
    bytes: int
    resident_bytes: int
    error: float
    cost: float
    latency: float | None = None

    @classmethod
    def scored(cls, label: str, family: str, bytes: int, resident_bytes: int, error: float,
               sensitivity: float, latency: float | None = None) -> Candidate:
        """A candidate whose cost is (sensitivity * error)^2."""
        return cls(label, family, int(bytes), int(resident_bytes), float(error),
                   contribution(sensitivity, error), latency)


def contribution(sensitivity: float, error: float) -> float:
    """A layer's additive share of the whole-model squared error: (sensitivity * error)^2."""
    return float(sensitivity * error) ** 2


@dataclass(frozen=True)
class Allocation:
    """One candidate index per layer (``choice``), its summed objective and predicted error.

    ``predicted_error`` = sqrt(scale * sum of the chosen costs) (``scale`` 1 unless calibrated by
    ``allocate_verified``); ``feasible``: it meets ``budget`` (False only when no choice does:
    then every layer has its most accurate candidate).
    """
    choice: tuple[int, ...]
    objective: float
    predicted_error: float
    budget: float
    objective_name: str = "bytes"
    feasible: bool = True
    scale: float = 1.0

    def chosen(self, layers: Sequence[Sequence[Candidate]]) -> list[Candidate]:
        """The chosen candidate of each layer."""
        return [layers[l][c] for l, c in enumerate(self.choice)]


@dataclass(frozen=True)
class Verified:
    """``allocate_verified``'s result: the last allocation, the allocations tried (``rounds``),
    the measured error of each, whether the last one met the budget, and the cost scale
    (measured / predicted)^2 that calibrated the back-off."""
    allocation: Allocation
    rounds: tuple[Allocation, ...]
    measured: tuple[float, ...]
    met: bool
    scale: float


# ---------------------------------------------------------------- helpers

def _objective(c: Candidate, name: str) -> float:
    value = getattr(c, name)
    if value is None:
        raise ValueError(f"candidate {c.label!r} ({c.family}) has no {name}; objective={name!r} needs it on every candidate")
    return float(value)


def _check(layers: Sequence[Sequence[Candidate]], budget: float, objective: str) -> list[list[tuple[float, float]]]:
    """(objective, cost) per layer and candidate, after checking the input."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r}: one of {', '.join(OBJECTIVES)}")
    if not (isinstance(budget, (int, float)) and not math.isnan(budget) and budget >= 0):
        raise ValueError(f"budget={budget!r} must be a number >= 0 (inf: no budget)")
    points = []
    for l, cands in enumerate(layers):
        if not cands:
            raise ValueError(f"layer {l} has no candidate (give at least the unchanged one)")
        row = []
        for c in cands:
            o = _objective(c, objective)
            if not (math.isfinite(o) and math.isfinite(c.cost) and c.cost >= 0):
                raise ValueError(f"layer {l} candidate {c.label!r}: objective {o!r} and cost {c.cost!r} must be finite, "
                                 "cost >= 0")
            row.append((o, float(c.cost)))
        points.append(row)
    return points


def _total_cost(points, choice, scale: float = 1.0) -> float:
    return scale * math.fsum(points[l][c][1] for l, c in enumerate(choice))


def _total_objective(points, choice) -> float:
    return math.fsum(points[l][c][0] for l, c in enumerate(choice))


def _fits(points, choice, budget: float, scale: float = 1.0) -> bool:
    return math.sqrt(_total_cost(points, choice, scale)) <= budget


def hull(points: Sequence[tuple[float, float]]) -> list[int]:
    """Lower convex hull of one layer's (objective, cost) points, as candidate indices sorted by
    increasing cost (strictly decreasing objective); the first vertex is the most accurate
    candidate (least cost, then least objective, then lowest index)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][1], points[i][0], i))
    out: list[int] = []
    for i in order:
        o, k = points[i]
        if out and o >= points[out[-1]][0]:       # costs more and saves nothing: dominated
            continue
        while len(out) >= 2:                      # drop the last vertex while it is on or above the chord
            o1, k1 = points[out[-2]]
            o2, k2 = points[out[-1]]
            # slope(out[-2] -> out[-1]) must be steeper than slope(out[-2] -> i): (o1-o2)/(k2-k1) > (o1-o)/(k-k1)
            if (o1 - o2) * (k - k1) <= (o1 - o) * (k2 - k1):
                out.pop()
            else:
                break
        out.append(i)
    return out


def _rate(saving: float, added: float) -> float:
    """Objective saving per added cost (a saving that adds no cost ranks first)."""
    return math.inf if added <= 0 else saving / added


def _argmin(row, lam: float) -> int:
    best, arg = math.inf, 0
    for i, (o, k) in enumerate(row):
        v = o + lam * k
        if v < best:
            best, arg = v, i
    return arg


# ---------------------------------------------------------------- allocation

def allocate(layers: Sequence[Sequence[Candidate]], budget: float, objective: str = "bytes") -> Allocation:
    """One candidate per layer minimizing the summed ``objective`` with sqrt(sum cost) <= ``budget``
    (module doc: Lagrangian bisection, then the greedy repair/improve step)."""
    points = _check(layers, budget, objective)
    hulls = [hull(row) for row in points]
    accurate = tuple(h[0] for h in hulls)

    def result(choice, feasible=True) -> Allocation:
        return Allocation(tuple(choice), _total_objective(points, choice),
                          math.sqrt(_total_cost(points, choice)), float(budget), objective, feasible)

    if not _fits(points, accurate, budget):
        return result(accurate, feasible=False)

    # Lagrangian: bisect log(lambda) between the smallest and largest hull exchange rates.
    rates = [(row[h[j - 1]][0] - row[h[j]][0]) / (row[h[j]][1] - row[h[j - 1]][1])
             for row, h in zip(points, hulls) for j in range(1, len(h))]
    best = accurate
    if rates:
        lo, hi = min(rates) / 2, max(rates) * 2

        def solve(lam):
            return tuple(_argmin(row, lam) for row in points)

        def better(a, b):
            return (_total_objective(points, a), _total_cost(points, a)) < (_total_objective(points, b),
                                                                           _total_cost(points, b))
        for lam in (lo, hi):
            c = solve(lam)
            if _fits(points, c, budget) and better(c, best):
                best = c
        if not _fits(points, solve(lo), budget):
            for _ in range(200):
                if hi / lo <= 1 + 1e-12:
                    break
                mid = math.sqrt(lo * hi)
                c = solve(mid)
                if _fits(points, c, budget):
                    hi = mid
                    if better(c, best):
                        best = c
                else:
                    lo = mid
    return result(_improve(points, list(best), budget))


def _improve(points, choice: list[int], budget: float) -> list[int]:
    """Greedy repair/improve: the single-layer change with the best saving per added cost that
    stays within the budget, until none lowers the objective."""
    cost = [points[l][c][1] for l, c in enumerate(choice)]
    limit = budget * budget

    def fits(l: int, k: float, total: float, k0: float) -> bool:
        new = total - k0 + k
        if math.isinf(limit):
            return True
        if abs(new - limit) > 1e-9 * limit:          # clear of the boundary: the running sum decides
            return new < limit
        cost[l], old = k, cost[l]                    # at the boundary: the exact test of the result
        ok = math.sqrt(math.fsum(cost)) <= budget
        cost[l] = old
        return ok

    while True:
        total = math.fsum(cost)
        pick = None          # (-rate, -saving, l, c): best rate, then largest saving, then lowest index
        for l, row in enumerate(points):
            o0, k0 = row[choice[l]]
            for c, (o, k) in enumerate(row):
                if o >= o0:
                    continue
                key = (-_rate(o0 - o, k - k0), -(o0 - o), l, c)
                if (pick is None or key < pick) and fits(l, k, total, k0):
                    pick = key
        if pick is None:
            return choice
        _, _, l, c = pick
        choice[l] = c
        cost[l] = points[l][c][1]


# ---------------------------------------------------------------- back-off

def back_off(allocation: Allocation, layers: Sequence[Sequence[Candidate]], order_key: str | None = None, *,
             target: float | None = None, scale: float | None = None) -> Allocation:
    """Move the worst layers to the next more accurate vertex of their own hull.

    Worst = the largest cost removed per unit of ``order_key`` regained (``order_key``: the
    objective that ranks the moves, ``allocation.objective_name`` by default), i.e.
    (k(cur) - k(next)) / (o(next) - o(cur)), a move that regains nothing ranking first; ties by
    the lower layer index.  The next vertex is the hull vertex of largest cost below the current
    candidate's cost (the unchanged candidate only when it is that vertex).  Without ``target``
    one layer moves; with it, layers move one at a time (at least one) until
    sqrt(scale * sum cost) <= target or no layer can move.  ``scale`` (default the allocation's)
    calibrates the costs.  Returns a new Allocation (the same choice when nothing can move).
    """
    key = order_key or allocation.objective_name
    points = _check(layers, allocation.budget, key)
    if len(allocation.choice) != len(layers):
        raise ValueError(f"allocation has {len(allocation.choice)} layers, the candidates {len(layers)}")
    scale = allocation.scale if scale is None else float(scale)
    hulls = [hull(row) for row in points]
    choice = list(allocation.choice)
    moved = 0
    while True:
        if moved and (target is None or math.sqrt(_total_cost(points, choice, scale)) <= target):
            break
        pick = None              # (-rate, l, next)
        for l, h in enumerate(hulls):
            o0, k0 = points[l][choice[l]]
            below = [i for i in h if points[l][i][1] < k0]
            if not below:
                continue
            nxt = below[-1]
            o1, k1 = points[l][nxt]
            rate = math.inf if o1 <= o0 else (k0 - k1) / (o1 - o0)
            cand = (-rate, l, nxt)
            if pick is None or cand < pick:
                pick = cand
        if pick is None:
            break
        choice[pick[1]] = pick[2]
        moved += 1
    obj = allocation.objective_name
    opoints = points if obj == key else _check(layers, allocation.budget, obj)
    return replace(allocation, choice=tuple(choice), objective=_total_objective(opoints, choice),
                   predicted_error=math.sqrt(_total_cost(points, choice, scale)), scale=scale,
                   feasible=_fits(points, choice, allocation.budget, scale))


def allocate_verified(layers: Sequence[Sequence[Candidate]], budget: float,
                      measure: Callable[[Allocation], float], max_rounds: int = 8,
                      objective: str = "bytes") -> Verified:
    """Allocate, measure (``measure`` runs the real planned model and returns its whole-model
    relative output error), and back off until the measurement meets ``budget``.

    After a miss the costs are calibrated: scale *= (measured / predicted)^2 (the predicted
    error under the current scale), and ``back_off`` moves layers until the calibrated
    prediction meets the budget (at least one layer per round).  Stops when a measurement meets
    the budget, after ``max_rounds`` measurements, or when no layer can move (every layer at its
    most accurate candidate) or the prediction is 0 and the measurement is not.
    """
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds!r} must be >= 1")
    alloc = allocate(layers, budget, objective)
    scale = 1.0
    rounds, measured = [], []
    while True:
        m = float(measure(alloc))
        rounds.append(alloc)
        measured.append(m)
        if m <= budget:
            return Verified(alloc, tuple(rounds), tuple(measured), True, scale)
        if len(rounds) >= max_rounds or alloc.predicted_error <= 0 or not math.isfinite(m):
            break
        scale *= (m / alloc.predicted_error) ** 2
        nxt = back_off(alloc, layers, target=budget, scale=scale)
        if nxt.choice == alloc.choice:
            break
        alloc = nxt
    return Verified(alloc, tuple(rounds), tuple(measured), False, scale)
