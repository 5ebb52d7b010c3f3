"""Calibrate: collect each site's input statistics by running the original model in onnxruntime.

``calibrate(loaded, sites, feeds, cfg)`` -> Statistics (the model is left as it was: the extra
outputs are added for the session only).
Matches: eligible sites (their first input tensor ``x``; for Gemm with transA, x^T), main
graph nodes only: onnxruntime cannot return the activations of an If/Loop/Scan body, so
sites inside one are planned with the weight error (their note says so).
``Statistics.layers[weight_name]`` is a ``LayerStats`` over every node sharing the weight:
  * ``gram``: the Gram matrix G = X^T X (float32 storage, accumulated in float64) of the
    rows x (at most ``rows``, a seeded subsample) that the layer ``y = x @ W`` sees; the
    float output error of a candidate is ||X (W - W_hat)||^2 = tr(E^T G E).
    Bounded form: G is the exact (K, K) matrix when K <= GRAM_EXACT_MAX, else its
    diagonal, a 1-D array g_i = sum_n x_ni^2 (K values), which the planner accepts
    (``bfc.factorize.calibrated``): the error becomes sum_i g_i ||e_i||^2, i.e.
    G ~ diag(G), exact when the input features are uncorrelated and dropping the cross
    terms 2 sum_{i<j} G_ij <e_i, e_j> otherwise (``tests/test_calibrate_bounded.py``
    measures the change of the error estimate on correlated inputs).  The report notes
    which sites got the diagonal form.  (The reconstruction and the rotated low-bit family
    need the dense G: a layer wider than GRAM_EXACT_MAX cannot use them.)
  * ``sample``: up to SAMPLE_ROWS of those rows (seeded), on which the planner measures
    targets whose numerics are not a float product (the custom op's per-row int8
    activation quantization).
Bounded memory:
  * the inputs run CHUNK samples at a time: one chunk's activations are held, never the set;
  * only the sites the planner will plan are collected (``bfc.passes.schedule.skip_reason``:
    --include/--exclude/--min-size); weights read through the same tensors (Q, K, V) share one
    accumulator and one ``LayerStats``;
  * the sites are collected group by group: sites that share an input tensor (or a weight
    read by several inputs) form one unit, and units are packed in graph order into groups
    whose float64 accumulators (K^2 or K each, plus the sample rows) fit GROUP_BYTES
    (a larger unit is a group of its own); each group is one pass of onnxruntime over the
    calibration inputs, asking for that group's tensors only;
  * each finished statistic is written (float32) to a spill folder and kept as a
    ``FileArray`` (``bfc.passes.model_io.stream``), read again only while its layer is planned; the
    folder is removed once no statistic refers to it.
Row subsamples are drawn from one generator per input tensor (``default_rng([seed, i])``, i
its position among the collected tensors), so they do not depend on the grouping.
For a model read as a skeleton (``bfc.passes.model_io.stream``), ``base`` is its file: onnxruntime
reads the weights from there.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bfc.config import OptimizeConfig
from bfc.factorize.calibrated import weighted_error
from bfc.passes.find_sites import Site
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import FileArray, trim
from bfc.passes.products import LoadedModel, Sites, Statistics
from bfc.passes.schedule import skip_reason

CHUNK = 4           # samples per onnxruntime run while collecting activations
SAMPLE_ROWS = 512   # activation rows kept per site for target-exact error measurements
GRAM_EXACT_MAX = 4096       # widest input K with an exact (K, K) Gram (128 MB of float64)
GROUP_BYTES = 256 << 20     # float64 accumulator bytes of one calibration pass (one group of sites)


@dataclass(frozen=True)
class LayerStats:
    gram: np.ndarray       # (K, K) X^T X, or its diagonal (K,) for wide inputs; a FileArray once spilled
    sample: np.ndarray     # (n <= SAMPLE_ROWS, K) float32 rows of X; a FileArray once spilled


def diagonal_error(gram, w: np.ndarray, w_hat: np.ndarray) -> tuple[float, float]:
    """(relative layer error from the exact ``gram``, the same from its diagonal): what the bounded
    form changes in the planner's error estimate ||X E|| / ||X W||."""
    g = np.asarray(gram, np.float64)
    return weighted_error(w, w_hat, g), weighted_error(w, w_hat, np.diag(g).copy())


def calibrate(loaded: LoadedModel, sites: Sites, feeds: dict | None, cfg: OptimizeConfig) -> Statistics:
    """The calibrate stage: statistics of the sites the planner will plan (none without ``feeds``)."""
    if feeds is None or not sites.eligible:
        return Statistics()
    layers = collect(loaded.model, list(sites.sites), feeds, cfg.calibration_rows, cfg.seed, loaded.base, config=cfg)
    diag = sorted(k for k, v in layers.items() if np.ndim(v.gram) == 1)
    notes = (f"calibration: {len(diag)} layers with inputs wider than {GRAM_EXACT_MAX} keep "
             f"the diagonal of X^T X only, e.g. {diag[0]}",) if diag else ()
    return Statistics(layers, notes)


def _fixed_first_dims(model: onnx.ModelProto) -> set[str]:
    """Inputs whose axis 0 is a fixed size (not a batch axis: e.g. x in y = W @ x)."""
    out = set()
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim if i.type.tensor_type.HasField("shape") else []
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            out.add(i.name)
    return out


def split_feeds(feeds: dict, fixed=frozenset()) -> list[dict]:
    """Split the feeds along axis 0 when every input shares that batch axis (and none declares a
    fixed size there); else one run."""
    sizes = {v.shape[0] if np.ndim(v) else None for v in feeds.values()}
    if len(sizes) != 1 or None in sizes or fixed & set(feeds):
        return [feeds]
    n = sizes.pop()
    return [{k: v[i:i + CHUNK] for k, v in feeds.items()} for i in range(0, n, CHUNK)]


def _groups(names: list[str], wanted: dict, acc_of: dict, budget: int) -> list[list[str]]:
    """Input tensors packed into calibration passes (module doc): a unit is a connected set of
    tensors and sites (a site read through several tensors keeps them together); its cost counts
    each accumulator once (``acc_of``: weight -> its accumulator's key, shared by Q, K, V)."""
    parent = {n: n for n in names}

    def find(n):
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n
    first = {}
    for n in names:
        for s, _sn in wanted[n]:
            if s.weight_name in first:
                parent[find(n)] = find(first[s.weight_name])
            else:
                first[s.weight_name] = n
    units: dict = {}
    for n in names:
        units.setdefault(find(n), []).append(n)
    groups, cur, used = [], [], 0
    for unit in units.values():         # in graph order of their first tensor
        accs = {acc_of[s.weight_name]: s.weight.shape[0] for n in unit for s, _sn in wanted[n]}
        cost = sum(8 * (k * k if exact else k) + 4 * SAMPLE_ROWS * k for (_m, exact), k in accs.items())
        if cur and used + cost > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.extend(unit)
        used += cost
    if cur:
        groups.append(cur)
    return groups


class _Spill:
    """A temporary folder of float32 statistics, removed when the last FileArray into it is freed."""

    def __init__(self):
        self.dir = tempfile.TemporaryDirectory(prefix="bfc-calib-")
        self.count = 0

    def put(self, a: np.ndarray):
        a = np.ascontiguousarray(a, np.float32)
        self.count += 1
        path = Path(self.dir.name) / f"{self.count}.f32"
        a.tofile(path)
        f = FileArray(path, 0, a.shape, np.float32)
        f.owner = self                  # keeps the folder while the statistic lives
        return f


def collect(model: onnx.ModelProto, sites: list[Site], feeds: dict, rows: int = 8192, seed: int = 0,
            base=None, group_bytes: int = GROUP_BYTES, spill: bool = True, config=None) -> dict:
    """``{weight_name: LayerStats}`` for the eligible sites (module doc), and with ``config`` only
    for those the planner will plan (``bfc.passes.schedule.skip_reason``); ``base``: the model file a
    skeleton's weight references are relative to; ``spill=False`` keeps the statistics in memory."""
    wanted = {}
    for s in sites:
        if s.eligible and (config is None or skip_reason(s, config) is None):
            for sn in s.nodes:
                if sn.scope is not None or sn.op == "Gather":
                    continue               # inside a subgraph (no activations from onnxruntime); or an embedding
                wanted.setdefault(sn.input, []).append((s, sn))   # Q, K, V share an input
    names = list(wanted)
    if not names:
        return {}
    exact = {}
    members: dict = {}
    for n in names:
        for s, sn in wanted[n]:
            exact.setdefault(s.weight_name, s.weight.shape[0] <= GRAM_EXACT_MAX)
            members.setdefault(s.weight_name, []).append((n, sn.trans_a))
    # weights read through the same tensors in the same way (Q, K, V) share one accumulator,
    # filled by its first weight (its owner)
    acc_of = {w: (tuple(sorted(m)), exact[w]) for w, m in members.items()}
    owner: dict = {}
    for w, a in acc_of.items():
        owner.setdefault(a, w)
    chunks = split_feeds(feeds, _fixed_first_dims(model))
    per_chunk = max(1, -(-rows // len(chunks)))     # rows per site and chunk (ceil): at most ~rows in all
    sample_per_chunk = max(1, -(-SAMPLE_ROWS // len(chunks)))
    rngs = {n: np.random.default_rng([seed, i]) for i, n in enumerate(names)}
    folder = None if base is None else Path(base).absolute().parent
    store = _Spill() if spill else None
    out = {}
    for group in _groups(names, wanted, acc_of, group_bytes):
        grams: dict = {}
        samples: dict = {}
        existing = {o.name for o in model.graph.output}
        added = [n for n in group if n not in existing]
        outputs = model.graph.output
        for n in added:                # the outputs are removed again below: no copy of the weights
            outputs.append(onnx.ValueInfoProto(name=n))
        try:
            sess = session(model, threads=0, arena=False, external_folder=folder)
        finally:
            for _ in added:
                del outputs[len(outputs) - 1]
        for part in chunks:                  # one chunk's activations at a time
            for n, act in zip(group, run(sess, part, group)):
                cache = {}
                rng = rngs[n]
                for s, sn in wanted[n]:
                    key = (sn.trans_a, exact[s.weight_name])
                    if key not in cache:
                        v = np.asarray(act)
                        v = (v.T if sn.trans_a else v).reshape(-1, v.shape[-1] if not sn.trans_a else v.shape[0])
                        if v.shape[0] > per_chunk:
                            v = v[np.sort(rng.choice(v.shape[0], per_chunk, replace=False))]
                        v = v.astype(np.float64)
                        keep = v if v.shape[0] <= sample_per_chunk else v[np.sort(
                            rng.choice(v.shape[0], sample_per_chunk, replace=False))]
                        g = v.T @ v if key[1] else np.einsum("ij,ij->j", v, v)
                        cache[key] = (g, keep.astype(np.float32))
                    a = acc_of[s.weight_name]
                    if owner[a] != s.weight_name:
                        continue             # its owner adds the same rows
                    g, keep = cache[key]
                    if a in grams:
                        grams[a] += g
                    else:
                        grams[a] = g.copy()
                    samples.setdefault(a, []).append(keep)
                del cache, act
        del sess
        trim()
        for a in list(grams):                # float32 storage; plan works in float64
            g = grams.pop(a).astype(np.float32)
            x = np.concatenate(samples.pop(a))[:SAMPLE_ROWS]
            st = LayerStats(store.put(g), store.put(x)) if store is not None else LayerStats(g, x)
            for w, wa in acc_of.items():
                if wa == a:
                    out[w] = st
            del g, x, st
        trim()
    return out
