"""What ``bfc optimize`` did: one row per site, totals before/after, verification."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LayerRow:
    layer: str
    nodes: int
    shape: tuple[int, ...]
    structure: str
    precision: str
    params_before: int
    params_after: int
    bytes_before: int
    bytes_after: int
    flops_before: int          # per input row (one token / sample)
    flops_after: int
    error: float | None        # relative layer error (see error_kind)
    error_kind: str            # "output" (calibration activations) or "weight"
    reason: str | None         # why the layer was not rewritten
    note: str | None = None    # what else was done to a rewritten layer (e.g. reconstruction)
    plan_seconds: float | None = None   # wall time of planning the layer (None: not planned)
    worker: str | None = None           # who planned it (main, pid N, dask NAME)
    resumed: bool = False               # loaded from the work folder (--work-dir) instead of planned

    @property
    def rewritten(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class OutputRow:
    name: str
    rel_error: float
    cosine: float


@dataclass
class Report:
    model: str
    target: str
    layers: list[LayerRow] = field(default_factory=list)
    outputs: list[OutputRow] = field(default_factory=list)
    verified_on: str | None = None   # "calibration" | "random" | None (skipped or not possible)
    not_verified: str | None = None  # why verification could not run
    model_bytes_before: int = 0
    model_bytes_after: int = 0         # bytes written (model file + its external data) when saved
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    calibrated: bool | None = None   # layer errors measured on --calibration data (None: not said; the
    #                                  table then takes verified_on's word)
    resident_bytes: tuple[int, int] | None = None   # session resident bytes, input and output (measured)
    latency_ms: tuple[float, float] | None = None   # median ms per run, batch 1, 1 thread, input and output
    objective: str = "size"

    def _legend(self) -> str:
        """What the error column measures: only the kinds it shows, on the inputs it was measured on."""
        kinds = {r.error_kind for r in self.layers if r.error is not None}
        parts = []
        if "weight" in kinds:
            parts.append("(w) = relative weight error")
        if "output" in kinds:
            on = {True: "calibration data", False: "generated inputs"}.get(
                self.calibrated, "generated inputs" if self.verified_on == "random" else "calibration data")
            parts.append(("else " if parts else "") + f"relative output error on {on}")
        return "; errors: " + ", ".join(parts) if parts else ""

    @property
    def rewritten(self) -> list[LayerRow]:
        return [r for r in self.layers if r.rewritten]

    def totals(self) -> dict:
        t = {k: sum(getattr(r, k) for r in self.layers)
             for k in ("params_before", "params_after", "bytes_before", "bytes_after", "flops_before", "flops_after")}
        t.update(sites=len(self.layers), rewritten=len(self.rewritten),
                 model_bytes_before=self.model_bytes_before, model_bytes_after=self.model_bytes_after)
        return t

    def to_dict(self) -> dict:
        d = asdict(self)
        d["totals"] = self.totals()
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def table(self) -> str:
        head = ("layer", "shape", "structure", "precision", "params", "bytes", "FLOPs/row", "error", "note")
        rows = []
        for r in self.layers:
            err = "-" if r.error is None else f"{r.error:.2e}" + ("" if r.error_kind == "output" else " (w)")
            note = r.reason or "; ".join(x for x in (r.note, f"{r.nodes} nodes share the weight" if r.nodes > 1
                                                     else None) if x)
            rows.append((r.layer, "x".join(map(str, r.shape)) or "-", r.structure, r.precision,
                         _ratio(r.params_before, r.params_after), _ratio(r.bytes_before, r.bytes_after, True),
                         _ratio(r.flops_before, r.flops_after), err, note))
        t = self.totals()
        rows.append(("TOTAL", "", f"{t['rewritten']}/{t['sites']} rewritten", "",
                     _ratio(t["params_before"], t["params_after"]), _ratio(t["bytes_before"], t["bytes_after"], True),
                     _ratio(t["flops_before"], t["flops_after"]), "", ""))
        widths = [max(len(str(x[i])) for x in [head] + rows) for i in range(len(head))]
        widths[-1] = 0
        fmt = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
        lines = [fmt(head), fmt(["-" * w for w in widths[:-1]] + ["----"])] + [fmt(r) for r in rows]
        lines.append(f"model file: {size_text(self.model_bytes_before)} -> {size_text(self.model_bytes_after)}"
                     f"  ({self.seconds:.1f} s, target {self.target}{self._legend()})")
        lines += [f"note: {n}" for n in self.notes]
        if self.verified_on:
            on = "generated" if self.verified_on == "random" else self.verified_on
            for o in self.outputs:
                lines.append(f"verified output {o.name} on {on} inputs: relative error "
                             f"{o.rel_error:.3e}, cosine {o.cosine:.5f}")
        elif self.not_verified:
            lines.append(f"not verified: {self.not_verified}")
        else:
            lines.append("verification skipped (--no-verify)")
        lines += [f"warning: {w}" for w in self.warnings()]
        lines.append(self.summary())
        return "\n".join(lines)

    def warnings(self) -> list[str]:
        """What a user must not miss: more FLOPs or a slower model than the input."""
        out = []
        t = self.totals()
        if t["flops_after"] > t["flops_before"]:
            out.append(f"the rewritten layers need more FLOPs than the original ({t['flops_after']:,} vs "
                       f"{t['flops_before']:,} per row)")
        if self.latency_ms is not None and self.latency_ms[1] > 1.1 * self.latency_ms[0]:
            out.append(f"the optimized model runs slower than the input ({self.latency_ms[1]:.3g} ms vs "
                       f"{self.latency_ms[0]:.3g} ms per run, batch 1, 1 thread)"
                       + ("; --objective size does not weigh latency" if self.objective == "size" else ""))
        return out

    def summary(self) -> str:
        """One line: file and resident bytes before -> after, verified output error, latency before -> after."""
        parts = [f"file {size_text(self.model_bytes_before)} -> {size_text(self.model_bytes_after)}"]
        if self.resident_bytes is not None:
            parts.append(f"resident {size_text(self.resident_bytes[0])} -> {size_text(self.resident_bytes[1])}")
        errs = [o.rel_error for o in self.outputs]
        if errs:
            on = "generated" if self.verified_on == "random" else self.verified_on
            parts.append(f"output error {max(errs):.3g} on {on} inputs")
        if self.latency_ms is not None:
            parts.append(f"latency {self.latency_ms[0]:.3g} -> {self.latency_ms[1]:.3g} ms (batch 1, 1 thread, "
                         f"target {self.target})")
        return "summary: " + ", ".join(parts)


def compared(value: float, bound: float, digits: int = 3) -> tuple[str, str]:
    """``value`` and ``bound`` printed with ``digits`` significant digits, or more where that would
    print them equal although they differ: "error 0.2004 > max-error 0.2", never "0.2 > 0.2"."""
    value, bound = float(value), float(bound)
    for d in range(digits, 18):
        a, b = f"{value:.{d}g}", f"{bound:.{d}g}"
        if a != b or value == bound:
            return a, b
    return repr(value), repr(bound)


def size_text(n: int) -> str:
    """Decimal units (1 kB = 1000 B), as everywhere in bfc: the one way bfc prints a size."""
    for unit, k in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"


def _ratio(before: int, after: int, size: bool = False) -> str:
    f = size_text if size else _count
    if before == after:
        return f(before)
    return f"{f(before)}->{f(after)}"


def _count(n: int) -> str:
    for unit, k in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= k:
            return f"{n / k:.1f}{unit}"
    return str(n)
