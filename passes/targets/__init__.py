"""Targets: how a planned layer is emitted into the graph, and the function it then computes.

A target is one module of this package that defines a ``Target`` subclass and
registers an instance with ``@register``; ``get_target(name)`` finds it.  The planner
asks the target for the function its emitted layer computes (``simulate``) and scores
every candidate with it, so the error budget holds for the numbers the target really
produces; the rewrite pass asks it to ``emit`` the layer.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import ConfigError
from bfc.quant import QuantizedFactorization
from bfc.quant.formats import Format

_REGISTRY: dict[str, "Target"] = {}


class Target:
    """Base class.  A layer is ``y = x @ W_hat (+ bias)`` with ``W_hat`` a ``QuantizedFactorization``
    (``family`` "ks") or a ``bfc.lowbit.RotatedLayer`` (``family`` "rotated"): ``tensors``, ``emit`` and
    ``simulate`` dispatch on the layer's family; a target that cannot emit a family says why in
    ``lowbit_support`` and the planner skips it."""
    name: str = ""
    summary: str = ""
    min_opset: int = 13
    rotation_storage: str = "float16"     # how the rotation chain's values are stored
    lowbit_scale_dtype: str = "float16"   # type of the group scales of rotated layers

    def lowbit_support(self, bits: int, opset: int) -> str | None:
        """Why this target cannot emit a rotated layer of ``bits`` at ``opset`` (None: it can)."""
        return f"target {self.name} cannot emit rotated low-bit layers; use --target portable or ort"

    def compute_dtype(self, model_dtype: np.dtype) -> np.dtype:
        """Float type the emitted layer computes in (the rewrite casts around it when it differs)."""
        return np.dtype(model_dtype)

    def check(self, fmt: Format, opset: int) -> str | None:
        """Why this target cannot store ``fmt`` at ``opset`` (None: it can).  Checked before planning."""
        return None

    def simulate(self, q: QuantizedFactorization) -> Callable[[np.ndarray], np.ndarray] | None:
        """numpy ``x (n, M) -> y (n, N)`` of what the emitted layer computes, when that is not the float
        product ``q.apply`` (e.g. activations quantized on the fly); None when it is."""
        return None

    def tensors(self, b, q: QuantizedFactorization):
        """Graph constants of one weight group (created once, shared by every node of the group)."""
        raise NotImplementedError

    def emit(self, b, x: gs.Variable, rank: int | None, tensors, q: QuantizedFactorization,
             bias: gs.Constant | None) -> gs.Variable:
        """Nodes computing ``x @ W_hat (+ bias)`` for ``x`` of shape [..., M] (``rank`` if known)."""
        raise NotImplementedError

    def rotate(self, b, x: gs.Variable, rank: int | None, rotation) -> gs.Variable:
        """Nodes computing ``x Q`` as a 2-D (rows, K) tensor (the rewrite shares it among the layers
        reading ``x`` with the same Q)."""
        raise NotImplementedError

    def emit_rotated(self, b, x: gs.Variable, rank: int | None, tensors, layer, bias, rotated) -> gs.Variable:
        """Nodes computing ``layer.apply(x) (+ bias)``; ``rotated()`` returns the shared ``x Q`` (2-D)."""
        raise NotImplementedError


def register(cls):
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    """Import every module of this package once: each registers its target."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_target(name: str) -> Target:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"target={name!r} is not a bfc target; use one of {'|'.join(names())}")
    return _REGISTRY[name]
