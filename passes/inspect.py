"""Inspect: every site of a model and what a Monarch (block rank 1, int8) layer would gain.

Matches: the sites of ``find_sites`` (eligible or not).
Ensures: one row per site: layer, shape, dense params, the Monarch-r1 int8 size, the
byte gain, the Monarch-r1 relative weight error ||W - W_hat||_F / ||W||_F (fp32 factors),
or the reason the site cannot be rewritten.  Nothing is written.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import BfcError
from bfc.factorize import chain_for, factorize
from bfc.passes.find_sites import find_sites
from bfc.passes.load import as_model


def _fmt(n: float) -> str:
    """Decimal SI prefixes (k = 1000, M = 10^6, G = 10^9), as every size bfc prints; "B" appended for bytes."""
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return str(int(n))


def inspect_model(model_or_path):
    """(rows, summary line) for ``bfc inspect``."""
    graph = gs.import_onnx(as_model(model_or_path))
    rows, before, after = [], 0, 0
    for s in find_sites(graph):
        shape = "x".join(map(str, s.shape)) or "-"
        if not s.eligible:
            rows.append((s.name, shape, _fmt(s.weight.size) if s.weight is not None else "-", "-", "-", "-", s.reason))
            continue
        m, n = s.shape
        dense_bytes = s.weight.nbytes
        try:
            chain = chain_for("monarch", m, n, 1)
        except BfcError as e:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-", f"no Monarch at this shape ({e})"))
            continue
        if chain.nnz >= m * n:
            rows.append((s.name, shape, _fmt(m * n), "-", "-", "-", "too small for a Monarch to be cheaper"))
            continue
        f = factorize(s.weight.astype(np.float64), chain)
        q_bytes = chain.nnz + 4 * sum(p.a * p.d * p.c for p in chain)
        before += dense_bytes
        after += q_bytes
        note = f"{len(s.nodes)} nodes share the weight" if len(s.nodes) > 1 else ""
        rows.append((s.name, shape, _fmt(m * n), f"{_fmt(chain.nnz)} params, {_fmt(q_bytes)}B",
                     f"{dense_bytes / q_bytes:.1f}x", f"{f.rel_error:.3f}", note))
    n_ok = sum(1 for r in rows if r[4] != "-")
    summary = (f"{len(rows)} sites, {n_ok} could be rewritten; their weights {_fmt(before)}B -> {_fmt(after)}B "
               "as Monarch r1 int8 (bfc optimize picks structure and precision per layer from the error budget)")
    return rows, summary
