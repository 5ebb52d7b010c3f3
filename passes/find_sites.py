"""Find the layers bfc can rewrite (sites) and give every other candidate a reason.

Matches, in the main graph:
  * ``MatMul(x, W)`` with ``W`` a constant 2-D tensor (initializer or ``Constant`` node)
    and ``x`` of any rank ``[..., K]``:  ``y = x @ W``.
  * ``Gemm(A, B, C)`` with constant 2-D ``B``:
    ``y = alpha * op(A) @ op(B) + beta * C``, ``op`` = transpose when transA/transB;
    the site weight is ``W = B^T`` if transB else ``B`` (so again ``y = alpha * x @ W + ...``),
    and ``C`` (any broadcastable bias, constant or not) is kept.
Nodes that share one weight (same tensor, same transB) form one *group*: the weight
is factorized once and every node of the group is rewritten with the same factors.
MatMul/Gemm nodes inside If/Loop/Scan subgraphs, with a non-constant weight, a weight
on the first input, integer types, or a name marking them as bfc's own layers are
reported with the reason they are not rewritten (nothing is skipped silently).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import ModelError

BFC_PREFIX = "bfc/"      # names of nodes and tensors bfc creates; such layers are never re-factorized
FLOAT_TYPES = (np.float32, np.float16)


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


def node_key(node: gs.Node) -> str:
    """A node's name, or ``op:first-output`` for unnamed nodes (output names are unique)."""
    return node.name or f"{node.op}:{node.outputs[0].name}"


@dataclass
class Site:
    """A group of nodes sharing one constant weight W (y = x @ W, W of shape (K, N))."""
    weight_name: str
    weight: np.ndarray | None
    nodes: list[SiteNode] = field(default_factory=list)
    reason: str | None = None     # why it cannot be rewritten (None: eligible)
    subgraph: str | None = None

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
    """numpy value of a constant tensor (initializer or Constant node output), else None."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    if len(t.inputs) == 1 and t.inputs[0].op == "Constant":
        v = t.inputs[0].attrs.get("value")
        if isinstance(v, gs.Constant):
            return np.asarray(v.values)
    return None


def _subgraphs(node):
    for v in node.attrs.values():
        if isinstance(v, gs.Graph):
            yield v


def _candidate(node, graph_label, in_main):
    """(key, SiteNode, weight, reason) for a MatMul/Gemm node, or None."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return None
    name = node_key(node)
    x, wt = node.inputs[0], node.inputs[1]
    a = node.attrs
    sn = SiteNode(name, node.op, float(a.get("alpha", 1.0)), float(a.get("beta", 1.0)),
                  bool(a.get("transA", 0)), len(x.shape) if x.shape is not None else None, x.name, node)
    trans_b = bool(a.get("transB", 0)) if node.op == "Gemm" else False
    w = _constant_value(wt)
    reason = None
    if name.startswith(BFC_PREFIX):
        reason = "already a bfc layer (not re-factorized)"
    elif w is None:
        reason = ("weight is on the first input (bfc rewrites x @ W with a constant W)"
                  if _constant_value(x) is not None else "weight is computed at run time, not a constant")
    elif w.ndim != 2:
        reason = f"weight {wt.name} has rank {w.ndim}; bfc rewrites 2-D weights only"
    elif w.dtype not in FLOAT_TYPES:
        reason = f"weight {wt.name} has type {w.dtype}; bfc rewrites float32/float16 layers only"
    elif not in_main:
        reason = f"inside the {graph_label} subgraph; reported only, not rewritten"
    elif node.op == "MatMul" and x.shape is not None and len(x.shape) < 1:
        reason = "input is a scalar"
    if w is not None and w.ndim == 2 and reason is None:
        if not np.isfinite(w).all():
            raise ModelError(f"weight {wt.name} of node {name} contains NaN or Inf values; "
                             "fix the model (e.g. re-export from a finite checkpoint)")
        w = w.T if trans_b else w
    key = (wt.name, trans_b) if reason is None else (f"{name}#skip", False)
    return key, sn, w, reason


def find_sites(graph: gs.Graph) -> list[Site]:
    """Sites of the main graph (eligible or not) and, reported only, those of subgraphs."""
    sites: dict = {}

    def visit(g, label, in_main):
        for node in g.nodes:
            for sub in _subgraphs(node):
                visit(sub, f"{node.op} {node.name or ''}".strip(), False)
            cand = _candidate(node, label, in_main)
            if cand is None:
                continue
            key, sn, w, reason = cand
            if key not in sites:
                sites[key] = Site(key[0], w if w is not None and w.ndim == 2 else None,
                                  reason=reason, subgraph=None if in_main else label)
            sites[key].nodes.append(sn)

    visit(graph, "main", True)
    return list(sites.values())
