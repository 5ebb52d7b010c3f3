"""Sensitivity: how much the whole model's output moves per unit of relative error in one weight.

``measure_sensitivity(model, weights, feeds)`` -> Sensitivities, in ONE onnxruntime session.
Each listed weight W_l (an initializer, typically the B input of MatMul y = x @ W or of Gemm)
is also declared a graph input, its initializer the default value (onnxruntime's overridable
initializers), so a run can feed

    W_l + s_l * D_l          (computed in numpy, in W_l's dtype: s_l rounded to it, then W + s D)

with D_l a fixed seeded Gaussian matrix in W_l's dtype scaled to ||D_l||_F = ||W_l||_F
(``noise``: ``default_rng([seed, crc32(name)])``, independent of the list and the grouping).
Every consumer (several nodes sharing W_l, a node inside an If/Loop body that reads W_l from the
outer scope) sees the one fed value, so a shared weight is perturbed once.  An initializer of
an If/Loop body is moved to the main graph (the body reads it from the outer scope) and fed the
same way.  (The alternative, W_l := W_l^base + s_l * D_l in the graph with scalar inputs s_l,
measured 3x slower per run on a 6-layer decoder, 0.31 s vs 0.13 s: every run adds all the
noise matrices, and it holds them all: twice the weights.)

The run feeding no weight is the reference y_ref (same session, same kernels); the run
feeding only W_l + s_l D_l gives the model's relative output error

    err_l = max over float outputs of ||y - y_ref|| / ||y_ref||     (``bfc.passes.guard.output_error``)

and sensitivity_l = err_l / eps_l, where eps_l is the layer's own relative error at s_l:

  * ``relative_to="output"`` (default; matches a candidate's calibrated error
    ||X W - X W_hat|| / ||X W||): eps_l = s_l sqrt(sum ||op(X, D_l)||^2 / sum ||op(X, W_l)||^2)
    over the weight's consumers, X their other operand captured in one extra run (MatMul
    either side, Gemm with transA/transB, the Gather rows of an embedding table).  A weight with
    another consumer (a Transpose, a node in a subgraph) falls back to ``"weight"`` and says so.
  * ``relative_to="weight"`` (matches the uncalibrated error ||W - W_hat||_F / ||W||_F):
    eps_l = s_l ||D_l||_F / ||W_l||_F.

s_l is chosen so that eps_l = ``eps`` (then rounded to the weight's dtype; the exact eps_l is
used).  For small errors the model is linear in each s_l and independent perturbations add in
quadrature, which is the model ``bfc.passes.allocate`` relies on: cost_l = (sensitivity_l e_l)^2.
Runs: 1 reference + 1 capture (per group, below) + 1 per weight.

Memory: onnxruntime's copy of the model, plus transiently the copied ModelProto and its
serialization (about 3x the model while the session is built); then one weight at a time
(W, D, W + s D: 3x the largest weight) and the captured operands X of the consumers
(``relative_to="output"``: for all weights at once by default; ``max_bytes`` bounds them:
operands are captured for groups of weights, one run per group).  Weights that are graph
inputs cannot be prepacked by onnxruntime: runs cost about a plain run (measured 0.13 s vs 0.12 s).
fp16 weights get fp16 noise and fp16 s_l; at eps = 1e-2 the fp16 rounding of the outputs
(~1e-3 relative) limits the precision to about 1% (measured 0.5% against a rebuilt model).
Models beyond protobuf's 2 GB cannot be serialized for onnxruntime here.
"""
from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bfc.passes.guard import output_error
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import graphs

RELATIVE_TO = ("output", "weight")
ROW_BLOCK = 8192          # rows of X per product when measuring ||X D|| and ||X W||
_CONSUMERS = ("MatMul", "Gemm", "Gather")


@dataclass(frozen=True)
class LayerSensitivity:
    """One weight's result: ``sensitivity`` = model_error / layer_error (None: not measured,
    ``reason`` says why); ``scale`` the s_l used; ``relative_to`` how layer_error was measured;
    ``reason`` also carries notes (e.g. a fallback to the weight norm)."""
    name: str
    sensitivity: float | None
    reason: str | None = None
    scale: float = 0.0
    layer_error: float = 0.0
    model_error: float = 0.0
    relative_to: str = "output"


@dataclass(frozen=True)
class Sensitivities:
    """Per weight in the order asked (duplicates once); ``groups``: the groups of layers whose
    operands were captured together (one run each; 1 without ``max_bytes``)."""
    layers: tuple[LayerSensitivity, ...]
    eps: float
    groups: int
    seconds: float

    def as_dict(self) -> dict[str, float | None]:
        return {r.name: r.sensitivity for r in self.layers}

    def __getitem__(self, name: str) -> LayerSensitivity:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)


def noise(name: str, weight: np.ndarray, seed: int = 0) -> np.ndarray:
    """The fixed perturbation direction of ``name``: iid N(0, 1) scaled to ||D||_F = ||W||_F, in
    W's dtype (drawn from ``default_rng([seed, crc32(name)])``)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    d = rng.standard_normal(weight.shape)
    wn, dn = _norm(weight), _norm(d)
    d *= wn / dn if dn > 0 else 0.0
    return d.astype(weight.dtype)


def _norm(a: np.ndarray) -> float:
    """||a||_F accumulated in float64."""
    v = np.asarray(a).reshape(-1)
    if v.dtype != np.float64:
        v = v.astype(np.float64)
    return float(np.sqrt(np.dot(v, v)))


# ---------------------------------------------------------------- graph rewriting

def _all_names(model: onnx.ModelProto) -> set[str]:
    names = set()
    for g in graphs(model.graph):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for n in g.node:
            names.update(n.input)
            names.update(n.output)
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


@dataclass(frozen=True)
class _Use:
    """One main-graph consumer of a weight: its op, which input the weight is, the other operand."""
    op: str
    slot: int
    other: str
    trans_a: bool = False
    trans_b: bool = False
    axis: int = 0


def _uses(model: onnx.ModelProto, name: str) -> tuple[list[_Use], str | None]:
    """The consumers of ``name`` usable for the output normalization, or why there are none."""
    uses = []
    for g in graphs(model.graph):
        sub = g is not model.graph
        for n in g.node:
            for slot, x in enumerate(n.input):
                if x != name:
                    continue
                if sub:
                    return [], f"{n.op_type} node {n.name!r} inside a subgraph reads it"
                if n.op_type not in _CONSUMERS or (n.op_type == "Gather" and slot != 0) or \
                        (n.op_type == "Gemm" and slot == 2) or list(n.input[:2]).count(name) > 1:
                    return [], f"{n.op_type} node {n.name!r} reads it (not a MatMul/Gemm operand or Gather table)"
                other = n.input[1 - slot] if n.op_type != "Gather" else n.input[1]
                uses.append(_Use(n.op_type, slot, other, bool(_attr(n, "transA", 0)), bool(_attr(n, "transB", 0)),
                                 int(_attr(n, "axis", 0))))
    return uses, (None if uses else "no consumer")


def _product(use: _Use, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The consumer's product with weight ``w`` (float64), X the other operand."""
    if use.op == "Gather":
        return np.take(w, x, axis=use.axis)
    if use.op == "Gemm":
        a, b = (x, w) if use.slot == 1 else (w, x)
        a = a.T if use.trans_a else a
        b = b.T if use.trans_b else b
        return a @ b
    return x @ w if use.slot == 1 else w @ x


def _sq_norm(use: _Use, w: np.ndarray, x: np.ndarray) -> float:
    """||op(X, w)||^2, in row blocks of X where X is the left factor of a 2-D w."""
    w = np.asarray(w, np.float64)
    if use.op == "Gather":
        return float(np.sum(np.square(_product(use, w, x))))
    x = np.asarray(x, np.float64)
    left = (use.op == "MatMul" and use.slot == 1 and w.ndim == 2) or \
           (use.op == "Gemm" and use.slot == 1 and not use.trans_a)
    if not left:
        return float(np.sum(np.square(_product(use, w, x))))
    rows = x.reshape(-1, x.shape[-1])
    return float(sum(np.sum(np.square(_product(use, w, rows[i:i + ROW_BLOCK])))
                     for i in range(0, rows.shape[0], ROW_BLOCK)))


class PerturbedModel:
    """One onnxruntime session of ``model`` in which each weight in ``names`` is also a graph input
    (its initializer the default), so a run can replace it by W + s * noise(W).

    ``error({name: s, ...})`` returns the relative output error of that run against the
    reference run (no weight fed); ``found`` holds the measurable names, ``missing`` the others
    with a reason; ``operands(names)`` runs the model once more for the consumers' other inputs.
    An initializer of an If/Loop body is moved to the main graph (its nodes read it from the
    outer scope) so that it can be fed too.
    """

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], feeds: dict, seed: int = 0, threads: int = 0):
        self.seed = seed
        self.missing: dict[str, str] = {}
        self.found: dict[str, onnx.TensorProto] = {}       # the tensors of ``model`` (read, never changed)
        self.uses: dict[str, list[_Use]] = {}
        self.no_uses: dict[str, str] = {}
        where = {}
        for gi, g in enumerate(graphs(model.graph)):
            for t in g.initializer:
                where.setdefault(t.name, (gi, t))
        main_names = {t.name for t in model.graph.initializer} | {v.name for v in model.graph.input}
        for name in names:
            if name in self.found or name in self.missing:
                continue
            if name not in where:
                self.missing[name] = "no initializer of that name (a Constant node or a computed tensor)"
                continue
            gi, t = where[name]
            if t.data_location == onnx.TensorProto.EXTERNAL:
                self.missing[name] = "its data is external (load the weights into the model first)"
            elif helper.tensor_dtype_to_np_dtype(t.data_type).kind != "f":
                self.missing[name] = f"not a float tensor ({helper.tensor_dtype_to_np_dtype(t.data_type)})"
            elif gi > 0 and name in main_names:
                self.missing[name] = "an initializer of a subgraph whose name the main graph also uses"
            elif not np.any(numpy_helper.to_array(t)):
                self.missing[name] = "an all-zero weight has no relative error"
            else:
                self.found[name] = t
                self.uses[name], why = _uses(model, name)
                if why is not None:
                    self.no_uses[name] = why
        m = onnx.ModelProto()
        m.CopyFrom(model)
        inputs = {v.name for v in m.graph.input}
        for g in list(graphs(m.graph))[1:]:                                  # hoist the found body initializers
            keep = [t for t in g.initializer if t.name not in self.found]
            if len(keep) != len(g.initializer):
                m.graph.initializer.extend(t for t in g.initializer if t.name in self.found)
                del g.initializer[:]
                g.initializer.extend(keep)
        for name, t in self.found.items():
            if name not in inputs:
                m.graph.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.outputs = [o.name for o in model.graph.output]
        graph_inputs = {v.name for v in model.graph.input}
        self.inits = {t.name: t for t in model.graph.initializer}
        operands = {u.other for n in self.found if n not in self.no_uses for u in self.uses[n]}
        self.captured = sorted(x for x in operands
                               if x not in graph_inputs and x not in self.inits and x not in self.outputs)
        m.graph.output.extend(onnx.ValueInfoProto(name=x) for x in self.captured)
        self.sess = session(m, threads=threads)
        del m
        self.feeds = dict(feeds)
        self.ref = [np.asarray(r, np.float64) if np.asarray(r).dtype.kind == "f" else np.asarray(r)
                    for r in run(self.sess, self.feeds, self.outputs)]

    def weight(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.found[name])

    def perturbed(self, name: str, s, wd: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """W + s * noise(W) in W's dtype (s rounded to it first), as ``error`` feeds it; ``wd``: (W, D)
        when the caller has them."""
        w, d = wd if wd is not None else self.pair(name)
        return w + np.asarray(s, w.dtype) * d

    def pair(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(W, noise(W))."""
        w = self.weight(name)
        return w, noise(name, w, self.seed)

    def error(self, scales: dict[str, float], pairs: dict | None = None) -> float:
        """Relative output error with ``W_l + scales[l] * D_l`` (the others unperturbed); ``pairs``:
        (W, D) by name where the caller has them."""
        feeds = dict(self.feeds)
        for name, s in scales.items():
            feeds[name] = self.perturbed(name, s, (pairs or {}).get(name))
        return output_error(self.ref, run(self.sess, feeds, self.outputs))

    def operands(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The other operands of these weights' consumers on the feeds (one run for the computed ones)."""
        want = sorted({u.other for n in names if n not in self.no_uses for u in self.uses[n]})
        run_for = [x for x in want if x in self.captured]
        got = dict(zip(run_for, run(self.sess, self.feeds, run_for))) if run_for else {}
        for x in want:
            if x in self.feeds:
                got[x] = np.asarray(self.feeds[x])
            elif x in self.inits:
                got[x] = numpy_helper.to_array(self.inits[x])
        return got

    def ratio(self, name: str, relative_to: str, x: dict | None = None,
              wd: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[float | None, str, str | None]:
        """(r, relative_to used, note) with eps_l = s_l * r: the layer's relative error per unit s;
        ``x``: the operands (``operands``) for ``relative_to="output"``; ``wd``: (W, D)."""
        w, d = wd if wd is not None else self.pair(name)
        note = None
        if relative_to == "output" and name not in self.no_uses:
            uses = self.uses[name]
            x = x if x is not None else self.operands([name])
            if all(u.other in x for u in uses):
                num = sum(_sq_norm(u, d, x[u.other]) for u in uses)
                den = sum(_sq_norm(u, w, x[u.other]) for u in uses)
                if den > 0:
                    return float(np.sqrt(num / den)), "output", None
                return None, "output", "the consumers' output X W is zero on these inputs"
            note = "an operand is not available"
        elif relative_to == "output":
            note = self.no_uses[name]
        r = _norm(d) / _norm(w)
        return r, "weight", (f"relative to the weight norm: {note}" if relative_to == "output" else None)


# ---------------------------------------------------------------- measurement

def measure_sensitivity(model: onnx.ModelProto, weights: Iterable[str], feeds: dict, *, eps: float = 1e-2,
                        seed: int = 0, relative_to: str = "output", max_bytes: int | None = None,
                        threads: int = 0) -> Sensitivities:
    """sensitivity_l = (whole-model relative output error) / (layer l's relative error) at a layer
    error of ``eps``, one weight perturbed at a time (module doc).  ``model`` holds its weights
    inline; ``feeds`` maps input names to arrays; ``max_bytes`` bounds the captured operand bytes
    (``relative_to="output"``) held at once: they are captured for groups of layers, one run per
    group, sized from the largest operand seen (the first group is one layer); ``threads``
    onnxruntime intra-op threads (0: its default)."""
    if relative_to not in RELATIVE_TO:
        raise ValueError(f"relative_to={relative_to!r}: one of {', '.join(RELATIVE_TO)}")
    if not (eps > 0 and np.isfinite(eps)):
        raise ValueError(f"eps={eps!r} must be a positive number")
    t0 = time.perf_counter()
    names = list(dict.fromkeys(weights))
    pm = PerturbedModel(model, names, feeds, seed, threads)
    out: dict[str, LayerSensitivity] = {
        name: LayerSensitivity(name, None, why, relative_to=relative_to) for name, why in pm.missing.items()}
    todo = [n for n in names if n in pm.found]
    largest, groups = 0, 0
    while todo:
        if relative_to == "output" and max_bytes is not None:
            per_layer = max(largest * max(len(pm.uses[n]) for n in todo), 1)
            size = 1 if largest == 0 else max(1, int(max_bytes // per_layer))
        else:
            size = len(todo)
        group, todo = todo[:size], todo[size:]
        x = pm.operands(group) if relative_to == "output" else {}
        groups += 1
        largest = max([largest] + [a.nbytes for a in x.values()])
        for name in group:
            wd = pm.pair(name)
            r, used, note = pm.ratio(name, relative_to, x, wd)
            if r is None or r <= 0:
                out[name] = LayerSensitivity(name, None, note or "zero noise", relative_to=used)
                continue
            s = np.asarray(eps / r, helper.tensor_dtype_to_np_dtype(pm.found[name].data_type))
            layer_error = float(s) * r
            model_error = pm.error({name: s}, {name: wd})
            del wd
            out[name] = LayerSensitivity(name, model_error / layer_error, note, float(s), layer_error, model_error, used)
        del x
    return Sensitivities(tuple(out[n] for n in names), float(eps), groups, time.perf_counter() - t0)


def layer_sensitivity(model: onnx.ModelProto, sites: Sequence, feeds: dict, reference=None, **kw) -> dict[str, float]:
    """{weight name: sensitivity} for the measured weights of ``sites`` (objects with a
    ``weight_name``, or names).  ``reference`` is accepted and not used: the reference run is
    made inside the perturbed graph, so that both runs use the same kernels."""
    names = [getattr(s, "weight_name", s) for s in sites]
    res = measure_sensitivity(model, names, feeds, **kw)
    return {r.name: r.sensitivity for r in res.layers if r.sensitivity is not None}
