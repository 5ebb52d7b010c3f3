"""Fake quantization of KS factor values with a straight-through estimator (STE).

Formats use the same names as ``bfc.config.Precision`` ("int8", "fp8-e4m3", "fp8-e5m2").

Scales are per channel, absmax, in bfc's canonical factor layout ``(a, d, b, c)``:
a channel is one column of the factor K (fixed ``i, l, k``), so the scale is
constant along ``b`` and has shape ``(a, d, 1, c)``::

    s = max_j |v[i, l, j, k]| / qmax          (qmax = 127, 448 or 57344)
    int8:  q(v) = s * clamp(round(v / s), -127, 127)
    fp8:   q(v) = s * float(cast_fp8(clamp(v / s, -qmax, qmax)))

``torch`` casts to ``float8_e5m2`` overflow to inf, so values are clamped first
(saturation, as ONNX ``QuantizeLinear(saturate=1)``).  With ``scaling="none"`` the
fp8 formats cast the raw values (no scale; out-of-range values saturate).

The STE returns ``v + (q(v) - v).detach()``: the forward sees q(v), the gradient
with respect to v is the identity (no clipping happens with absmax scales).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from bfc.errors import ConfigError


class QuantFormat(str, enum.Enum):
    INT8 = "int8"
    FP8_E4M3 = "fp8-e4m3"
    FP8_E5M2 = "fp8-e5m2"

    @property
    def qmax(self) -> float:
        return {"int8": 127.0, "fp8-e4m3": 448.0, "fp8-e5m2": 57344.0}[self.value]

    @property
    def torch_dtype(self):
        return {"int8": torch.int8, "fp8-e4m3": torch.float8_e4m3fn,
                "fp8-e5m2": torch.float8_e5m2}[self.value]


class Scaling(str, enum.Enum):
    PER_CHANNEL = "per-channel"   # absmax over b, scale shape (a, d, 1, c)
    NONE = "none"                 # fp8 only: raw saturating cast


@dataclass(frozen=True)
class FakeQuant:
    """Weight fake-quantization settings of a ``KSLinear``."""
    fmt: QuantFormat = QuantFormat.INT8
    scaling: Scaling = Scaling.PER_CHANNEL

    def __post_init__(self):
        for name, enum_type in (("fmt", QuantFormat), ("scaling", Scaling)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_type(value))
            except ValueError:
                allowed = [e.value for e in enum_type]
                raise ConfigError(f"FakeQuant.{name}={value!r} is not one of {allowed}") from None
        if self.fmt is QuantFormat.INT8 and self.scaling is Scaling.NONE:
            raise ConfigError("FakeQuant(fmt='int8') needs scaling='per-channel' (an int8 cast "
                              "without a scale would round every weight to an integer)")

    @classmethod
    def parse(cls, spec) -> "FakeQuant | None":
        """None, a FakeQuant, or a format name ("int8", "fp8-e4m3", "fp8-e5m2")."""
        if spec is None or isinstance(spec, FakeQuant):
            return spec
        return cls(fmt=spec)


def channel_scale(values: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Absmax scale per column of the factor: shape (a, d, 1, c) for values (a, d, b, c)."""
    amax = values.detach().abs().amax(dim=-2, keepdim=True)
    scale = amax / fmt.qmax
    # an all-zero channel quantizes to zero with any scale; avoid 0/0
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_values(values: torch.Tensor, spec: FakeQuant) -> torch.Tensor:
    """q(values) in the values' dtype (no gradient path; see ``fake_quant``)."""
    fmt = spec.fmt
    v = values.detach()
    if spec.scaling is Scaling.PER_CHANNEL:
        s = channel_scale(v, fmt)
        x = v / s
    else:
        s, x = None, v
    if fmt is QuantFormat.INT8:
        q = torch.clamp(torch.round(x), -fmt.qmax, fmt.qmax)
    else:
        x = torch.clamp(x.float(), -fmt.qmax, fmt.qmax)
        q = x.to(fmt.torch_dtype).to(torch.float32).to(v.dtype)
    return q * s if s is not None else q


def fake_quant(values: torch.Tensor, spec: FakeQuant | None) -> torch.Tensor:
    """Straight-through fake quantization: forward q(values), gradient identity."""
    if spec is None:
        return values
    return values + (quantize_values(values, spec) - values).detach()
