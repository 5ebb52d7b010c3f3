"""Plan: choose structure and precision per site, factorize and quantize (target-independent).

Matches: the eligible sites of ``find_sites``.
Ensures: every site gets a ``LayerPlan``; a rewritten plan carries ``LayerWeights``
(W_hat = P_row^T K_1 ... K_L P_col [+ U V^T], quantized), a kept-dense plan a reason.
Error of a layer: with calibration activations X, the relative output error
||X W - X W_hat|| / ||X W||; without, the weight error ||W - W_hat||_F / ||W||_F.
Choice:
  * structure=auto: per family (monarch, 3-factor chain, butterfly for square layers),
    block ranks 1, 2, 4, ... up to half the dense parameters; the largest is tried first
    (if it misses ``max_error`` the family is out), then the smallest rank meeting the
    budget is bisected; the family whose result is smallest in bytes wins; none: the
    layer stays dense and the best error seen is reported.
  * a fixed structure: that chain (``rank``), kept dense if it misses ``max_error``.
  * precision=auto: for the chosen structure the lowest precision (int8, fp8-e4m3,
    fp16, fp32) whose measured error (the layer's sensitivity, measured on the
    calibration activations when given) keeps the budget.
With calibration the fit is activation-weighted: W is factorized as diag(s) W with
s_i = ||X[:, i]|| and the scaling undone on the first factor, and errors are computed
from the Gram matrix X^T X (bfc.factorize's full weighted CG refinement is not used
here: it costs seconds per layer and candidate).
The factorization does not depend on the target, so the custom-op rewrite reuses it.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import numpy as np

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError
from bfc.factorize import KSFactorization, candidates, chain_for, factorize
from bfc.passes.find_sites import Site
from bfc.passes.layer import LayerWeights, from_factorization

AUTO_STRUCTURES = ("monarch", "butterfly", "chain3")
AUTO_RANKS = (1, 2, 4, 8, 16, 32)
MAX_PARAM_FRACTION = 0.5   # auto: a structure must at least halve the parameters to be worth its transposes


@dataclass
class LayerPlan:
    site: Site
    weights: LayerWeights | None = None
    structure: str = "dense"
    precision: str = "-"
    error: float | None = None
    error_kind: str = "weight"
    reason: str | None = None
    note: str | None = None      # e.g. what reconstruction changed

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


def layer_error(w: np.ndarray, lw: LayerWeights, gram: np.ndarray | None) -> float:
    """Relative weight error, or with gram = X^T X the output error ||X (W - W_hat)|| / ||X W||."""
    e = w - lw.to_dense()
    if gram is None:
        return float(np.linalg.norm(e) / max(np.linalg.norm(w), 1e-30))
    num = np.einsum("ij,ij->", e, gram @ e)
    den = np.einsum("ij,ij->", w, gram @ w)
    return float(np.sqrt(max(num, 0.0) / max(den, 1e-300)))


def _fit(w, chain, residual_rank, gram):
    if gram is None:
        return factorize(w, chain, residual_rank=residual_rank)
    s = np.sqrt(np.clip(np.diag(gram), 0, None))
    s = np.maximum(s, 1e-3 * max(s.max(), 1e-30))
    f = factorize(s[:, None] * w, chain, residual_rank=residual_rank)
    p = chain[0]
    values = list(f.factors)
    values[0] = values[0] / s[p.row_index()]
    low = None if f.low_rank is None else (f.low_rank[0] / s[:, None], f.low_rank[1])
    return KSFactorization(chain, tuple(values), f.row_perm, f.col_perm, low)


def _quantize(f: KSFactorization, precision: Precision, seed: int, method: str = "auto") -> LayerWeights:
    if precision is Precision.FP32:
        return from_factorization(f, precision, np.float32)
    if precision is Precision.FP16:
        return from_factorization(f, precision, np.float16)
    try:
        from bfc.quant import quantize
    except ImportError as e:  # pragma: no cover - bfc.quant ships with bfc
        raise BfcError(f"precision {precision.value} needs bfc.quant, which failed to import ({e}); "
                       "use --precision fp16 or fp32") from None
    return from_factorization(quantize(f, precision.value, method=method, seed=seed), precision)


def _label(structure, rank, k):
    s = structure if rank in (None, 1) else f"{structure} r{rank}"
    return s + (f" + lowrank {k}" if k else "")


def _fixed_candidate(cfg: OptimizeConfig, m: int, n: int):
    rank = cfg.rank or 1
    if cfg.structure is Structure.LOWRANK_RESIDUAL:
        return [("monarch", rank, cfg.residual_rank, chain_for("monarch", m, n, rank))]
    return [(cfg.structure.value, rank, 0, chain_for(cfg.structure.value, m, n, rank))]


def _try_precisions(w, f, x, precisions, budget, seed, method):
    """(LayerWeights, precision, error) for the lowest precision meeting the budget, else (None, label, err)."""
    fp = from_factorization(f, Precision.FP32)
    err = f.rel_error if x is None and np.isfinite(f.rel_error) else layer_error(w, fp, x)
    if err > budget:
        return None, "fp32", err
    best = (float("inf"), "")
    for prec in precisions:
        lw = fp if prec is Precision.FP32 else _quantize(f, prec, seed, method)
        e = err if prec is Precision.FP32 else layer_error(w, lw, x)
        if e <= budget:
            return lw, prec.value, e
        best = min(best, (e, prec.value))
    return None, best[1], best[0]


def _search_family(w, cands, x, precisions, budget, seed, method, seen):
    """Cheapest candidate of one structure family meeting the budget, assuming the error falls with
    the rank: test the largest first (if it fails the family fails), then bisect on fp32 error."""
    cache = {}

    def fit(i):
        if i not in cache:
            s, r, k, ch = cands[i]
            cache[i] = _fit(w, ch, k, x)
            fp_err = (cache[i].rel_error if x is None and np.isfinite(cache[i].rel_error)
                      else layer_error(w, from_factorization(cache[i], Precision.FP32), x))
            cache[i] = (cache[i], fp_err)
            label = _label(s, r, k)
            if seen[0] is None or fp_err < seen[0][0]:
                seen[0] = (fp_err, label)
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
        lw, prec, err = _try_precisions(w, fit(i)[0], x, precisions, budget, seed, method)
        if lw is not None:
            s, r, k, _ch = cands[i]
            return lw, _label(s, r, k), prec, err
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


def plan_site(site: Site, cfg: OptimizeConfig, x: np.ndarray | None) -> LayerPlan:
    """Plan one eligible site (include/exclude/min-size already applied)."""
    w = site.weight.astype(np.float64)
    m, n = w.shape
    plan = LayerPlan(site, error_kind="output" if x is not None else "weight")
    x = None if x is None else np.asarray(x, np.float64)    # the Gram matrix X^T X of the calibration rows
    precisions = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
    budget = cfg.max_error if cfg.max_error is not None else float("inf")
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
    for fam in AUTO_STRUCTURES + tuple(s.value for s in Structure):
        cands = fams.pop(fam, [])
        if found:
            cands = [c for c in cands if c[3].nnz + c[2] * (m + n) < found[0][0].n_params]
        if cands:
            hit = _search_family(w, cands, x, precisions, budget, cfg.seed, cfg.quant_method.value, seen)
            if hit is not None and (not found or hit[0].nbytes < found[0][0].nbytes):
                found = [hit]
    if found:
        plan.weights, plan.structure, plan.precision, plan.error = found[0]
        if cfg.reconstruct and x is not None and plan.precision not in ("fp32", "fp16"):
            _reconstruct(plan, w, x, cfg)
        return plan
    plan.error = seen[0][0]
    plan.reason = f"error budget not met: best {seen[0][1]} has error {seen[0][0]:.3g} > max-error {budget:g}"
    return plan


def _reconstruct(plan: LayerPlan, w: np.ndarray, gram: np.ndarray, cfg: OptimizeConfig) -> None:
    """Fine-tune the planned layer's quantized factors on its calibration outputs (bfc.reconstruct).

    ||X (W - W_hat)|| depends on X only through G = X^T X, so the rows of G^(1/2) stand in
    for the calibration activations (at most M rows however many tokens were seen)."""
    from bfc.quant import QuantizedFactor, QuantizedFactorization
    from bfc.reconstruct import reconstruct
    lw = plan.weights
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > evals.max() * 1e-10
    x = np.sqrt(evals[keep])[:, None] * evecs[:, keep].T
    qf = QuantizedFactorization(lw.chain, tuple(QuantizedFactor(v, s) for v, s in zip(lw.values, lw.scales)),
                                lw.row_perm, lw.col_perm, lw.low_rank, lw.precision.value, "planned", float("nan"))
    res = reconstruct(qf, w, x, steps=cfg.reconstruct_steps, lr=cfg.reconstruct_lr)
    new = from_factorization(res.factorization, lw.precision)
    err = layer_error(w, new, gram)
    if err < plan.error:
        plan.note = f"reconstructed: error {plan.error:.3g} -> {err:.3g}"
        plan.weights, plan.error = new, err


def _match(names, patterns):
    return any(fnmatch.fnmatchcase(nm, p) for nm in names for p in patterns)


def plan_sites(sites: list[Site], cfg: OptimizeConfig, activations: dict | None = None,
               progress=None, model_bytes: int | None = None) -> list[LayerPlan]:
    """One LayerPlan per site, in the order of ``sites``."""
    plans = {}
    order = sorted(range(len(sites)), key=lambda i: -(sites[i].weight.size if sites[i].weight is not None else 0))
    total = model_bytes if model_bytes is not None else sum(s.weight.nbytes for s in sites if s.weight is not None)
    for i in order:
        site = sites[i]
        names = [nd.name for nd in site.nodes]
        if not site.eligible:
            plans[i] = LayerPlan(site, reason=site.reason)
        elif cfg.include and not _match(names, cfg.include):
            plans[i] = LayerPlan(site, reason="not matched by --include " + ",".join(cfg.include))
        elif cfg.exclude and _match(names, cfg.exclude):
            plans[i] = LayerPlan(site, reason="matched by --exclude " + ",".join(cfg.exclude))
        elif site.weight.size < cfg.min_size:
            plans[i] = LayerPlan(site, reason=f"too small ({site.weight.size} weights < min-size {cfg.min_size})")
        elif cfg.target_size is not None and total <= cfg.target_size:
            plans[i] = LayerPlan(site, reason=f"target size {cfg.target_size} bytes already reached")
        else:
            x = None if activations is None else activations.get(site.weight_name)
            plans[i] = plan_site(site, cfg, x)
            if plans[i].rewritten:
                total -= plans[i].bytes_before - plans[i].bytes_after
        if progress is not None:
            progress(site.name)
    return [plans[i] for i in range(len(sites))]
