"""Inspect: every site of a model and what a Monarch (block rank 1, int8) layer would gain.

Matches: the sites of ``find_sites`` (eligible or not).
Ensures: one row per site: layer, shape, dense params, the Monarch-r1 int8 size, the
byte gain, the Monarch-r1 relative weight error ||W - W_hat||_F / ||W||_F (fp32 factors),
or the reason the site is not rewritten (not eligible, or fewer weights than ``min_size``, the
rule of ``bfc optimize``).  A weight's bytes are those the model stores it in (an int8
weight behind a DequantizeLinear: its int8 values, scales and zero points), not the float
value the layer computes with.  Nothing is written.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.config import OptimizeConfig
from bfc.errors import BfcError, ConfigError
from bfc.factorize import chain_for, factorize
from bfc.passes.find_sites import find_sites
from bfc.passes.load import as_model


def _fmt(n: float) -> str:
    """Decimal SI prefixes (k = 1000, M = 10^6, G = 10^9), as every size bfc prints; "B" appended for bytes."""
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return str(int(n))


def _stored_bytes(site) -> int:
    """Bytes of the constants the model computes ``site``'s weight from (its storage types), or the
    weight's own bytes when the chain cannot be followed."""
    sn = site.nodes[0] if site.nodes else None
    node = getattr(sn, "node", None)
    if node is None:
        return int(site.weight.nbytes)
    weights = [t for t in node.inputs[:2] if t.name != sn.input]
    if len(weights) != 1:
        return int(site.weight.nbytes)
    total, seen, todo = 0, set(), [weights[0]]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, gs.Constant):
            v = t.values
            total += int(v.nbytes if hasattr(v, "nbytes") else np.asarray(v).nbytes)
        elif len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
            v = t.inputs[0].attrs["value"]
            total += int(np.asarray(getattr(v, "values", v)).nbytes)
        elif len(t.inputs) == 1:
            todo.extend(i for i in t.inputs[0].inputs if i.name)
        else:
            return int(site.weight.nbytes)
    return total


def inspect_model(model_or_path, min_size: int | None = None):
    """(rows, summary line) for ``bfc inspect``; ``min_size`` (default: optimize's) as ``--min-size``."""
    if min_size is None:
        min_size = OptimizeConfig().min_size
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ConfigError(f"--min-size {min_size!r} must be a whole number >= 0")
    graph = gs.import_onnx(as_model(model_or_path))
    rows, before, after = [], 0, 0
    for s in find_sites(graph):
        shape = "x".join(map(str, s.shape)) or "-"
        if not s.eligible:
            rows.append((s.name, shape, _fmt(s.weight.size) if s.weight is not None else "-", "-", "-", "-", s.reason))
            continue
        m, n = s.shape
        if s.weight.size < min_size:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-",
                         f"too small ({s.weight.size} weights < min-size {min_size})"))
            continue
        dense_bytes = _stored_bytes(s)
        try:
            chain = chain_for("monarch", m, n, 1)
        except BfcError as e:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-", f"no Monarch at this shape ({e})"))
            continue
        if chain.nnz >= m * n:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-", "too small for a Monarch to be cheaper"))
            continue
        q_bytes = chain.nnz + 4 * sum(p.a * p.d * p.c for p in chain)
        if q_bytes >= dense_bytes:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-",
                         f"stored in {_fmt(dense_bytes)}B, no larger than a Monarch r1 int8 ({_fmt(q_bytes)}B)"))
            continue
        f = factorize(s.weight.astype(np.float64), chain)
        before += dense_bytes
        after += q_bytes
        note = f"{len(s.nodes)} nodes share the weight" if len(s.nodes) > 1 else ""
        rows.append((s.name, shape, _fmt(m * n), f"{_fmt(chain.nnz)} params, {_fmt(q_bytes)}B",
                     f"{dense_bytes / q_bytes:.1f}x", f"{f.rel_error:.3f}", note))
    n_ok = sum(1 for r in rows if r[4] != "-")
    summary = (f"{len(rows)} sites, {n_ok} could be rewritten; their weights {_fmt(before)}B (as stored) -> "
               f"{_fmt(after)}B as Monarch r1 int8 (bfc optimize picks structure and precision per layer from the "
               "error budget)")
    return rows, summary
