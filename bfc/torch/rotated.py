"""``TrainableRotated``: a rotated low-bit layer ``y = (x Q) deq(W_r) + (x U) V^T`` as trainable tensors.

Starts from a planned ``bfc.lowbit.RotatedLayer`` (Q, group codes q with scales s0, optional int8
correction) and computes, bit for bit at step 0, what the emitted graph computes:

  * W_r, group j of column n (rows ``[j g, (j+1) g)``), b bits symmetric, levels [-2^(b-1), 2^(b-1)-1]:
        s   = fp16(s0 * exp(t))                      learned step size (LSQ), t = 0 at the start;
                                                     rounded to the stored scale type (straight-through)
        r   = clamp(u * s0 / s, qmin, qmax)          u: float32 latent in units of s0 (starts in q's
                                                     rounding bin: ``latent_codes``)
        q   = round(r)                               straight-through: d q / d r = 1
        deq = s * q                                  what MatMulNBits / the unpacking compute
    so ``d y / d u`` flows through the rounding (STE) and ``d y / d t`` is LSQ's
    ``round(r) - r`` (plus the clamp's edge term).
  * Q: ``KroneckerRotation`` P_1 (x) ... (x) P_t, each factor ``fp16(P_l0 C(A_l))`` with
    ``C(A) = (I - A)^-1 (I + A)`` the Cayley map of a skew A (zero at the start: Q is the planned one;
    orthogonal for every A, so Q stays a rotation while it trains; rounded to the stored type
    straight-through, as the planner's ``stored_as``).  One ``TrainableRotation`` is shared by every
    layer reading the same tensor with the same Q (Q, K and V projections).  ``ButterflyRotation``:
    applied as its fixed KS chain (not trained).
  * correction (if any): U, V int8 per column, ``U = su * clamp(round(U_lat / su), -127, 127)`` with
    learned su (the same LSQ parametrization, 127 levels), float32 products.
Numerics per target (``emulate_rows``):
  * ort / portable (float): ``xr = x Q`` in float32, ``y = xr @ deq`` (MatMulNBits accuracy_level 0 or
    the in-graph unpacking + MatMul, both float32 products);
  * custom-op ``ai.bfc.LowBitMatMul``: ``xr`` quantized per row (``bfc.ops._quantize_rows``: amax per row,
    ``qx = rint(clip(xr * 127/amax, -127, 127))``, straight-through), exact integer group sums
    ``qx[:, G_j] @ q[G_j]`` (exact in float32: g * 127 * 2^(b-1) < 2^24), ``acc += isum_j * s_j`` in group
    order, ``y = acc * (amax/127)``: the operations of ``bfc.ops.lowbit_matmul_reference`` in its order.
``export()`` writes the trained layer back on the same grid: codes ``round(r)``, scales ``s`` (fp16),
Q's factors as stored, the correction's int8 codes and scales.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from bfc.errors import UnsupportedError
from bfc.lowbit.correction import LowRankCorrection
from bfc.lowbit.groups import GroupQuantized
from bfc.lowbit.int8_layer import Int8Linear
from bfc.lowbit.kron_rotation import KroneckerRotation
from bfc.lowbit.layer import RotatedLayer
from bfc.lowbit.rotation import ButterflyRotation
from bfc.torch.linear import _ks_apply

_STORE = {"float16": torch.float16, "float32": torch.float32}


def _stored(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """v rounded to the storage type in the forward, identity gradient."""
    if dtype == torch.float32:
        return v
    return v + (v.detach().to(dtype).to(torch.float32) - v.detach())


def _round_ste(r: torch.Tensor) -> torch.Tensor:
    return r + (torch.round(r.detach()) - r.detach())


class TrainableRotation(nn.Module):
    """``x Q`` for rows x (n, K); Kronecker factors trained through the Cayley map (module doc)."""

    def __init__(self, rotation, train: bool = True):
        super().__init__()
        self.rotation = rotation
        self.kron = isinstance(rotation, KroneckerRotation)
        if not self.kron and not isinstance(rotation, ButterflyRotation):
            raise UnsupportedError(f"distillation of rotated layers: unknown rotation {type(rotation).__name__}")
        self.dtype = _STORE[np.dtype(rotation.storage).name]
        self.skew = nn.ParameterList()
        if self.kron:
            for l, f in enumerate(rotation.factors):
                self.register_buffer(f"p0_{l}", torch.from_numpy(np.asarray(f, np.float32).copy()))
                self.skew.append(nn.Parameter(torch.zeros(f.shape, dtype=torch.float32),
                                              requires_grad=bool(train) and f.shape[0] > 1))
        else:
            for l, v in enumerate(rotation.values):
                self.register_buffer(f"v_{l}", torch.from_numpy(np.asarray(v, np.float32).copy()))

    def factors(self) -> list[torch.Tensor]:
        """The Kronecker factors the forward multiplies by: fp16(P_l0 C(A_l)) (straight-through)."""
        out = []
        for l, a in enumerate(self.skew):
            p0 = getattr(self, f"p0_{l}")
            if not a.requires_grad:
                out.append(p0)
                continue
            s = a - a.T
            eye = torch.eye(a.shape[0], dtype=a.dtype)
            c = torch.linalg.solve(eye - s, eye + s)
            out.append(_stored(p0 @ c, self.dtype))
        return out

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        if not self.kron:
            h = x2
            for l, p in enumerate(self.rotation.chain.patterns):
                h = _ks_apply(p, getattr(self, f"v_{l}"), h)
            return h
        facs = self.factors()
        n, k = x2.shape
        sizes = [f.shape[0] for f in facs]
        h = x2.reshape(n * k // sizes[-1], sizes[-1]) @ facs[-1]
        for l in range(len(facs) - 2, -1, -1):
            before = n * int(np.prod(sizes[:l], dtype=np.int64))
            after = k // int(np.prod(sizes[:l + 1], dtype=np.int64))
            h = torch.matmul(facs[l].T, h.reshape(before, sizes[l], after))
        return h.reshape(n, k)

    @torch.no_grad()
    def export(self):
        """The trained Q as the planner stores it (factors in the storage type)."""
        if not self.kron or not any(a.requires_grad for a in self.skew):
            return self.rotation
        facs = tuple(f.double().numpy().astype(np.float64) for f in self.factors())
        return KroneckerRotation(facs, self.rotation.storage)


class _LSQ(nn.Module):
    """One symmetric grid ``s * clamp(round(u s0 / s), qmin, qmax)`` with learned s = s0 exp(t)."""

    def __init__(self, q: np.ndarray, s0: np.ndarray, qmin: int, qmax: int, store: torch.dtype, expand):
        super().__init__()
        self.qmin, self.qmax, self.store, self.expand = float(qmin), float(qmax), store, expand
        s0 = np.asarray(s0, np.float32)
        self.register_buffer("s0", torch.from_numpy(np.where(s0 == 0, np.float32(1), s0).copy()))
        self.register_buffer("zero", torch.from_numpy((s0 == 0).copy()))
        self.u = nn.Parameter(torch.from_numpy(np.asarray(q, np.float32).copy()))
        self.t = nn.Parameter(torch.zeros_like(self.s0))

    def scale(self) -> torch.Tensor:
        s = _stored(self.s0 * torch.exp(self.t), self.store)
        return torch.where(self.zero, torch.zeros_like(s), s)

    def codes(self):
        """(r, q, s): r the latent in units of s (clamped), q its grid point (straight-through), s the scale."""
        s = self.scale()
        safe = torch.where(self.zero, torch.ones_like(s), s)
        r = torch.clamp(self.u * self.expand(self.s0 / safe), self.qmin, self.qmax)
        return r, _round_ste(r), s

    def dequantized(self) -> torch.Tensor:
        _, q, s = self.codes()
        return q * self.expand(s)


BIN = 0.45      # latent codes start at most this far from their planned code (inside its rounding bin)


def latent_codes(layer: RotatedLayer, weight: np.ndarray | None) -> np.ndarray:
    """Initial latent codes u (K, N): the planned codes q, or, with the float weight W, the float codes
    ``(Q^T W) / s0`` moved into q's rounding bin, ``u = q + clip((Q^T W) / s0 - q, -BIN, BIN)``: round(u) = q
    (step 0 is the planned layer), and codes the rounding left near a bin edge flip after a few steps
    (QAT from the float weight, keeping GPTQ's choices)."""
    gq = layer.weight
    q = gq.values.astype(np.float64)
    if weight is None:
        return q.astype(np.float32)
    w = np.asarray(weight, np.float64)
    wr = w if layer.rotation is None else layer.rotation.rotate_weight(w)
    s = gq.scales.astype(np.float64)[np.arange(gq.shape[0]) // gq.group_size]
    r = np.divide(wr, s, out=q.copy(), where=s != 0)
    return (q + np.clip(r - q, -BIN, BIN)).astype(np.float32)


class TrainableRotated(nn.Module):
    """A ``RotatedLayer`` as trainable tensors (module doc); ``forward(x2)`` maps rows (n, K) to (n, N)."""

    def __init__(self, layer: RotatedLayer, rotation: TrainableRotation | None = None, emulate_rows: bool = False,
                 weight: np.ndarray | None = None):
        super().__init__()
        gq = layer.weight
        if not gq.symmetric:
            raise UnsupportedError("distillation trains symmetric group formats only (bfc's rotated layers are)")
        self.layer0 = layer
        self.emulate_rows = bool(emulate_rows)
        self.rot = rotation if rotation is not None or layer.rotation is None else TrainableRotation(layer.rotation)
        k, n = gq.shape
        g, ng = gq.group_size, gq.n_groups
        self.k, self.n, self.g, self.ng = k, n, g, ng
        rows = torch.from_numpy(np.arange(k) // g)
        self.register_buffer("rows", rows)
        store = _STORE[np.dtype(gq.scales.dtype).name]
        self.w = _LSQ(latent_codes(layer, weight), gq.scales, -(1 << (gq.bits - 1)), (1 << (gq.bits - 1)) - 1,
                      store, lambda s: s.index_select(0, self.rows))
        c = layer.correction
        if c is not None:
            self.cu = _LSQ(c.u, c.u_scale, -127, 127, torch.float32, lambda s: s.reshape(1, -1))
            self.cv = _LSQ(c.v, c.v_scale, -127, 127, torch.float32, lambda s: s.reshape(1, -1))
        else:
            self.cu = self.cv = None

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        xr = x2 if self.rot is None else self.rot(x2)
        y = self._rows(xr) if self.emulate_rows else xr @ self.w.dequantized()
        if self.cu is not None:
            y = y + (x2 @ self.cu.dequantized()) @ self.cv.dequantized().T
        return y

    def _rows(self, h: torch.Tensor) -> torch.Tensor:
        """custom-op LowBitMatMul: per-row int8 activations, exact group sums, scales in group order."""
        with torch.no_grad():
            amax = h.abs().amax(dim=-1, keepdim=True)
            inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
            cs = amax / torch.tensor(127.0)
        hq = _round_ste(torch.clamp(h * inv, -127.0, 127.0))
        _, q, s = self.w.codes()
        acc = None
        for j in range(self.ng):
            k0, k1 = j * self.g, min(self.k, (j + 1) * self.g)
            part = (hq[:, k0:k1] @ q[k0:k1]) * s[j]
            acc = part if acc is None else acc + part
        return acc * cs

    @torch.no_grad()
    def export(self, rotation=None) -> RotatedLayer:
        """The trained layer on its grid (module doc); ``rotation``: the exported shared Q."""
        gq = self.layer0.weight
        _, q, s = self.w.codes()
        weight = GroupQuantized(q.numpy().astype(np.int8), s.numpy().astype(gq.scales.dtype), None,
                                gq.bits, gq.group_size, True)
        corr = None
        if self.cu is not None:
            _, qu, su = self.cu.codes()
            _, qv, sv = self.cv.codes()
            corr = LowRankCorrection(qu.numpy().astype(np.int8), su.numpy().astype(np.float32),
                                     qv.numpy().astype(np.int8), sv.numpy().astype(np.float32))
        rot = self.layer0.rotation if rotation is None else rotation
        return replace(self.layer0, rotation=rot, weight=weight, correction=corr)


class TrainableInt8(nn.Module):
    """An ``Int8Linear`` (``bfc.lowbit.int8_layer``: the allocator's int8 per-column and rotated low-bit
    "int8 compute" forms) as trainable tensors, computing what onnxruntime computes:
        xr  = x Q                                         (TrainableRotation; float32)
        W   = s * clamp(round(u s0 / s), qmin, qmax)      codes: b-bit groups (``_LSQ``, as TrainableRotated);
                                                          no codes: int8 per column, s = col_scale
        c   = max(max_k |W[k, n]| / 127, tiny), W8 = round(W / c)   the load-time fold (codes only;
                                                          ``int8_fold.fold_codes``), straight-through
        xq  = clip(round(xr / sx) + zp, 0, 255)           DynamicQuantizeLinear over the whole call's tensor
                                                          (sx, zp from its min/max: no gradient), straight-through
        y   = ((xq - zp) @ W8) * (sx * c)                 MatMulInteger and the float32 rescaling
    The integer product runs in float32 (exact below 2^24; beyond, float32 rounding of a sum of integers:
    relative 6e-8).  ``export()`` gives the ``Int8Linear`` on the same grid (codes and fp16 scales, folded
    again by ``Int8Linear.from_codes``; or the int8 weight and its trained column scales)."""

    def __init__(self, layer: Int8Linear, rotation: TrainableRotation | None = None,
                 weight: np.ndarray | None = None):
        super().__init__()
        self.layer0 = layer
        self.rot = rotation if rotation is not None or layer.rotation is None else TrainableRotation(layer.rotation)
        gq = layer.codes
        if gq is None:
            self.w = _LSQ(layer.w_s8.astype(np.float32), layer.col_scale, -127, 127, torch.float32,
                          lambda s: s.reshape(1, -1))
            return
        if not gq.symmetric:
            raise UnsupportedError("distillation trains symmetric group formats only (bfc's rotated layers are)")
        self.register_buffer("rows", torch.from_numpy(np.arange(gq.shape[0]) // gq.group_size))
        start = latent_codes(RotatedLayer(layer.rotation, gq, None), weight)
        self.w = _LSQ(start, gq.scales, -(1 << (gq.bits - 1)), (1 << (gq.bits - 1)) - 1,
                      _STORE[np.dtype(gq.scales.dtype).name], lambda s: s.index_select(0, self.rows))

    def weight8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W8 as float32 integers, straight-through; c (N,)): the integer MatMul's weight and column scales."""
        if self.layer0.codes is None:
            _, q, s = self.w.codes()
            return q, s.reshape(-1)
        deq = self.w.dequantized()
        c = torch.clamp(deq.detach().abs().amax(dim=0) / 127.0, min=float(np.finfo(np.float32).tiny))
        return torch.clamp(_round_ste(deq / c), -127.0, 127.0), c

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        xr = x2 if self.rot is None else self.rot(x2)
        with torch.no_grad():
            lo = torch.clamp(xr.min(), max=0.0)
            hi = torch.clamp(xr.max(), min=0.0)
            sx = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
            zp = torch.round(torch.clamp(-lo / sx, 0.0, 255.0))
        xq = torch.clamp(_round_ste(xr / sx) + zp, 0.0, 255.0)
        w8, c = self.weight8()
        return ((xq - zp) @ w8) * (sx * c)

    @torch.no_grad()
    def export(self, rotation=None) -> Int8Linear:
        """The trained ``Int8Linear`` (``rotation``: the exported shared Q)."""
        l0 = self.layer0
        _, q, s = self.w.codes()
        if l0.codes is None:
            return replace(l0, w_s8=q.numpy().astype(np.int8), col_scale=s.numpy().reshape(-1).astype(np.float32))
        gq = l0.codes
        codes = GroupQuantized(q.numpy().astype(np.int8), s.numpy().astype(gq.scales.dtype), None,
                               gq.bits, gq.group_size, True)
        trained = Int8Linear.from_codes(codes, l0.rotation if rotation is None else rotation)
        return replace(trained, owns_rotation=l0.owns_rotation)
