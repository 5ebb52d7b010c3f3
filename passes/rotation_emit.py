"""Graph emission of a Kronecker rotation ``x2 Q``, Q = P1 (x) ... (x) Pt (``bfc.lowbit.kron_rotation``).

For x of shape [..., K], K = d_1 ... d_t, row-major index k = (i_1 d_2 + i_2) d_3 + ... (ONNX
Reshape order), ``(x Q)[a_1..a_t] = sum x[i_1..i_t] prod_l P_l[i_l, a_l]``; the output is 2-D
(rows, K), rows = prod of x's leading dims:

  t = 1:  MatMul(x2, P1)                 x2 = x, or Reshape(x, [-1, K])     1 node (+ that Reshape)
  t = 2:  h = Reshape(x, [-1, m, n])                                        (rows, m, n)
          h = MatMul(h, P2)            one GEMM (rows*m, n) x (n, n)         h[r] = X[r] P2
          h = MatMul(P1^T, h)          P1^T (m, m) broadcast over the rows   h[r] = P1^T X[r] P2
          y = Reshape(h, [-1, K])                                            2 MatMuls + 2 Reshapes

The input Reshape reads x in any rank: it is the Reshape(x, [-1, K]) a rank-3 activation needs before a
2-D layer anyway, so a 2-factor rotation adds three nodes (2 MatMuls, 1 Reshape) to such a layer.
  t = 3:  Reshape [-1, d2, d3], MatMul P3, MatMul P2^T (batch rows*d1), Reshape [-1, d1, d2 d3],
          MatMul P1^T, Reshape [-1, K]                                        3 MatMuls + 3 Reshapes

Factors are stored in the rotation's ``storage`` type; fp16 ones get a Cast to the builder's float
type, which onnxruntime folds at load (all inputs constant).  Every MatMul's constant operand is a
stored factor (P^T is stored transposed, not transposed in the graph).
"""
from __future__ import annotations

import numpy as np

ONNX_FLOAT_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def _factor(b, what: str, v: np.ndarray, storage):
    t = b.const(what, np.asarray(v, np.dtype(storage)))
    if np.dtype(storage) == b.dtype:
        return t
    return b.cast(t, b.dtype, ONNX_FLOAT_TYPES[np.dtype(b.dtype)])


def emit_rotation(b, x2, rotation, rank: int | None = 2):
    """``x2 @ Q`` for an activation x2 [..., K] (``rank`` its rank, None if unknown) and a
    ``KroneckerRotation``; returns the (rows, K) output variable.  Nodes: t MatMuls and, for t >= 2, t Reshapes (module docstring);
    factors of size 1 are skipped, leading identity factors (``KroneckerRotation.block_diagonal``)
    become rows: ``Reshape(x2, [-1, b]) -> MatMul(., P) -> Reshape(., [-1, K])``."""
    k = rotation.size
    storage = rotation.storage
    scalar = float(np.prod([f[0, 0] for f in rotation.factors if f.shape[0] == 1]))   # +-1 factors of size 1
    facs = [f for f in rotation.factors if f.shape[0] > 1]
    if facs and scalar != 1.0:
        facs[-1] = scalar * facs[-1]
    elif not facs:
        facs = [np.full((1, 1), scalar)]
    lead = 0
    while lead < len(facs) - 1 and np.array_equal(facs[lead], np.eye(facs[lead].shape[0])):
        lead += 1
    facs = facs[lead:]
    if len(facs) == 1 and facs[0].shape[0] == 1 and facs[0][0, 0] == 1.0:
        return x2 if rank == 2 else b.reshape(x2, [-1, k])
    if len(facs) == 1:
        if lead == 0:
            x2 = x2 if rank == 2 else b.reshape(x2, [-1, k])
            return b.op("MatMul", [x2, _factor(b, "rot_p", facs[0], storage)])
        h = b.op("MatMul", [b.reshape(x2, [-1, facs[0].shape[0]]), _factor(b, "rot_p", facs[0], storage)])
        return b.reshape(h, [-1, k])
    sizes = [f.shape[0] for f in facs]
    t = len(facs)
    h = b.reshape(x2, [-1, sizes[-2], sizes[-1]])
    h = b.op("MatMul", [h, _factor(b, "rot_p", facs[-1], storage)])
    for l in range(t - 2, -1, -1):
        if l < t - 2:
            h = b.reshape(h, [-1, sizes[l], int(np.prod(sizes[l + 1:]))])
        h = b.op("MatMul", [_factor(b, "rot_pt", facs[l].T, storage), h])
    return b.reshape(h, [-1, k])
