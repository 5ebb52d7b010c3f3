"""Seeded generator of real-shaped ONNX models for the fuzz test (tests/test_fuzz_models.py).

``make_case(seed) -> Case``: one model built with onnx.helper from a fixed integer seed, with
what the test needs to feed it on its own (``Case.feeds(seed)``), independently of bfc's
``random_feeds``.

Families (drawn per seed):
  mlp          float input [B, D] or [B, S, D]; 2-4 MatMul+bias or Gemm layers (64..384 wide),
               Relu / Gelu (Erf form, or the Gelu op at opset >= 20) / Tanh / Sigmoid,
               LayerNormalization (expanded into ReduceMean/Sub/Pow/Sqrt/Div below opset 17)
  transformer  ids [B, S] (int64) -> Gather table (500x64 .. 2000x128) [+ token types], 1-2 blocks
               of multi-head Softmax attention (Q/K/V/O MatMuls, Reshape/Transpose heads, an
               additive mask from attention_mask [B, 1, 1, S] float or int64: the same dim names
               across inputs of rank 2 and 4), residuals, LayerNorm, a Gelu/Relu FFN, mean pooling
               and a Gemm classifier
  rnn          LSTM or GRU with initial-state graph inputs (h0, c0 for LSTM) whose dims are named
               like the op's X ("batch"), named unrelatedly ("unk__N"), or fixed, fed by a
               Gather embedding (ids) or a float [S, B, E] input through a MatMul projection;
               a MatMul head on Y_h
  if           a MatMul before an If whose two branches each hold a MatMul (weights in the branch's
               own initializers or the outer scope), on a bool input or a data-derived condition
  loop         a Loop (trip count 2-3) whose body holds a MatMul + bias + Relu on the carried state

Every model has several graph outputs: the main float output (declared with symbolic dims,
unknown dims -- a dim without value or param --, or no shape at all), an intermediate float
output with unknown dims, a rank-0 float output declared with an empty ``shape {}``
(ReduceSumSquare of an activation: positive and far from 0, so that its relative error means
something), and sometimes an int64 ArgMax.  Opsets 7..21 (the ops used are picked to exist at
that opset); IR version at least the opset's minimum; some models keep their initializers in the
graph inputs (old exporters), some are saved with external data, and a few have an input
of type string (bfc cannot generate it: nothing may be rewritten).

Weights: Gaussian N(0, 1/fan_in), or U diag(s) V^T with a decaying spectrum s_k = (k+1)^-alpha
(alpha 0.5..2, trained-layer-like, compressible), scaled to the same output scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

WIDTHS = (64, 96, 128, 192, 256, 320, 384)
BATCH, SEQ = 2, 8          # the sizes of the logical dims B and S in the test's own feeds


@dataclass
class InputSpec:
    name: str
    elem: int                          # TensorProto element type
    dims: list                         # logical dims: "B", "S", or ints
    kind: str                          # float | ids | mask | bool | string | const (a fixed value)
    bound: int = 0                     # ids: rows of the table they index
    value: object = None               # const


@dataclass
class Case:
    seed: int
    family: str
    opset: int
    model: onnx.ModelProto
    inputs: list[InputSpec]
    external: bool = False
    generatable: bool = True           # False: an input bfc cannot generate (no declared shape)
    notes: list[str] = field(default_factory=list)

    def feeds(self, seed: int) -> dict:
        """The test's own inputs: B=2, S=8; floats standard normal; ids uniform in the table's
        rows; masks and bools ones (the rules bfc's generated inputs follow, other values)."""
        rng = np.random.default_rng(seed)
        out = {}
        for s in self.inputs:
            shape = [BATCH if d == "B" else SEQ if d == "S" else d for d in s.dims]
            dt = onnx.helper.tensor_dtype_to_np_dtype(s.elem)
            if s.kind == "float":
                out[s.name] = rng.standard_normal(shape).astype(dt)
            elif s.kind == "ids":
                out[s.name] = rng.integers(0, s.bound, shape).astype(dt)
            elif s.kind == "string":
                out[s.name] = np.array(["fuzz"] * int(np.prod(shape)), object).reshape(shape)
            elif s.kind in ("mask", "bool"):
                out[s.name] = np.ones(shape, dt)
            else:
                out[s.name] = np.asarray(s.value, dt)
        return out


class _G:
    """Node/initializer accumulator with unique names."""

    def __init__(self, rng, opset):
        self.rng, self.opset = rng, opset
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, p):
        self.n += 1
        return f"{p}_{self.n}"

    def init(self, arr, p="c"):
        n = self.name(p)
        self.inits.append(nh.from_array(np.asarray(arr), n))
        return n

    def op(self, op_type, ins, n_out=1, p=None, **attrs):
        outs = [self.name(p or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(h.make_node(op_type, ins, outs, name=self.name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    # -- building blocks ------------------------------------------------------------------------
    def weight(self, din, dout, p="W"):
        return self.init(make_weight(self.rng, din, dout), p)

    def linear(self, x, din, dout, two_d=False, bias=True):
        """MatMul (+ Add bias), or a Gemm (transB either way) when x is 2-D."""
        if two_d and self.rng.random() < 0.5:
            w = make_weight(self.rng, din, dout)
            trans_b = int(self.rng.random() < 0.5)
            wn = self.init(w.T.copy() if trans_b else w, "W")
            ins = [x, wn] + ([self.init(bias_vec(self.rng, dout), "b")] if bias else [])
            return self.op("Gemm", ins, transB=trans_b, p="gemm")
        y = self.op("MatMul", [x, self.weight(din, dout)], p="mm")
        return self.op("Add", [y, self.init(bias_vec(self.rng, dout), "b")]) if bias else y

    def act(self, x, kind=None):
        kind = kind or self.rng.choice(["relu", "gelu", "tanh", "sigmoid"] if self.opset >= 9 else
                                       ["relu", "tanh", "sigmoid"])
        if kind == "gelu" and self.opset < 9:
            kind = "relu"
        if kind == "relu":
            return self.op("Relu", [x])
        if kind == "tanh":
            return self.op("Tanh", [x])
        if kind == "sigmoid":
            return self.op("Sigmoid", [x])
        if self.opset >= 20 and self.rng.random() < 0.5:
            return self.op("Gelu", [x])
        e = self.op("Erf", [self.op("Div", [x, self.init(np.float32(np.sqrt(2.0)))])])
        half = self.op("Mul", [x, self.init(np.float32(0.5))])
        return self.op("Mul", [half, self.op("Add", [e, self.init(np.float32(1.0))])])

    def layernorm(self, x, d):
        gamma = self.init((1 + 0.1 * self.rng.standard_normal(d)).astype(np.float32), "ln_g")
        beta = self.init((0.1 * self.rng.standard_normal(d)).astype(np.float32), "ln_b")
        if self.opset >= 17:
            return self.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)
        mean = self.op("ReduceMean", [x], axes=[-1], keepdims=1)
        xc = self.op("Sub", [x, mean])
        var = self.op("ReduceMean", [self.op("Mul", [xc, xc])], axes=[-1], keepdims=1)
        std = self.op("Sqrt", [self.op("Add", [var, self.init(np.float32(1e-5))])])
        return self.op("Add", [self.op("Mul", [self.op("Div", [xc, std]), gamma]), beta])

    def reduce_all(self, op_type, x):
        """Reduce over every axis to a rank-0 tensor (keepdims=0, no axes: all of them)."""
        return self.op(op_type, [x], keepdims=0)

    def reduce_axis(self, op_type, x, axis, keepdims):
        if self.opset >= 18 or (op_type == "ReduceSum" and self.opset >= 13):
            return self.op(op_type, [x, self.init(np.array([axis], np.int64), "axes")], keepdims=keepdims)
        return self.op(op_type, [x], axes=[axis], keepdims=keepdims)


def make_weight(rng, din, dout) -> np.ndarray:
    if rng.random() < 0.5:
        return (rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32)
    k = min(din, dout)
    alpha = rng.choice([0.5, 1.0, 1.5, 2.0])
    u, _ = np.linalg.qr(rng.standard_normal((din, k)))
    v, _ = np.linalg.qr(rng.standard_normal((dout, k)))
    s = (np.arange(1, k + 1) ** -alpha)
    s *= np.sqrt(dout / np.sum(s ** 2)) * np.sqrt(k / din)     # about the Gaussian layer's output scale
    return ((u * s) @ v.T).astype(np.float32)


def bias_vec(rng, d):
    return (0.1 * rng.standard_normal(d)).astype(np.float32)


def _dim(rng, sym, names, allow_unknown=True):
    """How a logical dim is declared: its shared name, an unknown dim (None), or a fixed size."""
    if isinstance(sym, int):
        return sym
    r = rng.random()
    if allow_unknown and r < 0.15:
        return None
    return names[sym]


def _outputs(g, rng, main, main_dims, hidden, hidden_rank, argmax_axis=None):
    """Graph outputs: main (symbolic / unknown / no shape), hidden (unknown dims), a rank-0 scalar
    (declared shape {}), and sometimes an int64 ArgMax of main."""
    r = rng.random()
    if r < 0.5:
        decl = main_dims
    elif r < 0.8:
        decl = [None if isinstance(d, str) else d for d in main_dims]
    else:
        decl = None
    outs = [h.make_tensor_value_info(main, T.FLOAT, decl)]
    extra = []
    if hidden is not None:
        outs.append(h.make_tensor_value_info(hidden, T.FLOAT, [None] * hidden_rank))
    sq = g.reduce_all("ReduceSumSquare", hidden if hidden is not None else main)
    outs.append(h.make_tensor_value_info(sq, T.FLOAT, []))
    if argmax_axis is not None and rng.random() < 0.5:
        am = g.op("ArgMax", [main], axis=argmax_axis, keepdims=0, p="argmax")
        extra.append(h.make_tensor_value_info(am, T.INT64, main_dims[:argmax_axis]))
    return outs + extra


def _mlp(g, rng, names):
    rank3 = rng.random() < 0.4
    lg = ["B", "S"] if rank3 else ["B"]
    din = int(rng.choice(WIDTHS))
    spec = InputSpec("x", T.FLOAT, lg + [din], "float")
    decl = [_dim(rng, d, names) for d in lg] + [din]
    x, d = "x", din
    hidden = None
    depth = int(rng.integers(2, 5))
    for i in range(depth):
        dout = int(rng.choice(WIDTHS)) if i < depth - 1 else int(rng.choice([64, 96, 128]))
        x = g.linear(x, d, dout, two_d=not rank3)
        d = dout
        if i < depth - 1:
            x = g.act(x)
            if rng.random() < 0.3:
                x = g.layernorm(x, d)
            if i == 0:
                hidden = x
    main = g.op("Identity", [x], p="logits")
    main_dims = [names[s] for s in lg] + [d]
    outs = _outputs(g, rng, main, main_dims, hidden, len(lg) + 1, argmax_axis=len(lg))
    return [h.make_tensor_value_info("x", T.FLOAT, decl)], [spec], outs


def _attention(g, rng, x, d, heads, mask_bias):
    dh = d // heads
    q, k, v = (g.linear(x, d, d) for _ in range(3))
    shp = g.init(np.array([0, 0, heads, dh], np.int64), "shape")
    q = g.op("Transpose", [g.op("Reshape", [q, shp])], perm=[0, 2, 1, 3])
    kt = g.op("Transpose", [g.op("Reshape", [k, shp])], perm=[0, 2, 3, 1])
    v = g.op("Transpose", [g.op("Reshape", [v, shp])], perm=[0, 2, 1, 3])
    s = g.op("Mul", [g.op("MatMul", [q, kt]), g.init(np.float32(1 / np.sqrt(dh)))])
    p = g.op("Softmax", [g.op("Add", [s, mask_bias])], axis=3)
    o = g.op("Transpose", [g.op("MatMul", [p, v])], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.init(np.array([0, 0, d], np.int64), "shape")])
    return g.linear(o, d, d)


def _transformer(g, rng, names):
    vocab = int(rng.integers(500, 2001))
    d = int(rng.choice([64, 96, 128]))
    heads = int(rng.choice([2, 4]))
    table = g.init((0.5 * rng.standard_normal((vocab, d))).astype(np.float32), "emb")
    specs = [InputSpec("input_ids", T.INT64, ["B", "S"], "ids", bound=vocab)]
    ins = [h.make_tensor_value_info("input_ids", T.INT64, [names["B"], names["S"]])]
    x = g.op("Gather", [table, "input_ids"], p="emb_out")
    if rng.random() < 0.4:
        tt = g.init((0.5 * rng.standard_normal((2, d))).astype(np.float32), "tok_type")
        specs.append(InputSpec("token_type_ids", T.INT64, ["B", "S"], "ids", bound=2))
        ins.append(h.make_tensor_value_info("token_type_ids", T.INT64, [names["B"], names["S"]]))
        x = g.op("Add", [x, g.op("Gather", [tt, "token_type_ids"])])
    x = g.layernorm(x, d)
    mask_t = T.INT64 if rng.random() < 0.5 else T.FLOAT
    specs.append(InputSpec("attention_mask", mask_t, ["B", 1, 1, "S"], "mask"))
    ins.append(h.make_tensor_value_info("attention_mask", mask_t, [names["B"], 1, 1, names["S"]]))
    m = "attention_mask" if mask_t == T.FLOAT else g.op("Cast", ["attention_mask"], to=T.FLOAT)
    mask_bias = g.op("Mul", [g.op("Sub", [g.init(np.float32(1.0)), m]), g.init(np.float32(-1e4))])
    hidden = None
    for _ in range(int(rng.integers(1, 3))):
        x = g.layernorm(g.op("Add", [x, _attention(g, rng, x, d, heads, mask_bias)]), d)
        f = int(rng.choice([128, 192, 256, 384]))
        ff = g.linear(g.act(g.linear(x, d, f), "gelu" if rng.random() < 0.7 else "relu"), f, d)
        x = g.layernorm(g.op("Add", [x, ff]), d)
        hidden = hidden or x
    pooled = g.reduce_axis("ReduceMean", x, 1, keepdims=0)          # [B, d]
    c = int(rng.choice([64, 96]))
    logits = g.op("Identity", [g.linear(pooled, d, c, two_d=True)], p="logits")
    outs = _outputs(g, rng, logits, [names["B"], c], hidden, 3, argmax_axis=1)
    return ins, specs, outs


def _rnn(g, rng, names):
    op = str(rng.choice(["LSTM", "GRU"]))
    gates = 4 if op == "LSTM" else 3
    hid = int(rng.choice([64, 96, 128]))
    specs, ins = [], []
    if rng.random() < 0.5:
        vocab = int(rng.integers(500, 2001))
        e = int(rng.choice([64, 128]))
        table = g.init((0.5 * rng.standard_normal((vocab, e))).astype(np.float32), "emb")
        specs.append(InputSpec("tokens", T.INT64, ["B", "S"], "ids", bound=vocab))
        ins.append(h.make_tensor_value_info("tokens", T.INT64, [names["B"], names["S"]]))
        x = g.op("Transpose", [g.op("Gather", [table, "tokens"])], perm=[1, 0, 2])      # [S, B, e]
    else:
        e0 = int(rng.choice([64, 128, 192]))
        specs.append(InputSpec("x", T.FLOAT, ["S", "B", e0], "float"))
        ins.append(h.make_tensor_value_info("x", T.FLOAT, [names["S"], names["B"], e0]))
        e = int(rng.choice([64, 128]))
        x = g.act(g.linear("x", e0, e), "tanh")
    w = g.init((rng.standard_normal((1, gates * hid, e)) / np.sqrt(e)).astype(np.float32), "W")
    r = g.init((rng.standard_normal((1, gates * hid, hid)) / np.sqrt(hid)).astype(np.float32), "R")
    b = g.init((0.1 * rng.standard_normal((1, 2 * gates * hid))).astype(np.float32), "B")
    style = rng.choice(["shared", "unrelated", "fixed"])
    state = {"shared": ["num_dir", names["B"], "hidden"], "unrelated": ["unk__1", "unk__2", "unk__3"],
             "fixed": [1, names["B"], hid]}[style]
    rnn_in = [x, w, r, b, "", "h0"]
    specs.append(InputSpec("h0", T.FLOAT, [1, "B", hid], "float"))
    ins.append(h.make_tensor_value_info("h0", T.FLOAT, state))
    if op == "LSTM":
        rnn_in.append("c0")
        specs.append(InputSpec("c0", T.FLOAT, [1, "B", hid], "float"))
        ins.append(h.make_tensor_value_info("c0", T.FLOAT, state))
    y, yh = g.op(op, rnn_in, n_out=2, hidden_size=hid)
    last = g.op("Reshape", [yh, g.init(np.array([-1, hid], np.int64), "shape")])            # [B, hid]
    c = int(rng.choice([64, 96]))
    logits = g.op("Identity", [g.linear(g.act(g.linear(last, hid, hid, two_d=True), "relu"), hid, c,
                                        two_d=True)], p="logits")
    outs = _outputs(g, rng, logits, [names["B"], c], y, 4, argmax_axis=1)
    return ins, specs, outs


def _branch(g, rng, x, d, name, act):
    """A subgraph computing act(x @ W + b), its weights inside the subgraph or in the outer scope."""
    sub = _G(rng, g.opset)
    sub.n = g.n + 1000 * (1 + (name == "else"))
    w, b = make_weight(rng, d, d), bias_vec(rng, d)
    if rng.random() < 0.5:
        wn, bn = sub.init(w, "W"), sub.init(b, "b")
    else:
        wn, bn = g.init(w, "W"), g.init(b, "b")
    y = sub.act(sub.op("Add", [sub.op("MatMul", [x, wn]), bn]), act)
    out = sub.op("Identity", [y], p=name + "_out")
    return h.make_graph(sub.nodes, name, [], [h.make_tensor_value_info(out, T.FLOAT, None)], sub.inits)


def _if(g, rng, names):
    d = int(rng.choice([64, 128, 192, 256]))
    din = int(rng.choice(WIDTHS))
    specs = [InputSpec("x", T.FLOAT, ["B", din], "float")]
    ins = [h.make_tensor_value_info("x", T.FLOAT, [_dim(rng, "B", names), din])]
    x0 = g.act(g.linear("x", din, d, two_d=True), "relu")
    if rng.random() < 0.5:
        specs.append(InputSpec("use_branch", T.BOOL, [], "bool"))
        ins.append(h.make_tensor_value_info("use_branch", T.BOOL, []))
        cond = "use_branch"
    else:            # data-derived, always true: sum of squares of a non-zero activation > 0
        cond = g.op("Greater", [g.reduce_all("ReduceSumSquare", x0), g.init(np.float32(0.0))])
    y = g.op("If", [cond], then_branch=_branch(g, rng, x0, d, "then", "relu"),
             else_branch=_branch(g, rng, x0, d, "else", "tanh"), p="if_out")
    c = int(rng.choice([64, 96]))
    logits = g.op("Identity", [g.linear(y, d, c, two_d=True)], p="logits")
    outs = _outputs(g, rng, logits, [names["B"], c], x0, 2, argmax_axis=1)
    return ins, specs, outs


def _loop(g, rng, names):
    d = int(rng.choice([64, 128, 192]))
    din = int(rng.choice(WIDTHS))
    specs = [InputSpec("x", T.FLOAT, ["B", din], "float")]
    ins = [h.make_tensor_value_info("x", T.FLOAT, [_dim(rng, "B", names), din])]
    x0 = g.act(g.linear("x", din, d, two_d=True), "tanh")
    body = _G(rng, g.opset)
    body.n = g.n + 1000
    w = 0.7 * make_weight(rng, d, d)
    wn = body.init(w, "W") if rng.random() < 0.5 else g.init(w, "W")
    hn = body.op("Tanh", [body.op("Add", [body.op("MatMul", ["h_in", wn]), body.init(bias_vec(rng, d), "b")])])
    body.nodes.append(h.make_node("Identity", ["cond_in"], ["cond_out"]))
    graph = h.make_graph(body.nodes, "body",
                         [h.make_tensor_value_info("iter", T.INT64, []), h.make_tensor_value_info("cond_in", T.BOOL, []),
                          h.make_tensor_value_info("h_in", T.FLOAT, None)],
                         [h.make_tensor_value_info("cond_out", T.BOOL, []), h.make_tensor_value_info(hn, T.FLOAT, None)],
                         body.inits)
    trip = g.init(np.array(int(rng.integers(2, 4)), np.int64), "trip")
    cond = g.init(np.array(True), "cond")
    y = g.op("Loop", [trip, cond, x0], body=graph, p="loop_out")
    c = int(rng.choice([64, 96]))
    logits = g.op("Identity", [g.linear(y, d, c, two_d=True)], p="logits")
    outs = _outputs(g, rng, logits, [names["B"], c], x0, 2, argmax_axis=1)
    return ins, specs, outs


FAMILIES = {"mlp": _mlp, "transformer": _transformer, "rnn": _rnn, "if": _if, "loop": _loop}
WEIGHTS = {"mlp": 3, "transformer": 3, "rnn": 2, "if": 1, "loop": 1}


def make_case(seed: int) -> Case:
    """The model of ``seed`` (retries the draw when onnx.checker rejects a combination)."""
    for attempt in range(20):
        rng = np.random.default_rng([seed, attempt])
        opset = int(rng.integers(7, 22))
        fams = list(FAMILIES)
        p = np.array([WEIGHTS[f] for f in fams], float)
        family = str(rng.choice(fams, p=p / p.sum()))
        names = {"B": str(rng.choice(["batch", "batch_size", "N"])),
                 "S": str(rng.choice(["sequence", "seq_len", "S"]))}
        g = _G(rng, opset)
        ins, specs, outs = FAMILIES[family](g, rng, names)
        generatable = True
        notes = []
        if family == "mlp" and rng.random() < 0.1:
            # a string input (passed through to a string output): bfc cannot generate it, and onnx.checker
            # rejects the other such form (a graph input without a shape)
            ins.append(h.make_tensor_value_info("tag", T.STRING, [1]))
            specs.append(InputSpec("tag", T.STRING, [1], "string"))
            tag = g.op("Identity", ["tag"], p="tag_out")
            outs.append(h.make_tensor_value_info(tag, T.STRING, [1]))
            generatable = False
            notes.append("string input")
        graph_inputs = list(ins)
        if rng.random() < 0.15:                              # initializers listed as graph inputs (IR < 4 style)
            graph_inputs += [h.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.inits]
            notes.append("initializers in graph inputs")
        graph = h.make_graph(g.nodes, f"fuzz_{family}_{seed}", graph_inputs, outs, g.inits)
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="bfc-fuzz")
        model.ir_version = max(h.find_min_ir_version_for([h.make_opsetid("", opset)]), int(rng.choice([4, 6, 7, 8])))
        try:
            onnx.checker.check_model(model, full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            notes.append(f"attempt {attempt} rejected: {str(e).splitlines()[0][:120]}")
            continue
        external = bool(rng.random() < 0.25)
        return Case(seed, family, opset, model, specs, external, generatable, notes)
    raise RuntimeError(f"seed {seed}: no draw passed onnx.checker")


def save(case: Case, path) -> list:
    """Write the model (with external data for some cases); returns the files written."""
    path = str(path)
    if case.external:
        onnx.save_model(case.model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.rsplit("/", 1)[-1] + ".data", size_threshold=0)
        return [path, path + ".data"]
    onnx.save_model(case.model, path)
    return [path]
