"""Hierarchical factorization of a matrix onto a chainable KS chain.

A *piece* is the product of a run of consecutive factors ``K_lo ... K_hi``; it is
supported on ``chain.product_pattern(lo, hi)`` and stored in the canonical
``(a, d, b, c)`` layout.  Splitting a piece at ``s`` into ``[lo..s]`` and
``[s+1..hi]`` (block rank r between them) is one batched truncated SVD: the piece's
values rearranged as ``(a, c1, b2, d, B_L, C_R)`` are independent ``B_L x C_R``
blocks whose best rank-r approximations are exactly the optimal split
(disjoint rank-one supports; Le, Zheng, Riccietti, Gribonval 2022 and 2024):

    T[i, (j2, l), (j1), ...] ...   rows j = (j1, j2), cols k = (k1, k2)
    left  (a, b2*d, B_L, c1*r)   = U sqrt(S)     right (a*c1, d, r*b2, C_R) = sqrt(S) Vt

The tree is either ``left-to-right`` (peel the leftmost factor) or ``balanced``
(split at the middle).  With ``orthonormalize`` the singular values live in one
*carrier* piece; pieces to its left have orthonormal columns and pieces to its right
orthonormal rows in every rank-r block, so an error made while splitting the carrier
is not amplified by the others (the condition of the error guarantee).  Moving the
carrier is a batched QR (to the right) or LQ (to the left) between neighbours.
"""
from __future__ import annotations

import numpy as np

from bfc.ks import Chain, KSPattern


class _Geometry:
    """Index bookkeeping between two neighbouring pieces (left = [lo..s], right = [s+1..hi])."""

    def __init__(self, left: KSPattern, right: KSPattern):
        self.a, self.d = left.a, right.d
        self.r = left.a * left.c // right.a
        self.c1 = right.a // left.a
        self.b2 = left.d // right.d
        self.bl, self.cr = left.b, right.c
        self.left, self.right = left, right

    # left values (a, b2*d, BL, c1*r) <-> (a, c1, b2, d, BL, r)
    def left_blocks(self, v):
        a, c1, b2, d, bl, r = self.a, self.c1, self.b2, self.d, self.bl, self.r
        return v.reshape(a, b2, d, bl, c1, r).transpose(0, 4, 1, 2, 3, 5)

    def left_values(self, blocks):
        a, c1, b2, d, bl, r = self.a, self.c1, self.b2, self.d, self.bl, self.r
        return np.ascontiguousarray(blocks.transpose(0, 2, 3, 4, 1, 5)).reshape(a, b2 * d, bl, c1 * r)

    # right values (a*c1, d, r*b2, CR) <-> (a, c1, b2, d, r, CR)
    def right_blocks(self, v):
        a, c1, b2, d, r, cr = self.a, self.c1, self.b2, self.d, self.r, self.cr
        return v.reshape(a, c1, d, r, b2, cr).transpose(0, 1, 4, 2, 3, 5)

    def right_values(self, blocks):
        a, c1, b2, d, r, cr = self.a, self.c1, self.b2, self.d, self.r, self.cr
        return np.ascontiguousarray(blocks.transpose(0, 1, 3, 4, 2, 5)).reshape(a * c1, d, r * b2, cr)

    # the product piece (a, d, B_L*b2, c1*C_R) <-> (a, c1, b2, d, BL, CR)
    def product_blocks(self, v):
        a, c1, b2, d, bl, cr = self.a, self.c1, self.b2, self.d, self.bl, self.cr
        return v.reshape(a, d, bl, b2, c1, cr).transpose(0, 4, 3, 1, 2, 5)


def _pad(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] == size:
        return x
    shape = list(x.shape)
    shape[axis] = size - x.shape[axis]
    return np.concatenate([x, np.zeros(shape, x.dtype)], axis=axis)


def _top1_eigh(gram: np.ndarray, squarings: int = 10, tol: float = 1e-10):
    """Top eigenpair of a batch of PSD matrices by repeated squaring (G^1024), Rayleigh
    refinement and an exact ``eigh`` fallback for the blocks whose residual
    ||G v - lam v|| exceeds ``tol * lam`` (near-degenerate top pairs).  Batched LAPACK
    ``eigh`` costs ~100 us per small matrix; a batched matmul costs ~4 us."""
    n = gram.shape[-1]
    g = gram.reshape(-1, n, n)
    tr = np.trace(g, axis1=1, axis2=2).real
    h = g / np.where(tr > 0, tr, 1.0)[:, None, None]
    tmp = np.empty_like(h)
    for _ in range(squarings):
        np.matmul(h, h, out=tmp)
        h, tmp = tmp, h
        h /= np.maximum(np.trace(h, axis1=1, axis2=2).real, 1e-300)[:, None, None]
    col = np.argmax(np.abs(np.diagonal(h, axis1=1, axis2=2)), axis=1)
    v = h[np.arange(h.shape[0]), :, col]
    for _ in range(2):
        v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
        gv = (g @ v[:, :, None])[:, :, 0]
        lam = (v.conj() * gv).sum(axis=1).real
        resid = np.linalg.norm(gv - lam[:, None] * v, axis=1)
        v = gv
    v = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    bad = (resid > tol * np.abs(lam)) & (tr > 0)
    if bad.any():
        w, vv = np.linalg.eigh(g[bad])
        v[bad], lam[bad] = vv[..., -1], w[..., -1]
    return (np.clip(lam, 0, None).reshape(gram.shape[:-2] + (1,)),
            v.reshape(gram.shape[:-2] + (n, 1)))


def _top_eigh(gram: np.ndarray, k: int, chunk: int = 256):
    """Top-k eigenpairs (descending) of a batch of Hermitian PSD matrices."""
    if k == 1 and gram.shape[-1] >= 12:
        n = gram.shape[-1]
        flat = gram.reshape(-1, n, n)
        parts = [_top1_eigh(flat[i:i + chunk]) for i in range(0, flat.shape[0], chunk)]  # bounded scratch
        return (np.concatenate([p[0] for p in parts]).reshape(gram.shape[:-2] + (1,)),
                np.concatenate([p[1] for p in parts]).reshape(gram.shape[:-2] + (n, 1)))
    w, v = np.linalg.eigh(gram)
    return np.clip(w[..., ::-1][..., :k], 0, None), v[..., ::-1][..., :k]


def rank_split(blocks: np.ndarray, r: int, ortho: bool):
    """Best rank-r split ``blocks ~ left @ right`` of every ``BL x CR`` block.

    ``blocks`` is a (possibly strided) view of shape (a, c1, b2, d, BL, CR).  Returns
    ``left`` (a, c1, b2, d, BL, r) and ``right`` (a, c1, d, r, b2, CR), the latter already
    in the right piece's memory order.  With ``ortho`` the left blocks have orthonormal
    columns and the singular values go right; otherwise they are split as sqrt.
    Truncations go through the Gram matrix of the short side (one pass over the data
    and a small batched eigh, much faster than a batched SVD); no truncation needs no SVD.
    """
    bl, cr = blocks.shape[-2:]
    k = min(bl, cr, r)
    to_right = "acbdrk->acdrbk"
    if k == bl:                       # left can be the identity (or Q of a QR when not ortho-free)
        left = np.broadcast_to(np.eye(bl, dtype=blocks.dtype), blocks.shape[:4] + (bl, bl))
        right = np.einsum("acbdik->acdibk", blocks)
    elif k == cr:
        if ortho:
            q, rr = np.linalg.qr(np.ascontiguousarray(blocks))
            left, right = q, np.einsum(to_right, rr)
        else:
            left = blocks
            right = np.einsum(to_right, np.broadcast_to(np.eye(cr, dtype=blocks.dtype), blocks.shape[:4] + (cr, cr)))
    elif bl <= cr:
        s2, u = _top_eigh(np.einsum("...ik,...jk->...ij", blocks, blocks.conj()), k)
        right = np.einsum("acbdir,acbdik->acdrbk", u.conj(), blocks)
        left = u
        if not ortho:
            root = np.sqrt(np.sqrt(s2))
            left = u * root[..., None, :]
            right = right / np.where(root > 0, root, 1.0).transpose(0, 1, 3, 4, 2)[..., None]
    else:
        s2, v = _top_eigh(np.einsum("...ki,...kj->...ij", blocks.conj(), blocks), k)
        left = blocks @ v                                  # = U S
        s = np.sqrt(s2)
        if ortho:
            left = left / np.where(s > 0, s, 1.0)[..., None, :]
            right = np.einsum(to_right, v.conj().swapaxes(-1, -2) * s[..., :, None])
        else:
            root = np.sqrt(s)
            left = left / np.where(root > 0, root, 1.0)[..., None, :]
            right = np.einsum(to_right, v.conj().swapaxes(-1, -2) * root[..., :, None])
    return _pad(left, 5, r), _pad(right, 3, r)


def _qr_padded(m: np.ndarray, r: int):
    """Batched reduced QR of (n, p, r) matrices, Q padded to r columns."""
    q, rr = np.linalg.qr(m)
    k = q.shape[2]
    if k < r:
        q = np.concatenate([q, np.zeros(q.shape[:2] + (r - k,), q.dtype)], axis=2)
        rr = np.concatenate([rr, np.zeros((rr.shape[0], r - k, r), rr.dtype)], axis=1)
    return q, rr


class _Pieces:
    def __init__(self, chain: Chain, values: np.ndarray, orthonormalize: bool):
        self.chain = chain
        self.ortho = orthonormalize
        self.ranges = [(0, len(chain) - 1)]
        self.values = [values]
        self.carrier = 0

    def pattern(self, k: int) -> KSPattern:
        lo, hi = self.ranges[k]
        return self.chain.product_pattern(lo, hi)

    def _push_right(self, k: int) -> None:
        """Make piece k orthonormal towards piece k+1 (QR), moving its norm into k+1."""
        g = _Geometry(self.pattern(k), self.pattern(k + 1))
        lb = self.left_blocks_batched(g, self.values[k])
        q, rr = _qr_padded(lb, g.r)
        self.values[k] = g.left_values(q.reshape(g.a, g.c1, g.b2, g.d, g.bl, g.r))
        rr = rr.reshape(g.a, g.c1, g.b2, g.d, g.r, g.r)
        rb = g.right_blocks(self.values[k + 1])
        self.values[k + 1] = g.right_values(np.einsum("ikjlqp,ikjlpm->ikjlqm", rr, rb, optimize=True))

    def _push_left(self, k: int) -> None:
        """Make piece k orthonormal towards piece k-1 (LQ), moving its norm into k-1."""
        g = _Geometry(self.pattern(k - 1), self.pattern(k))
        rb = np.ascontiguousarray(g.right_blocks(self.values[k])).reshape(-1, g.r, g.cr)
        q, rr = _qr_padded(rb.conj().transpose(0, 2, 1), g.r)   # M^H = Q R  =>  M = R^H Q^H
        self.values[k] = g.right_values(q.conj().transpose(0, 2, 1).reshape(g.a, g.c1, g.b2, g.d, g.r, g.cr))
        lt = rr.conj().transpose(0, 2, 1).reshape(g.a, g.c1, g.b2, g.d, g.r, g.r)
        lb = g.left_blocks(self.values[k - 1])
        self.values[k - 1] = g.left_values(np.einsum("ikjlmp,ikjlpq->ikjlmq", lb, lt, optimize=True))

    @staticmethod
    def left_blocks_batched(g: _Geometry, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(g.left_blocks(v)).reshape(-1, g.bl, g.r)

    def move_carrier(self, target: int) -> None:
        while self.carrier < target:
            self._push_right(self.carrier)
            self.carrier += 1
        while self.carrier > target:
            self._push_left(self.carrier)
            self.carrier -= 1

    def split(self, k: int, s: int) -> None:
        """Split piece k (covering [lo..hi]) into [lo..s] and [s+1..hi]."""
        lo, hi = self.ranges[k]
        if self.ortho:
            self.move_carrier(k)
        g = _Geometry(self.chain.product_pattern(lo, s), self.chain.product_pattern(s + 1, hi))
        left, right = rank_split(g.product_blocks(self.values[k]), g.r, self.ortho)
        self.values[k:k + 1] = [g.left_values(left),
                                np.ascontiguousarray(right).reshape(g.a * g.c1, g.d, g.r * g.b2, g.cr)]
        self.ranges[k:k + 1] = [(lo, s), (s + 1, hi)]
        if self.carrier > k or (self.ortho and self.carrier == k):
            self.carrier += 1


def split_order(n_factors: int, order: str) -> list[tuple[int, int]]:
    """The (piece lo, split point s) sequence of a tree, in execution order."""
    out: list[tuple[int, int]] = []

    def visit(lo: int, hi: int) -> None:
        if lo == hi:
            return
        s = lo if order == "left-to-right" else (lo + hi - 1) // 2
        out.append((lo, s))
        visit(lo, s)
        visit(s + 1, hi)

    visit(0, n_factors - 1)
    return out


def hierarchical(target: np.ndarray, chain: Chain, order: str = "balanced",
                 orthonormalize: bool = True) -> list[np.ndarray]:
    """Factor values (canonical layout) of ``chain`` approximating the dense ``target``."""
    top = chain.product_pattern(0, len(chain) - 1)
    dtype = np.result_type(target.dtype, np.float64)
    pieces = _Pieces(chain, top.from_dense(target).astype(dtype, copy=False), orthonormalize)
    for lo, s in split_order(len(chain), order):
        k = next(i for i, (a, _) in enumerate(pieces.ranges) if a == lo)
        pieces.split(k, s)
    return pieces.values


def combine(g: _Geometry, left: np.ndarray, right: np.ndarray, rows=None) -> np.ndarray:
    """The product piece of two neighbouring pieces (the inverse of a split).

    With the blocks of ``_Geometry``, every ``B_L x C_R`` block of the product is one
    rank-r product ``left_block @ right_block`` over the batch (a, c1, b2, d), so the
    cost is nnz(product) * r and nothing the size of a dense factor is formed.  ``rows``
    (a slice of the flattened a*c1 axis of the right piece) restricts the result to
    those right blocks; returns blocks of shape (J, b2, d, B_L, C_R), J = a*c1 or the
    slice length.
    """
    a, c1, b2, d, bl, r, cr = g.a, g.c1, g.b2, g.d, g.bl, g.r, g.cr
    lb = g.left_blocks(left).reshape(a * c1, b2, d, bl, r)
    rb = right.reshape(a * c1, d, r, b2, cr)
    if rows is not None:
        lb, rb = lb[rows], rb[rows]
    return np.einsum("jbdlr,jdrbk->jbdlk", lb, rb)


def product_values(chain: Chain, values, lo: int = 0, hi: int | None = None):
    """``(pattern, values)`` of the piece K_lo ... K_hi, multiplied pairwise along a
    balanced tree (each step ``combine``); memory is the size of the pieces, never the
    size of a dense factor."""
    hi = len(chain) - 1 if hi is None else hi
    if lo == hi:
        return chain[lo], np.asarray(values[lo])
    s = (lo + hi - 1) // 2
    pl, vl = product_values(chain, values, lo, s)
    pr, vr = product_values(chain, values, s + 1, hi)
    g = _Geometry(pl, pr)
    # combine's sum over r, written straight into the product's (a, d, BL, b2, c1, CR)
    # order: numpy's own einsum loop (no BLAS call, no transposed copy) is several
    # times faster here, r being small
    left = g.left_blocks(vl)                                   # (a, c1, b2, d, BL, r)
    right = vr.reshape(g.a, g.c1, g.d, g.r, g.b2, g.cr)
    out = np.einsum("acbdlr,acdrbk->adlbck", left, right)
    return chain.product_pattern(lo, hi), out.reshape(g.a, g.d, g.bl * g.b2, g.c1 * g.cr)


def dense_column_chunks(chain: Chain, values, chunk: int = 4096):
    """Yield ``(start, stop, K_1 ... K_L[:, start:stop])`` in column chunks.

    The chain is split once at its balanced midpoint into a left and a right piece
    (``product_values``); a chunk of the right piece's (a*c1) blocks covers the
    contiguous columns [j*C_R*d, (j+1)*C_R*d) of the product, so each chunk costs
    one ``combine`` on a slice.  Peak memory: the two pieces plus one M x chunk block.
    """
    m, n = chain.shape
    if len(chain) == 1:
        dense = chain[0].to_dense(values[0])
        for j0 in range(0, n, chunk):
            yield j0, min(n, j0 + chunk), dense[:, j0:j0 + chunk]
        return
    s = (len(chain) - 2) // 2
    pl, vl = product_values(chain, values, 0, s)
    pr, vr = product_values(chain, values, s + 1, len(chain) - 1)
    g = _Geometry(pl, pr)
    a, c1, b2, d, bl, cr = g.a, g.c1, g.b2, g.d, g.bl, g.cr
    width = cr * d                                    # columns per right block
    step = max(1, chunk // width)
    big_b = bl * b2
    for j0 in range(0, a * c1, step):
        j1 = min(a * c1, j0 + step)
        blk = combine(g, vl, vr, slice(j0, j1))         # (J, b2, d, BL, CR)
        out = np.zeros((m, (j1 - j0) * width), dtype=blk.dtype)
        j = np.arange(j0, j1)
        i = j // c1
        # product row = i*B*d + (bl*b2 + b2)*d + l ; local column = (j - j0)*C_R*d + k*d + l
        row = (i[:, None, None, None, None] * big_b * d
               + (np.arange(bl)[None, None, None, :, None] * b2
                  + np.arange(b2)[None, :, None, None, None]) * d
               + np.arange(d)[None, None, :, None, None])
        col = ((j - j0)[:, None, None, None, None] * width
               + np.arange(cr)[None, None, None, None, :] * d + np.arange(d)[None, None, :, None, None])
        out[row, col] = blk
        yield j0 * width, j1 * width, out
