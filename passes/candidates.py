"""Candidates: the per-layer search -- structure and precision of one site, scored with the target's numerics.

``plan_site`` is a pure function of one site's weight, statistics, config and target (the task
function of every engine in ``bfc.passes.layer_runner``); ordering the sites, the target-size
cut and the model-level choices live in ``bfc.passes.schedule``.
Every site gets a ``LayerPlan``; a rewritten plan carries a
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

from dataclasses import dataclass, replace
from functools import partial

import numpy as np

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError
from bfc.factorize import candidates, chain_for, factorize, relative_error, weighted_error
from bfc.lowbit import LowBitFormat, rotated_gram
from bfc.lowbit.gptq import gptq_factor, gptq_quantize
from bfc.lowbit.groups import quantize_groups
from bfc.lowbit.int8_layer import HalfLinear, Int8Linear
from bfc.passes import lowbit_plan
from bfc.passes.find_sites import Site
from bfc.passes.products import LayerPlan
from bfc.quant import QuantizedFactorization, cast, quantize
from bfc.quant.embedding import quantize_embedding
from bfc.reconstruct import reconstruct
from bfc.report import compared

AUTO_STRUCTURES = ("monarch", "butterfly", "chain3")
AUTO_RANKS = (1, 2, 4, 8, 16, 32)
MAX_PARAM_FRACTION = 0.5   # auto: a structure must at least halve the parameters to be worth its transposes
WHITE_ROWS = 256           # rows of N(0, I) inputs scoring a non-float target without calibration


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
            return relative_error(self._ref, y)
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


def plan_site(site: Site, cfg: OptimizeConfig, target, stats=None, precisions=None, rotation=None,
              lowbit_bits=()) -> LayerPlan:
    """Plan one eligible site (include/exclude/min-size already applied) for ``target``;
    ``precisions`` (default: from ``cfg``) are the formats to try, lowest first; ``rotation`` the
    site's (shared) rotation and ``lowbit_bits`` the rotated family's bits to try (none: no rotated
    candidates)."""
    w = site.weight.astype(np.float64)
    m, n = w.shape
    plan = LayerPlan(site, error_kind="output" if stats is not None else "weight")
    keep = partial(replace, plan)       # the plan with some fields set (LayerPlan is frozen)
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
            return keep(reason="no bits of the rotated family can be emitted by this target")
        if lowbit[0] is None:
            e, b = compared(lowbit[2], budget)
            return keep(error=lowbit[2], reason=f"error budget not met: best {lowbit[1]} has error {e} > max-error {b}")
        return keep(weights=lowbit[0], structure=lowbit[1], precision=lowbit[2], error=lowbit[3])
    if cfg.structure is Structure.AUTO:
        fams = _auto_candidates(cfg, m, n)
        if cfg.max_error is None:       # target-size only: the cheapest Monarch/chain
            fams = {k: v[:1] for k, v in list(fams.items())[:1]}
    else:
        try:
            fams = {cfg.structure.value: [c for c in _fixed_candidate(cfg, m, n)
                                          if c[3].nnz + c[2] * (m + n) < m * n]}
        except BfcError as e:
            return keep(reason=f"{cfg.structure.value} does not fit {m}x{n} ({e})")
    if not any(fams.values()):
        return keep(reason=f"no {cfg.structure.value} structure with at most {MAX_PARAM_FRACTION:.0%} of the "
                           f"dense parameters at {m}x{n}")
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
        return keep(error=found[0][3], reason=f"no byte saving: {found[0][1]} {found[0][2]} needs "
                                              f"{found[0][0].nbytes} bytes, the dense weight {plan.bytes_before}")
    if found:
        plan = keep(weights=found[0][0], structure=found[0][1], precision=found[0][2], error=found[0][3])
        if cfg.reconstruction.enabled and gram is not None and plan.precision not in ("fp32", "fp16") \
                and plan.structure != "rotated":
            plan = _reconstruct(plan, w, gram, score, cfg)
        return plan
    e, b = compared(seen[0][0], budget)
    return keep(error=seen[0][0], reason=f"error budget not met: best {seen[0][1]} has error {e} > max-error {b}")


def _reconstruct(plan: LayerPlan, w: np.ndarray, gram: np.ndarray, score, cfg: OptimizeConfig) -> LayerPlan:
    """Fine-tune the planned layer's quantized factors on its calibration Gram (bfc.reconstruct);
    kept only when the target's error improves."""
    res = reconstruct(plan.weights, w, gram=gram, steps=cfg.reconstruction.steps, lr=cfg.reconstruction.lr)
    err = score(res.factorization)
    if err < plan.error:
        return replace(plan, weights=res.factorization, error=err,
                       note=f"reconstructed: error {plan.error:.3g} -> {err:.3g}")
    return plan


# ---- the allocator's candidates: every family, scored with the target's numerics ---------------------

ALLOC_BITS = (2, 3, 4)               # rotated low-bit codes, folded to int8 compute
ALLOC_GROUPS = (64,)                 # 128 saves ~3% of the bytes at ~5% more error: not worth its time
KS_FAMILIES = ("monarch",)   # KS chains offered to the allocator (block ranks up to MAX_PARAM_FRACTION); chain3 and
#                              butterfly measured dominated by monarch on MiniLM at 2x its time
KS_PRECISIONS = (Precision.INT4, Precision.INT8, Precision.FP8_E4M3)   # their factor formats, lowest first
KS_QUANT_SLACK = 0.02                # a format within 2% of the float chain's error: no wider one is tried
KS_MAX_ERROR = 0.5                   # the screen: a family whose most accurate chain loses half of ||W||_F is out
EMBEDDING_FORMATS = ((8, None), (4, 64), (2, 64))   # (bits, block; None: one scale per row); blocks 32 and 128
#                                                  differ from 64 by a few % of bytes or error, at ~3 s each


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: its form (None: unchanged), bytes in the file and in a running session,
    and its own relative output error (``Scorer``: the target's numerics on the site's sample rows)."""
    label: str
    form: object | None
    nbytes: int
    resident_nbytes: int
    error: float


def layer_candidates(site: Site, cfg: OptimizeConfig, target, stats=None, rotation=None, *,
                     opset: int, prerotated: bool = False) -> tuple[Candidate, ...]:
    """Every candidate of one site that ``target`` can emit at ``opset``, unchanged first.  A matmul
    site: dense int8 per column, fp16, and for each bits x group the rotated low-bit codes of Q^T W
    (``rotation``: the site's shared Q; GPTQ with the rotated Gram under calibration, searched-scale
    rounding otherwise), folded to int8 compute (``bfc.lowbit.int8_layer``), and with calibration KS
    chains (``_ks_forms``); ``prerotated``: the input arrives rotated (``bfc.passes.head_rotation``), the low-bit
    codes are of W itself with no Q.  An embedding site: int8, int4 and int2 rows with block scales (``bfc.quant.embedding``).  With ``cfg.max_error`` a candidate
    above it is dropped (a per-layer cap under the whole-model budget)."""
    w = site.weight
    dense = Candidate("unchanged", None, int(w.nbytes), int(w.nbytes), 0.0)
    forms = []
    if site.nodes and site.nodes[0].op == "Gather":
        table = np.asarray(w)
        for bits, block in EMBEDDING_FORMATS:
            if block is not None and (table.shape[1] % block or block >= table.shape[1]):
                continue
            q = quantize_embedding(table, bits, block, search=bits < 8)     # int8 rows: the extreme is enough
            forms.append((q.label, q, q.error(table)))
    else:
        w64 = np.asarray(w, np.float64)
        score = Scorer(w64, stats, target, cfg.seed)
        for q in (Int8Linear.from_weight(w64), HalfLinear.from_weight(w64)):
            forms.append((q.label, q, score(q)))
        if rotation is not None or prerotated:
            wr = w64 if rotation is None else rotation.rotate_weight(w64)   # Q^T W, Q^T G Q and GPTQ's factor:
            gr = None if score.gram is None or score.gram.ndim != 2 else \
                score.gram if rotation is None else rotated_gram(rotation, score.gram)
            factor = None if gr is None else gptq_factor(gr)     # once for every format
            for bits in ALLOC_BITS:
                for group in ALLOC_GROUPS:
                    if group > w64.shape[0]:
                        continue
                    fmt = LowBitFormat(bits, group, True, target.lowbit_scale_dtype)
                    gq = gptq_quantize(wr, None, fmt, factor=factor) if factor is not None else \
                        quantize_groups(wr, fmt)                   # no (or only a diagonal) Gram: searched RTN
                    q = Int8Linear.from_codes(gq, rotation)
                    forms.append((q.label, q, score(q)))
        if score.gram is not None:
            forms += _ks_forms(w64, score, cfg, forms)
    out = [dense]
    for label, q, err in forms:
        if target.emitter(q).support(q, opset) is not None:
            continue
        if cfg.max_error is not None and err > cfg.max_error:
            continue
        if q.nbytes < dense.nbytes:
            out.append(Candidate(label, q, int(q.nbytes), int(q.resident_nbytes), float(err)))
    return tuple(out)


def _ks_forms(w: np.ndarray, score: Scorer, cfg: OptimizeConfig, others) -> list:
    """The allocator's KS-chain candidates (label, form, error) of one matmul weight: per family of
    ``KS_FAMILIES`` and block rank (at most ``MAX_PARAM_FRACTION`` of the dense parameters), the
    activation-weighted factorization with its factors in the formats of ``KS_PRECISIONS``, lowest
    first, up to the first whose error is within ``KS_QUANT_SLACK`` of the float chain's (a wider format
    could only add bytes).
    Screened first at the cost of one unweighted fit (block SVDs, no Gram eigendecomposition): when the
    family's most accurate chain (its largest rank) loses more than ``KS_MAX_ERROR`` of ||W||_F, the
    weight has no KS structure and the family is out -- the case of every trained dense weight of
    MiniLM-L6 and all-mpnet-base-v2 (0.51-0.74), whose activation-weighted KS candidates were measured
    dominated by the rotated ones (more bytes and more error) at 10-60 s a layer.  Then a rank whose int4
    bytes b and float error e are both matched by another candidate (bytes <= b, error <= e; the error
    falls with the rank and no format beats the float chain) is skipped: it cannot be on the
    allocator's bytes/error hull.
    Only with calibration statistics: a KS chain's error lies in few input directions, which generated
    inputs do not predict (measured: the demo MLP without calibration, KS candidates in, budget 0.1 kept
    its error on generated inputs and lost 9 points of top-1 on real images)."""
    fams = _auto_candidates(cfg, *w.shape)
    out = []
    for fam in KS_FAMILIES:
        chains = fams.get(fam, [])
        if not chains:
            continue
        if factorize(w, chains[-1][3], refine=False).rel_error > KS_MAX_ERROR:
            continue                    # the screen: no KS structure (one unweighted fit, block SVDs)
        for s, r, k, ch in chains:
            f = factorize(w, ch, gram=score.gram, refine=False)
            e_float = score(cast(f, "fp32"))
            if any(q.nbytes <= ch.nnz // 2 and e <= e_float for _, q, e in others + out):
                continue
            for prec in KS_PRECISIONS:
                q = _store(f, prec, cfg.seed, cfg.quant_method.value)
                e = score(q)
                out.append((f"{_label(s, r, k)} {prec.value}", q, e))
                if e <= e_float * (1 + KS_QUANT_SLACK):
                    break
    return out
