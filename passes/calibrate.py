"""Calibrate: collect each site's input statistics by running the original model in onnxruntime.

Requires: sites.  Ensures: calibration (``state.stats``).  Not in place (the model is
left as it was: the extra outputs are added for the session only).
Matches: eligible sites (their first input tensor ``x``; for Gemm with transA, x^T), main
graph nodes only: onnxruntime cannot return the activations of an If/Loop/Scan body, so
sites inside one are planned with the weight error (their note says so).
Ensures: ``stats[weight_name]`` is a ``LayerStats`` over every node sharing the weight:
  * ``gram``: the (K, K) Gram matrix X^T X (float32 storage, accumulated in float64) of
    the rows x (at most ``rows``, a seeded subsample) that the layer ``y = x @ W`` sees;
    the float output error of a candidate is ||X (W - W_hat)||^2 = tr(E^T X^T X E);
  * ``sample``: up to SAMPLE_ROWS of those rows (seeded), on which the planner measures
    targets whose numerics are not a float product (the custom op's per-row int8
    activation quantization).
The inputs run CHUNK samples at a time, so memory stays bounded for long calibration sets.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bfc.passes.contract import Contract, GraphPass, PassResult
from bfc.passes.find_sites import Site
from bfc.passes.session import run, session

CHUNK = 4           # samples per onnxruntime run while collecting activations
SAMPLE_ROWS = 512   # activation rows kept per site for target-exact error measurements


@dataclass(frozen=True)
class LayerStats:
    gram: np.ndarray       # (K, K) X^T X
    sample: np.ndarray     # (n <= SAMPLE_ROWS, K) float32 rows of X


class Calibrate(GraphPass):
    contract = Contract.of(requires={"sites"}, ensures={"calibration"})

    def run(self, state) -> PassResult:
        cfg = state.config
        if state.feeds is not None and any(s.eligible for s in state.sites):
            state.stats = collect(state.model, state.sites, state.feeds, cfg.calibration_rows, cfg.seed)
        return PassResult(changed=False)


def _fixed_first_dims(model: onnx.ModelProto) -> set[str]:
    """Inputs whose axis 0 is a fixed size (not a batch axis: e.g. x in y = W @ x)."""
    out = set()
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim if i.type.tensor_type.HasField("shape") else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            out.add(i.name)
    return out


def _chunks(feeds: dict, fixed=frozenset()) -> list[dict]:
    """Split the feeds along axis 0 when every input shares that batch axis (and none declares a
    fixed size there); else one run."""
    sizes = {v.shape[0] if np.ndim(v) else None for v in feeds.values()}
    if len(sizes) != 1 or None in sizes or fixed & set(feeds):
        return [feeds]
    n = sizes.pop()
    return [{k: v[i:i + CHUNK] for k, v in feeds.items()} for i in range(0, n, CHUNK)]


def collect(model: onnx.ModelProto, sites: list[Site], feeds: dict, rows: int = 8192, seed: int = 0) -> dict:
    """``{weight_name: LayerStats}`` for the eligible sites."""
    wanted = {}
    for s in sites:
        if s.eligible:
            for sn in s.nodes:
                if getattr(sn, "scope", None) is not None:
                    continue               # inside a subgraph: onnxruntime cannot return its activations
                wanted.setdefault(sn.input, []).append((s, sn))   # Q, K, V share an input
    names = list(wanted)
    if not names:
        return {}
    existing = {o.name for o in model.graph.output}
    added = [n for n in names if n not in existing]
    outputs = model.graph.output
    for n in added:                # the outputs are removed again below: no copy of the weights
        outputs.append(onnx.ValueInfoProto(name=n))
    try:
        sess = session(model, threads=0, arena=False)
    finally:
        for _ in added:
            del outputs[len(outputs) - 1]
    grams: dict = {}
    samples: dict = {}
    chunks = _chunks(feeds, _fixed_first_dims(model))
    per_chunk = max(1, -(-rows // len(chunks)))     # rows per site and chunk (ceil): at most ~rows in all
    sample_per_chunk = max(1, -(-SAMPLE_ROWS // len(chunks)))
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
                    keep = v if v.shape[0] <= sample_per_chunk else v[np.sort(
                        rng.choice(v.shape[0], sample_per_chunk, replace=False))]
                    cache[sn.trans_a] = (v.T @ v, keep.astype(np.float32))
                g, keep = cache[sn.trans_a]
                if s.weight_name in grams:
                    grams[s.weight_name] += g
                else:
                    grams[s.weight_name] = g.copy()
                samples.setdefault(s.weight_name, []).append(keep)
    # float32 storage; plan works in float64
    return {k: LayerStats(g.astype(np.float32), np.concatenate(samples[k])[:SAMPLE_ROWS]) for k, g in grams.items()}
