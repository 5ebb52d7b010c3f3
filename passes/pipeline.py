"""The one pipeline, top to bottom: load -> normalize -> fuse -> head rotations -> sites -> calibrate -> plan ->
guard -> distill -> rewrite -> save -> verify (a rewrite larger than the input is dropped: ``rewrite.never_larger``).

``optimize(source, config, output=None, on_event=None)`` owns this order, for a model file and
for an in-memory ``onnx.ModelProto`` alike; ``bfc.optimize`` and ``bfc optimize`` both call it,
so the same config gives the same model bytes.  Each stage is a function in its own module
that takes the products it needs and returns a small frozen product
(``bfc.passes.products``); progress is reported as typed events (``bfc.passes.events``).
A model path is read without its weights (``bfc.passes.model_io.stream``): the stages work on a
skeleton whose weights are references into the input's files, a layer's weight is read while
that layer is planned, untouched weights are copied from file to file.
With ``output`` the result is written atomically and checked before it is moved into place
(``bfc.passes.save``), and verification runs from the files; the returned model is then None.
Without ``output`` the returned model holds its weights.  When verification cannot run (no
onnxruntime library for the target, inputs bfc cannot generate), the result stands and the
report says "not verified: <reason>".
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import onnx

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError, ConfigError, UnsupportedError
from bfc.passes.calibrate import calibrate
from bfc.passes.distill import distill
from bfc.passes.events import Event, SitesFound, StageStarted
from bfc.passes.find_sites import find_model_sites, other_constants
from bfc.passes.fuse import fuse_stage
from bfc.passes.guard import guard
from bfc.passes.head_rotation import fold_head_rotations
from bfc.passes.load import load
from bfc.passes.lowbit_emit import UNPACK_OPSET
from bfc.passes.model_io.feeds import MEASURE_BATCH, load_feeds, random_feeds
from bfc.passes.model_io.files import MIN_OPSET, check_output_path
from bfc.passes.model_io.stream import materialize, trim
from bfc.passes.normalize import normalize
from bfc.passes.products import LayerPlan, LoadedModel, RewrittenModel, Sites
from bfc.passes.rewrite import never_larger, rewrite_model
from bfc.passes.save import save
from bfc.passes.schedule import plan_layers
from bfc.passes.targets import Target, get_target
from bfc.passes.verify import verify_result
from bfc.report import LayerRow, OutputRow, Report


@dataclass(frozen=True)
class Planned:
    """What the stages up to the rewrite made (``run_passes``): the plans and the output model."""
    loaded: LoadedModel
    plans: tuple[LayerPlan, ...]
    output: onnx.ModelProto
    notes: tuple[str, ...]
    rewritten: RewrittenModel


def optimize(source, config: OptimizeConfig | None = None, *, output=None,
             on_event: Callable[[Event], None] | None = None,
             evaluate: Callable[[str], float] | None = None) -> tuple[onnx.ModelProto | None, Report]:
    """Run the pipeline on a model path or ModelProto; see the module doc.  Returns (model or None, report).
    ``evaluate``: model path -> the user's metric (higher is better); with ``config.max_metric_drop`` the
    allocator searches its budget against it."""
    cfg = _checked(config)
    if (evaluate is None) != (cfg.max_metric_drop is None):
        raise ConfigError("accuracy-aware mode needs both an evaluate function and max_metric_drop "
                          "(--evaluate module:function --max-metric-drop X)")
    if evaluate is not None and not cfg.allocating:
        raise ConfigError("--evaluate searches the allocator's budget: use it with --structure auto --precision auto "
                          "(the default)")
    emit = on_event or _ignore
    t0 = time.perf_counter()
    out_path = None if output is None else check_output_path(output, _source_files(source))
    target = get_target(cfg.target)

    emit(StageStarted("load"))
    loaded = load(source, out_path)                                       # LoadedModel
    precisions = supported_precisions(cfg, target, loaded.opset)
    feeds = None if cfg.calibration is None else load_feeds(cfg.calibration, loaded.model)
    emit(StageStarted("normalize"))
    loaded = normalize(loaded, preferred_opset(cfg))                      # LoadedModel (opset upgraded)
    emit(StageStarted("fuse"))
    loaded = fuse_stage(loaded, cfg.fuse, target.name)                    # LoadedModel (transformer fusions)
    loaded = fold_head_rotations(loaded, cfg.allocating, cfg.seed)         # LoadedModel (O's rotation in V)
    emit(StageStarted("sites"))
    sites = Sites(tuple(find_model_sites(loaded.model, loaded.base)))     # Sites
    emit(SitesFound(sites.eligible, len(sites.sites)))
    loaded = replace(loaded, notes=loaded.notes + tuple(other_constants(loaded.model, sites.sites, cfg.min_size)))
    emit(StageStarted("calibrate"))
    stats = calibrate(loaded, sites, feeds, cfg)                          # Statistics
    trim()
    emit(StageStarted("plan"))
    plan = plan_layers(loaded, sites, stats, feeds, cfg, target, precisions, emit, evaluate)   # Plan
    trim()
    emit(StageStarted("guard"))
    plan = guard(loaded, plan, feeds, cfg, target, emit)                  # Plan (whole-model budget)
    emit(StageStarted("distill"))
    plan = distill(loaded, plan, stats, feeds, cfg, target, emit)         # Plan (optional training)
    emit(StageStarted("rewrite"))
    rewritten = rewrite_model(loaded, plan, target, cfg.fix_batch)        # RewrittenModel
    plan, rewritten = never_larger(loaded, plan, rewritten, target, cfg.fix_batch)   # else the input unchanged
    notes = loaded.notes + stats.notes + plan.notes
    del stats, sites
    trim()

    if cfg.verification.strict and not plan.rewritten:
        why = "; ".join(f"{p.site.name}: {p.reason}" for p in plan.layers[:3]) or "no MatMul/Gemm node"
        raise UnsupportedError(f"nothing to rewrite ({why}); without --strict the model is written unchanged")
    report = Report(model=loaded.name, target=target.name, layers=[_row(p) for p in plan.layers],
                    model_bytes_before=loaded.input_bytes, model_bytes_after=rewritten.nbytes,
                    notes=list(notes), calibrated=feeds is not None)
    del plan
    trim()
    verify_feeds, why_no_feeds = feeds, None
    if cfg.verification.enabled and feeds is None:
        try:                 # ranged by the input (its tables); shaped by the output where --fix-batch pins it
            verify_feeds = random_feeds(loaded.model, cfg.seed + 1, MEASURE_BATCH) if cfg.fix_batch is None \
                else random_feeds(rewritten.model, cfg.seed + 1)
        except BfcError as e:
            why_no_feeds = str(e)

    result, out_model = rewritten, rewritten.model
    if out_path is not None:
        emit(StageStarted("save"))
        result = save(rewritten, out_path, loaded)                       # SavedModel (checked, then moved)
        report.model_bytes_after = result.nbytes
        out_model = None
    elif loaded.base is not None:
        out_model = materialize(out_model, loaded.base)                  # asked for in memory: the weights read in
        result = RewrittenModel(out_model, None, rewritten.nbytes, rewritten.changed)
    del rewritten
    if cfg.verification.enabled:
        emit(StageStarted("verify"))
        try:
            checked = verify_result(loaded, result, verify_feeds, "calibration" if feeds is not None else "random",
                                    why_no_feeds)
        except Exception:
            if out_path is not None:     # bfc's own output does not run: do not leave it on disk
                for p in (out_path, Path(str(out_path) + ".data")):
                    p.unlink(missing_ok=True)
            raise
        report.outputs = [OutputRow(c.name, c.rel_error, c.cosine) for c in checked.outputs]
        report.verified_on = checked.verified_on if checked.not_verified is None else None
        report.not_verified = checked.not_verified
        report.resident_bytes, report.latency_ms = checked.resident, checked.latency_ms
    report.objective = cfg.latency.objective.value
    report.seconds = time.perf_counter() - t0
    return out_model, report


def run_passes(source, cfg: OptimizeConfig, emit=None, output=None) -> Planned:
    """The stages load -> rewrite (no save, no verification, no ``never_larger``), for tests and benches
    that look at the plans; for a path, ``output`` is a skeleton whose references are relative to ``loaded.base``."""
    emit = emit or _ignore
    target = get_target(cfg.target)
    loaded = load(source, None if output is None else Path(output))
    precisions = supported_precisions(cfg, target, loaded.opset)
    feeds = None if cfg.calibration is None else load_feeds(cfg.calibration, loaded.model)
    loaded = normalize(loaded, preferred_opset(cfg))
    loaded = fuse_stage(loaded, cfg.fuse, target.name)
    loaded = fold_head_rotations(loaded, cfg.allocating, cfg.seed)
    sites = Sites(tuple(find_model_sites(loaded.model, loaded.base)))
    stats = calibrate(loaded, sites, feeds, cfg)
    plan = plan_layers(loaded, sites, stats, feeds, cfg, target, precisions, emit)
    plan = guard(loaded, plan, feeds, cfg, target, emit)
    plan = distill(loaded, plan, stats, feeds, cfg, target, emit)
    rewritten = rewrite_model(loaded, plan, target, cfg.fix_batch)
    return Planned(loaded, plan.layers, rewritten.model, loaded.notes + stats.notes + plan.notes, rewritten)


def supported_precisions(cfg: OptimizeConfig, target: Target, opset: int) -> tuple[Precision, ...]:
    """The precisions the planner may try: those of the config that ``target`` can store at ``opset``."""
    wanted = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
    why = {p: target.check(p.format, opset) for p in wanted}
    ok = tuple(p for p in wanted if why[p] is None)
    if not ok:
        raise UnsupportedError(f"target {target.name} cannot store {cfg.precision.value} weights in "
                               f"this model: {why[cfg.precision]}, and the model has opset {opset}; use "
                               "--precision int8 or convert the model to a newer opset")
    return ok


def preferred_opset(cfg: OptimizeConfig) -> int:
    """The opset this run's forms want: 18 where rotated low-bit codes may be unpacked in the graph."""
    return UNPACK_OPSET if cfg.allocating or cfg.structure is Structure.ROTATED else MIN_OPSET


def _row(p: LayerPlan) -> LayerRow:
    s = p.site
    return LayerRow(layer=s.name, nodes=len(s.nodes), shape=s.shape, structure=p.structure,
                    precision=p.precision if p.rewritten else (str(s.weight.dtype) if s.weight is not None else "-"),
                    params_before=p.params_before, params_after=p.params_after,
                    bytes_before=p.bytes_before, bytes_after=p.bytes_after,
                    flops_before=p.flops_before, flops_after=p.flops_after,
                    error=p.error, error_kind=p.error_kind, reason=None if p.rewritten else (p.reason or "kept dense"),
                    note=p.note, plan_seconds=p.seconds, worker=p.worker, resumed=p.resumed)


def _checked(config) -> OptimizeConfig:
    cfg = config if config is not None else OptimizeConfig()
    if not isinstance(cfg, OptimizeConfig):
        raise ConfigError(f"config must be a bfc.OptimizeConfig, got {type(cfg).__name__}")
    return cfg


def _source_files(source) -> list:
    """The input path (its data files are checked once it is read, by ``load``)."""
    return [] if isinstance(source, onnx.ModelProto) else [source]


def _ignore(event: Event) -> None:
    pass
