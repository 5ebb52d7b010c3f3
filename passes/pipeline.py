"""The one pipeline: load -> find sites -> calibrate -> plan -> rewrite -> export -> save -> verify.

``optimize(source, config, output=None, on_event=None)`` is the only owner of this order,
for a model file and for an in-memory ``onnx.ModelProto`` alike (both get the same
checks); ``bfc.optimize`` and ``bfc optimize`` both call it, so the same config gives
the same model bytes.  Each step is a ``GraphPass`` with a declared contract
(``bfc.passes.contract``); the pipeline checks the contracts as it runs them and
reports progress as typed events (``bfc.passes.events``).
A model path is read without its weights (``bfc.passes.stream``): every pass works on a
skeleton whose weights are references into the input's files, a layer's weight is read
while that layer is planned, untouched weights are copied from file to file.
With ``output`` the result is written atomically, tensor by tensor (``load.save_model``),
the written file is checked, and verification runs from the files (only onnxruntime's
copies in memory); the returned model is then None.  Without ``output`` the returned
model holds its weights (read in at the end).  When verification cannot run (no
onnxruntime library for the target, inputs bfc cannot generate), the result stands and
the report says "not verified: <reason>".
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs

from bfc.config import AUTO_PRECISIONS, OptimizeConfig, Precision
from bfc.errors import BfcError, ConfigError, UnsupportedError
from bfc.passes.calibrate import Calibrate
from bfc.passes.cleanup import Export, check_file
from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.distill import Distill
from bfc.passes.events import Event, SitesFound, StageStarted
from bfc.passes.find_sites import find_sites
from bfc.passes.guard import Guard
from bfc.passes.normalize import Normalize
from bfc.passes import load as load_mod
from bfc.passes.load import (as_model, check_output_path, default_opset, input_files, model_size,
                              open_with_base, save_model)
from bfc.passes.stream import import_graph, materialize, trim
from bfc.passes.plan import LayerPlan, Plan
from bfc.passes.rewrite import Rewrite
from bfc.passes.session import load_feeds, random_feeds
from bfc.passes.targets import Target, get_target
from bfc.passes.verify import verify
from bfc.report import LayerRow, OutputRow, Report


@dataclass
class State:
    """Everything the passes read and write; ``facts`` records what the passes so far ensured."""
    config: OptimizeConfig
    target: Target
    source: object                             # path or ModelProto, as given
    emit: Callable[[Event], None]
    model: onnx.ModelProto | None = None       # the input (never modified): for a path, its skeleton
    base: Path | None = None                   # the model file the skeleton's weight references are relative to
    files: list = field(default_factory=list)  # the files the input reads (model and external data)
    output_path: Path | None = None            # where the result goes (checked against ``files`` on load)
    source_model: onnx.ModelProto | None = None   # the skeleton as read (before an opset upgrade)
    name: str = "model"
    model_bytes: int = 0
    precisions: tuple[Precision, ...] = ()
    feeds: dict | None = None
    graph: gs.Graph | None = None
    sites: list = field(default_factory=list)
    stats: dict | None = None
    plans: list[LayerPlan] = field(default_factory=list)
    output: onnx.ModelProto | None = None
    output_error: float | None = None          # whole-model output error measured by the guard
    notes: list[str] = field(default_factory=list)   # what the pipeline did beyond the layer table
    results: dict[str, PassResult] = field(default_factory=dict)
    facts: set[str] = field(default_factory=set)

    def model_in_memory(self) -> onnx.ModelProto:
        """The input with its weights read in (for passes that need every value, e.g. distillation)."""
        return self.model if self.base is None else materialize(self.model, self.base)


class Load(GraphPass):
    """Load and check the model, read the calibration inputs, check the target's requirements."""
    contract = Contract.of(ensures={"model"})

    def run(self, state: State) -> PassResult:
        cfg = state.config
        if not isinstance(state.source, (str, os.PathLike)):
            state.model = as_model(state.source)     # a ModelProto (anything else: a typed error)
            state.name = state.model.graph.name or "model"
        else:                                # weights stay in their files (bfc.passes.stream)
            state.model, state.base = open_with_base(state.source)
            state.name = str(state.source)
            state.files = input_files(state.source, state.model)
            state.source_model = state.model
            if state.output_path is not None:
                check_output_path(state.output_path, state.files)
        state.model_bytes = model_size(state.model, state.base)
        opset = default_opset(state.model)
        wanted = AUTO_PRECISIONS if cfg.precision is Precision.AUTO else (cfg.precision,)
        why = {p: state.target.check(p.format, opset) for p in wanted}
        state.precisions = tuple(p for p in wanted if why[p] is None)
        if not state.precisions:
            raise UnsupportedError(f"target {state.target.name} cannot store {cfg.precision.value} weights in "
                                   f"this model: {why[cfg.precision]}, and the model has opset {opset}; use "
                                   "--precision int8 or convert the model to a newer opset")
        if cfg.calibration is not None:
            state.feeds = load_feeds(cfg.calibration, state.model)
        return PassResult(changed=False)


class FindSites(GraphPass):
    contract = Contract.of(requires={"model"}, ensures={"graph", "sites"})

    def run(self, state: State) -> PassResult:
        state.graph = import_graph(state.model, state.base)
        state.sites = find_sites(state.graph)
        state.emit(SitesFound(sum(s.eligible for s in state.sites), len(state.sites)))
        return PassResult(changed=False, skipped={s.name: s.reason for s in state.sites if not s.eligible})


PASSES: tuple[tuple[str, GraphPass], ...] = (
    ("load", Load()), ("normalize", Normalize()), ("sites", FindSites()), ("calibrate", Calibrate()), ("plan", Plan()),
    ("guard", Guard()), ("distill", Distill()), ("rewrite", Rewrite()), ("export", Export()))


def _row(p: LayerPlan) -> LayerRow:
    s = p.site
    return LayerRow(layer=s.name, nodes=len(s.nodes), shape=s.shape, structure=p.structure,
                    precision=p.precision if p.rewritten else (str(s.weight.dtype) if s.weight is not None else "-"),
                    params_before=p.params_before, params_after=p.params_after,
                    bytes_before=p.bytes_before, bytes_after=p.bytes_after,
                    flops_before=p.flops_before, flops_after=p.flops_after,
                    error=p.error, error_kind=p.error_kind, reason=None if p.rewritten else (p.reason or "kept dense"),
                    note=p.note, plan_seconds=p.seconds, worker=p.worker, resumed=p.resumed)


def run_passes(source, cfg: OptimizeConfig, emit=None, output=None) -> State:
    """Load -> ... -> export (no save, no verification); the state holds every pass's output.  For a
    path, ``state.output`` is a skeleton whose references are relative to ``state.base``."""
    state = State(cfg, get_target(cfg.target), source, emit or (lambda event: None), output_path=output)
    for stage, p in PASSES:
        state.emit(StageStarted(stage))
        state.results[stage] = p(state)
        trim()                       # each pass's temporaries leave the resident size
    return state


def optimize(source, config: OptimizeConfig | None = None, *, output=None,
             on_event: Callable[[Event], None] | None = None) -> tuple[onnx.ModelProto | None, Report]:
    """Run the pipeline on a model path or ModelProto; see the module doc.  Returns (model or None, report)."""
    cfg = config if config is not None else OptimizeConfig()
    if not isinstance(cfg, OptimizeConfig):
        raise ConfigError(f"config must be a bfc.OptimizeConfig, got {type(cfg).__name__}")
    emit = on_event or (lambda event: None)
    t0 = time.perf_counter()
    if output is not None:                # the input's data files are checked once it is read (Load)
        output = check_output_path(output, [source] if not isinstance(source, onnx.ModelProto) else [])
    state = run_passes(source, cfg, emit, output)
    if cfg.strict and not any(p.rewritten for p in state.plans):
        why = "; ".join(f"{p.site.name}: {p.reason}" for p in state.plans[:3]) or "no MatMul/Gemm node"
        raise UnsupportedError(f"nothing to rewrite ({why}); without --strict the model is written unchanged")
    out = state.output
    out_bytes = model_size(out, state.base)
    report = Report(model=state.name, target=state.target.name, layers=[_row(p) for p in state.plans],
                    model_bytes_before=state.model_bytes, model_bytes_after=out_bytes, notes=state.notes)
    _release(state)                  # the report has what it needs: only the output proto stays
    feeds, no_feeds = state.feeds, None
    if cfg.verify and feeds is None:
        try:                             # shaped by the output: --fix-batch pins its batch dimension
            feeds = random_feeds(out, cfg.seed)
        except BfcError as e:
            no_feeds = str(e)
    if output is None and state.base is not None:
        out = state.output = materialize(out, state.base)   # asked for in memory: the weights read in
    verify_against = out
    verify_base = None
    if output is not None:
        emit(StageStarted("save"))
        if out is state.model or out is state.source_model:
            out = _copy(out)               # saving may move a skeleton's references to the output's data
        save_model(out, output, state.files, base=state.base)    # tensor by tensor
        state.output = out = None
        check_file(output)
        report.model_bytes_after = _file_bytes(output, external=out_bytes > load_mod.PROTO_LIMIT)
        verify_against, verify_base = open_with_base(output)   # the written files, read by onnxruntime
    if cfg.verify:
        emit(StageStarted("verify"))
        original, original_base = (state.model, None) if isinstance(source, onnx.ModelProto) else (
            (state.source_model, state.base) if state.source_model is state.model else (source, None))
        try:
            if feeds is None:
                raise BfcError(no_feeds)
            checks = verify(original, verify_against, feeds, original_base=original_base, optimized_base=verify_base)
            report.outputs = [OutputRow(c.name, c.rel_error, c.cosine) for c in checks]
            report.verified_on = "calibration" if state.feeds is not None else "random"
        except BfcError as e:
            report.not_verified = str(e)
        except Exception:
            if output is not None:       # bfc's own output does not run: do not leave it on disk
                for p in (Path(output), Path(str(output) + ".data")):
                    p.unlink(missing_ok=True)
            raise
    report.seconds = time.perf_counter() - t0
    return out, report


def _release(state: State) -> None:
    """Drop the graph, the sites, the plans and the statistics (each holds the new layers' values or
    the graph that does), so that saving and verification hold one copy of the output at most."""
    state.graph, state.sites, state.plans, state.stats = None, [], [], None
    trim()


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _file_bytes(path: Path, external: bool) -> int:
    """Bytes written: the model file, plus the ``<name>.data`` file save_model writes beside it above
    2 GB (``external``; a stale file of that name from another run is not counted)."""
    return path.stat().st_size + (Path(str(path) + ".data").stat().st_size if external else 0)
