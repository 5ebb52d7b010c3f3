"""Plan: choose structure and precision per site, factorize and quantize, scored with the target's numerics.

Requires: sites (and calibration when given).  Ensures: plans.  Not in place.
Matches: the eligible sites of ``find_sites``.
Ensures: every site gets a ``LayerPlan``; a rewritten plan carries a
``QuantizedFactorization`` (W_hat = P_row^T K_1 ... K_L P_col [+ U V^T]), a kept-dense
plan a reason.
Error of a layer, for the function y = T(x) that the chosen target computes:
  * T the float product x @ W_hat: with calibration the relative output error
    ||X W - X W_hat|| / ||X W|| from the Gram matrix G = X^T X
    (``bfc.factorize.weighted_error``); without, ||W - W_hat||_F / ||W||_F;
  * otherwise (e.g. the custom op's per-row int8 activations): ||X W - T(X)|| / ||X W||
    measured on the site's sample of calibration rows, or without calibration on
    WHITE_ROWS seeded standard-normal rows (for which E||x E||^2 = ||E||_F^2, the same
    quantity the weight error measures).
Choice:
  * structure=auto: per family (monarch, 3-factor chain, butterfly for square layers),
    block ranks 1, 2, 4, ... up to half the dense parameters; the largest is tried first
    (if it misses ``max_error`` the family is out), then the smallest rank meeting the
    budget is bisected; the family whose result is smallest in bytes wins; none: the
    layer stays dense and the best error seen is reported.
  * a fixed structure: that chain (``rank``), kept dense if it misses ``max_error``.
  * precision=auto: for the chosen structure the lowest precision (int8, fp8-e4m3,
    fp16, fp32) whose measured error keeps the budget.
  * structure=rotated: the rotated low-bit family (``bfc.passes.lowbit_plan``: one butterfly
    rotation per input tensor, int2/3/4 group-wise weight, optional int8 correction); with
    structure=auto and precision=auto its int4/int3/int2 candidates compete with the KS
    families by bytes (the smallest meeting ``max_error`` wins; mixed plans are normal).
    A target that cannot emit the family says why (``Target.lowbit_support``): the sites
    get that reason (fixed family) or the family is skipped (auto).
With calibration the fit is activation-weighted (``bfc.factorize.factorize(gram=G,
refine=False)``: diagonal pre-whitening, no CG refinement, which costs seconds per layer
and candidate).
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import numpy as np

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError
from bfc.factorize import candidates, chain_for, factorize, weighted_error
from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.events import LayerPlanned
from bfc.passes.find_sites import Site
from bfc.passes import lowbit_plan
from bfc.quant import QuantizedFactorization, cast, quantize

AUTO_STRUCTURES = ("monarch", "butterfly", "chain3")
AUTO_RANKS = (1, 2, 4, 8, 16, 32)
MAX_PARAM_FRACTION = 0.5   # auto: a structure must at least halve the parameters to be worth its transposes
WHITE_ROWS = 256           # rows of N(0, I) inputs scoring a non-float target without calibration


@dataclass
class LayerPlan:
    site: Site
    weights: QuantizedFactorization | None = None
    structure: str = "dense"
    precision: str = "-"
    error: float | None = None
    error_kind: str = "weight"
    reason: str | None = None
    note: str | None = None      # e.g. what reconstruction changed
    seconds: float | None = None  # wall time of planning this layer (bfc.passes.layer_runner)
    worker: str | None = None     # who planned it: main, pid N, dask NAME
    resumed: bool = False         # loaded from the work folder instead of planned

    @property
    def rewritten(self) -> bool:
        return self.weights is not None

    @property
    def params_before(self) -> int:
        return int(self.site.weight.size) if self.site.weight is not None else 0

    @property
    def bytes_before(self) -> int:
        return int(self.site.weight.nbytes) if self.site.weight is not None else 0

    @property
    def flops_before(self) -> int:
        return 2 * self.params_before

    @property
    def params_after(self) -> int:
        return self.weights.n_params if self.rewritten else self.params_before

    @property
    def bytes_after(self) -> int:
        return self.weights.nbytes if self.rewritten else self.bytes_before

    @property
    def flops_after(self) -> int:
        return self.weights.flops_per_row if self.rewritten else self.flops_before


class Scorer:
    """The layer error of candidates for one site under one target (see module doc)."""

    def __init__(self, w: np.ndarray, stats, target, seed: int):
        self.w, self.target = w, target
        self.gram = None if stats is None else np.asarray(stats.gram, np.float64)
        if stats is not None:
            self.rows = np.asarray(stats.sample, np.float64)
        else:
            self.rows = np.random.default_rng(seed).standard_normal((WHITE_ROWS, w.shape[0]))
        self._ref = None

    def __call__(self, q: QuantizedFactorization) -> float:
        simulate = self.target.simulate(q)
        if simulate is not None:
            if self._ref is None:
                self._ref = self.rows @ self.w
            y = np.asarray(simulate(self.rows), np.float64)
            if q.low_rank is not None:
                u, v = (np.asarray(m, np.float64) for m in q.low_rank)
                y = y + (self.rows @ u) @ v.T
            return float(np.linalg.norm(y - self._ref) / max(np.linalg.norm(self._ref), 1e-30))
        # a KS factorization in column blocks (no dense M x N temporary); a rotated layer as its dense W_hat
        w_hat = q.dequantized().iter_columns() if isinstance(q, QuantizedFactorization) else q.to_dense()
        return weighted_error(self.w, w_hat, self.gram)


def _store(f, precision: Precision, seed: int, method: str) -> QuantizedFactorization:
    if precision in (Precision.FP32, Precision.FP16):
        return cast(f, precision.value)
    return quantize(f, precision.value, method=method, seed=seed)


def _label(structure, rank, k):
    s = structure if rank in (None, 1) else f"{structure} r{rank}"
    return s + (f" + lowrank {k}" if k else "")


def _fixed_candidate(cfg: OptimizeConfig, m: int, n: int):
    rank = cfg.rank or 1
    if cfg.structure is Structure.LOWRANK_RESIDUAL:
        return [("monarch", rank, cfg.residual_rank, chain_for("monarch", m, n, rank))]
    return [(cfg.structure.value, rank, 0, chain_for(cfg.structure.value, m, n, rank))]


def _try_precisions(f, score, precisions, budget, seed, method):
    """(QuantizedFactorization, precision, error) for the lowest precision meeting the budget,
    else (None, label, error)."""
    best = (float("inf"), "")
    for prec in precisions:
        q = _store(f, prec, seed, method)
        e = score(q)
        if e <= budget:
            return q, prec.value, e
        best = min(best, (e, prec.value))
    return None, best[1], best[0]


def _search_family(w, cands, gram, score, precisions, budget, seed, method, seen):
    """Cheapest candidate of one structure family meeting the budget, assuming the error falls with
    the rank: test the largest first (if it fails the family fails), then bisect on fp32 error."""
    cache = {}

    def fit(i):
        if i not in cache:
            s, r, k, ch = cands[i]
            f = factorize(w, ch, gram=gram, refine=False, residual_rank=k)
            fp_err = score(cast(f, "fp32"))
            cache[i] = (f, fp_err)
            if seen[0] is None or fp_err < seen[0][0]:
                seen[0] = (fp_err, _label(s, r, k))
        return cache[i]

    hi = len(cands) - 1
    if fit(hi)[1] > budget:
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if fit(mid)[1] <= budget:
            hi = mid
        else:
            lo = mid + 1
    for i in range(lo, len(cands)):
        q, prec, err = _try_precisions(fit(i)[0], score, precisions, budget, seed, method)
        if q is not None:
            s, r, k, _ch = cands[i]
            return q, _label(s, r, k), prec, err
        seen[0] = min(seen[0], (err, f"{_label(*cands[i][:3])} {prec}"))
    return None


def _auto_candidates(cfg, m, n):
    ranks = AUTO_RANKS if cfg.rank is None else (cfg.rank,)
    fams = {}
    for params, s, r, k, ch in candidates(m, n, AUTO_STRUCTURES, ranks, (0,)):
        if params > MAX_PARAM_FRACTION * m * n or (s == "butterfly" and m != n):
            continue
        fams.setdefault(s, []).append((s, r, k, ch))
    return fams


def _lowbit_bits(cfg: OptimizeConfig, target, opset) -> tuple[tuple[int, ...], str | None]:
    """Bits of the rotated family this plan tries (none: the reason)."""
    if cfg.structure is Structure.ROTATED:
        wanted = (cfg.bits,)
    elif cfg.structure is Structure.AUTO and cfg.precision is Precision.AUTO and cfg.max_error is not None:
        wanted = lowbit_plan.AUTO_BITS
    else:
        return (), None
    why = {b: target.lowbit_support(b, opset) for b in wanted}
    ok = tuple(b for b in wanted if why[b] is None)
    return ok, None if ok else why[wanted[0]]


def plan_site(site: Site, cfg: OptimizeConfig, target, stats=None, precisions=None, rotation=None,
              lowbit_bits=()) -> LayerPlan:
    """Plan one eligible site (include/exclude/min-size already applied) for ``target``;
    ``precisions`` (default: from ``cfg``) are the formats to try, lowest first; ``rotation`` the
    site's (shared) rotation and ``lowbit_bits`` the rotated family's bits to try (none: no rotated
    candidates)."""
    w = site.weight.astype(np.float64)
    m, n = w.shape
    plan = LayerPlan(site, error_kind="output" if stats is not None else "weight")
    score = Scorer(w, stats, target, cfg.seed)
    gram = score.gram                  # one float64 copy of the statistics, shared with the scorer
    if precisions is None:
        precisions = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
    budget = cfg.max_error if cfg.max_error is not None else float("inf")
    lowbit = None
    if lowbit_bits:
        lowbit = lowbit_plan.plan_rotated(w, gram, score, cfg, target, rotation, lowbit_bits, budget)
    if cfg.structure is Structure.ROTATED:
        if lowbit is None:
            plan.reason = "no bits of the rotated family can be emitted by this target"
        elif lowbit[0] is None:
            plan.error = lowbit[2]
            plan.reason = f"error budget not met: best {lowbit[1]} has error {lowbit[2]:.3g} > max-error {budget:g}"
        else:
            plan.weights, plan.structure, plan.precision, plan.error = lowbit
        return plan
    if cfg.structure is Structure.AUTO:
        fams = _auto_candidates(cfg, m, n)
        if cfg.max_error is None:       # target-size only: the cheapest Monarch/chain
            fams = {k: v[:1] for k, v in list(fams.items())[:1]}
    else:
        try:
            fams = {cfg.structure.value: [c for c in _fixed_candidate(cfg, m, n)
                                          if c[3].nnz + c[2] * (m + n) < m * n]}
        except BfcError as e:
            plan.reason = f"{cfg.structure.value} does not fit {m}x{n} ({e})"
            return plan
    if not any(fams.values()):
        plan.reason = (f"no {cfg.structure.value} structure with at most {MAX_PARAM_FRACTION:.0%} of the "
                       f"dense parameters at {m}x{n}")
        return plan
    seen = [None]
    found = []
    if lowbit is not None:
        if lowbit[0] is not None:
            found = [lowbit]
        else:
            seen[0] = (lowbit[2], lowbit[1])
    method = cfg.quant_method.value
    for fam in AUTO_STRUCTURES + tuple(s.value for s in Structure):
        cands = fams.pop(fam, [])
        if found:
            cands = [c for c in cands if c[3].nnz + c[2] * (m + n) < found[0][0].n_params]
        if cands:
            hit = _search_family(w, cands, gram, score, precisions, budget, cfg.seed, method, seen)
            if hit is not None and (not found or hit[0].nbytes < found[0][0].nbytes):
                found = [hit]
    if found and found[0][0].nbytes >= plan.bytes_before:
        plan.error = found[0][3]
        plan.reason = (f"no byte saving: {found[0][1]} {found[0][2]} needs {found[0][0].nbytes} bytes, "
                       f"the dense weight {plan.bytes_before}")
        return plan
    if found:
        plan.weights, plan.structure, plan.precision, plan.error = found[0]
        if cfg.reconstruct and gram is not None and plan.precision not in ("fp32", "fp16") \
                and plan.structure != "rotated":
            _reconstruct(plan, w, gram, score, cfg)
        return plan
    plan.error = seen[0][0]
    plan.reason = f"error budget not met: best {seen[0][1]} has error {seen[0][0]:.3g} > max-error {budget:g}"
    return plan


def _reconstruct(plan: LayerPlan, w: np.ndarray, gram: np.ndarray, score, cfg: OptimizeConfig) -> None:
    """Fine-tune the planned layer's quantized factors on its calibration Gram (bfc.reconstruct);
    kept only when the target's error improves."""
    from bfc.reconstruct import reconstruct
    res = reconstruct(plan.weights, w, gram=gram, steps=cfg.reconstruct_steps, lr=cfg.reconstruct_lr)
    err = score(res.factorization)
    if err < plan.error:
        plan.note = f"reconstructed: error {plan.error:.3g} -> {err:.3g}"
        plan.weights, plan.error = res.factorization, err


def _match(names, patterns):
    return any(fnmatch.fnmatchcase(nm, p) for nm in names for p in patterns)


def skip_reason(site: Site, cfg: OptimizeConfig) -> str | None:
    """Why ``site`` is not planned at all (not eligible, --include/--exclude, --min-size), or None:
    the one selection rule, also used by calibration to collect only the statistics planned on."""
    names = [nd.name for nd in site.nodes]
    if not site.eligible:
        return site.reason
    if cfg.include and not _match(names, cfg.include):
        return "not matched by --include " + ",".join(cfg.include)
    if cfg.exclude and _match(names, cfg.exclude):
        return "matched by --exclude " + ",".join(cfg.exclude)
    if site.weight.size < cfg.min_size:
        return f"too small ({site.weight.size} weights < min-size {cfg.min_size})"
    return None


def plan_sites(sites: list[Site], cfg: OptimizeConfig, target, stats: dict | None = None,
               on_event=None, model_bytes: int | None = None, precisions=None, opset: int = 21) -> list[LayerPlan]:
    """One LayerPlan per site, in the order of ``sites`` (largest weights are planned first)."""
    plans = {}
    bits, lowbit_why = _lowbit_bits(cfg, target, opset)
    rots = {}
    if bits:
        todo = [s for s in sites if skip_reason(s, cfg) is None]
        rots = lowbit_plan.rotations(todo, stats, cfg, target, max(bits))
    order = sorted(range(len(sites)), key=lambda i: -(sites[i].weight.size if sites[i].weight is not None else 0))
    total = model_bytes if model_bytes is not None else sum(s.weight.nbytes for s in sites if s.weight is not None)
    if precisions is None:
        precisions = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
    # Every eligible site is one task of bfc.passes.layer_runner (in process, a process pool or Dask;
    # resumable); a target-size cut is applied to the results in ``order``, as planned sequentially.
    from bfc.passes.layer_runner import LayerTask, Runner
    count = [0, time.perf_counter(), 0, 0]      # layers reported, start, elements planned, elements to plan
    todo = []

    def emit(i, res=None):
        count[0] += 1
        if on_event is None:
            return
        if res is None:
            on_event(LayerPlanned(sites[i].name, plans[i].rewritten, count[0], len(sites)))
            return
        elapsed = time.perf_counter() - count[1]
        eta = elapsed * (count[3] - count[2]) / count[2] if count[2] else None
        on_event(LayerPlanned(sites[i].name, plans[i].rewritten, count[0], len(sites), res.seconds, res.worker,
                              elapsed, eta, res.resumed, res.cpu_seconds))

    for i in order:
        site = sites[i]
        why = skip_reason(site, cfg)
        if why is not None:
            plans[i] = LayerPlan(site, reason=why)
        elif cfg.target_size is not None and total <= cfg.target_size:
            plans[i] = LayerPlan(site, reason=f"target size {cfg.target_size} bytes already reached")
        elif cfg.structure is Structure.ROTATED and lowbit_why is not None:
            plans[i] = LayerPlan(site, reason=lowbit_why)
        else:
            todo.append(i)
            continue
        emit(i)
    count[3] = sum(int(sites[i].weight.size) for i in todo)
    tasks = [LayerTask(i, sites[i].weight_name, sites[i].weight,
                       None if stats is None else stats.get(sites[i].weight_name), cfg, target, tuple(precisions),
                       rots.get(sites[i].weight_name), tuple(bits), cfg.seed) for i in todo]
    cut = f"target size {cfg.target_size} bytes already reached"
    ready, nxt = {}, 0
    runs = Runner(cfg).run(tasks)
    try:
        for task, res in runs:
            count[2] += int(task.weight.size)
            ready[task.index] = res
            while nxt < len(todo) and todo[nxt] in ready:      # in ``order``: the target-size cut as before
                i = todo[nxt]
                nxt += 1
                res = ready.pop(i)
                if cfg.target_size is not None and total <= cfg.target_size:
                    plans[i] = LayerPlan(sites[i], reason=cut)
                else:
                    plans[i] = LayerPlan(sites[i], res.weights, res.structure, res.precision, res.error,
                                         res.error_kind, res.reason, res.note, res.seconds, res.worker, res.resumed)
                    if plans[i].rewritten:
                        total -= plans[i].bytes_before - plans[i].bytes_after
                emit(i, res)
            if cfg.target_size is not None and total <= cfg.target_size:
                break
    finally:
        runs.close()
    for i in todo[nxt:]:
        plans[i] = LayerPlan(sites[i], reason=cut)
        emit(i)
    out = [plans[i] for i in range(len(sites))]
    lowbit_plan.assign_rotation_owners(out)
    return out


class Plan(GraphPass):
    contract = Contract.of(requires={"sites", "calibration"}, ensures={"plans"})

    def run(self, state) -> PassResult:
        from bfc.passes.load import default_opset
        state.plans = plan_sites(state.sites, state.config, state.target, state.stats, state.emit,
                                 state.model_bytes, state.precisions or None, default_opset(state.model))
        if state.config.objective == "latency":      # bfc.passes.latency: never a rewrite slower than dense
            from bfc.passes.latency import check_plan
            for p in state.plans:
                check_plan(p, state.config, state.target, default_opset(state.model))
        return PassResult(changed=False, skipped={p.site.name: p.reason for p in state.plans if not p.rewritten})
