"""Distill: train the planned layers end to end against the original model (optional, needs torch).

Requires: plans, guarded.  Ensures: distilled.  Not in place (``state.graph`` is untouched
except, with ``distill_layernorm``, the values of LayerNormalization scale/bias constants).
Runs only with ``config.distill`` (a .npz of model inputs, keys = input names); otherwise
it ensures the fact and changes nothing.
Algebra (``bfc.distill``): the student is the original graph in the torch interpreter with
every rewritten site's node computing alpha * T(op(A)) + beta * C, T the planned layer
with target-exact fake quantization (custom-op int8: per-row int8 activations); the
teacher is onnxruntime on the original.  Loss: relative MSE of the graph outputs (+ the
``distill_match`` tensors).  Each trained layer is written back on its format's grid
(values, trained scales) into ``plan.weights``, so the rewrite emits it for any target.
Acceptance: the whole-model output error (max over float outputs, relative) is measured
before and after on the calibration inputs (or, without them, on a held-out batch of the
distillation data); when training does not lower it, the planned layers are kept and a
note says so.  Each kept layer's error is re-measured with the planner's scorer.
Matched tensors (``distill_match``): tensor names, or ``op:TYPE`` for the first output of every
main-graph node of that op type (e.g. ``op:LayerNormalization``: each transformer block's
hidden states), so a config names them the same way on any export of the model.
With ``work_dir`` the training state is saved every 100 steps to ``work_dir/distill-<key>.pt``
(key: the data, the planned layers and the distill options) and a rerun resumes from it.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.events import StageStarted
from bfc.passes.plan import Scorer
from bfc.passes.session import load_feeds

from bfc.errors import BfcError, ConfigError
from bfc.quant import QuantizedFactorization


def _torch_distill():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("--distill needs PyTorch: pip install 'bfc[torch]' (or pip install torch)") from None
    from bfc import distill
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


def _checkpoint(cfg, taken, data, emulate):
    """``work_dir/distill-<key>.pt`` (resumable training state), keyed by everything that defines the run."""
    work = getattr(cfg, "work_dir", None)
    if work is None:
        return None
    h = hashlib.sha256(repr((cfg.distill_steps, cfg.distill_batch, cfg.distill_lr, cfg.distill_match,
                             cfg.distill_layernorm, cfg.seed, emulate)).encode())
    for k in sorted(data):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data[k]).tobytes())
    for p in taken:
        h.update(p.site.name.encode())
        for f in p.weights.factors:
            h.update(np.ascontiguousarray(f.values).tobytes())
            h.update(np.ascontiguousarray(f.scale).tobytes())
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    return work / f"distill-{h.hexdigest()[:16]}.pt"


class Distill(GraphPass):
    contract = Contract.of(requires={"plans", "guarded"}, ensures={"distilled"})

    def run(self, state) -> PassResult:
        cfg = state.config
        path = getattr(cfg, "distill", None)
        if path is None:
            return PassResult(changed=False)
        taken = [p for p in state.plans if p.rewritten and isinstance(p.weights, QuantizedFactorization)]
        other = sum(p.rewritten for p in state.plans) - len(taken)
        if not taken:
            state.notes.append("distill: no planned KS layer to train")
            return PassResult(changed=False)
        if other:
            state.notes.append(f"distill: {other} planned layers of another family (e.g. rotated low-bit) are not "
                               "trained and enter the student with their dense weights")
        if any(sn.scope is not None for p in taken for sn in p.site.nodes):
            state.notes.append("distill: skipped, a planned layer lies inside an If/Loop/Scan body "
                               "(the torch interpreter runs the main graph only)")
            return PassResult(changed=False)
        d = _torch_distill()
        state.emit(StageStarted("distill", f"{cfg.distill_steps} steps on {path}"))
        data = load_feeds(path, state.model)
        emulate = state.target.name == "custom-op"
        for p in taken:
            sim = state.target.simulate(p.weights)
            if sim is not None and not (emulate and p.weights.fmt == "int8"):
                raise BfcError(f"distill: target {state.target.name} computes layer {p.site.name} with numerics "
                               "the distillation does not emulate; run without --distill")
        layers = [(p.site.nodes, p.weights) for p in taken]
        every = max(1, cfg.distill_steps // 20)

        def progress(step, loss):
            if step % every == 0 or step == cfg.distill_steps:
                state.emit(StageStarted("distill", f"step {step}/{cfg.distill_steps}, loss {loss:.4g}"))
        model = state.model_in_memory() if hasattr(state, "model_in_memory") else state.model   # weights read in
        res = d.distill(model, layers, data, steps=cfg.distill_steps, batch=cfg.distill_batch,
                        lr=cfg.distill_lr, match=match_tensors(state.model, cfg.distill_match),
                        layernorm=cfg.distill_layernorm,
                        seed=cfg.seed, eval_data=state.feeds, emulate_rows=emulate,
                        checkpoint=_checkpoint(cfg, taken, data, emulate), on_step=progress)
        where = "calibration inputs" if state.feeds is not None else "a held-out batch of the distillation data"
        if not res.error_after < res.error_before:
            state.notes.append(f"distill: output error {res.error_before:.3g} -> {res.error_after:.3g} on {where} "
                               f"after {res.steps} steps did not improve; the planned layers were kept")
            return PassResult(changed=False)
        for p, q in zip(taken, res.weights):
            stats = None if state.stats is None else state.stats.get(p.site.weight_name)
            err = Scorer(p.site.weight.astype(np.float64), stats, state.target, cfg.seed)(q)
            old = p.error
            p.weights, p.error = q, err
            note = f"distilled: layer error {old:.3g} -> {err:.3g}" if old is not None else "distilled"
            p.note = note if p.note is None else f"{p.note}; {note}"
        if res.layernorm:
            tensors = state.graph.tensors()
            for name, value in res.layernorm.items():
                t = tensors.get(name)
                if t is not None and hasattr(t, "values"):
                    t.values = value.astype(np.asarray(t.values).dtype)
        state.notes.append(f"distill: whole-model output error {res.error_before:.3g} -> {res.error_after:.3g} "
                           f"on {where} ({res.steps} steps, batch {cfg.distill_batch}, lr {cfg.distill_lr:g}, "
                           f"{res.seconds:.0f} s{', LayerNorm trained' if res.layernorm else ''})")
        return PassResult(changed=True)
