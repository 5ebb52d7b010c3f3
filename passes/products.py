"""The typed products of the pipeline's stages (``bfc.passes.pipeline`` reads top to bottom with them).

    load       source, output path               -> LoadedModel
    normalize  LoadedModel                       -> LoadedModel   (opset upgraded where needed)
    fuse       LoadedModel                       -> LoadedModel   (onnxruntime's transformer fusions)
    sites      LoadedModel                       -> Sites
    calibrate  LoadedModel, Sites, feeds         -> Statistics
    plan       Sites, Statistics                 -> Plan          (per-layer search + schedule)
    guard      LoadedModel, Plan, feeds          -> Plan          (whole-model budget)
    distill    LoadedModel, Plan, Statistics     -> Plan          (optional training)
    rewrite    LoadedModel, Plan                 -> RewrittenModel
    save       RewrittenModel, output path       -> SavedModel
    verify     LoadedModel, Saved/RewrittenModel -> Verification

Each product is frozen: a stage returns a new one instead of changing what it was given.  A
``LayerPlan`` is the one per-layer record (frozen too: stages make changed copies with
``dataclasses.replace``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import onnx

from bfc.passes.find_sites import Site


@dataclass(frozen=True)
class LoadedModel:
    """The input model: for a path, a skeleton whose weights are references relative to ``base``
    (``bfc.passes.model_io.stream``); for a ModelProto, the proto itself (``base`` None).  Never modified."""
    model: onnx.ModelProto
    source: object                       # the path or ModelProto as given (what verification compares with)
    base: Path | None                    # the model file the skeleton's references are relative to
    files: tuple[Path, ...]              # the files the input reads (the output may touch none)
    name: str
    nbytes: int                          # model bytes, weights included
    opset: int
    upgraded: bool = False               # ``model`` is a changed copy of the input (opset upgrade, fusions)
    notes: tuple[str, ...] = ()
    prerotated: frozenset = frozenset()  # tensors that arrive rotated (``bfc.passes.head_rotation``)

    @property
    def input_bytes(self) -> int:
        """What the user compares: the bytes of the input's files (model + external data), else ``nbytes``."""
        return sum(Path(f).stat().st_size for f in self.files) or self.nbytes


@dataclass(frozen=True)
class Sites:
    """Every MatMul/Gemm weight site of the model (eligible or not, each with its reason)."""
    sites: tuple[Site, ...]

    @property
    def eligible(self) -> int:
        return sum(s.eligible for s in self.sites)


@dataclass(frozen=True)
class Statistics:
    """Per-site calibration statistics (``LayerStats`` by weight name); ``layers`` None: no calibration."""
    layers: dict | None = None
    notes: tuple[str, ...] = ()

    def get(self, weight_name: str):
        return None if self.layers is None else self.layers.get(weight_name)


@dataclass(frozen=True)
class LayerPlan:
    site: Site
    weights: object | None = None    # a layer form (QuantizedFactorization | RotatedLayer) or None: dense
    structure: str = "dense"
    precision: str = "-"
    error: float | None = None
    error_kind: str = "weight"
    reason: str | None = None
    note: str | None = None      # e.g. what reconstruction changed
    seconds: float | None = None  # wall time of planning this layer (bfc.passes.layer_runner)
    worker: str | None = None     # who planned it: main, pid N, dask NAME
    resumed: bool = False         # loaded from the work folder instead of planned
    alternatives: tuple = ()      # the allocator: every candidate considered, (label, bytes, error)

    @property
    def rewritten(self) -> bool:
        return self.weights is not None

    @property
    def params_before(self) -> int:
        return int(self.site.weight.size) if self.site.weight is not None else 0

    @property
    def bytes_before(self) -> int:
        return int(self.site.weight.nbytes) if self.site.weight is not None else 0

    @property
    def is_embedding(self) -> bool:
        return bool(self.site.nodes) and self.site.nodes[0].op == "Gather"

    @property
    def flops_before(self) -> int:
        return 0 if self.is_embedding else 2 * self.params_before

    @property
    def params_after(self) -> int:
        return self.weights.n_params if self.rewritten else self.params_before

    @property
    def bytes_after(self) -> int:
        return self.weights.nbytes if self.rewritten else self.bytes_before

    @property
    def resident_after(self) -> int:
        """Weight bytes onnxruntime keeps after session creation (the form's, or the dense weight's)."""
        return self.weights.resident_nbytes if self.rewritten else self.bytes_before

    @property
    def flops_after(self) -> int:
        return self.weights.flops_per_row if self.rewritten else self.flops_before

    def kept_dense(self, reason: str, error: float | None = None) -> "LayerPlan":
        """This layer left dense, with the reason (and the best error seen)."""
        return replace(self, weights=None, structure="dense", precision="-", reason=reason,
                       error=self.error if error is None else error)


@dataclass(frozen=True)
class Plan:
    """One LayerPlan per site (in the order of ``Sites``), plus what the stages did beyond it."""
    layers: tuple[LayerPlan, ...]
    notes: tuple[str, ...] = ()
    output_error: float | None = None            # whole-model output error measured by the guard
    tensor_updates: dict = field(default_factory=dict)   # graph tensor name -> new value (distilled LayerNorm)
    post_training: Plan | None = None            # allocated with distillation headroom: the plan to fall back to

    @property
    def rewritten(self) -> tuple[LayerPlan, ...]:
        return tuple(p for p in self.layers if p.rewritten)


@dataclass(frozen=True)
class RewrittenModel:
    """The output model (for a path input, a skeleton whose untouched weights are references relative
    to ``base``)."""
    model: onnx.ModelProto
    base: Path | None
    nbytes: int
    changed: bool                               # False: the input as it is


@dataclass(frozen=True)
class SavedModel:
    path: Path
    nbytes: int                                 # bytes written (model file + its .data file)


@dataclass(frozen=True)
class Verification:
    outputs: tuple = ()                         # OutputCheck per model output
    verified_on: str | None = None              # "calibration" | "random"
    not_verified: str | None = None             # why it could not run
    resident: tuple[int, int] | None = None     # session resident bytes (input, output), measured (model_io/measure.py)
    latency_ms: tuple[float, float] | None = None   # median ms per run at batch 1, 1 thread (input, output)
