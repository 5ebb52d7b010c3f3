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
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bfc.config import AUTO_PRECISIONS, Objective, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError, ConfigError
from bfc.passes import allocate, lowbit_plan
from bfc.passes.candidates import ALLOC_BITS
from bfc.passes.events import LayerPlanned
from bfc.passes.find_sites import Site
from bfc.passes.guard import output_error
from bfc.passes.latency import check_plan
from bfc.passes.layer_runner import LayerTask, Runner
from bfc.passes.model_io.feeds import MEASURE_BATCH, random_feeds
from bfc.passes.model_io.files import save_model
from bfc.passes.model_io.measure import first_rows
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import materialize
from bfc.passes.products import LayerPlan, LoadedModel, Plan, Sites, Statistics
from bfc.passes.rewrite import rewritten
from bfc.passes.sensitivity import layer_sensitivity


def _lowbit_bits(cfg: OptimizeConfig, target, opset) -> tuple[tuple[int, ...], str | None]:
    """Bits of the rotated family this plan tries (none: the reason)."""
    if cfg.structure is Structure.ROTATED:
        wanted = (cfg.lowbit.bits,)
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
    if site.nodes and site.nodes[0].op == "Gather" and not cfg.allocating:
        return "embedding table: quantized by the allocator (structure auto, precision auto: the default)"
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
        if cfg.lowbit.kronecker_rotation and cfg.structure is Structure.ROTATED and not target.lowbit_kronecker:
            raise ConfigError(f"--kronecker-rotation: target {target.name} applies butterfly rotations only; use "
                              "--target ort or portable, or leave --kronecker-rotation out")
        todo = [s for s in sites if skip_reason(s, cfg) is None]
        rots = lowbit_plan.rotations(todo, stats, cfg, target, max(bits), kronecker=cfg.lowbit.kronecker_rotation)
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
                       opset, rotation=rots.get(sites[i].weight_name), bits=tuple(bits), seed=cfg.seed) for i in todo]
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


def plan_layers(loaded: LoadedModel, sites: Sites, stats: Statistics, feeds: dict | None, cfg: OptimizeConfig,
                target, precisions: tuple[Precision, ...], on_event=None, evaluate=None) -> Plan:
    """The plan stage: one LayerPlan per site (see the module doc); with ``cfg.allocating`` the allocator
    (``evaluate``: the user's metric, see ``allocate_layers``)."""
    if cfg.allocating:
        plan = allocate_layers(loaded, sites, stats, feeds, cfg, target, on_event, evaluate)
        layers = plan.layers
        if cfg.latency.objective is Objective.LATENCY:        # a layer measured slower than its dense MatMul stays dense
            layers = tuple(p if p.is_embedding else check_plan(p, cfg, target, loaded.opset) for p in layers)
        return replace(plan, layers=tuple(_with_site_note(p) for p in layers))
    layers = plan_sites(list(sites.sites), cfg, target, stats.layers, on_event, loaded.nbytes,
                        precisions or None, opset=loaded.opset)
    if cfg.latency.objective is Objective.LATENCY:
        layers = [check_plan(p, cfg, target, loaded.opset) for p in layers]
    return Plan(tuple(_with_site_note(p) for p in layers))


def _with_site_note(p: LayerPlan) -> LayerPlan:
    """The site's note (folded weight chain, dequantized weight, planned without calibration) first."""
    note = p.site.note
    if not note or (p.note is not None and note in p.note):
        return p
    return replace(p, note=note if p.note is None else f"{note}; {p.note}")


# ---- the allocator: the model-level choice among every layer's candidates ----------------------------

def allocate_layers(loaded: LoadedModel, sites: Sites, stats: Statistics, feeds: dict | None, cfg: OptimizeConfig,
                    target, on_event=None, evaluate=None) -> Plan:
    """The plan stage with ``cfg.allocating``: per selected site, every candidate the target can emit
    (``candidates.layer_candidates``, one task per site on the engines of ``layer_runner``); per site
    the sensitivity s_l of the model output to a relative error in its weight (``sensitivity``, one
    onnxruntime session); the allocation minimizing bytes subject to sqrt(sum_l (s_l e_l)^2) <= E
    (``allocate``), verified by running the planned model; a miss moves the worst layers to their
    next more accurate candidate (never straight to unchanged).  Without runnable inputs (no
    calibration and generated inputs that do not run) nothing is rewritten and the reason names
    ``--calibration``.
    With ``evaluate`` (model path -> the user's metric, higher is better) and ``cfg.max_metric_drop``
    the budget itself is searched (``metric_budget``): the largest budget of ``BUDGET_LADDER`` whose
    allocation keeps the metric within the drop, by bisection (the metric is taken as monotone in
    the budget), each point written to a temporary file and evaluated (Intel Neural Compressor's
    accuracy-driven tuning, on the allocator's budget).
    With distillation data and ``distill_headroom`` > 1 the plan returned is allocated to headroom x the budget
    (the layers training starts from) and ``Plan.post_training`` holds the allocation at the budget, the plan
    the distill stage falls back to (``bfc.passes.distill.within_budget``).  Sites reading a tensor that
    arrives rotated (``bfc.passes.head_rotation``) get low-bit codes without a rotation of their own."""
    todo = [i for i, s in enumerate(sites.sites) if skip_reason(s, cfg) is None]
    layers = {i: LayerPlan(s, reason=skip_reason(s, cfg)) for i, s in enumerate(sites.sites) if i not in todo}
    if not todo:
        return Plan(tuple(layers[i] for i in range(len(sites.sites))))
    model = loaded.model if loaded.base is None else materialize(loaded.model, loaded.base)
    try:
        run_feeds = feeds if feeds is not None else random_feeds(model, cfg.seed, MEASURE_BATCH)
        reference = run(session(model, threads=0), run_feeds)
    except BfcError as e:
        why = (f"whole-model output error cannot be measured ({e.__class__.__name__}: {str(e).split('; ')[0]}); "
               "give model inputs with --calibration FILE.npz, or accept an unmeasured model with "
               "--no-max-output-error")
        if cfg.max_output_error is not None:
            for i in todo:
                layers[i] = LayerPlan(sites.sites[i], reason=why)
            return Plan(tuple(layers[i] for i in range(len(sites.sites))))
        run_feeds = reference = None
    matmuls = [sites.sites[i] for i in todo if sites.sites[i].nodes[0].op != "Gather"]
    prerotated = {s.weight_name for s in matmuls if _reads_prerotated(s, loaded)}   # bfc.passes.head_rotation
    rots = lowbit_plan.rotations([s for s in matmuls if s.weight_name not in prerotated], stats.layers, cfg, target,
                                 max(ALLOC_BITS), kronecker=True)
    tasks = [LayerTask(i, sites.sites[i].weight_name, sites.sites[i].weight, stats.get(sites.sites[i].weight_name),
                       cfg, target, (), loaded.opset, rotation=rots.get(sites.sites[i].weight_name), seed=cfg.seed,
                       mode="candidates", op=sites.sites[i].nodes[0].op,
                       prerotated=sites.sites[i].weight_name in prerotated)
             for i in sorted(todo, key=lambda i: -sites.sites[i].weight.size)]
    cands, meta = {}, {}
    clock = [time.perf_counter()]
    runs = Runner(cfg).run(tasks)
    try:
        for done, (task, res) in enumerate(runs, 1):
            cands[task.index], meta[task.index] = res.candidates, res
            if on_event is not None:
                on_event(LayerPlanned(sites.sites[task.index].name, len(res.candidates) > 1, done, len(tasks),
                                      res.seconds, res.worker, resumed=res.resumed, cpu_seconds=res.cpu_seconds))
    finally:
        runs.close()
    order = sorted(cands)
    clock.append(time.perf_counter())
    sens = _sensitivities(model, [sites.sites[i] for i in order], run_feeds, stats.layers is not None)
    table = [[allocate.Candidate.scored(c.label, type(c.form).__name__, c.nbytes, c.resident_nbytes, c.error,
                                        sens.get(sites.sites[i].weight_name, 1.0)) for c in cands[i]]
             for i in order]
    budget = cfg.max_output_error if cfg.max_output_error is not None else float("inf")
    clock.append(time.perf_counter())

    def planned(choice) -> list[LayerPlan]:
        out = []
        for i, k in zip(order, choice):
            c, r = cands[i][k], meta[i]
            site = sites.sites[i]
            kind = "output" if stats.get(site.weight_name) is not None else "weight"
            alts = tuple((x.label, x.nbytes, x.error) for x in cands[i])
            if c.form is None:
                out.append(LayerPlan(site, error=0.0, error_kind=kind, reason="allocated: unchanged (every "
                                     "candidate costs more error per byte saved than the budget allows)",
                                     seconds=r.seconds, worker=r.worker, alternatives=alts))
            else:
                out.append(LayerPlan(site, c.form, "allocated", c.label, c.error, kind,
                                     seconds=r.seconds, worker=r.worker, resumed=r.resumed, alternatives=alts,
                                     note=f"sensitivity {sens.get(site.weight_name, 1.0):.3g}"))
        return lowbit_plan.assign_rotation_owners(out)

    def measure(alloc: allocate.Allocation) -> float:
        if run_feeds is None:
            return 0.0
        return plan_error(loaded, planned(alloc.choice), target, reference, run_feeds)

    search_notes = ()
    if evaluate is not None and cfg.max_metric_drop is not None:
        budget, search_notes = metric_budget(loaded, table, planned, target, evaluate, cfg.max_metric_drop)
    where = "calibration" if feeds is not None else "generated"

    def allocated(share: float, what: str) -> tuple[tuple, tuple[str, ...], float]:
        """(choice, notes, measured error) of the allocation verified at ``share`` x the budget."""
        result = allocate.allocate_verified(table, budget * share, measure, objective="bytes")
        choice = result.allocation.choice if result.met else (0,) * len(order)     # the budget always holds
        measured = result.measured[-1] if result.met else 0.0
        notes = (f"allocator{what}: {sum(k > 0 for k in choice)} of {len(order)} layers compressed; whole-model "
                 f"output error {measured:.3g} on {where} inputs (budget {budget:g}, planned to {budget * share:.3g}; "
                 f"predicted {result.allocation.predicted_error:.3g}; {len(result.rounds)} verification "
                 f"run{'s' if len(result.rounds) > 1 else ''})",)
        if not result.met:
            notes += (f"allocator{what}: no allocation met the budget within {len(result.rounds)} verification runs "
                      f"(errors {', '.join(f'{m:.3g}' for m in result.measured)}); the model is left unchanged",)
        return choice, notes, measured

    choice, notes, measured = allocated(VERIFIED_SHARE, "")
    post_training = None
    headroom = cfg.distillation.headroom
    if (cfg.distillation.data is not None and headroom > 1 and run_feeds is not None and budget < float("inf")
            and evaluate is None):
        post = planned(choice)
        post_training = Plan(tuple({**layers, **dict(zip(order, post))}[i] for i in range(len(sites.sites))),
                             search_notes + notes, output_error=measured)
        choice, pre_notes, measured = allocated(VERIFIED_SHARE * headroom, f" (before training, {headroom:g}x the budget)")
        notes += pre_notes
    clock.append(time.perf_counter())
    for i, p in zip(order, planned(choice)):
        layers[i] = p
    timing = (f"; time: candidates {clock[1] - clock[0]:.0f} s, sensitivities {clock[2] - clock[1]:.0f} s, "
              f"allocation and verification {clock[3] - clock[2]:.0f} s")
    notes = search_notes + (notes[0] + timing,) + notes[1:]
    return Plan(tuple(layers[i] for i in range(len(sites.sites))), notes, output_error=measured,
                post_training=post_training)


def _reads_prerotated(site: Site, loaded: LoadedModel) -> bool:
    """Every node of the site reads a tensor that arrives rotated (``LoadedModel.prerotated``)."""
    return bool(loaded.prerotated) and all(sn.input in loaded.prerotated and not sn.trans_a for sn in site.nodes)


def plan_error(loaded: LoadedModel, layers, target, reference: dict, feeds: dict, updates=None) -> float:
    """The whole-model output error (``guard.output_error`` against ``reference``, the original's outputs on
    ``feeds``) of the model with ``layers`` rewritten by ``target`` (and ``updates``: new graph tensor values),
    run in onnxruntime."""
    trial = rewritten(loaded.model, [p for p in layers if p.rewritten], target, loaded.opset, loaded.base, updates)
    folder = None if loaded.base is None else Path(loaded.base).absolute().parent
    return output_error(reference, run(session(trial, threads=0, external_folder=folder), feeds))


def _sensitivities(model, sites, feeds, calibrated: bool) -> dict:
    """{weight name: sensitivity} on the first SENSITIVITY_SAMPLES inputs (all of them where a model
    does not run on a slice of its inputs); none without runnable inputs (every sensitivity then 1)."""
    if feeds is None:
        return {}
    kind = "output" if calibrated else "weight"
    try:
        return layer_sensitivity(model, sites, first_rows(feeds, SENSITIVITY_SAMPLES), relative_to=kind)
    except BfcError:
        return layer_sensitivity(model, sites, feeds, relative_to=kind)


# The allocator verifies its plan in its own session on the model in memory; the written file is verified
# again from disk (bfc.passes.verify), whose kernels may round the int8 activations differently: measured
# 0.2000 here and 0.2025 there on all-mpnet-base-v2 at the default budget.  A plan is accepted at this
# share of the budget so that the written model keeps it.
VERIFIED_SHARE = 0.97
SENSITIVITY_SAMPLES = 8      # inputs per sensitivity run: a ratio of errors, stable on few samples (one run per layer)
BUDGET_LADDER = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8)


def metric_budget(loaded: LoadedModel, table, planned, target, evaluate, max_drop: float) -> tuple[float, tuple]:
    """The largest budget of BUDGET_LADDER whose allocation keeps ``evaluate`` within ``max_drop`` of
    the input's metric (bisection; the smallest budget when none does), and notes with every point."""
    with tempfile.TemporaryDirectory(prefix="bfc-metric-") as tmp:
        def metric_of(model, name: str) -> float:
            path = Path(tmp) / name
            save_model(model, path, loaded.files, base=loaded.base)
            value = float(evaluate(str(path)))
            path.unlink()
            return value

        ref = metric_of(loaded.model, "input.onnx")
        seen = {}

        def ok(k: int) -> bool:
            alloc = allocate.allocate(table, BUDGET_LADDER[k])
            trial = rewritten(loaded.model, [p for p in planned(alloc.choice) if p.rewritten], target, loaded.opset,
                              loaded.base)
            seen[k] = metric_of(trial, f"budget{k}.onnx")
            return ref - seen[k] <= max_drop
        lo, hi = -1, len(BUDGET_LADDER)             # ladder[lo] meets the drop (-1: none yet), ladder[hi] does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    chosen = BUDGET_LADDER[max(lo, 0)]
    tried = ", ".join(f"{BUDGET_LADDER[k]:g}: {v:.4g}" for k, v in sorted(seen.items()))
    return chosen, (f"accuracy-aware: input metric {ref:.4g}, max drop {max_drop:g}; budgets tried (metric) {tried}; "
                    f"chose max-output-error {chosen:g}" + ("" if lo >= 0 else " (no budget kept the metric: the "
                                                                   "smallest tried)"),)
