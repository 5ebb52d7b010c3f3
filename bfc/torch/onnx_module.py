"""ONNX -> trainable torch: a small interpreter over an ONNX graph, in eager PyTorch.

``OnnxModule(model, overrides)`` runs the graph's nodes in topological order with torch
ops (one function per ONNX op in ``OPS``; the op set of transformer / MLP exports such as
MiniLM's dynamo export: MatMul, Gemm, elementwise math, Softmax, LayerNormalization,
Gelu, reductions, shape ops (Shape, Reshape, Slice, Concat, Gather, Expand, Range, ...)).
Shapes are concrete in eager mode, so the shape arithmetic of a dynamic export simply
runs.  Float initializers become buffers (frozen); ``overrides`` maps node keys (the node
name, or ``op:first-output`` for unnamed nodes, as ``bfc.passes.find_sites.node_key``)
to ``nn.Module``s that are called with the node's input tensors (None for absent inputs)
and return its output tensor(s): that is how bfc puts trainable KS layers in place of a
planned MatMul/Gemm while the rest of the graph stays the original.

An op outside ``OPS``, a subgraph (If/Loop/Scan) or a node of another domain is an
``UnsupportedError`` naming the op and the node, raised when the module is built; of the
com.microsoft domain ``OPS`` has what ``bfc.passes.fuse`` emits (MultiHeadAttention), so a fused
model trains as it runs.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn import functional as F

from bfc.errors import UnsupportedError

_DTYPES = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.FLOAT16: torch.float16,
           onnx.TensorProto.DOUBLE: torch.float64, onnx.TensorProto.BFLOAT16: torch.bfloat16,
           onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
           onnx.TensorProto.INT16: torch.int16, onnx.TensorProto.INT8: torch.int8,
           onnx.TensorProto.UINT8: torch.uint8, onnx.TensorProto.BOOL: torch.bool}


def node_key(node: onnx.NodeProto) -> str:
    """The node's name, or ``op:first-output`` (the same key as ``bfc.passes.find_sites.node_key``)."""
    return node.name or f"{node.op_type}:{node.output[0]}"


def _tensor(arr: np.ndarray) -> torch.Tensor:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf" or arr.dtype.itemsize > 8 or arr.dtype == np.uint16:
        raise UnsupportedError(f"constant of numpy type {arr.dtype} is not supported by the torch interpreter")
    return torch.from_numpy(np.array(arr, copy=True))


def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


def _is_int(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and t.dtype is not torch.bool


# ---- op implementations: f(inputs: list[Tensor|None], attrs: dict) -> Tensor | tuple ----------
def _binary(fn):
    return lambda x, a: fn(x[0], x[1])


def _div(x, a):
    if _is_int(x[0]) and _is_int(x[1]):
        return torch.div(x[0], x[1], rounding_mode="trunc")
    return x[0] / x[1]


def _pow(x, a):
    y = torch.pow(x[0], x[1])
    return y.to(x[0].dtype)


def _gemm(x, a):
    A, B = x[0], x[1]
    if a.get("transA", 0):
        A = A.t()
    if a.get("transB", 0):
        B = B.t()
    y = A @ B
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if len(x) > 2 and x[2] is not None:
        y = y + (x[2] * beta if beta != 1.0 else x[2])
    return y


def _softmax(x, a, log=False):
    axis = a.get("axis", -1)
    return F.log_softmax(x[0], dim=axis) if log else F.softmax(x[0], dim=axis)


def _multi_head_attention(x, a):
    """com.microsoft MultiHeadAttention as ``bfc.passes.fuse`` emits it: query (B, S, H d), key (B, L, H d),
    value (B, L, H dv), no packed bias or key padding mask, optional additive attention_bias broadcastable to
    (B, H, S, L):  out = merge_heads(softmax(Q K^T scale + bias) V), scale = attribute or 1/sqrt(d)."""
    if (len(x) > 3 and x[3] is not None) or (len(x) > 4 and x[4] is not None) or len(x) > 6 \
            or a.get("unidirectional", 0):
        raise UnsupportedError("the torch interpreter runs MultiHeadAttention with separate Q/K/V and an "
                               "attention_bias only (no packed bias, key padding mask, past state or causal mask)")
    q, k, v = x[0], x[1], x[2]
    h = int(a["num_heads"])
    b, s, _ = q.shape
    d = q.shape[-1] // h
    heads = [t.reshape(t.shape[0], t.shape[1], h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v)]
    scale = a.get("scale", 0.0) or 1.0 / float(np.sqrt(d))
    scores = torch.matmul(heads[0], heads[1].transpose(-1, -2)) * scale
    if len(x) > 5 and x[5] is not None:
        scores = scores + x[5]
    out = torch.matmul(torch.softmax(scores, dim=-1), heads[2])
    return out.transpose(1, 2).reshape(b, s, -1)


def _layer_norm(x, a):
    v = x[0]
    axis = _axis(a.get("axis", -1), v.dim())
    shape = tuple(v.shape[axis:])
    w = None if len(x) < 2 or x[1] is None else x[1].expand(shape)
    b = None if len(x) < 3 or x[2] is None else x[2].expand(shape)
    return F.layer_norm(v, shape, w, b, a.get("epsilon", 1e-5))


def _gelu(x, a):
    approx = a.get("approximate", b"none")
    approx = approx.decode() if isinstance(approx, bytes) else approx
    return F.gelu(x[0], approximate="tanh" if approx == "tanh" else "none")


def _reduce(fn):
    def run(x, a):
        v = x[0]
        if len(x) > 1 and x[1] is not None:
            axes = _ints(x[1])
        else:
            axes = list(a.get("axes", []))
        keep = bool(a.get("keepdims", 1))
        if not axes:
            if a.get("noop_with_empty_axes", 0):
                return v
            axes = list(range(v.dim()))
        return fn(v, [_axis(i, v.dim()) for i in axes], keep)
    return run


def _reduce_max(v, axes, keep):
    for ax in sorted(axes, reverse=True):
        v = v.amax(dim=ax, keepdim=keep)
    return v


def _reduce_min(v, axes, keep):
    for ax in sorted(axes, reverse=True):
        v = v.amin(dim=ax, keepdim=keep)
    return v


def _reshape(x, a):
    v, shape = x[0], _ints(x[1])
    if not a.get("allowzero", 0):
        shape = [v.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return v.reshape(shape)


def _transpose(x, a):
    perm = a.get("perm")
    return x[0].permute(*(perm if perm is not None else reversed(range(x[0].dim()))))


def _axes_arg(x, a):
    return _ints(x[1]) if len(x) > 1 and x[1] is not None else list(a.get("axes", []))


def _unsqueeze(x, a):
    v = x[0]
    axes = _axes_arg(x, a)
    rank = v.dim() + len(axes)
    for ax in sorted(_axis(i, rank) for i in axes):
        v = v.unsqueeze(ax)
    return v


def _squeeze(x, a):
    v = x[0]
    axes = _axes_arg(x, a)
    if not axes:
        return v.squeeze()
    for ax in sorted((_axis(i, v.dim()) for i in axes), reverse=True):
        v = v.squeeze(ax)
    return v


def _slice(x, a):
    v = x[0]
    starts, ends = _ints(x[1]), _ints(x[2])
    axes = _ints(x[3]) if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = _ints(x[4]) if len(x) > 4 and x[4] is not None else [1] * len(starts)
    for s, e, ax, st in zip(starts, ends, axes, steps):
        ax = _axis(ax, v.dim())
        n = v.shape[ax]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
        else:
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < 0 else e))
        idx = torch.arange(s, e, st, dtype=torch.int64)
        v = v.index_select(ax, idx) if st != 1 else v.narrow(ax, s, max(0, e - s))
    return v


def _gather(x, a):
    data, idx = x[0], x[1].to(torch.int64)
    ax = _axis(a.get("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[ax], idx)
    out = data.index_select(ax, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:ax]) + tuple(idx.shape) + tuple(data.shape[ax + 1:]))


def _gather_nd(x, a):
    data, idx = x[0], x[1].to(torch.int64)
    b = a.get("batch_dims", 0)
    if b:
        bshape = data.shape[:b]
        nb = int(np.prod(bshape)) if b else 1
        d = data.reshape((nb,) + tuple(data.shape[b:]))
        i = idx.reshape((nb,) + tuple(idx.shape[b:]))
        out = torch.stack([_gather_nd([d[j], i[j]], {}) for j in range(nb)])
        return out.reshape(tuple(bshape) + tuple(out.shape[1:]))
    k = idx.shape[-1]
    parts = tuple(torch.where(idx[..., j] < 0, idx[..., j] + data.shape[j], idx[..., j]) for j in range(k))
    return data[parts]


def _expand(x, a):
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(_ints(x[1])))
    return x[0].expand(shape)


def _concat(x, a):
    parts = [t for t in x if t is not None and t.numel() > 0] or [x[0]]
    return torch.cat(parts, dim=a["axis"])


def _split(x, a):
    v = x[0]
    ax = _axis(a.get("axis", 0), v.dim())
    if len(x) > 1 and x[1] is not None:
        sizes = _ints(x[1])
    elif "split" in a:
        sizes = list(a["split"])
    else:
        n = a.get("num_outputs", a.get("_n_outputs"))
        chunk = -(-v.shape[ax] // n)
        sizes = [min(chunk, v.shape[ax] - i * chunk) for i in range(n)]
    return tuple(torch.split(v, sizes, dim=ax))


def _cast(x, a):
    return x[0].to(_DTYPES[a["to"]])


def _clip(x, a):
    v = x[0]
    lo = x[1] if len(x) > 1 and x[1] is not None else a.get("min")
    hi = x[2] if len(x) > 2 and x[2] is not None else a.get("max")
    if lo is not None:
        v = torch.maximum(v, torch.as_tensor(lo, dtype=v.dtype))
    if hi is not None:
        v = torch.minimum(v, torch.as_tensor(hi, dtype=v.dtype))
    return v


def _where(x, a):
    return torch.where(x[0].to(torch.bool), x[1], x[2])


def _range(x, a):
    start, limit, delta = (t.item() for t in x[:3])
    return torch.arange(start, limit, delta, dtype=x[0].dtype)


def _constant_of_shape(x, a):
    value = a.get("value")
    fill = numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
    t = _tensor(fill).reshape(-1)
    return torch.full(tuple(_ints(x[0])), t[0].item(), dtype=t.dtype)


def _constant(x, a):
    for k in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if k in a:
            v = a[k]
            if k == "value":
                return _tensor(numpy_helper.to_array(v))
            dt = np.float32 if "float" in k else np.int64
            return _tensor(np.asarray(v, dt))
    raise UnsupportedError(f"Constant node with attributes {sorted(a)} is not supported by the torch interpreter")


def _variadic(fn):
    def run(x, a):
        out = x[0]
        for t in x[1:]:
            out = fn(out, t)
        return out
    return run


def _flatten(x, a):
    v = x[0]
    ax = _axis(a.get("axis", 1), v.dim())
    lead = int(np.prod(v.shape[:ax])) if ax else 1
    return v.reshape(lead, -1)


def _tile(x, a):
    return x[0].repeat(*_ints(x[1]))


def _dropout(x, a):
    return (x[0], torch.ones_like(x[0], dtype=torch.bool))


def _leaky_relu(x, a):
    return F.leaky_relu(x[0], a.get("alpha", 0.01))


def _shape(x, a):
    dims = list(x[0].shape)
    start, end = a.get("start", 0), a.get("end", len(dims))
    return torch.tensor(dims[start:end] if dims else [], dtype=torch.int64)


def _batch_norm(x, a):
    v, scale, bias, mean, var = x[:5]
    return F.batch_norm(v, mean, var, scale, bias, False, 0.0, a.get("epsilon", 1e-5))


def _einsum(x, a):
    eq = a["equation"]
    return torch.einsum(eq.decode() if isinstance(eq, bytes) else eq, *x)


def _trilu(x, a):
    k = int(x[1].item()) if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if a.get("upper", 1) else torch.tril(x[0], k)


def _cumsum(x, a):
    v, ax = x[0], int(x[1].item())
    if a.get("reverse", 0):
        v = v.flip(ax)
    y = torch.cumsum(v, ax)
    if a.get("exclusive", 0):
        y = y - v
    return y.flip(ax) if a.get("reverse", 0) else y


OPS = {
    "MatMul": _binary(torch.matmul), "Gemm": _gemm,
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
    "Pow": _pow, "Mod": lambda x, a: torch.fmod(x[0], x[1]) if a.get("fmod", 0) else torch.remainder(x[0], x[1]),
    "Sqrt": lambda x, a: torch.sqrt(x[0]), "Reciprocal": lambda x, a: torch.reciprocal(x[0]),
    "Exp": lambda x, a: torch.exp(x[0]), "Log": lambda x, a: torch.log(x[0]),
    "Abs": lambda x, a: torch.abs(x[0]), "Neg": lambda x, a: torch.neg(x[0]),
    "Floor": lambda x, a: torch.floor(x[0]), "Ceil": lambda x, a: torch.ceil(x[0]),
    "Round": lambda x, a: torch.round(x[0]), "Sign": lambda x, a: torch.sign(x[0]),
    "Erf": lambda x, a: torch.erf(x[0]), "Gelu": _gelu, "Tanh": lambda x, a: torch.tanh(x[0]),
    "Relu": lambda x, a: F.relu(x[0]), "Sigmoid": lambda x, a: torch.sigmoid(x[0]), "LeakyRelu": _leaky_relu,
    "Softplus": lambda x, a: F.softplus(x[0]), "Sin": lambda x, a: torch.sin(x[0]),
    "Cos": lambda x, a: torch.cos(x[0]),
    "Softmax": _softmax, "LogSoftmax": lambda x, a: _softmax(x, a, log=True),
    "LayerNormalization": _layer_norm, "BatchNormalization": _batch_norm,
    "ReduceMean": _reduce(lambda v, ax, k: v.mean(dim=ax, keepdim=k)),
    "ReduceSum": _reduce(lambda v, ax, k: v.sum(dim=ax, keepdim=k)),
    "ReduceMax": _reduce(_reduce_max), "ReduceMin": _reduce(_reduce_min),
    "ReduceProd": _reduce(lambda v, ax, k: _prod(v, ax, k)),
    "ReduceL2": _reduce(lambda v, ax, k: torch.sqrt((v * v).sum(dim=ax, keepdim=k))),
    "ReduceSumSquare": _reduce(lambda v, ax, k: (v * v).sum(dim=ax, keepdim=k)),
    "Reshape": _reshape, "Transpose": _transpose, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Concat": _concat, "Gather": _gather, "GatherND": _gather_nd, "Slice": _slice, "Shape": _shape,
    "Size": lambda x, a: torch.tensor(x[0].numel(), dtype=torch.int64),
    "Cast": _cast, "CastLike": lambda x, a: x[0].to(x[1].dtype), "Where": _where, "Expand": _expand,
    "ConstantOfShape": _constant_of_shape, "Constant": _constant, "Identity": lambda x, a: x[0],
    "Range": _range, "Split": _split, "Flatten": _flatten, "Tile": _tile, "Dropout": _dropout,
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Xor": _binary(torch.logical_xor),
    "Not": lambda x, a: torch.logical_not(x[0]),
    "IsNaN": lambda x, a: torch.isnan(x[0]), "IsInf": lambda x, a: torch.isinf(x[0]),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum), "Sum": _variadic(torch.add),
    "Mean": lambda x, a: _variadic(torch.add)(x, a) / len(x),
    "Clip": _clip, "Einsum": _einsum, "Trilu": _trilu, "CumSum": _cumsum,
    "com.microsoft.MultiHeadAttention": _multi_head_attention,
}


def _prod(v, axes, keep):
    for ax in sorted(axes, reverse=True):
        v = v.prod(dim=ax, keepdim=keep)
    return v


def op_name(node) -> str:
    """The ``OPS`` key of a node: its op type, prefixed by its domain outside the standard one."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def check_supported(model: onnx.ModelProto, overrides=()) -> None:
    """UnsupportedError naming the first ops the interpreter cannot run (outside ``overrides``)."""
    bad = {}
    for node in model.graph.node:
        if node_key(node) in overrides:
            continue
        op = op_name(node)
        if op not in OPS or any(
                at.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for at in node.attribute):
            bad.setdefault(op, node_key(node))
    if bad:
        ops = ", ".join(f"{op} (node {name!r})" for op, name in list(bad.items())[:5])
        raise UnsupportedError(f"the torch interpreter (bfc.torch.onnx_module) does not support op {ops}; "
                               "distillation needs a model made of the ops in bfc.torch.onnx_module.OPS "
                               "(no subgraphs; of the com.microsoft domain only what bfc's fusions emit)")


class OnnxModule(nn.Module):
    """An ONNX model as a torch module (see the module doc).

    ``forward(feeds, capture=(), force=None)`` takes ``{input name: tensor or array}`` and returns
    ``{name: tensor}`` for the graph outputs and every tensor named in ``capture``; ``force``
    ``{tensor name: tensor}`` replaces those tensors, once computed, by the given values in what
    the later nodes read (teacher forcing: the nodes between two forced tensors see the given input
    and nothing of the graph before it); ``capture`` still returns the computed values.
    """

    def __init__(self, model: onnx.ModelProto, overrides: dict[str, nn.Module] | None = None,
                 float_dtype: torch.dtype | None = None):
        super().__init__()
        overrides = dict(overrides or {})
        check_supported(model, overrides)
        g = model.graph
        self._nodes = [(node_key(n), op_name(n), list(n.input), list(n.output),
                        {a.name: helper.get_attribute_value(a) for a in n.attribute}) for n in g.node]
        for key, op, ins, outs, attrs in self._nodes:
            if op == "Split":
                attrs["_n_outputs"] = len(outs)
        self.input_names = [i.name for i in g.input if i.name not in {t.name for t in g.initializer}]
        self.output_names = [o.name for o in g.output]
        self._const_names: dict[str, str] = {}
        for i, t in enumerate(g.initializer):
            arr = numpy_helper.to_array(t)
            v = _tensor(arr)
            if float_dtype is not None and v.dtype.is_floating_point:
                v = v.to(float_dtype)
            buf = f"c{i}"
            self.register_buffer(buf, v, persistent=False)
            self._const_names[t.name] = buf
        self.layers = nn.ModuleDict()
        self._override: dict[str, str] = {}
        for j, (key, mod) in enumerate(overrides.items()):
            self.layers[f"l{j}"] = mod
            self._override[key] = f"l{j}"
        unknown = set(overrides) - {k for k, *_ in self._nodes}
        if unknown:
            raise UnsupportedError(f"overrides name nodes the model does not have: {sorted(unknown)[:5]}")
        self._last_use = {}
        for i, (_k, _op, ins, _outs, _a) in enumerate(self._nodes):
            for n in ins:
                self._last_use[n] = i

    def constant(self, name: str) -> torch.Tensor | None:
        buf = self._const_names.get(name)
        return None if buf is None else getattr(self, buf)

    def forward(self, feeds: dict, capture=(), force: dict | None = None) -> dict[str, torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        computed: dict[str, torch.Tensor] = {}
        force = force or {}
        for name in self.input_names:
            if name not in feeds:
                raise UnsupportedError(f"input {name!r} is missing from the feeds (have {sorted(feeds)})")
            v = feeds[name]
            env[name] = v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))
        keep = set(self.output_names) | set(capture)
        for i, (key, op, ins, outs, attrs) in enumerate(self._nodes):
            args = [None if n == "" else (env[n] if n in env else self.constant(n)) for n in ins]
            for n, v in zip(ins, args):
                if n and v is None:
                    raise UnsupportedError(f"node {key!r} ({op}) reads {n!r}, which no earlier node computes")
            layer = self._override.get(key)
            try:
                res = self.layers[layer](args) if layer is not None else OPS[op](args, attrs)
            except UnsupportedError:
                raise
            except (RuntimeError, IndexError, ValueError, TypeError, KeyError) as e:
                raise RuntimeError(f"torch interpreter: node {key!r} ({op}) failed: {e}") from e
            if not isinstance(res, (tuple, list)):
                res = (res,)
            for n, v in zip(outs, res):
                if n in force:
                    computed[n] = v
                    f = force[n]
                    v = f if isinstance(f, torch.Tensor) else torch.from_numpy(np.asarray(f))
                if n:
                    env[n] = v
            for n in ins:                     # free activations nobody reads any more
                if n in env and self._last_use.get(n) == i and n not in keep and n not in self.input_names:
                    del env[n]
        missing = [n for n in keep if n not in env]
        if missing:
            raise UnsupportedError(f"tensors {missing[:5]} are not computed by the graph")
        return {n: computed.get(n, env[n]) for n in list(self.output_names) + [c for c in capture
                                                                               if c not in self.output_names]}
