"""Guard: the whole model's output error after planning, backing off the layers that hurt most.

Requires: plans (and calibration when given).  Ensures: guarded.  Not in place (each trial
rewrites a fresh import of the input model).
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

import dataclasses
from pathlib import Path

import numpy as np

from bfc.errors import BfcError
from bfc.passes.cleanup import export
from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.events import StageStarted
from bfc.passes.find_sites import find_sites
from bfc.passes.rewrite import rewrite
from bfc.passes.session import random_feeds, run, session
from bfc.passes.stream import import_graph


def output_error(ref: list, got: list) -> float:
    """max over float outputs of the relative error ||got - ref|| / ||ref||."""
    errs = [float(np.linalg.norm(np.asarray(g, np.float64) - r) / max(np.linalg.norm(r), 1e-30))
            for r, g in zip(ref, got) if np.asarray(r).dtype.kind == "f"]
    return max(errs, default=0.0)


def _trial(model, plans, target, base=None):
    """The input model with ``plans`` rewritten by ``target`` (a fresh import; ``model`` is untouched;
    a skeleton's untouched weights stay references relative to ``base``)."""
    graph = import_graph(model, base)
    fresh = {s.weight_name: s for s in find_sites(graph)}
    moved = [dataclasses.replace(p, site=fresh[p.site.weight_name]) for p in plans]
    rewrite(graph, moved, target)
    return export(graph, model, [p.site.name for p in moved], base)


class Guard(GraphPass):
    contract = Contract.of(requires={"plans", "calibration"}, ensures={"guarded"})

    def run(self, state) -> PassResult:
        budget = state.config.max_output_error
        taken = [p for p in state.plans if p.rewritten]
        if budget is None or state.config.max_error is None or not taken:
            return PassResult(changed=False)
        state.emit(StageStarted("guard", f"whole-model output error <= {budget:g}"))
        try:
            return self._back_off(state, taken, budget)
        except BfcError as e:           # e.g. inputs bfc cannot generate, or no custom-op library
            state.notes.append(f"whole-model output error not checked: {e}")
            return PassResult(changed=False)

    def _back_off(self, state, taken, budget) -> PassResult:
        feeds = state.feeds if state.feeds is not None else random_feeds(state.model, state.config.seed)
        base = getattr(state, "base", None)
        folder = None if base is None else Path(base).absolute().parent
        sess = session(state.model, threads=0, external_folder=folder)
        names = [o.name for o in sess.get_outputs()]
        ref = [np.asarray(r, np.float64) for r in run(sess, feeds, names)]
        del sess

        def error(k: int) -> float:
            trial = _trial(state.model, order[:k], state.target, base)
            return output_error(ref, run(session(trial, threads=0, external_folder=folder), feeds, names))

        order = sorted(taken, key=lambda p: (p.error or 0.0) / max(p.bytes_before - p.bytes_after, 1))
        measured = {len(order): error(len(order))}
        if measured[len(order)] <= budget:
            state.output_error = measured[len(order)]
            return PassResult(changed=False)
        lo, hi = 0, len(order)            # prefix lo meets the budget (0: nothing rewritten), hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            measured[mid] = error(mid)
            lo, hi = (mid, hi) if measured[mid] <= budget else (lo, mid)
        state.output_error = measured.get(lo, 0.0)
        skipped = {}
        for p in order[lo:]:
            p.reason = (f"backed off: the whole model's output error {measured[len(order)]:.3g} exceeds "
                        f"max-output-error {budget:g} with every planned layer (this one costs most per byte saved)")
            p.weights = None
            p.structure, p.precision = "dense", "-"
            skipped[p.site.name] = p.reason
        state.notes.append(f"guard: backed off {len(order) - lo} of {len(order)} planned layers; whole-model "
                           f"output error {measured[len(order)]:.3g} -> {state.output_error:.3g} "
                           f"(max-output-error {budget:g})")
        return PassResult(changed=True, skipped=skipped)
