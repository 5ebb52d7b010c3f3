"""Schedule: which sites are planned, in which order, by which engine, and the target-size cut.

``plan_layers`` (the pipeline's plan stage) hands every selected site to the per-layer search
(``bfc.passes.candidates.plan_site``) through an engine of ``bfc.passes.layer_runner`` (in
process, a process pool or Dask; resumable), largest weights first; with ``target_size`` the
results are taken in that order until the model's weight bytes reach it.  Rotations are chosen
here, once per input tensor (``bfc.passes.lowbit_plan.rotations``), because several sites share
one.  With ``objective=latency`` a rewrite measured slower than its dense layer stays dense
(``bfc.passes.latency``).
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import replace

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision, Structure
from bfc.passes import lowbit_plan
from bfc.passes.events import LayerPlanned
from bfc.passes.find_sites import Site
from bfc.passes.latency import check_plan
from bfc.passes.layer_runner import LayerTask, Runner
from bfc.passes.products import LayerPlan, LoadedModel, Plan, Sites, Statistics


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
               on_event=None, model_bytes: int | None = None, precisions=None, *, opset: int) -> list[LayerPlan]:
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
    return lowbit_plan.assign_rotation_owners([plans[i] for i in range(len(sites))])


def plan_layers(loaded: LoadedModel, sites: Sites, stats: Statistics, cfg: OptimizeConfig, target,
                precisions: tuple[Precision, ...], on_event=None) -> Plan:
    """The plan stage: one LayerPlan per site (see the module doc)."""
    layers = plan_sites(list(sites.sites), cfg, target, stats.layers, on_event, loaded.nbytes,
                        precisions or None, opset=loaded.opset)
    if cfg.objective == "latency":
        layers = [check_plan(p, cfg, target, loaded.opset) for p in layers]
    return Plan(tuple(_with_site_note(p) for p in layers))


def _with_site_note(p: LayerPlan) -> LayerPlan:
    """The site's note (folded weight chain, dequantized weight, planned without calibration) first."""
    note = p.site.note
    if not note or (p.note is not None and note in p.note):
        return p
    return replace(p, note=note if p.note is None else f"{note}; {p.note}")
