"""Transformer fusions before sites are found (``--fuse``): attention as MultiHeadAttention.

``recognize(model)`` names the onnxruntime optimizer model type of a BERT-like encoder ("bert") or
None; ``fuse(model, model_type, opset)`` returns a ``FuseResult`` (the new model, the fusions applied
with counts, a note).  The input model is never changed; graph inputs/outputs, the default-domain
opset and the IR version are kept; any failure returns the input model with a note.  Passes, in order:

1. **SDPA -> com.microsoft MultiHeadAttention** (``fuse_sdpa``, bfc's own matcher).  Q/K/V heads
   split (Reshape + Transpose; K^T as Transpose(0,2,3,1), a second Transpose, or torch.export's
   Reshape/Transpose/Reshape swap, proven from the shape expressions), scale (a Div or Mul on the scores,
   on Q and/or on K), an optional additive mask (any (b|1, H|1, s|1, L) float tensor the graph computes,
   kept as MHA's attention_bias; a (.., 1, L) mask gets one Expand), Softmax, the optional NaN guard
   Where(IsNaN(p), 0, p), probs @ V, heads merged -> one MHA fed by the projections' outputs.  Head
   counts and sequence dims are checked against onnx shape inference (data propagation).  The Q/K/V/
   output projections stay separate constant-weight MatMuls (+ bias Add), so bfc's site finder finds
   and rewrites every one of them (MiniLM: 36 sites before and after); onnxruntime's ``Attention`` op,
   which packs Q/K/V weights into one tensor bfc cannot rewrite, is never created.  Needed because
   onnxruntime's own attention fusion does not match the torch.export (dynamo) graph of MiniLM (Q and
   K each scaled by d^-1/4, the reshape-based K^T, the NaN guard), so it fuses nothing there.
2. **onnxruntime's transformer optimizer** (``optimize_model``, opt_level=0: pure-Python graph fusion,
   no session optimization baked in, use_gpu=False) with ``fusion_options``: LayerNormalization (from
   ReduceMean decompositions; only when the opset allows, >= 17), Gelu (from Erf), and its attention
   fusion as MultiHeadAttention (separate Q/K/V MatMuls) for the graphs it knows (TorchScript BERT).
   SkipLayerNormalization, BiasGelu/FastGelu and EmbedLayerNormalization are off (measured below;
   EmbedLayerNormalization would also hide the embedding Gathers, which are bfc sites).
3. **Residual Add -> Sum** before each LayerNormalization (``block_skip_layernorm``): onnxruntime's
   session optimizer fuses Add + LayerNormalization into SkipLayerNormalization at load whatever the
   file holds, and that CPU kernel is slower than what it replaces; a two-input Sum computes the same
   sum and is not matched.

Measured (1 thread, onnxruntime 1.32, shared 2-core Intel Xeon; ``python bench/bench_fuse.py``, latest
run in bench/results/fuse.md), MiniLM-L6 torch.export, 294 -> 148 nodes; the quietest of five runs:

    ms (vs unfused)        1x128            32x128
    fp32 unfused           26.16            930.2
    fp32 fused             22.15 (1.18x)    776.9 (1.20x)
    int8 dyn. unfused      12.30            484.4
    int8 dyn. fused         8.04 (1.53x)    331.5 (1.46x)
    int8 MHA only          10.44 (1.18x)    395.8 (1.22x)    (block_skip=False)
    int8 MHA packed bias    8.09 (1.52x)    345.7 (1.40x)    (packed_bias=True)

Over five runs (four on a loaded machine, load average 3-7 on the 2 cores) int8 dynamic fused/unfused
was 1.40-1.53x at 1x128 and 1.42-1.55x at 32x128; fp32 1.07-1.19x at 1x128 and 1.04-1.40x at 32x128
(noisy); packed_bias within noise of the default.  fp32 outputs agree to 4e-7 relative.  Kernel timings behind the choices (one op, 1 thread):
SkipLayerNormalization 220 us against Add + Add + LayerNormalization 39 us at 1x128x384 (6.9 ms
against 1.85 ms at 4096x384); BiasGelu 162 us against Add + Gelu 136 us and Gelu alone 109 us at
128x1536 (int8 dynamic folds a MatMul's bias into MatMulIntegerToFloat for free, leaving Gelu alone);
the int8 profile at 1x128 goes from 2.97 ms of SkipLayerNormalization to 0.58 ms of Sum +
LayerNormalization, and attention (Transpose, Mul, Where, IsNaN, Softmax, two MatMuls: ~3.5 ms) to
2.3 ms of MultiHeadAttention.  FastGelu (tanh approximation) changes the outputs and is not used.

Biases: bfc folds a Gemm's C into its rewritten layer (passes/rewrite.py) but leaves a MatMul's bias
Add as a node after it; so the Adds stay (MHA's packed bias input is optional, ``packed_bias``: 18
fewer nodes, no faster), Gemm + C is kept as is, and nothing needs SkipLayerNormalization to absorb
the output projections' biases.
"""
from __future__ import annotations

import contextlib
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper, shape_inference

from bfc.passes.model_io.stream import graphs, materialize, node_subgraphs
from bfc.passes.products import LoadedModel

MS_DOMAIN = "com.microsoft"
MODEL_TYPES = ("bert",)
# ops a fusion creates (counted in FuseResult.fusions)
FUSED_OPS = ("MultiHeadAttention", "Attention", "SkipLayerNormalization", "LayerNormalization", "Gelu",
             "BiasGelu", "FastGelu", "EmbedLayerNormalization", "SimplifiedLayerNormalization",
             "SkipSimplifiedLayerNormalization")
_ONNX = ("", "ai.onnx")
_MAX_PROTO = 2_000_000_000          # protobuf's 2 GiB limit (the optimizer serializes the model)
FUSE_MAX_BYTES = 1 << 30            # the fuse stage reads the weights into memory: only below 1 GB


@dataclass(frozen=True)
class FuseResult:
    """The fused model (or the input model itself when nothing was fused), the fusions applied as
    (op created, count) pairs, and a one-line note for the report."""
    model: onnx.ModelProto
    fusions: tuple[tuple[str, int], ...] = ()
    note: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.fusions)


# ---------------------------------------------------------------- recognition

def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constants(graph) -> dict[str, onnx.TensorProto]:
    out = {i.name: i for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.domain in _ONNX:
            t = _attr(n, "value")
            if isinstance(t, onnx.TensorProto):
                out[n.output[0]] = t
    return out


def _softmax_feeds_matmul(graph, softmax, consumers) -> bool:
    """Softmax(scores) @ V: the Softmax output reaches a MatMul's first input through at most a NaN
    guard (Where(IsNaN)), Cast or Dropout."""
    frontier, seen = [softmax.output[0]], set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        for c in consumers.get(t, ()):
            if c.op_type == "MatMul" and c.input[0] == t:
                return True
            if c.op_type in ("Where", "IsNaN", "Cast", "Dropout") and len(seen) < 8:
                frontier.extend(o for o in c.output[:1])
    return False


def recognize(model: onnx.ModelProto) -> str | None:
    """``"bert"`` for a BERT-like encoder (onnxruntime's optimizer model type), else None.

    Conservative: the main graph must hold (1) layer normalization (LayerNormalization or a
    ReduceMean/Sqrt decomposition, or onnxruntime's fused forms), (2) softmax attention (a Softmax
    whose output is the first input of a MatMul), (3) GELU (Gelu op, Erf, or the tanh approximation)
    and (4) at least four MatMul/Gemm layers with a constant 2-D weight."""
    g = model.graph
    ops = Counter(n.op_type for n in g.node)
    norm = (ops["LayerNormalization"] or ops["SkipLayerNormalization"]
            or (ops["ReduceMean"] >= 2 and ops["Sqrt"] >= 1))
    gelu = ops["Gelu"] or ops["Erf"] or ops["BiasGelu"] or ops["FastGelu"] or (ops["Tanh"] and ops["Pow"])
    consumers = defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)
    attention = ops["MultiHeadAttention"] or ops["Attention"] or any(
        _softmax_feeds_matmul(g, n, consumers) for n in g.node if n.op_type == "Softmax")
    consts = _constants(g)
    weights = sum(1 for n in g.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1
                  and n.input[1] in consts and len(consts[n.input[1]].dims) == 2)
    return "bert" if norm and gelu and attention and weights >= 4 else None


# ---------------------------------------------------------------- SDPA -> MultiHeadAttention

class _Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.prod = {o: n for n in self.g.node for o in n.output if o}
        self.consts = _constants(self.g)
        self.cons = defaultdict(list)
        for n in self.g.node:
            for i in n.input:
                self.cons[i].append(n)
        inferred = shape_inference.infer_shapes(model, data_prop=True)
        self.info = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)
                     + list(inferred.graph.output)}

    def node(self, name, op):
        n = self.prod.get(name)
        return n if n is not None and n.op_type == op and n.domain in _ONNX else None

    def const(self, name):
        t = self.consts.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def dims(self, name):
        """Inferred dims of a tensor (int, dim_param name, or None each), or None when unknown."""
        v = self.info.get(name)
        if v is None or not v.type.tensor_type.HasField("shape"):
            return None
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in v.type.tensor_type.shape.dim]

    def elem(self, name):
        v = self.info.get(name)
        return v.type.tensor_type.elem_type if v is not None else None


def _same(a, b) -> bool:
    """Two inferred dims are the same: equal ints, or the same dim_param (onnx's shape inference names an
    unknown dim once, ``unk__N``, and propagates that name: equal names are equal values)."""
    return a is not None and b is not None and a == b


def _fits(b, full, one: bool) -> bool:
    """Bias dim ``b`` against the scores' dim ``full``: equal, 1 (when ``one``), or unknown to inference
    (a name) while not provably different."""
    if b is None:
        return False
    if b == full or (one and b == 1):
        return True
    return not isinstance(b, int)


def _strip_scale(G: _Graph, t):
    """t = x * c or x / c with a scalar constant c: (x, c or 1/c); else (t, 1.0)."""
    for op in ("Mul", "Div"):
        n = G.node(t, op)
        if n is None:
            continue
        for i in (1, 0) if op == "Mul" else (1,):
            c = G.const(n.input[i])
            if c is not None and c.size == 1 and np.issubdtype(c.dtype, np.floating) and c.item() != 0:
                return n.input[1 - i], (float(c.item()) if op == "Mul" else 1.0 / float(c.item()))
    return t, 1.0


def _heads(G: _Graph, t, perm=(0, 2, 1, 3)):
    """t = Transpose(perm)(Reshape(x3)) with x3 [b, s, H*d] and the reshape [b, s, H, d] (inferred):
    (x3, H, d), else None."""
    tr = G.node(t, "Transpose")
    if tr is None or list(_attr(tr, "perm", [])) != list(perm):
        return None
    return _heads_from_reshape(G, tr)


def _shape_entries(G: _Graph, name):
    """A 1-D int64 shape tensor as a list of ints and ("dim", tensor, axis) entries, or None."""
    c = G.const(name)
    if c is not None:
        return [int(v) for v in np.atleast_1d(c)] if c.ndim <= 1 else None
    n = G.prod.get(name)
    if n is None or n.domain not in _ONNX:
        return None
    if n.op_type == "Shape":
        dims = G.dims(n.input[0])
        if dims is None:
            return None
        r = len(dims)
        start, end = _attr(n, "start", 0), _attr(n, "end", r)
        start, end = (max(0, min(r, v + r if v < 0 else v)) for v in (start, end))
        return [("dim", n.input[0], i) for i in range(start, end)]
    if n.op_type == "Concat" and _attr(n, "axis", 0) in (0, -1):
        out = []
        for i in n.input:
            e = _shape_entries(G, i)
            if e is None:
                return None
            out += e
        return out
    if n.op_type == "Slice" and len(n.input) >= 3:
        data = _shape_entries(G, n.input[0])
        starts, ends = G.const(n.input[1]), G.const(n.input[2])
        axes = G.const(n.input[3]) if len(n.input) > 3 and n.input[3] else np.array([0])
        steps = G.const(n.input[4]) if len(n.input) > 4 and n.input[4] else np.array([1])
        if data is None or starts is None or ends is None or axes is None or steps is None:
            return None
        if starts.size != 1 or ends.size != 1 or int(np.ravel(axes)[0]) not in (0, -1) or int(np.ravel(steps)[0]) != 1:
            return None
        r = len(data)
        s, e = int(starts.ravel()[0]), int(ends.ravel()[0])
        s, e = (max(0, min(r, v + r if v < 0 else v)) for v in (s, e))
        return data[s:e]
    if n.op_type == "Gather" and _attr(n, "axis", 0) == 0:
        data, idx = _shape_entries(G, n.input[0]), G.const(n.input[1])
        if data is None or idx is None or idx.ndim > 1:
            return None
        return [data[int(i)] for i in np.atleast_1d(idx)]
    if n.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return _shape_entries(G, n.input[0])
    return None


def _entry_is(G: _Graph, e, t, axis) -> bool:
    """Shape entry e is dimension ``axis`` of tensor t."""
    dt = G.dims(t)
    if isinstance(e, int):
        return dt is not None and isinstance(dt[axis], int) and dt[axis] == e
    _, src, i = e
    if src == t and i == axis:
        return True
    ds = G.dims(src)
    return ds is not None and dt is not None and i < len(ds) and _same(ds[i], dt[axis])


def _k_heads(G: _Graph, t):
    """t = K^T [b, H, d, L] computed from x3 [b, L, H*d]: (x3, H, d), else None. Forms:
    Transpose(0,2,3,1)(Reshape(x3)); Transpose(0,1,3,2)(heads); and the swap written as
    Reshape([-1, L, d]) -> Transpose(0,2,1) -> Reshape([b, H, d, L]) over heads (torch.export)."""
    tr = G.node(t, "Transpose")
    if tr is not None:
        perm = list(_attr(tr, "perm", []))
        if perm == [0, 2, 3, 1]:
            tr2 = helper.make_node("Transpose", [tr.input[0]], [t], perm=[0, 2, 1, 3])
            return _heads_from_reshape(G, tr2)
        if perm == [0, 1, 3, 2]:
            return _heads(G, tr.input[0])
        return None
    r2 = G.node(t, "Reshape")
    if r2 is None:
        return None
    t2 = G.node(r2.input[0], "Transpose")
    if t2 is None or list(_attr(t2, "perm", [])) != [0, 2, 1]:
        return None
    r1 = G.node(t2.input[0], "Reshape")
    if r1 is None:
        return None
    kh = r1.input[0]
    s1, s2 = _shape_entries(G, r1.input[1]), _shape_entries(G, r2.input[1])
    if s1 is None or s2 is None or len(s1) != 3 or len(s2) != 4 or s1[0] != -1:
        return None
    if not (_entry_is(G, s1[1], kh, 2) and _entry_is(G, s1[2], kh, 3)):
        return None
    if not all(_entry_is(G, e, kh, a) for e, a in zip(s2, (0, 1, 3, 2))):
        return None
    return _heads(G, kh)


def _heads_from_reshape(G: _Graph, tr):
    """(x3, H, d) when tr.input[0] = Reshape(x3 [b, s, H*d]) to [b, s, H, d] (inferred dims), else None; the
    Transpose ``tr`` itself is not checked (``_heads`` checks it; callers may pass one not in the graph)."""
    rs = G.node(tr.input[0], "Reshape")
    if rs is None:
        return None
    x3, d4, d3 = rs.input[0], G.dims(rs.output[0]), G.dims(rs.input[0])
    if d4 is None or d3 is None or len(d4) != 4 or len(d3) != 3:
        return None
    h, d, width = d4[2], d4[3], d3[2]
    if not all(isinstance(v, int) and v > 0 for v in (h, d, width)) or h * d != width:
        return None
    return (x3, h, d) if _same(d4[0], d3[0]) and _same(d4[1], d3[1]) else None


def _match_sdpa(G: _Graph, pv):
    """Softmax attention ending in MatMul ``pv`` (probs @ V), followed by Transpose(0,2,1,3) and a
    Reshape to [b, s, H*d]: a dict describing the MultiHeadAttention that replaces it, else None."""
    if pv.op_type != "MatMul" or pv.domain not in _ONNX:
        return None
    p = pv.input[0]
    w = G.node(p, "Where")
    if w is not None:                        # NaN guard: Where(IsNaN(s), 0, s)
        isn = G.node(w.input[0], "IsNaN")
        zero = G.const(w.input[1])
        if isn is None or isn.input[0] != w.input[2] or zero is None or zero.size != 1 or zero.item() != 0:
            return None
        p = w.input[2]
    sm = G.node(p, "Softmax")
    if sm is None or _attr(sm, "axis", -1) not in (-1, 3):
        return None
    s, bias = sm.input[0], None
    add = G.node(s, "Add")
    if add is not None:
        for i in (0, 1):
            x, _ = _strip_scale(G, add.input[i])
            if G.node(x, "MatMul") is not None and G.const(add.input[1 - i]) is None:
                s, bias = add.input[i], add.input[1 - i]
                break
        else:
            return None
    s, scale = _strip_scale(G, s)
    qk = G.node(s, "MatMul")
    if qk is None:
        return None
    qa, cq = _strip_scale(G, qk.input[0])
    kb, ck = _strip_scale(G, qk.input[1])
    q, k, v = _heads(G, qa), _k_heads(G, kb), _heads(G, pv.input[1])
    if q is None or k is None or v is None:
        return None
    (q3, h, d), (k3, hk, dk), (v3, hv, dv) = q, k, v
    if not (h == hk == hv and d == dk == dv):
        return None
    outs = G.cons.get(pv.output[0], [])
    if len(outs) != 1 or outs[0].op_type != "Transpose" or list(_attr(outs[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    rs = G.cons.get(outs[0].output[0], [])
    if len(rs) != 1 or rs[0].op_type != "Reshape" or rs[0].input[0] != outs[0].output[0]:
        return None
    out = rs[0].output[0]
    dq, dkv, dvv, do = G.dims(q3), G.dims(k3), G.dims(v3), G.dims(out)
    if any(x is None or len(x) != 3 for x in (dq, dkv, dvv, do)):
        return None
    if not (_same(dq[0], dkv[0]) and _same(dq[0], dvv[0]) and _same(dkv[1], dvv[1])
            and _same(do[0], dq[0]) and _same(do[1], dq[1]) and do[2] == h * d):
        return None
    if any(G.elem(x) != onnx.TensorProto.FLOAT for x in (q3, k3, v3)):
        return None
    if bias is not None:                     # attention_bias: (b or 1, H or 1, s, L), float
        db = G.dims(bias)
        if db is None or len(db) != 4 or G.elem(bias) != onnx.TensorProto.FLOAT:
            return None
        # the Add broadcasts the bias over the scores (b, H, s, L): each dim is 1 or the scores' dim.
        # A dim inference cannot name is taken as the scores' (MHA checks it at run time, so a wrong
        # guess fails loudly); a known dim must fit: L must not broadcast (MHA has no such form).
        if not (_fits(db[0], dq[0], one=True) and (db[1] in (1, h) or not isinstance(db[1], int))
                and _fits(db[2], dq[1], one=True) and _fits(db[3], dkv[1], one=False)):
            return None
        expand = db[2] == 1 and dq[1] != 1      # MHA wants the bias's query axis in full: Expand it
    return {"q": q3, "k": k3, "v": v3, "bias": bias, "heads": h, "scale": scale * cq * ck,
            "out": out, "reshape": rs[0], "name": pv.name or out, "expand": bias is not None and expand,
            "seq": dq[1]}


def _prune(graph, keep_outputs) -> None:
    """Drop nodes none of whose outputs is used (repeatedly), then unused initializers."""
    while True:
        used = set(keep_outputs)
        for n in graph.node:
            used.update(n.input)
            for sg in node_subgraphs(n):
                used.update(_outer_names(sg))
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        ids = {id(n) for n in dead}
        keep = [n for n in graph.node if id(n) not in ids]
        del graph.node[:]
        graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in used]
    if len(inits) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(inits)


def _outer_names(g) -> set[str]:
    """Every name read by a node of ``g`` or of a graph nested in it."""
    return {x for sg in graphs(g) for n in sg.node for x in n.input}


def fuse_sdpa(model: onnx.ModelProto, packed_bias: bool = False) -> int:
    """Replace each softmax attention block (Q/K/V split into heads, scores, optional additive mask,
    Softmax, optional NaN guard, probs @ V, heads merged) by one com.microsoft MultiHeadAttention fed
    by the Q, K and V projections' outputs; the projections (MatMul + Add) stay.  In place; returns
    the number of blocks fused.  ``packed_bias``: the projections' bias Adds move into MHA's bias
    input (measured: no faster, and the int8 MatMuls fold their bias for free)."""
    G = _Graph(model)
    matches = [m for m in (_match_sdpa(G, n) for n in model.graph.node if n.op_type == "MatMul") if m]
    if not matches:
        return 0
    out_names = {o.name for o in model.graph.output}
    new_vi = []
    by_reshape = {id(m["reshape"]): m for m in matches}
    nodes, expanded = [], {}
    for n in model.graph.node:
        m = by_reshape.get(id(n))
        if m is None:
            nodes.append(n)
            continue
        ins, bias_in = [m["q"], m["k"], m["v"]], ""
        if packed_bias:
            ins, bias_in = _unbias(G, model, ins, m["name"]) or (ins, "")
        attn_bias = m["bias"] or ""
        if m["expand"]:                         # (b|1, H|1, 1, L) -> (b|1, H|1, s, L), once per mask and s
            key = (attn_bias, m["seq"])
            if key not in expanded:
                expanded[key] = _expand_bias(nodes, model, attn_bias, m["q"], len(expanded))
            attn_bias = expanded[key]
        inputs = ins + [bias_in, "", attn_bias]
        while inputs and not inputs[-1]:
            inputs.pop()
        nodes.append(helper.make_node("MultiHeadAttention", inputs, [m["out"]], name=f"fuse/MHA/{m['name']}",
                                      domain=MS_DOMAIN, num_heads=int(m["heads"]), scale=float(m["scale"])))
        if m["out"] in G.info and m["out"] not in out_names:
            new_vi.append(G.info[m["out"]])
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    have = {v.name for v in model.graph.value_info}
    model.graph.value_info.extend(v for v in new_vi if v.name not in have)
    _prune(model.graph, out_names)
    _ensure_ms_opset(model)
    return len(matches)


def _expand_bias(nodes, model, bias, q3, i) -> str:
    """Append nodes broadcasting ``bias`` (b, H, 1, L) over the query length of q3 (b, s, D)."""
    p = f"fuse/mask{i}"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([1, 1], np.int64), f"{p}_11"),
                                    numpy_helper.from_array(np.array([1], np.int64), f"{p}_1")])
    nodes.append(helper.make_node("Shape", [q3], [f"{p}_seq"], name=f"{p}_Shape", start=1, end=2))
    nodes.append(helper.make_node("Concat", [f"{p}_11", f"{p}_seq", f"{p}_1"], [f"{p}_shape"],
                                  name=f"{p}_Concat", axis=0))
    nodes.append(helper.make_node("Expand", [bias, f"{p}_shape"], [f"{p}_bias"], name=f"{p}_Expand"))
    return f"{p}_bias"


def block_skip_layernorm(model: onnx.ModelProto) -> int:
    """Write each residual Add feeding a LayerNormalization (both Add inputs computed, none constant)
    as the equivalent two-input Sum, so that onnxruntime's session optimizer does not fuse the pair
    into SkipLayerNormalization (4-5x slower than Add + LayerNormalization on the CPU provider,
    onnxruntime 1.32; see the module docstring).  In place; returns the number of Adds rewritten."""
    consts = _constants(model.graph)
    prod = {o: n for n in model.graph.node for o in n.output if o}
    k = 0
    for n in model.graph.node:
        if n.op_type != "LayerNormalization" or n.domain not in _ONNX:
            continue
        a = prod.get(n.input[0])
        if (a is not None and a.op_type == "Add" and a.domain in _ONNX and len(a.input) == 2
                and not any(i in consts for i in a.input)):
            a.op_type = "Sum"
            k += 1
    return k


def _unbias(G: _Graph, model, ins, name):
    """q/k/v = Add(MatMul, const bias (N,)) each: (MatMul outputs, packed bias name), else None."""
    mm, biases = [], []
    for t in ins:
        add = G.node(t, "Add")
        if add is None:
            return None
        for i in (0, 1):
            b = G.const(add.input[1 - i])
            if G.node(add.input[i], "MatMul") is not None and b is not None and b.ndim == 1:
                mm.append(add.input[i])
                biases.append(b.astype(np.float32))
                break
        else:
            return None
    bname = f"fuse/MHA/{name}/bias"
    model.graph.initializer.append(numpy_helper.from_array(np.concatenate(biases), bname))
    return mm, bname


def _ensure_ms_opset(model) -> None:
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


# ---------------------------------------------------------------- onnxruntime's optimizer

def fusion_options(model_type: str, layer_norm: bool = True):
    """FusionOptions for bfc: MultiHeadAttention (separate Q/K/V MatMuls, raw mask), LayerNormalization
    and Gelu fusion on; SkipLayerNormalization, BiasGelu and EmbedLayerNormalization off (see the
    module docstring for the measurements)."""
    from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
    o = FusionOptions(model_type)
    o.enable_attention = True
    o.use_multi_head_attention = True           # MatMuls for Q/K/V stay separate constant-weight MatMuls
    o.attention_mask_format = AttentionMaskFormat.AttentionMask
    o.enable_layer_norm = layer_norm
    o.enable_gelu = True
    o.enable_skip_layer_norm = False
    o.enable_bias_skip_layer_norm = False
    o.enable_bias_gelu = False
    o.enable_gelu_approximation = False
    o.enable_embed_layer_norm = False           # would hide the embedding Gathers (bfc sites)
    o.enable_rotary_embeddings = False
    o.enable_qordered_matmul = False
    return o


@contextlib.contextmanager
def _quiet():
    loggers = [logging.getLogger(n) for n in ("onnxruntime.transformers", "onnxruntime", "fusion_base",
                                              "onnx_model", "fusion_utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _ort_pass(model: onnx.ModelProto, model_type: str, layer_norm: bool) -> onnx.ModelProto:
    from onnxruntime.transformers.optimizer import optimize_model
    with _quiet():
        opt = optimize_model(model, model_type, num_heads=0, hidden_size=0,
                             optimization_options=fusion_options(model_type, layer_norm),
                             opt_level=0, use_gpu=False, only_onnxruntime=False)
    return opt.model


# ---------------------------------------------------------------- fuse

def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in _ONNX), 0)


def _io_signature(vis):
    return [(v.name, v.type.SerializeToString(deterministic=True)) for v in vis]


def _unchanged(model, note) -> FuseResult:
    return FuseResult(model, (), note)


def fuse(model: onnx.ModelProto, model_type: str | None, opset: int, *,
         attention: bool = True, ort_pass: bool = True, block_skip: bool = True,
         packed_bias: bool = False) -> FuseResult:
    """Fuse a recognized transformer (``model_type`` from ``recognize``) for onnxruntime's CPU provider.

    Runs bfc's SDPA -> MultiHeadAttention fusion (``attention``), then onnxruntime's transformer
    optimizer in pure-Python graph mode (opt_level=0, use_gpu=False, ``fusion_options``).  The
    input model is never changed (the work is on a copy); graph inputs and outputs keep their
    names, types and shapes; the default-domain opset and IR version are kept (``opset``, the
    opset bfc will save with, only limits which default-domain ops may be created: the
    LayerNormalization fusion needs 17).  Any failure, or no fusion at all, returns the input model
    itself with a note."""
    if model_type is None:
        return _unchanged(model, "not fused: no transformer encoder recognized")
    if model_type not in MODEL_TYPES:
        return _unchanged(model, f"not fused: model type {model_type!r} is not supported (only {MODEL_TYPES})")
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return _unchanged(model, "not fused: weights in external data files")
    try:
        if model.ByteSize() > _MAX_PROTO:
            return _unchanged(model, "not fused: model over 2 GB")
        work = onnx.ModelProto()
        work.CopyFrom(model)
        before = Counter((n.domain, n.op_type) for n in work.graph.node)
        min_opset = min(_default_opset(model), opset)
        fused_attention = fuse_sdpa(work, packed_bias) if attention else 0
        if ort_pass:
            work = _ort_pass(work, model_type, layer_norm=min_opset >= 17)
        blocked = block_skip_layernorm(work) if block_skip else 0
        _ensure_ms_opset(work)
        # inputs/outputs exactly as given (the optimizer may rewrite dims or drop value_info)
        if _io_signature(work.graph.input) != _io_signature(model.graph.input) or \
                [o.name for o in work.graph.output] != [o.name for o in model.graph.output]:
            return _unchanged(model, "not fused: the optimizer changed the graph inputs or outputs")
        del work.graph.output[:]
        work.graph.output.extend(model.graph.output)
        work.ir_version = model.ir_version
        for o in work.opset_import:
            if o.domain in _ONNX and o.version != _default_opset(model):
                return _unchanged(model, "not fused: the optimizer changed the opset")
        work.producer_name, work.producer_version = model.producer_name, model.producer_version
        after = Counter((n.domain, n.op_type) for n in work.graph.node)
        fusions = tuple((op, after[(d, op)] - before[(d, op)]) for (d, op) in sorted(after)
                        if op in FUSED_OPS and after[(d, op)] > before[(d, op)])
        fusions += (("Sum (residual Add, no SkipLayerNormalization)", blocked),) if blocked else ()
        if not fusions:
            return _unchanged(model, "not fused: no fusion pattern matched")
        _check_loads(work)
        n0, n1 = len(model.graph.node), len(work.graph.node)
        note = ("fused " + ", ".join(f"{c} {op}" for op, c in fusions)
                + f"; {n0} -> {n1} nodes")
        if attention and not fused_attention and not any(op == "MultiHeadAttention" for op, _ in fusions):
            note += "; attention not fused (pattern not matched)"
        return FuseResult(work, fusions, note)
    except Exception as e:                    # noqa: BLE001 - the optimizer is third-party: never crash
        return _unchanged(model, f"not fused: onnxruntime's transformer optimizer failed "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def _check_loads(model) -> None:
    """The fused model must load in onnxruntime (no graph optimization: the graph as written)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def fuse_stage(loaded: LoadedModel, enabled: bool | None, target_name: str) -> LoadedModel:
    """The pipeline's fuse stage: ``enabled`` True, or None (the default) on a recognized transformer for a
    target that runs in onnxruntime (ort, custom-op: the fused ops are com.microsoft's).  The fused
    model holds its weights in memory (read in from the input's files; up to ``FUSE_MAX_BYTES``); the
    input's files are untouched and verification compares with them."""
    if enabled is False or (enabled is None and target_name == "portable") or loaded.nbytes > FUSE_MAX_BYTES:
        return loaded
    kind = recognize(loaded.model)
    if kind is None:
        return loaded
    model = loaded.model if loaded.base is None else materialize(loaded.model, loaded.base)
    res = fuse(model, kind, loaded.opset)
    if not res.changed:
        return replace(loaded, notes=loaded.notes + (res.note,)) if enabled else loaded
    return replace(loaded, model=res.model, base=None, upgraded=True, notes=loaded.notes + (res.note,))
