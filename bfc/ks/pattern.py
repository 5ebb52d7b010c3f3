"""Kronecker-sparse (KS) patterns and bfc's canonical factor value layout.

A KS pattern ``(a, b, c, d)`` is the support ``I_a (x) 1_{b x c} (x) I_d`` of a
matrix of shape ``(a*b*d, a*c*d)`` with ``a*b*c*d`` nonzeros.

Canonical value layout (used everywhere in bfc; converters live at the edges)::

    values.shape == (a, d, b, c)
    values[i, l, j, k] == K[i*b*d + j*d + l,  i*c*d + k*d + l]

so ``values[i, l]`` is a dense ``b x c`` block.  Products are taken as ONNX
``MatMul`` does, batch first: ``apply(values, x) == x @ K`` for ``x`` of shape
``(..., a*b*d)``; the result has shape ``(..., a*c*d)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ChainError, InvalidInputError


@dataclass(frozen=True, order=True)
class KSPattern:
    a: int
    b: int
    c: int
    d: int

    def __post_init__(self):
        for name in ("a", "b", "c", "d"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ChainError(f"KS pattern {name}={v!r} must be a positive integer")
            object.__setattr__(self, name, int(v))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a * self.b * self.d, self.a * self.c * self.d)

    @property
    def nnz(self) -> int:
        return self.a * self.b * self.c * self.d

    @property
    def value_shape(self) -> tuple[int, int, int, int]:
        return (self.a, self.d, self.b, self.c)

    def row_index(self) -> np.ndarray:
        """Row of every value, shape ``value_shape``."""
        a, b, d = self.a, self.b, self.d
        i = np.arange(a)[:, None, None, None]
        l = np.arange(d)[None, :, None, None]
        j = np.arange(b)[None, None, :, None]
        return np.broadcast_to(i * b * d + j * d + l, self.value_shape)

    def col_index(self) -> np.ndarray:
        """Column of every value, shape ``value_shape``."""
        a, c, d = self.a, self.c, self.d
        i = np.arange(a)[:, None, None, None]
        l = np.arange(d)[None, :, None, None]
        k = np.arange(c)[None, None, None, :]
        return np.broadcast_to(i * c * d + k * d + l, self.value_shape)

    def support(self) -> np.ndarray:
        """Boolean mask of the support, shape ``self.shape``."""
        return np.kron(np.kron(np.eye(self.a, dtype=bool), np.ones((self.b, self.c), bool)),
                       np.eye(self.d, dtype=bool))

    def check_values(self, values) -> np.ndarray:
        values = np.asarray(values)
        if values.shape != self.value_shape:
            raise ChainError(f"values for pattern {self} must have shape (a, d, b, c) = "
                             f"{self.value_shape}, got {values.shape}")
        return values

    def to_dense(self, values) -> np.ndarray:
        values = self.check_values(values)
        a, b, c, d = self.a, self.b, self.c, self.d
        out = np.zeros((a, b, d, a, c, d), dtype=values.dtype)
        ia, il = np.arange(a)[:, None], np.arange(d)[None, :]
        out[ia, :, il, ia, :, il] = values
        return out.reshape(self.shape)

    def from_dense(self, matrix) -> np.ndarray:
        """Values of ``matrix`` on the support (entries off the support are dropped)."""
        matrix = np.asarray(matrix)
        if matrix.shape != self.shape:
            raise ChainError(f"matrix of shape {matrix.shape} does not fit pattern {self} "
                             f"of shape {self.shape}")
        a, b, c, d = self.a, self.b, self.c, self.d
        if a == 1 and d == 1:
            return matrix.reshape(1, 1, b, c)
        ia, il = np.arange(a)[:, None], np.arange(d)[None, :]
        return matrix.reshape(a, b, d, a, c, d)[ia, :, il, ia, :, il]

    def apply(self, values, x) -> np.ndarray:
        """``x @ K`` without forming K: x has shape (..., a*b*d)."""
        values = self.check_values(values)
        x = np.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.shape[0]:
            raise InvalidInputError(f"input of shape {x.shape} does not match pattern {self}: "
                                    f"last dimension must be {self.shape[0]}")
        a, b, c, d = self.a, self.b, self.c, self.d
        xs = x.reshape(x.shape[:-1] + (a, b, d))
        y = np.einsum("...ijl,iljk->...ikl", xs, values, optimize=True)
        return y.reshape(x.shape[:-1] + (a * c * d,))

    def __str__(self) -> str:
        return f"({self.a},{self.b},{self.c},{self.d})"
