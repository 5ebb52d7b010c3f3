"""Targets: how a planned layer is emitted into the graph, and the function it then computes.

A target is one module of this package that defines a ``Target`` subclass and
registers an instance with ``@register``; ``get_target(name)`` finds it.  Emitters are a
(form x target) registry: the module registers one ``FormEmitter`` per layer form it
supports with ``@emits(name, FormType)``, so adding a form or a target is one file plus one
registration.  The planner asks the target for the function its emitted layer computes
(``simulate``) and scores every candidate with it, so the error budget holds for the numbers
the target really produces; the rewrite asks the form's emitter for the nodes.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import ConfigError, UnsupportedError
from bfc.quant.formats import Format

_REGISTRY: dict[str, "Target"] = {}


class FormEmitter:
    """How one target emits one layer form, and the function the emitted nodes compute.

    A form is a type of planned layer (``bfc.quant.QuantizedFactorization``: a KS chain;
    ``bfc.lowbit.RotatedLayer``: rotated low-bit, ...).  Each target module registers one emitter per
    form it supports with ``@emits(TARGET_NAME, FormType)``; a target without an emitter for a form
    refuses it with a reason (``Target.emitter``)."""

    def support(self, form, opset: int) -> str | None:
        """Why this emitter cannot emit ``form`` at ``opset`` (None: it can)."""
        return None

    def simulate(self, form) -> Callable[[np.ndarray], np.ndarray] | None:
        """numpy ``x (n, M) -> y (n, N)`` of what the emitted layer computes, when that is not the float
        product ``form.apply`` (e.g. activations quantized on the fly); None when it is."""
        return None

    def tensors(self, b, form):
        """Graph constants of one weight group (created once, shared by every node of the group)."""
        raise NotImplementedError

    def emit(self, b, x: gs.Variable, rank: int | None, tensors, form, bias: gs.Constant | None,
             rotated: Callable[[], gs.Variable]) -> gs.Variable:
        """Nodes computing ``form.apply(x) (+ bias)`` for ``x`` of shape [..., M] (``rank`` if known);
        ``rotated()`` returns the shared 2-D ``x Q`` of a rotated form (``Target.rotate``)."""
        raise NotImplementedError


_EMITTERS: dict[tuple[str, type], FormEmitter] = {}


def emits(target_name: str, form_type: type):
    """Class decorator: register an instance of a FormEmitter subclass for (target, form)."""
    def deco(cls):
        _EMITTERS[(target_name, form_type)] = cls()
        return cls
    return deco


class Target:
    """Base class.  A layer is ``y = form.apply(x) (+ bias)``; the target's registered emitters
    (``emits``) say how each form is emitted and what it computes.  A target inherits the emitters of
    the targets it subclasses (ort: portable's, except those it registers itself)."""
    name: str = ""
    summary: str = ""
    min_opset: int = 13
    rotation_storage: str = "float16"     # how the rotation chain's values are stored
    lowbit_scale_dtype: str = "float16"   # type of the group scales of rotated layers
    lowbit_kronecker: bool = True         # its rotated low-bit (RotatedLayer) emitter applies a KroneckerRotation

    def lowbit_support(self, bits: int, opset: int) -> str | None:
        """Why this target cannot emit a rotated layer of ``bits`` at ``opset`` (None: it can)."""
        return f"target {self.name} cannot emit rotated low-bit layers; use --target portable or ort"

    def compute_dtype(self, model_dtype: np.dtype) -> np.dtype:
        """Float type the emitted layer computes in (the rewrite casts around it when it differs)."""
        return np.dtype(model_dtype)

    def check(self, fmt: Format, opset: int) -> str | None:
        """Why this target cannot store ``fmt`` at ``opset`` (None: it can).  Checked before planning."""
        return None

    def emitter(self, form) -> FormEmitter:
        """The registered emitter of ``form``'s type for this target (or for a target it subclasses)."""
        for cls in type(self).__mro__:
            name = getattr(cls, "name", None)
            em = _EMITTERS.get((name, type(form))) if name else None
            if em is not None:
                return em
        raise UnsupportedError(f"target {self.name} cannot emit {type(form).__name__} layers")

    def simulate(self, form) -> Callable[[np.ndarray], np.ndarray] | None:
        """What the emitted layer computes (see ``FormEmitter.simulate``)."""
        return self.emitter(form).simulate(form)

    def rotate(self, b, x: gs.Variable, rank: int | None, rotation) -> gs.Variable:
        """Nodes computing ``x Q`` as a 2-D (rows, K) tensor (the rewrite shares it among the layers
        reading ``x`` with the same Q)."""
        raise UnsupportedError(f"target {self.name} does not emit a separate rotation")


def register(cls):
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    """Import every module of this package once: each registers its target."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def is_registered(target: "Target") -> bool:
    """``target`` is the registered instance of its name (another process can find it by name)."""
    _discover()
    return _REGISTRY.get(getattr(target, "name", None)) is target


def names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def get_target(name: str) -> Target:
    _discover()
    if name not in _REGISTRY:
        raise ConfigError(f"target={name!r} is not a bfc target; use one of {'|'.join(names())}")
    return _REGISTRY[name]
