"""Collect each site's input activations by running the original model in onnxruntime.

Matches: eligible sites (their first input tensor ``x``; for Gemm with transA, x^T).
Ensures: ``grams[weight_name]`` is the (K, K) Gram matrix X^T X (float32 storage,
accumulated in float64) of the rows x (at most ``rows``, a seeded subsample) that the layer ``y = x @ W`` sees, over every
node sharing the weight; it is all the planner needs (output error
||X (W - W_hat)||^2 = tr(E^T X^T X E), activation scales diag(X^T X)).  The model is
left as it was (the extra outputs are added for the session only).  The inputs run
CHUNK samples at a time, so memory stays bounded for long calibration sets.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bfc.passes.find_sites import Site, find_node
from bfc.passes.session import run, session


CHUNK = 4      # samples per onnxruntime run while collecting activations


def _chunks(feeds: dict) -> list[dict]:
    """Split the feeds along axis 0 when every input shares that batch axis; else one run."""
    sizes = {v.shape[0] if np.ndim(v) else None for v in feeds.values()}
    if len(sizes) != 1 or None in sizes:
        return [feeds]
    n = sizes.pop()
    return [{k: v[i:i + CHUNK] for k, v in feeds.items()} for i in range(0, n, CHUNK)]


def collect(model: onnx.ModelProto, graph: gs.Graph, sites: list[Site], feeds: dict,
            rows: int = 8192, seed: int = 0) -> dict:
    wanted = {}
    for s in sites:
        if s.eligible:
            for sn in s.nodes:
                node = find_node(graph, sn.name)
                wanted.setdefault(node.inputs[0].name, []).append((s, sn))   # Q, K, V share an input
    names = list(wanted)
    if not names:
        return {}
    existing = {o.name for o in model.graph.output}
    added = [n for n in names if n not in existing]
    outputs = model.graph.output
    for n in added:                # the outputs are removed again below: no copy of the weights
        outputs.append(onnx.ValueInfoProto(name=n))
    try:
        sess = session(model, arena=False)
    finally:
        for _ in added:
            del outputs[len(outputs) - 1]
    grams: dict = {}
    chunks = _chunks(feeds)
    per_chunk = max(1, -(-rows // len(chunks)))     # rows per site and chunk (ceil): at most ~rows in all
    rng = np.random.default_rng(seed)
    for part in chunks:                      # bounded memory: one chunk's activations at a time
        for n, act in zip(names, run(sess, part, names)):
            cache = {}
            for s, sn in wanted[n]:
                if sn.trans_a not in cache:
                    v = np.asarray(act)
                    v = (v.T if sn.trans_a else v).reshape(-1, v.shape[-1] if not sn.trans_a else v.shape[0])
                    if v.shape[0] > per_chunk:
                        v = v[np.sort(rng.choice(v.shape[0], per_chunk, replace=False))]
                    v = v.astype(np.float64)
                    cache[sn.trans_a] = v.T @ v
                g = cache[sn.trans_a]
                if s.weight_name in grams:
                    grams[s.weight_name] += g
                else:
                    grams[s.weight_name] = g.copy()
    out = {k: g.astype(np.float32) for k, g in grams.items()}   # float32 storage; plan works in float64
    return out
