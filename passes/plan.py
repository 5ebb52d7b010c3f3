"""Plan: choose structure and precision per site, factorize and quantize (target-independent).

Matches: the eligible sites of ``find_sites``.
Ensures: every site gets a ``LayerPlan``; a rewritten plan carries ``LayerWeights``
(W_hat = P_row^T K_1 ... K_L P_col [+ U V^T], quantized), a kept-dense plan a reason.
Error of a layer: with calibration activations X, the relative output error
||X W - X W_hat|| / ||X W||; without, the weight error ||W - W_hat||_F / ||W||_F.
Choice:
  * structure=auto: candidates (monarch, butterfly, 3-factor chains, block ranks 1..)
    in increasing parameter count; the first whose error meets ``max_error`` at some
    precision wins; none: the layer stays dense with the best error seen.
  * a fixed structure: that chain (``rank``), kept dense if it misses ``max_error``.
  * precision=auto: for the chosen structure the lowest precision (int8, fp8-e4m3,
    fp16, fp32) whose measured error (the layer's sensitivity, measured on the
    calibration activations when given) keeps the budget.
With calibration the fit is activation-weighted: W is factorized as diag(s) W with
s_i = rms(X[:, i]) and the scaling undone on the first factor (cheap; ``refine``
adds bfc.factorize's full weighted refinement of the chosen candidate).
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


@dataclass
class LayerPlan:
    site: Site
    weights: LayerWeights | None = None
    structure: str = "dense"
    precision: str = "-"
    error: float | None = None
    error_kind: str = "weight"
    reason: str | None = None

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


def layer_error(w: np.ndarray, lw: LayerWeights, x: np.ndarray | None) -> float:
    if x is None:
        return float(np.linalg.norm(w - lw.to_dense()) / max(np.linalg.norm(w), 1e-30))
    y = x @ w
    return float(np.linalg.norm(y - lw.apply(x)) / max(np.linalg.norm(y), 1e-30))


def _fit(w, chain, residual_rank, x, refine):
    if x is None:
        return factorize(w, chain, residual_rank=residual_rank)
    if refine:
        return factorize(w, chain, residual_rank=residual_rank, calibration=x)
    s = np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=0))
    s = np.maximum(s, 1e-3 * max(s.max(), 1e-30))
    f = factorize(s[:, None] * w, chain, residual_rank=residual_rank)
    p = chain[0]
    values = list(f.factors)
    values[0] = values[0] / s[p.row_index()]
    low = None if f.low_rank is None else (f.low_rank[0] / s[:, None], f.low_rank[1])
    return KSFactorization(chain, tuple(values), f.row_perm, f.col_perm, low)


def _quantize(f: KSFactorization, precision: Precision, seed: int) -> LayerWeights:
    if precision is Precision.FP32:
        return from_factorization(f, precision, np.float32)
    if precision is Precision.FP16:
        return from_factorization(f, precision, np.float16)
    try:
        from bfc.quant import quantize
    except ImportError as e:  # pragma: no cover - bfc.quant ships with bfc
        raise BfcError(f"precision {precision.value} needs bfc.quant, which failed to import ({e}); "
                       "use --precision fp16 or fp32") from None
    return from_factorization(quantize(f, precision.value, seed=seed), precision)


def _label(structure, rank, k):
    s = structure if rank in (None, 1) else f"{structure} r{rank}"
    return s + (f" + lowrank {k}" if k else "")


def _fixed_candidate(cfg: OptimizeConfig, m: int, n: int):
    rank = cfg.rank or 1
    if cfg.structure is Structure.LOWRANK_RESIDUAL:
        return [("monarch", rank, cfg.residual_rank, chain_for("monarch", m, n, rank))]
    return [(cfg.structure.value, rank, 0, chain_for(cfg.structure.value, m, n, rank))]


def plan_site(site: Site, cfg: OptimizeConfig, x: np.ndarray | None) -> LayerPlan:
    """Plan one eligible site (include/exclude/min-size already applied)."""
    w = site.weight.astype(np.float64)
    m, n = w.shape
    plan = LayerPlan(site, error_kind="output" if x is not None else "weight")
    if cfg.structure is Structure.AUTO:
        ranks = AUTO_RANKS if cfg.rank is None else (cfg.rank,)
        cands = [(s, r, k, ch) for _p, s, r, k, ch in candidates(m, n, AUTO_STRUCTURES, ranks, (0,))]
    else:
        try:
            cands = _fixed_candidate(cfg, m, n)
        except BfcError as e:
            plan.reason = f"{cfg.structure.value} does not fit {m}x{n} ({e})"
            return plan
        cands = [c for c in cands if c[3].nnz + c[2] * (m + n) < m * n]
    if not cands:
        plan.reason = f"no {cfg.structure.value} structure is cheaper than dense at {m}x{n}"
        return plan
    if cfg.target_size is not None and cfg.max_error is None:
        cands = cands[:1]
    precisions = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
    budget = cfg.max_error if cfg.max_error is not None else float("inf")
    best = None
    for structure, rank, k, chain in cands:
        f = _fit(w, chain, k, x, refine=False)
        fp = from_factorization(f, Precision.FP32)
        err = layer_error(w, fp, x)
        if best is None or err < best[0]:
            best = (err, _label(structure, rank, k))
        if err > budget:
            continue
        for prec in precisions:
            lw = fp if prec is Precision.FP32 else _quantize(f, prec, cfg.seed)
            err_q = err if prec is Precision.FP32 else layer_error(w, lw, x)
            if err_q <= budget:
                plan.weights, plan.structure, plan.precision, plan.error = lw, _label(structure, rank, k), prec.value, err_q
                return plan
            best = min(best, (err_q, f"{_label(structure, rank, k)} {prec.value}"))
    plan.error = best[0]
    plan.reason = (f"error budget not met: best {best[1]} has error {best[0]:.3g} > max-error {budget:g}")
    return plan


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
