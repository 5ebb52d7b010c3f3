"""Collect each site's input activations by running the original model in onnxruntime.

Matches: eligible sites (their first input tensor ``x``; for Gemm with transA, x^T).
Ensures: ``activations[weight_name]`` is an (n, K) float64 array of at most
``rows`` rows (a seeded subsample over every node sharing the weight), the rows
that the layer ``y = x @ W`` sees; the model itself is not changed (outputs are
added to a copy).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from bfc.passes.find_sites import Site, find_node
from bfc.passes.session import run, session


def collect(model: onnx.ModelProto, graph: gs.Graph, sites: list[Site], feeds: dict,
            rows: int = 2048, seed: int = 0) -> dict:
    wanted = {}
    for s in sites:
        if s.eligible:
            for sn in s.nodes:
                node = find_node(graph, sn.name)
                wanted[node.inputs[0].name] = (s, sn)
    names = list(wanted)
    if not names:
        return {}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for n in names:
        if n not in existing:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    values = run(session(probe), feeds, names)
    rng = np.random.default_rng(seed)
    acts: dict = {}
    for n, v in zip(names, values):
        s, sn = wanted[n]
        v = np.asarray(v)
        v = v.T if sn.trans_a else v
        v = v.reshape(-1, v.shape[-1])
        if v.shape[0] > rows:
            v = v[np.sort(rng.choice(v.shape[0], rows, replace=False))]
        acts.setdefault(s.weight_name, []).append(v)
    out = {}
    for k, parts in acts.items():
        x = np.concatenate(parts)
        if x.shape[0] > rows:
            x = x[np.sort(rng.choice(x.shape[0], rows, replace=False))]
        out[k] = x.astype(np.float64)
    return out
