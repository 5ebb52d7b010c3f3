"""Find the layers bfc can rewrite (sites) and give every other candidate a reason.

Matches, in the main graph and in every If/Loop/Scan body (recursively):
  * ``MatMul(x, W)`` with ``W`` a constant 2-D tensor and ``x`` of any rank ``[..., K]``:
    ``y = x @ W``.  ``W`` is an initializer, a ``Constant`` node, an outer-scope constant
    (for a subgraph) or a chain of constant-only Identity/Transpose/Cast/Reshape/Flatten/
    Unsqueeze/Squeeze/DequantizeLinear/Mul/Div nodes over them, folded in numpy
    (``bfc.passes.normalize.fold_weight``).
  * ``MatMul(W, x)`` with constant 2-D ``W`` and 2-D ``x``:  ``y = W @ x = (x^T W^T)^T``,
    a site with weight ``W^T`` whose input and output are transposed (``trans_a``,
    ``trans_out``).  Other ranks of ``x`` are reported (the transposes would not be 2-D).
  * ``Gemm(A, B, C)`` with constant 2-D ``B``:
    ``y = alpha * op(A) @ op(B) + beta * C``, ``op`` = transpose when transA/transB;
    the site weight is ``W = B^T`` if transB else ``B`` (so again ``y = alpha * x @ W + ...``),
    and ``C`` (any broadcastable bias, constant or not) is kept.
  * ``Gather(T, indices)`` (axis 0) with ``T`` a constant 2-D float table: an embedding site (weight
    ``T``, shape (V, D)), rewritten with quantized rows by the allocator; other Gathers are not sites.
Nodes that share one weight form one *group*, keyed by the weight's source chain and
whether the site weight is its transpose: the weight is factorized once and every node
of the group (in any graph) is rewritten with the same factors.  Each ``SiteNode``
carries the graph it lives in, so the rewrite appends its nodes there.
Sites inside subgraphs are planned without calibration (onnxruntime cannot return a
subgraph's activations): their note says so.  Already-quantized layers (MatMulInteger,
MatMulNBits, QLinearMatMul, ...), non-constant weights, integer or bfloat16 types and
bfc's own layers are reported with the reason they are not rewritten (nothing is
skipped silently).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import ModelError
from bfc.passes.embedding_emit import gather_reason
from bfc.passes.fold import Folded, fold_weight
from bfc.passes.model_io.stream import LazyArray, graphs, import_graph, initializers

BFC_PREFIX = "bfc/"      # names of nodes and tensors bfc creates; such layers are never re-factorized
FLOAT_TYPES = (np.float32, np.float16)
QUANTIZED_OPS = ("MatMulInteger", "MatMulNBits", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
                 "QGemm", "MatMulBnb4", "MatMulFpQ4")
QUANTIZED_REASON = "already quantized (MatMulInteger/MatMulNBits); bfc does not re-factorize quantized layers"
NO_CALIBRATION = "planned without calibration (weight error): calibration sees main-graph activations only"


@dataclass
class SiteNode:
    name: str                     # node_key(node): the node's name, or op:first-output for unnamed nodes
    op: str                       # MatMul | Gemm
    alpha: float = 1.0
    beta: float = 1.0
    trans_a: bool = False
    in_rank: int | None = None
    input: str = ""               # name of the activation tensor x
    node: gs.Node | None = field(default=None, repr=False, compare=False)   # the graph node itself
    graph: gs.Graph | None = field(default=None, repr=False, compare=False)  # the graph holding the node
    scope: str | None = None      # None: main graph; else the subgraph's label ("If cond/then_branch")
    trans_out: bool = False       # y = W @ x: the layer computes y^T = x^T W^T, the output is transposed back


def node_key(node: gs.Node) -> str:
    """A node's name, or ``op:first-output`` for unnamed nodes (output names are unique)."""
    return node.name or f"{node.op}:{node.outputs[0].name}"


@dataclass
class Site:
    """A group of nodes sharing one constant weight W (y = x @ W, W of shape (K, N))."""
    weight_name: str
    weight: np.ndarray | None    # or a LazyArray (bfc.passes.model_io.stream): read from its file when planned
    nodes: list[SiteNode] = field(default_factory=list)
    reason: str | None = None     # why it cannot be rewritten (None: eligible)
    subgraph: str | None = None   # label of the subgraph of the first node (None: main graph)
    note: str | None = None       # how the weight was found (folded chain, dequantized, uncalibrated)

    @property
    def name(self) -> str:
        return self.nodes[0].name if self.nodes else self.weight_name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape) if self.weight is not None else ()

    @property
    def eligible(self) -> bool:
        return self.reason is None


def _constant_value(t):
    """numpy value of a constant tensor (initializer, Constant node output or folded chain), else None."""
    f = fold_weight(t)
    return None if f is None else f.value


def _subgraphs(node):
    for k, v in node.attrs.items():
        if isinstance(v, gs.Graph):
            yield k, v


def _fold_note(f: Folded, name: str) -> str | None:
    if not f.ops:
        return None
    src = ", ".join(f.sources) or "small constants"
    note = f"weight {name} folded from {src} through {' -> '.join(f.ops)}"
    if f.dequantized:
        note += ("; DequantizeLinear weight: its dequantized values are re-factorized (the quantized "
                 "storage is replaced by the factors)")
    return note


def _why_not(node, name, x, wt, w) -> str | None:
    """Why a MatMul/Gemm with weight value ``w`` (None: not constant) is not rewritten (None: it is)."""
    if name.startswith(BFC_PREFIX):
        return "already a bfc layer (not re-factorized)"
    if w is None:
        return ("weight is on the first input (bfc rewrites x @ W with a constant W)"
                if _constant_value(x) is not None else "weight is computed at run time, not a constant")
    if w.ndim != 2:
        return f"weight {wt.name} has rank {w.ndim}; bfc rewrites 2-D weights only"
    if w.dtype not in FLOAT_TYPES:
        return f"weight {wt.name} has type {w.dtype}; bfc rewrites float32/float16 layers only"
    if node.op == "MatMul" and x.shape is not None and len(x.shape) < 1:
        return "input is a scalar"
    return None


def _gather_candidate(node, graph, label, in_main):
    """(key, SiteNode, table, reason, note) for a Gather of a constant 2-D float table (an embedding), or
    None for other Gathers (shapes, small index tables)."""
    table = node.inputs[0] if node.inputs else None
    fw = fold_weight(table) if isinstance(table, gs.Constant) else None
    if fw is None or fw.value.ndim != 2 or fw.value.dtype not in FLOAT_TYPES:
        return None
    name = node_key(node)
    sn = SiteNode(name, "Gather", input=node.inputs[1].name if len(node.inputs) > 1 else "", node=node,
                  graph=graph, scope=None if in_main else label)
    reason = gather_reason(node)
    if reason is None and not (fw.value.all_finite() if isinstance(fw.value, LazyArray)
                               else np.isfinite(fw.value).all()):
        raise ModelError(f"embedding table {table.name} of node {name} contains NaN or Inf values; "
                         "fix the model (e.g. re-export from a finite checkpoint)")
    key = (fw.key, "gather") if reason is None else (f"{name}#skip", id(node))
    return key, sn, fw.value, reason, None


def _candidate(node, graph, label, in_main):
    """(key, SiteNode, weight, reason, note) for a MatMul/Gemm (or quantized matmul) node, a Gather of
    an embedding table, or None."""
    if node.op == "Gather":
        return _gather_candidate(node, graph, label, in_main)
    if node.op in QUANTIZED_OPS:
        name = node_key(node)
        reason = QUANTIZED_REASON if node.op in ("MatMulInteger", "MatMulNBits") else \
            f"already quantized ({node.op}); bfc does not re-factorize quantized layers"
        return (f"{name}#skip", id(node)), SiteNode(name, node.op, node=node, graph=graph,
                                                  scope=None if in_main else label), None, reason, None
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    name = node_key(node)
    x, wt = node.inputs[0], node.inputs[1]
    a = node.attrs
    sn = SiteNode(name, node.op, float(a.get("alpha", 1.0)), float(a.get("beta", 1.0)),
                  bool(a.get("transA", 0)), len(x.shape) if x.shape is not None else None, x.name, node,
                  graph, None if in_main else label)
    trans = bool(a.get("transB", 0)) if node.op == "Gemm" else False
    fw = fold_weight(wt)
    reason, notes = None, []
    if fw is None and node.op == "MatMul" and not name.startswith(BFC_PREFIX):
        fx = fold_weight(x)
        if fx is not None:                   # y = W @ x
            if fx.value.ndim == 2 and wt.shape is not None and len(wt.shape) == 2:
                sn.trans_a = sn.trans_out = True
                sn.input, sn.in_rank = wt.name, 2
                fw, wt, trans = fx, x, True
                notes.append("y = W @ x rewritten as (x^T W^T)^T")
            else:
                rank = "unknown" if wt.shape is None else len(wt.shape)
                reason = (f"weight is on the first input (y = W @ x) and x has rank {rank}; bfc rewrites "
                          "W @ x only for a 2-D W and a 2-D x")
    w = None if fw is None else fw.value
    reason = reason or _why_not(node, name, x, wt, w)
    if w is not None and w.ndim == 2 and reason is None:
        if not (w.all_finite() if isinstance(w, LazyArray) else np.isfinite(w).all()):
            raise ModelError(f"weight {wt.name} of node {name} contains NaN or Inf values; "
                             "fix the model (e.g. re-export from a finite checkpoint)")
        w = w.T if trans else w
        n = _fold_note(fw, wt.name)
        if n:
            notes.insert(0, n)
        if not in_main:
            notes.append(f"inside {label}: {NO_CALIBRATION}")
    key = (fw.key, trans) if reason is None else (f"{name}#skip", id(node))
    return key, sn, w, reason, "; ".join(notes) or None


def find_sites(graph: gs.Graph) -> list[Site]:
    """Sites of the main graph and of every subgraph (eligible or not, each with its reason)."""
    sites: dict = {}

    def visit(g, label, in_main):
        for node in g.nodes:
            for attr, sub in _subgraphs(node):
                visit(sub, f"{node.op} {node_key(node)}/{attr}", False)
            cand = _candidate(node, g, label, in_main)
            if cand is None:
                continue
            key, sn, w, reason, note = cand
            if key not in sites:
                wname = (node.inputs[0] if sn.trans_out or sn.op == "Gather" else node.inputs[1]).name \
                    if reason is None else key[0]
                sites[key] = Site(wname, w if w is not None and w.ndim == 2 else None,
                                  reason=reason, subgraph=None if in_main else label, note=note)
            elif reason is None and not in_main and NO_CALIBRATION not in (sites[key].note or ""):
                more = f"the nodes inside {label} add no calibration statistics (main-graph activations only)"
                sites[key].note = "; ".join(filter(None, [sites[key].note, more]))
            sites[key].nodes.append(sn)

    visit(graph, "main", True)
    out, used = list(sites.values()), set()
    for s in out:                # one statistics key per group (the same tensor may feed W and W^T groups)
        base, i = s.weight_name, 1
        while s.weight_name in used:
            i += 1
            s.weight_name = f"{base}#{i}"
        used.add(s.weight_name)
    return out


def other_constants(model, sites: list[Site], min_size: int) -> list[str]:
    """One line per initializer of at least ``min_size`` values that is no site's weight or table: what reads
    it and that bfc leaves it as stored (e.g. a rank-3 constant, a Conv kernel, a computed weight's source)."""
    used = {s.weight_name for s in sites if s.eligible}
    readers: dict = {}
    for g in graphs(model.graph):
        for node in g.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
    out = []
    for t in initializers(model):
        n = 1
        for d in t.dims:
            n *= d
        if n >= min_size and t.name not in used:
            ops = ", ".join(sorted(readers.get(t.name, {"no node"})))
            out.append(f"constant {t.name} {list(t.dims)} ({n} values) left as stored: read by {ops}, which bfc does "
                       "not rewrite (MatMul/Gemm weights and Gather tables only)")
    return out


def find_model_sites(model, base=None) -> list[Site]:
    """The sites of a model (a skeleton's weights stay in their files, ``base``: see ``stream``)."""
    return find_sites(import_graph(model, base))
