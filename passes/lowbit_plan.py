"""Planning of the rotated low-bit family: ``y = x @ W ~= (x Q) deq(Q^T W) [+ (x U) V^T]``.

Requires: the sites, their calibration statistics (optional) and the target.  Used by
``bfc.passes.candidates`` for ``structure=rotated`` and, with ``precision=auto``, as extra
candidates of ``structure=auto``.
Rotations, one per input tensor (``rotations``): the eligible sites are grouped by the
tensor their first node reads (and whether it is transposed); every site of a group
gets the same ``ButterflyRotation`` Q, computed once from the group's Gram G = X^T X (the
same X for every site of the group) -- the randomized Hadamard-like butterfly, or, with
``learn_rotation``, learned on the concatenated weights [W_1 ... W_s] (K, sum N_i), which
minimizes the sum of the group's activation-weighted rounding errors.  Q's values are
rounded to the target's storage (float16: the graph stores what the planner used), so
Q is orthogonal to ~1e-3 and every error below is measured with the stored Q.
Candidates per site: (bits, correction rank) pairs; bits is ``cfg.lowbit.bits`` for the fixed
family (2/3/4 for auto), rank ``cfg.lowbit.correction_rank`` or, when it is 0, {0, 4, 8, 16}.
They are tried cheapest first (bytes: packed codes, scales in the target's scale type,
the int8 correction); the first whose error (``Scorer``: with calibration
||X W - X W_hat|| / ||X W||, the float function the portable and ort targets compute)
meets ``max_error`` wins, so a correction is taken only where it is the cheapest way to
meet the budget.  GPTQ rounding with the rotated Gram when calibration is present,
searched-scale RTN otherwise.
Bytes: the rotation is counted once per input tensor, by the first rewritten layer of
its group (``assign_rotation_owners``).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from bfc.lowbit import ButterflyRotation, LowBitFormat, RotatedLayer, rotate_quantize
from bfc.lowbit.correction import fit_correction
from bfc.lowbit.groups import packed_nbytes
from bfc.lowbit.kron_rotation import KroneckerRotation
from bfc.lowbit.rotation_learn import learn_rotation

AUTO_BITS = (4, 3, 2)
AUTO_CORRECTION_RANKS = (0, 4, 8, 16)


def group_key(site) -> tuple[str, bool]:
    sn = site.nodes[0]
    return sn.input, bool(sn.trans_a)


def rotations(sites, stats, cfg, target, bits: int = 4, kronecker: bool = False) -> dict:
    """``{weight_name: rotation}`` for ``sites`` (those the plan will try), one Q per input tensor: the
    butterfly (``ButterflyRotation``), or with ``kronecker`` a ``KroneckerRotation`` (two batched MatMuls
    in the graph; the allocator's)."""
    groups: dict = {}
    for s in sites:
        groups.setdefault(group_key(s), []).append(s)
    out = {}
    storage = target.rotation_storage
    for members in groups.values():
        k = members[0].weight.shape[0]
        if any(m.weight.shape[0] != k for m in members):      # cannot share: one Q per site
            for m in members:
                out[m.weight_name] = _rotation([m], stats, cfg, bits, kronecker).stored_as(storage)
            continue
        q = _rotation(members, stats, cfg, bits, kronecker).stored_as(storage)
        for m in members:
            out[m.weight_name] = q
    return out


def _rotation(members, stats, cfg, bits, kronecker: bool = False):
    k = members[0].weight.shape[0]
    if kronecker:
        return KroneckerRotation.random(k, cfg.seed)
    rot = ButterflyRotation.hadamard_like(k, cfg.seed)
    if not cfg.lowbit.learn_rotation or cfg.lowbit.rotation_steps == 0:
        return rot
    st = None if stats is None else stats.get(members[0].weight_name)
    gram = None if st is None else np.asarray(st.gram, np.float64)
    w = np.concatenate([m.weight.astype(np.float64) for m in members], axis=1)
    fmt = LowBitFormat(bits, cfg.lowbit.group_size, True, "float16")
    params, _ = learn_rotation(w, gram, fmt, init=rot.params, steps=cfg.lowbit.rotation_steps, seed=cfg.seed)
    return ButterflyRotation.from_params(params)


def _bytes(k: int, n: int, bits: int, group: int, scale_bytes: int, rank: int) -> int:
    g = min(group, k)
    ng = -(-k // g)
    return packed_nbytes(ng * g * n, bits) + ng * n * scale_bytes + (rank * (k + n) + 8 * rank if rank else 0)


def candidates(k: int, n: int, cfg, bits_options, scale_bytes: int):
    ranks = (cfg.lowbit.correction_rank,) if cfg.lowbit.correction_rank else AUTO_CORRECTION_RANKS
    ranks = [r for r in ranks if r <= min(k, n) // 4 or r == cfg.lowbit.correction_rank]
    cands = [(_bytes(k, n, b, cfg.lowbit.group_size, scale_bytes, r), b, r) for b in bits_options for r in ranks]
    return sorted(cands)


def plan_rotated(w, gram, score, cfg, target, rotation, bits_options, budget):
    """(RotatedLayer, label, precision, error) of the cheapest candidate meeting ``budget``, or
    (None, best label, best error)."""
    k, n = w.shape
    sdt = np.dtype(target.lowbit_scale_dtype)
    bases = {}
    best = (float("inf"), "")
    for _nb, bits, rank in candidates(k, n, cfg, bits_options, sdt.itemsize):
        if bits not in bases:
            bases[bits] = rotate_quantize(w, gram, bits=bits, group_size=cfg.lowbit.group_size, rotation=rotation,
                                          scale_dtype=sdt.name, gptq=gram is not None, seed=cfg.seed)
        layer = bases[bits]
        if rank:
            layer = RotatedLayer(layer.rotation, layer.weight, fit_correction(w - layer.to_dense(), gram, rank))
        err = score(layer)
        prec = f"int{bits} g{layer.weight.group_size}" + (f" + int8 r{rank}" if rank else "")
        if err <= budget:
            return layer, "rotated", prec, err
        best = min(best, (err, f"rotated {prec}"))
    return None, best[1], best[0]


def assign_rotation_owners(plans: list) -> list:
    """The plans with the first rewritten plan of each shared rotation counting (storing) it and the
    others not."""
    seen = set()
    out = []
    for p in plans:
        q = p.weights
        if isinstance(q, RotatedLayer) and q.rotation is not None:
            own = id(q.rotation) not in seen
            seen.add(id(q.rotation))
            if q.owns_rotation != own:
                p = dataclasses.replace(p, weights=dataclasses.replace(q, owns_rotation=own))
        out.append(p)
    return out
