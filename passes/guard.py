"""Guard: the whole model's output error after planning, backing off the layers that hurt most.

``guard(loaded, plan, feeds, cfg, target)`` -> Plan (each trial rewrites a fresh import of the
input model; the input is never changed).
Per-layer budgets do not bound the error of the whole network (layer errors compound), so
with ``max_output_error`` = E (and a per-layer budget ``max_error``: a fixed structure without
budgets is taken as asked) the planned model is run in onnxruntime on the calibration
inputs (or on generated inputs that respect each input's type and range) and compared with
the original: e = max over float outputs of ||y_opt - y_ref|| / ||y_ref||.  While e > E,
layers are backed off in order of error per byte saved (worst first): the rewrites are
sorted by  error_i / (bytes_before_i - bytes_after_i)  ascending, and the longest prefix
whose model meets E is found by bisection (O(log n) trial models; the error is close to
monotone in the prefix length, and the chosen prefix is one that was measured to pass).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from bfc.config import OptimizeConfig
from bfc.errors import BfcError
from bfc.factorize import relative_error
from bfc.passes.events import StageStarted
from bfc.passes.lowbit_plan import assign_rotation_owners
from bfc.passes.model_io.feeds import MEASURE_BATCH, random_feeds
from bfc.passes.model_io.session import run, session
from bfc.passes.products import LoadedModel, Plan
from bfc.passes.rewrite import rewritten
from bfc.report import compared


def output_error(ref: list, got: list) -> float:
    """max over float outputs of the relative error ||got - ref|| / ||ref||."""
    errs = [relative_error(r, g) for r, g in zip(ref, got) if np.asarray(r).dtype.kind == "f"]
    return max(errs, default=0.0)


def guard(loaded: LoadedModel, plan: Plan, feeds: dict | None, cfg: OptimizeConfig, target, emit) -> Plan:
    """The guard stage (see the module doc)."""
    budget = cfg.max_output_error
    taken = plan.rewritten
    if budget is None or cfg.allocating or not taken:      # the allocator verified its own plan
        return plan
    emit(StageStarted("guard", f"whole-model output error <= {budget:g}"))
    try:
        return _back_off(loaded, plan, feeds, cfg, target, budget)
    except BfcError as e:           # e.g. inputs bfc cannot generate, or no custom-op library
        why = (f"whole-model output error cannot be measured ({e.__class__.__name__}: {str(e).split('; ')[0]}); "
               "give model inputs with --calibration FILE.npz, or accept an unmeasured model with "
               "--no-max-output-error")
        return replace(plan, layers=tuple(p.kept_dense(why) if p.rewritten else p for p in plan.layers),
                       notes=plan.notes + (f"guard: nothing rewritten: {why}",))


def _back_off(loaded: LoadedModel, plan: Plan, feeds, cfg, target, budget) -> Plan:
    feeds = feeds if feeds is not None else random_feeds(loaded.model, cfg.seed, MEASURE_BATCH)
    folder = None if loaded.base is None else Path(loaded.base).absolute().parent
    sess = session(loaded.model, threads=0, external_folder=folder)
    names = [o.name for o in sess.get_outputs()]
    ref = [np.asarray(r, np.float64) for r in run(sess, feeds, names)]
    del sess

    def error(k: int) -> float:
        trial = rewritten(loaded.model, order[:k], target, loaded.opset, loaded.base)
        return output_error(ref, run(session(trial, threads=0, external_folder=folder), feeds, names))

    order = sorted(plan.rewritten, key=lambda p: (p.error or 0.0) / max(p.bytes_before - p.bytes_after, 1))
    measured = {len(order): error(len(order))}
    if measured[len(order)] <= budget:
        return replace(plan, output_error=measured[len(order)])
    lo, hi = 0, len(order)            # prefix lo meets the budget (0: nothing rewritten), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measured[mid] = error(mid)
        lo, hi = (mid, hi) if measured[mid] <= budget else (lo, mid)
    e, b = compared(measured[len(order)], budget)
    reason = (f"backed off: the whole model's output error {e} exceeds max-output-error {b} with every "
              "planned layer (this one costs most per byte saved)")
    off = {id(p) for p in order[lo:]}
    layers = assign_rotation_owners([p.kept_dense(reason) if id(p) in off else p for p in plan.layers])
    note = (f"guard: backed off {len(order) - lo} of {len(order)} planned layers; whole-model "
            f"output error {measured[len(order)]:.3g} -> {measured.get(lo, 0.0):.3g} (max-output-error {budget:g})")
    return replace(plan, layers=tuple(layers), output_error=measured.get(lo, 0.0), notes=plan.notes + (note,))
