"""``bfc.optimize``: load -> find sites -> (calibrate) -> plan -> rewrite -> clean up -> verify."""
from __future__ import annotations

import time

import onnx
import onnx_graphsurgeon as gs

from bfc.config import OptimizeConfig, Target
from bfc.errors import ConfigError, UnsupportedError
from bfc.report import LayerRow, OutputRow, Report
from bfc.passes.calibrate import collect
from bfc.passes.cleanup import export, fix_batch
from bfc.passes.find_sites import find_sites
from bfc.passes.load import PROTO_LIMIT, as_model, default_opset, proto_size
from bfc.passes.plan import LayerPlan, plan_sites
from bfc.passes.session import load_feeds, random_feeds
from bfc.passes.verify import verify

STAGES = ("load", "calibrate", "plan", "rewrite", "verify")


def _rewriter(target: Target):
    if target is Target.PORTABLE:
        from bfc.passes.rewrite_portable import rewrite_portable
        return rewrite_portable
    try:
        from bfc.passes.rewrite_custom_op import rewrite_custom_op
    except ImportError:
        raise UnsupportedError("target custom-op is not available in this build; use --target portable") from None
    return rewrite_custom_op


def _row(p: LayerPlan) -> LayerRow:
    s = p.site
    return LayerRow(layer=s.name, nodes=len(s.nodes), shape=s.shape, structure=p.structure,
                    precision=p.precision if p.rewritten else (str(s.weight.dtype) if s.weight is not None else "-"),
                    params_before=p.params_before, params_after=p.params_after,
                    bytes_before=p.bytes_before, bytes_after=p.bytes_after,
                    flops_before=p.flops_before, flops_after=p.flops_after,
                    error=p.error, error_kind=p.error_kind, reason=None if p.rewritten else (p.reason or "kept dense"),
                    note=p.note)


def optimize(model_or_path, config: OptimizeConfig | None = None, *, progress=None):
    """Optimize a model; returns ``(onnx.ModelProto, Report)``. The input is never modified.

    ``progress(stage, detail)`` is called as work proceeds (the CLI drives a progress bar with it).
    """
    cfg = config if config is not None else OptimizeConfig()
    if not isinstance(cfg, OptimizeConfig):
        raise ConfigError(f"config must be a bfc.OptimizeConfig, got {type(cfg).__name__}")
    note = progress or (lambda stage, detail=None: None)
    t0 = time.perf_counter()
    model = as_model(model_or_path)
    name = str(model_or_path) if not isinstance(model_or_path, onnx.ModelProto) else (model.graph.name or "model")
    graph = gs.import_onnx(model)
    sites = find_sites(graph)
    eligible = [s for s in sites if s.eligible]
    ours = [s for s in sites if not s.eligible and s.reason.startswith("already a bfc layer")]
    if not eligible and not ours:
        why = "; ".join(f"{s.name}: {s.reason}" for s in sites[:3]) or "the model has no MatMul/Gemm node"
        raise UnsupportedError(f"no eligible MatMul/Gemm site with a constant 2-D weight ({why}); "
                               "bfc has nothing to optimize in this model")
    note("load", f"{len(eligible)} eligible sites")
    feeds = load_feeds(cfg.calibration, model) if cfg.calibration is not None else None
    acts = None
    if feeds is not None and eligible:
        note("calibrate", "running the original model")
        acts = collect(model, graph, sites, feeds, cfg.calibration_rows, cfg.seed)
    model_bytes = proto_size(model)
    plans = plan_sites(sites, cfg, acts, progress=lambda site: note("plan", site), model_bytes=model_bytes)
    note("rewrite", None)
    _rewriter(cfg.target)(graph, plans, default_opset(model))
    out = export(graph, model, [p.site.name for p in plans if p.rewritten])
    if cfg.fix_batch is not None:
        out = fix_batch(out, cfg.fix_batch)
    out_bytes = proto_size(out)
    report = Report(model=name, target=cfg.target.value, layers=[_row(p) for p in plans],
                    model_bytes_before=model_bytes, model_bytes_after=out_bytes)
    if cfg.verify and out_bytes < PROTO_LIMIT and model_bytes < PROTO_LIMIT:
        note("verify", None)
        verify_into(report, model, out, verification_feeds(out, cfg, feeds), cfg)
    report.seconds = time.perf_counter() - t0
    return out, report


def verification_feeds(model: onnx.ModelProto, cfg: OptimizeConfig, feeds: dict | None = None) -> dict:
    """The calibration inputs, or seeded random ones shaped by ``model``'s inputs."""
    if feeds is None and cfg.calibration is not None:
        feeds = load_feeds(cfg.calibration, model)
    if feeds is not None:
        return feeds
    return random_feeds(model, cfg.seed)


def verify_into(report: Report, original, optimized, feeds: dict, cfg: OptimizeConfig) -> Report:
    """Fill ``report.outputs``; original/optimized are ModelProtos or paths."""
    report.outputs = [OutputRow(c.name, c.rel_error, c.cosine) for c in verify(original, optimized, feeds)]
    report.verified_on = "calibration" if cfg.calibration is not None else "random"
    return report
