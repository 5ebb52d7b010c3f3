"""Distill: train the planned layers end to end against the original model (optional, needs torch).

``distill(loaded, plan, stats, feeds, cfg, target, emit)`` -> Plan (with ``distill_layernorm``,
the new values of LayerNormalization scale/bias constants go in ``Plan.tensor_updates``, which the
rewrite applies).  Runs only with ``config.distillation.data`` (a .npz of model inputs, keys = input
names); otherwise it returns the plan as it is.
Algebra (``bfc.distill``): the student is the original graph in the torch interpreter with
every rewritten site's node computing alpha * T(op(A)) + beta * C, T the planned layer (KS chain,
rotated low-bit, or the allocator's int8-compute forms, ``bfc.torch.rotated``) with target-exact fake
quantization (custom-op int8 KS and LowBitMatMul: per-row int8 activations; int8 compute: onnxruntime's
dynamic uint8 activations); fp16 weights and quantized embedding rows are fixed, as the target computes
them (``bfc.distill.FrozenForm``); the
teacher is onnxruntime on the original.  Loss: relative MSE of the graph outputs (+ the
``distill_match`` tensors).  Each trained layer is written back on its format's grid
(values or codes, trained scales, a trained rotation as stored) into ``plan.weights``, so the
rewrite emits it for any target.
Acceptance: the whole-model output error (max over float outputs, relative) is measured
before and after on the calibration inputs (or, without them, on a held-out batch of the
distillation data); when training does not lower it, the planned layers are kept and a
note says so.  Each kept layer's error is re-measured with the planner's scorer.  A plan the
allocator made with ``distill_headroom`` > 1 (``Plan.post_training`` set) is then checked against the
budget in onnxruntime (``within_budget``), falling back to the post-training allocation.
Matched tensors (``distill_match``): tensor names, or ``op:TYPE`` for the first output of every
main-graph node of that op type (e.g. ``op:LayerNormalization``: each transformer block's
hidden states), so a config names them the same way on any export of the model.
With ``work_dir`` the training state is saved every 100 steps to ``work_dir/distill-<key>.pt``
(key: the data, the planned layers and the distill options) and a rerun resumes from it.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from bfc.config import OptimizeConfig
from bfc.errors import BfcError, ConfigError
from bfc.lowbit import RotatedLayer
from bfc.lowbit.int8_layer import Int8Linear
from bfc.passes.candidates import Scorer
from bfc.passes.events import StageStarted
from bfc.passes.model_io.feeds import MEASURE_BATCH, load_feeds, random_feeds
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import materialize
from bfc.passes.products import LoadedModel, Plan, Statistics
from bfc.passes.schedule import VERIFIED_SHARE, plan_error
from bfc.quant import QuantizedFactorization

TORCH_HINT = "pip install torch==2.13.0 (the CPU build; another version spec pulls a multi-GB CUDA build)"


def _torch_distill():
    """``bfc.distill`` (its module imports torch: the optional extra)."""
    try:
        from bfc import distill
    except ImportError:
        raise ConfigError(f"--distill needs PyTorch: {TORCH_HINT}") from None
    return distill


def match_tensors(model, match) -> tuple[str, ...]:
    """``distill_match`` with each ``op:TYPE`` entry expanded to the first output of every main-graph
    node of that op type (graph outputs left out: they are matched anyway); ConfigError for a name
    that is no tensor of the graph or a type that has no node."""
    g = model.graph
    outputs = {o.name for o in g.output}
    known = ({t.name for t in g.input} | {t.name for t in g.initializer}
             | {o for n in g.node for o in n.output if o})
    out: list[str] = []
    for m in match:
        if m.startswith("op:"):
            names = [n.output[0] for n in g.node if n.op_type == m[3:] and n.output and n.output[0]]
            if not names:
                raise ConfigError(f"distill_match {m!r}: the graph has no {m[3:]} node")
            out += [n for n in names if n not in outputs]
        elif m not in known:
            raise ConfigError(f"distill_match {m!r} is no tensor of the graph (name a tensor or op:TYPE)")
        else:
            out.append(m)
    return tuple(dict.fromkeys(out))


TRAINED_FORMS = (QuantizedFactorization, RotatedLayer, Int8Linear)   # trained; ``bfc.distill.FROZEN_FORMS``: fixed


def _arrays(form) -> list:
    """The stored arrays of a trainable form (what keys its checkpoint)."""
    if isinstance(form, QuantizedFactorization):
        return [a for f in form.factors for a in (f.values, f.scale)]
    if isinstance(form, Int8Linear):
        return [form.w_s8, form.col_scale] if form.codes is None else [form.codes.values, form.codes.scales]
    if isinstance(form, RotatedLayer):
        return [form.weight.values, form.weight.scales]
    return [v for v in vars(form).values() if isinstance(v, np.ndarray)]       # a frozen form's arrays


def _checkpoint(cfg, taken, data, emulate):
    """``work_dir/distill-<key>.pt`` (resumable training state), keyed by everything that defines the run."""
    work = cfg.schedule.work_dir
    if work is None:
        return None
    d = cfg.distillation
    h = hashlib.sha256(repr((d.steps, d.batch, d.lr, d.match, d.layernorm, d.rotation, cfg.seed, emulate)
                             + ((d.blockwise_steps,) if d.blockwise_steps else ())).encode())
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data[k]).tobytes())
    for p in taken:
        h.update(p.site.name.encode())
        for a in _arrays(p.weights):
            h.update(np.ascontiguousarray(a).tobytes())
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    return work / f"distill-{h.hexdigest()[:16]}.pt"


def distill(loaded: LoadedModel, plan: Plan, stats: Statistics, feeds: dict | None, cfg: OptimizeConfig,
            target, emit) -> Plan:
    """The distill stage (see the module doc); a plan allocated with headroom (``Plan.post_training``) is
    kept only when the trained model measures within the budget (``within_budget``)."""
    trained = _train(loaded, plan, stats, feeds, cfg, target, emit)
    return trained if plan.post_training is None else within_budget(loaded, trained, plan.post_training, feeds, cfg,
                                                                    target)


def within_budget(loaded: LoadedModel, trained: Plan, post: Plan, feeds: dict | None, cfg: OptimizeConfig,
                  target) -> Plan:
    """The trained plan (allocated to ``distill_headroom`` x the budget before training) when the model it
    writes measures within the allocator's share of the budget in onnxruntime (``schedule.plan_error``, the
    allocator's own verification: calibration inputs, or its generated ones) and its layers are smaller than
    post-training's; else the post-training allocation ``post``.  Each layer's note names its post-training
    choice where the two differ (the report's before/after per layer)."""
    model = loaded.model if loaded.base is None else materialize(loaded.model, loaded.base)
    run_feeds = feeds if feeds is not None else random_feeds(model, cfg.seed, MEASURE_BATCH)
    reference = run(session(model, threads=0), run_feeds)
    err = plan_error(loaded, trained.layers, target, reference, run_feeds, trained.tensor_updates)
    budget = cfg.max_output_error * VERIFIED_SHARE
    where = "calibration" if feeds is not None else "generated"
    size = {name: sum(p.bytes_after for p in plan.layers) for name, plan in (("post", post), ("trained", trained))}
    if err > budget or size["trained"] >= size["post"]:
        why = (f"over the budget {cfg.max_output_error:g} (planned to {budget:.3g})" if err > budget else
               f"but its layers are no smaller ({size['trained']} >= {size['post']} weight bytes)")
        return replace(post, notes=trained.notes + (
            f"distill: the trained model (allocated to {cfg.distillation.headroom:g}x the budget) measures output "
            f"error {err:.3g} on {where} inputs, {why}: the post-training allocation is written, untrained",))
    before = {p.site.name: p for p in post.layers}
    layers = []
    for p in trained.layers:
        b = before[p.site.name]
        if b.precision != p.precision:
            was = (f"post-training: {b.precision} ({b.error:.3g})" if b.rewritten
                   else "post-training: unchanged")
            p = replace(p, note=was if p.note is None else f"{p.note}; {was}")
        layers.append(p)
    changed = sum(before[p.site.name].precision != p.precision for p in trained.layers)
    return replace(trained, layers=tuple(layers), output_error=err, post_training=None, notes=trained.notes + (
        f"distill: the trained model measures output error {err:.3g} on {where} inputs, within the budget "
        f"{cfg.max_output_error:g} (planned to {budget:.3g}); {changed} layers take another form than "
        f"post-training ({size['post']} -> {size['trained']} weight bytes)",))


def _train(loaded: LoadedModel, plan: Plan, stats: Statistics, feeds: dict | None, cfg: OptimizeConfig,
           target, emit) -> Plan:
    """Distillation of the planned layers (the module doc)."""
    path = cfg.distillation.data
    if path is None:
        return plan

    def noted(note: str) -> Plan:
        return replace(plan, notes=plan.notes + (note,))

    d = _torch_distill()
    taken = [p for p in plan.layers if p.rewritten and isinstance(p.weights, TRAINED_FORMS + d.FROZEN_FORMS)]
    other = len(plan.rewritten) - len(taken)
    if not any(isinstance(p.weights, TRAINED_FORMS) for p in taken):
        return noted("distill: no planned KS, rotated low-bit or int8 layer to train")
    if other:
        plan = noted(f"distill: {other} planned layers of another family are not trained and enter the student "
                     "with their dense weights")
    if any(sn.scope is not None for p in taken for sn in p.site.nodes):
        return noted("distill: skipped, a planned layer lies inside an If/Loop/Scan body "
                     "(the torch interpreter runs the main graph only)")
    if cfg.distillation.blockwise_steps and not cfg.distillation.match:
        raise ConfigError("distill_blockwise_steps needs distill_match (the tensors that bound the blocks, "
                          "e.g. op:LayerNormalization)")
    total = cfg.distillation.blockwise_steps + cfg.distillation.steps
    emit(StageStarted("distill", f"{cfg.distillation.blockwise_steps} block-wise + {cfg.distillation.steps} "
                                 f"end-to-end steps on {path}"))
    data = load_feeds(path, loaded.model)
    emulate = target.name == "custom-op"
    for p in taken:       # Int8Linear: TrainableInt8 computes the integer graph every target emits for it
        sim = target.simulate(p.weights)
        emulated = isinstance(p.weights, RotatedLayer) or (isinstance(p.weights, QuantizedFactorization)
                                                           and p.weights.fmt == "int8")
        if sim is not None and not isinstance(p.weights, Int8Linear) and not (emulate and emulated):
            raise BfcError(f"distill: target {target.name} computes layer {p.site.name} with numerics "
                           "the distillation does not emulate; run without --distill")
    layers = [(p.site.nodes, p.weights) for p in taken]
    every = max(1, total // 20)

    def progress(step, loss):
        if step % every == 0 or step == total:
            emit(StageStarted("distill", f"step {step}/{total}, loss {loss:.4g}"))
    model = loaded.model if loaded.base is None else materialize(loaded.model, loaded.base)   # weights read in
    res = d.distill(model, layers, data, steps=cfg.distillation.steps, batch=cfg.distillation.batch,
                    lr=cfg.distillation.lr, match=match_tensors(loaded.model, cfg.distillation.match),
                    layernorm=cfg.distillation.layernorm,
                    seed=cfg.seed, eval_data=feeds, emulate_rows=emulate,
                    checkpoint=_checkpoint(cfg, taken, data, emulate), train_rotation=cfg.distillation.rotation,
                    floats=[p.site.weight if isinstance(p.weights, (RotatedLayer, Int8Linear)) else None
                            for p in taken],
                    blockwise_steps=cfg.distillation.blockwise_steps, on_step=progress)
    where = "calibration inputs" if feeds is not None else "a held-out batch of the distillation data"
    if not res.error_after < res.error_before:
        return noted(f"distill: output error {res.error_before:.3g} -> {res.error_after:.3g} on {where} "
                     f"after {res.steps} steps ({res.seconds:.0f} s) did not improve; the planned layers were kept")
    trained = {}
    for p, q in zip(taken, res.weights):
        if q is p.weights:            # a frozen form (fp16, embedding rows): in the student as the target computes it
            continue
        err = Scorer(p.site.weight.astype(np.float64), stats.get(p.site.weight_name), target, cfg.seed)(q)
        note = f"distilled: layer error {p.error:.3g} -> {err:.3g}" if p.error is not None else "distilled"
        trained[id(p)] = replace(p, weights=q, error=err, note=note if p.note is None else f"{p.note}; {note}")
    bw = f" ({cfg.distillation.blockwise_steps} block-wise)" if cfg.distillation.blockwise_steps else ""
    note = (f"distill: whole-model output error {res.error_before:.3g} -> {res.error_after:.3g} "
            f"on {where} ({res.steps} steps{bw}, batch {cfg.distillation.batch}, lr {cfg.distillation.lr:g}, "
            f"{res.seconds:.0f} s{', LayerNorm trained' if res.layernorm else ''})")
    return replace(plan, layers=tuple(trained.get(id(p), p) for p in plan.layers), notes=plan.notes + (note,),
                   tensor_updates={**plan.tensor_updates, **(res.layernorm or {})})
