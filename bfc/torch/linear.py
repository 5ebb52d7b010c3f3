"""``KSLinear``: a linear layer whose weight is a chain of Kronecker-sparse factors.

Orientation follows ONNX ``MatMul`` (batch first)::

    forward(x) = x[..., row_perm] @ K_1 @ ... @ K_L [..., inv(col_perm)]  (+ (x @ U) @ V^T)  + bias

Each factor ``K_l`` (KS pattern ``(a, b, c, d)``) is one ``torch.nn.Parameter`` of shape
``(a, d, b, c)`` in bfc's canonical layout (``bfc.ks.pattern``); ``x @ K_l`` is the
contraction ``(N, a, b, d) x (a, d, b, c) -> (N, a, c, d)`` (reshape + one batched GEMM
over the ``a*d`` dense ``b x c`` blocks): the dense matrix is never formed in ``forward``.  Permutations and the low-rank residual have exactly the
meaning of ``bfc.factorize.KSFactorization``, so ``from_factorization`` /
``to_factorization`` are lossless.

Any *valid* chain works for training (e.g. the kaleidoscope ``B B^T`` composition of
``kaleidoscope_chain``); initializing from a dense layer (``from_linear``) goes through
``bfc.factorize.factorize``, which needs a *chainable* chain.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bfc.errors import ChainError, InvalidInputError
from bfc.factorize import factorize, relative_error
from bfc.factorize.result import KSFactorization
from bfc.ks import Chain, KSPattern, chainable_chain, parse_chain, prime_factors
from bfc.torch.fake_quant import FakeQuant, fake_quant


# ---- chain compositions ----------------------------------------------------------------
def transpose_chain(chain) -> Chain:
    """Chain of ``(K_1 ... K_L)^T = K_L^T ... K_1^T``: pattern (a, b, c, d) -> (a, c, b, d)."""
    chain = parse_chain(chain)
    return Chain([KSPattern(p.a, p.c, p.b, p.d) for p in reversed(chain.patterns)])


def transpose_values(values):
    """Factor values of ``K^T`` in canonical layout: (a, d, b, c) -> (a, d, c, b)."""
    if isinstance(values, torch.Tensor):
        return values.transpose(-1, -2)
    return np.swapaxes(np.asarray(values), -1, -2)


def compose_chains(*chains) -> Chain:
    """The chain of the product ``W_1 W_2 ...`` (patterns concatenated, shapes checked)."""
    if not chains:
        raise ChainError("compose_chains needs at least one chain")
    return Chain([p for c in chains for p in parse_chain(c).patterns])


def kaleidoscope_chain(n: int, depth: int = 1, rank: int = 1, n_factors: int | None = None) -> Chain:
    """Kaleidoscope hierarchy ``(B B^T)^depth`` of size n (Dao et al., ICLR 2020).

    ``B`` is ``chainable_chain(n, n, rank, n_factors)`` (the square-dyadic butterfly when n
    is a power of two and ``n_factors`` defaults to log2 n).  The result is a valid chain
    but not a chainable one: train it with ``KSLinear``, it cannot be fitted by
    ``bfc.factorize``.
    """
    if not isinstance(depth, int) or depth < 1:
        raise ChainError(f"kaleidoscope depth={depth!r} must be a positive integer")
    if n_factors is None:
        n_factors = max(1, len(_prime_list(n)))
    b = chainable_chain(n, n, rank=rank, n_factors=n_factors)
    return compose_chains(*([b, transpose_chain(b)] * depth))


def _prime_list(n: int) -> list[int]:
    return prime_factors(n)


# ---- the layer ---------------------------------------------------------------------------
def _ks_apply(p: KSPattern, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ K`` for x of shape (N, a*b*d); values (a, d, b, c)."""
    # einsum "nijl,iljk->nikl" written as one batched GEMM over the a*d dense blocks
    # (torch's CPU einsum picks a slower path for this contraction)
    n = x.shape[0]
    a, b, c, d = p.a, p.b, p.c, p.d
    if a * d == 1:
        return x @ values.reshape(b, c)
    xs = x.reshape(n, a, b, d).permute(1, 3, 0, 2).reshape(a * d, n, b)
    y = torch.bmm(xs, values.reshape(a * d, b, c))
    return y.reshape(a, d, n, c).permute(2, 0, 3, 1).reshape(n, a * c * d)


def monarch_rank(p1: KSPattern, p2: KSPattern) -> int | None:
    """r when the two-factor chain ``(1, b1, c1, d1), (a2, b2, c2, 1)`` is a Monarch product of block
    rank r = b2 / d1 with c1 = a2 r (what ``monarch_product`` computes), else None."""
    if p1.a != 1 or p2.d != 1 or p2.b % p1.d or p1.c != p2.a * (p2.b // p1.d):
        return None
    return p2.b // p1.d


def monarch_product(p1: KSPattern, v1: torch.Tensor, p2: KSPattern, v2: torch.Tensor) -> torch.Tensor:
    """The dense (b1 d1, a2 c2) matrix K_1 K_2 of a Monarch chain (``monarch_rank`` not None), formed
    with b1 d1 a2 c2 r multiply-adds.

    Row i = (beta, delta) = beta d1 + delta of K_1 reaches the intermediate j = gamma d1 + delta,
    gamma = alpha r + rho, which is row beta2 = rho d1 + delta of K_2's block alpha, so
      W[(beta, delta), (alpha, gamma2)] = sum_rho v1[0, delta, beta, alpha r + rho] v2[alpha, 0, rho d1 + delta, gamma2].
    ``x @ W`` is then one dense GEMM: for MiniLM's 384-wide rows and ~500-token batches it runs
    ~2x faster forward + backward on one CPU thread than the two batched block products of
    ``_ks_apply`` (their operand permutations are copies), at the same float32 values up to the
    summation order.
    """
    r = p2.b // p1.d
    w = torch.einsum("dbar,ardc->bdac", v1.reshape(p1.d, p1.b, p2.a, r), v2.reshape(p2.a, r, p1.d, p2.c))
    return w.reshape(p1.b * p1.d, p2.a * p2.c)


def _as_index(perm, size: int, name: str) -> torch.Tensor | None:
    if perm is None:
        return None
    arr = np.asarray(perm)
    if arr.shape != (size,) or not np.array_equal(np.sort(arr), np.arange(size)):
        raise InvalidInputError(f"{name} must be a permutation of range({size}), got shape {arr.shape}")
    return torch.as_tensor(arr.astype(np.int64))


class KSLinear(nn.Module):
    """Linear layer ``y = x @ (K_1 ... K_L) + bias`` with KS factors as parameters.

    - ``chain``: a ``bfc.ks.Chain`` (or list of ``(a, b, c, d)``) of shape
      ``(in_features, out_features)``; default ``chainable_chain(in, out, rank, n_factors)``.
      The block rank between factors is set by the chain (``chainable_chain(..., rank=r)``).
    - ``quant``: None, a ``FakeQuant`` or a format name ("int8", "fp8-e4m3", "fp8-e5m2"):
      the factors are fake-quantized in ``forward`` with a straight-through gradient.
    - ``row_perm`` / ``col_perm`` / ``residual_rank``: as in ``KSFactorization``.

    Initialization from scratch: every factor is Gaussian with std ``1/sqrt(b_l)`` (the
    first factor ``1/sqrt(3 b_1)``) so the product has the output variance of
    ``nn.Linear``'s default init; the bias is ``U(-1/sqrt(in), 1/sqrt(in))``.
    """

    def __init__(self, in_features: int, out_features: int, chain=None, *, rank: int = 1,
                 n_factors: int = 2, bias: bool = True, quant=None, row_perm=None,
                 col_perm=None, residual_rank: int = 0, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if chain is None:
            chain = chainable_chain(in_features, out_features, rank=rank, n_factors=n_factors)
        chain = parse_chain(chain)
        if chain.shape != (in_features, out_features):
            raise ChainError(f"chain {chain} has shape {chain.shape} but KSLinear is "
                             f"{in_features} -> {out_features}; build the chain for "
                             f"({in_features}, {out_features})")
        if not isinstance(residual_rank, int) or residual_rank < 0:
            raise InvalidInputError(f"residual_rank={residual_rank!r} must be a non-negative integer")
        self.in_features, self.out_features = in_features, out_features
        self.chain = chain
        self.quant = FakeQuant.parse(quant)
        self.factors = nn.ParameterList()
        for l, p in enumerate(chain.patterns):
            std = 1.0 / math.sqrt(p.b * (3 if l == 0 else 1))
            v = torch.randn(p.value_shape, generator=generator, dtype=dtype) * std
            self.factors.append(nn.Parameter(v))
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            self.bias = nn.Parameter((torch.rand(out_features, generator=generator, dtype=dtype)
                                      * 2 - 1) * bound)
        else:
            self.register_parameter("bias", None)
        if residual_rank:
            self.lr_u = nn.Parameter(torch.randn(in_features, residual_rank, generator=generator,
                                                 dtype=dtype) / math.sqrt(in_features))
            self.lr_v = nn.Parameter(torch.zeros(out_features, residual_rank, dtype=dtype))
        else:
            self.register_parameter("lr_u", None)
            self.register_parameter("lr_v", None)
        rp = _as_index(row_perm, in_features, "row_perm")
        cp = _as_index(col_perm, out_features, "col_perm")
        self.register_buffer("row_perm", rp)
        self.register_buffer("col_perm", cp)
        self.register_buffer("inv_col_perm", None if cp is None else torch.argsort(cp))

    # ---- computation ----------------------------------------------------------------
    def quantized_factors(self) -> list[torch.Tensor]:
        """The factor values the forward uses (fake-quantized when ``quant`` is set)."""
        return [fake_quant(v, self.quant) for v in self.factors]

    def _linear(self, x2: torch.Tensor) -> torch.Tensor:
        h = x2 if self.row_perm is None else x2.index_select(-1, self.row_perm)
        for p, v in zip(self.chain.patterns, self.quantized_factors()):
            h = _ks_apply(p, v, h)
        if self.inv_col_perm is not None:
            h = h.index_select(-1, self.inv_col_perm)
        if self.lr_u is not None:
            h = h + (x2 @ self.lr_u) @ self.lr_v.T
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise InvalidInputError(f"KSLinear expects inputs of shape (..., {self.in_features}), "
                                    f"got {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._linear(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The effective weight W (in_features x out_features, ONNX orientation), quant applied."""
        p = self.factors[0]
        eye = torch.eye(self.in_features, dtype=p.dtype, device=p.device)
        return self._linear(eye)

    # ---- conversions ----------------------------------------------------------------
    def to_factorization(self, quantized: bool | None = None):
        """This layer's weight as a ``bfc.factorize.KSFactorization`` (float64; bias not included).

        ``quantized`` (default: whether ``quant`` is set) exports the fake-quantized factor
        values, i.e. exactly what ``forward`` multiplies by.
        """
        quantized = self.quant is not None if quantized is None else quantized
        with torch.no_grad():
            vals = self.quantized_factors() if quantized else list(self.factors)
            factors = tuple(v.detach().cpu().double().numpy().copy() for v in vals)
            low_rank = None
            if self.lr_u is not None:
                low_rank = (self.lr_u.detach().cpu().double().numpy().copy(),
                            self.lr_v.detach().cpu().double().numpy().copy())
        perm = lambda t: None if t is None else t.cpu().numpy().copy()  # noqa: E731
        return KSFactorization(chain=self.chain, factors=factors, row_perm=perm(self.row_perm),
                               col_perm=perm(self.col_perm), low_rank=low_rank,
                               info={"source": "bfc.torch.KSLinear",
                                     "quant": None if self.quant is None else self.quant.fmt.value})

    @classmethod
    def from_factorization(cls, fac, bias=None, *, quant=None,
                           dtype: torch.dtype = torch.float32) -> "KSLinear":
        """A layer computing ``fac.apply(x) + bias`` (bias: tensor/array of shape (N,) or None)."""
        m, n = fac.chain.shape
        k = 0 if fac.low_rank is None else int(np.asarray(fac.low_rank[0]).shape[1])
        layer = cls(m, n, fac.chain, bias=bias is not None, quant=quant, row_perm=fac.row_perm,
                    col_perm=fac.col_perm, residual_rank=k, dtype=dtype)
        with torch.no_grad():
            for param, v in zip(layer.factors, fac.chain.check_values(fac.factors)):
                param.copy_(torch.as_tensor(np.asarray(v), dtype=dtype))
            if k:
                layer.lr_u.copy_(torch.as_tensor(np.asarray(fac.low_rank[0]), dtype=dtype))
                layer.lr_v.copy_(torch.as_tensor(np.asarray(fac.low_rank[1]), dtype=dtype))
            if bias is not None:
                b = torch.as_tensor(np.asarray(bias.detach().cpu() if isinstance(bias, torch.Tensor)
                                               else bias), dtype=dtype).reshape(-1)
                if b.shape != (n,):
                    raise InvalidInputError(f"bias of shape {tuple(b.shape)} does not match "
                                            f"{n} output features")
                layer.bias.copy_(b)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, chain=None, *, quant=None, rank: int = 1,
                    n_factors: int = 2, calibration=None, **factorize_kwargs) -> "KSLinear":
        """Fit the KS chain to a dense ``nn.Linear`` with ``bfc.factorize.factorize``.

        ``nn.Linear`` stores ``weight`` as (out, in); the factorized matrix is its ONNX
        orientation ``W = weight.T`` (in x out).  ``calibration`` (inputs of the layer,
        shape (..., in)) and the other keyword arguments (``order``, ``perm``,
        ``residual_rank``...) go to ``factorize``.  The fit's relative Frobenius error is
        kept in ``layer.init_rel_error``.
        """
        if not isinstance(linear, nn.Linear):
            raise InvalidInputError(f"from_linear expects a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().cpu().double().numpy().T
        if chain is None:
            chain = chainable_chain(w.shape[0], w.shape[1], rank=rank, n_factors=n_factors)
        if calibration is not None:
            if isinstance(calibration, torch.Tensor):
                calibration = calibration.detach().cpu().double().numpy()
            factorize_kwargs["calibration"] = calibration
        fac = factorize(w, chain, **factorize_kwargs)
        layer = cls.from_factorization(fac, linear.bias, quant=quant, dtype=linear.weight.dtype)
        layer.to(linear.weight.device)
        layer.init_rel_error = relative_error(w, fac.to_dense())
        return layer

    @property
    def n_params(self) -> int:
        """Weight parameters (factors + residual; bias excluded)."""
        return sum(p.numel() for p in self.factors) + (
            0 if self.lr_u is None else self.lr_u.numel() + self.lr_v.numel())

    def extra_repr(self) -> str:
        q = "none" if self.quant is None else self.quant.fmt.value
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"chain={self.chain}, quant={q}, bias={self.bias is not None}")
