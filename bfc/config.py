"""Configuration of ``bfc optimize``: one frozen dataclass, validated on construction.

The TOML file (``--config FILE.toml``) uses the same keys as the CLI options, with
dashes or underscores (``max-error`` or ``max_error``); CLI options given explicitly
override the file.
"""
from __future__ import annotations

import enum
import math
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path

from bfc.errors import ConfigError
from bfc.quant.chain import Method as QuantMethod
from bfc.quant.formats import Format, get_format


class Structure(str, enum.Enum):
    AUTO = "auto"
    BUTTERFLY = "butterfly"
    MONARCH = "monarch"
    CHAIN3 = "chain3"               # three KS factors (block rank via --rank)
    LOWRANK_RESIDUAL = "lowrank-residual"
    ROTATED = "rotated"             # orthogonal butterfly rotation + int2/3/4 group-wise weight (bfc.lowbit)


class Precision(str, enum.Enum):
    """``auto`` or the name of a format of ``bfc.quant.formats.FORMATS`` (the one format table)."""
    AUTO = "auto"
    INT8 = "int8"
    INT4 = "int4"
    FP8_E4M3 = "fp8-e4m3"
    FP8_E5M2 = "fp8-e5m2"
    FP16 = "fp16"
    FP32 = "fp32"

    @property
    def format(self) -> Format:
        return get_format(self.value)

    @property
    def bits(self) -> int:
        return self.format.bits


# The default whole-model budget: the relative output error that keeps STS-B within 0.3 point (MiniLM-L6,
# all-mpnet-base-v2) and Fashion-MNIST top-1 within 0.3% (docs/default_budget.md).
DEFAULT_MAX_OUTPUT_ERROR = 0.2

# Precisions tried by ``precision=auto``, lowest first (HAWQ-style: the lowest that keeps the budget).
AUTO_PRECISIONS = (Precision.INT8, Precision.FP8_E4M3, Precision.FP16, Precision.FP32)


def _enum(cls, name, value):
    if isinstance(value, cls):
        return value
    try:
        return cls(str(value).lower())
    except ValueError:
        allowed = "|".join(m.value for m in cls)
        raise ConfigError(f"{name}={value!r} is not allowed; use one of {allowed}") from None


@dataclass(frozen=True)
class OptimizeConfig:
    """Options of ``bfc.optimize`` (the CLI flags have the same names with dashes).

    structure:   auto or one fixed structure.  auto with precision auto (the default) is the allocator:
                 every family's candidates per layer (rotated 2/3/4-bit codes, int8, fp16, quantized
                 embedding rows, unchanged), the smallest model whose whole-model error keeps
                 ``max_output_error`` (``bfc.passes.schedule.allocate_layers``); auto with a fixed precision:
                 the cheapest KS structure meeting ``max_error`` per layer
    rank:        block rank between factors (fixed structures); auto tries 1, 2, 4, ...
    residual_rank: rank of the low-rank residual for ``lowrank-residual``
    precision:   storage format of the factor values, or auto (the lowest meeting ``max_error``; with a fixed
                 structure and no ``max_error``: int8)
    quant_method: bfc.quant method (auto = best of the optimal rank-one orders; rtn is fastest)
    max_error:   per-layer relative output error budget; a layer that cannot meet it stays dense (the
                 allocator: a cap on each layer's candidates; None: no per-layer cap)
    max_output_error: budget of the whole model's relative output error (on the calibration inputs, or
                 generated ones); it always holds: layers are backed off until it does, and a model whose
                 error cannot be measured is left unchanged (None: no whole-model check).  Default
                 ``DEFAULT_MAX_OUTPUT_ERROR`` (docs: what it keeps of STS-B and Fashion-MNIST top-1)
    target_size: stop compressing once the model's weight bytes are at most this many bytes
    min_size:    layers with fewer weight elements stay dense
    include/exclude: fnmatch patterns on node names
    target:      the graph target that emits the layers (``bfc.passes.targets``: portable, custom-op);
                 its name is checked against the registry when the pipeline starts
    calibration: .npz of model inputs (names as keys) used for calibration and verification
    strict:      a run that rewrites nothing is an error (default: the model is written unchanged)
    calibration_rows: at most this many activation rows per layer (seeded subsample) enter its Gram matrix
    distill:     .npz of unlabeled model inputs: train the planned layers end to end against the original
                 model before the rewrite (bfc.distill; needs torch); None: no distillation
    distill_steps, distill_batch, distill_lr: Adam steps, samples per step, peak step size (cosine decay)
    distill_match: names of intermediate tensors matched as well as the outputs (e.g. each block's output)
    distill_layernorm: also train the LayerNormalization scales and biases
    reconstruct: fine-tune each quantized layer's factors to its calibration outputs (bfc.reconstruct)
    reconstruct_steps, reconstruct_lr: Adam steps per layer and step size (relative to each factor's RMS)
    bits, group_size: the rotated family's weight format (int2|3|4, one scale per group of 32|64|128 rows)
    learn_rotation: learn each rotation on the calibration Gram (ButterflyQuant-style; needs torch),
                 rotation_steps Adam steps; else the randomized Hadamard-like butterfly
    correction_rank: rank of the int8 low-rank correction of rotated layers; 0 = per layer, only when
                 it is the cheapest way to meet max_error
    objective:   size (the smallest plan meeting the budgets) or latency (as size, but a layer whose
                 rewrite runs slower than its dense MatMul in the target stays dense: bfc.passes.latency
                 measures both in onnxruntime, 1 thread, at latency_batch * latency_seq rows)
    latency_batch, latency_seq: rows per call of the latency measurement = batch * sequence length
    max_metric_drop: with an ``evaluate`` function (``bfc.optimize(..., evaluate=fn)``, ``--evaluate``), the
                 largest drop of the user's metric the allocator may spend; its budget is searched against it
    fuse:        onnxruntime's transformer fusions (attention, LayerNormalization, Gelu) before the sites are
                 found (``bfc.passes.fuse``; the projections stay separate MatMuls); None: on for a recognized
                 transformer when the target runs in onnxruntime (ort, custom-op), off for portable
    workers:     processes planning layers (bfc.passes.layer_runner); None: the usable cores (in process
                 for small models), 1: in this process; the output bytes never depend on it
    cluster:     plan on a Dask distributed cluster at this scheduler address (``local``: a LocalCluster
                 of ``workers`` processes); needs ``pip install 'bfc[cluster]'``
    work_dir:    folder of finished layer plans (content-keyed): a rerun loads them instead of planning
                 again, and the folder is kept; None: a folder in the system temp dir, removed once
                 planning finishes (a killed run resumes from it)
    """
    structure: Structure = Structure.AUTO
    rank: int | None = None
    residual_rank: int = 8
    precision: Precision = Precision.AUTO
    quant_method: QuantMethod = QuantMethod.AUTO
    max_error: float | None = None
    max_output_error: float | None = DEFAULT_MAX_OUTPUT_ERROR
    target_size: int | None = None
    min_size: int = 4096
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    calibration: Path | None = None
    calibration_rows: int = 8192
    target: str = "ort"
    verify: bool = True
    strict: bool = False
    fix_batch: int | None = None
    seed: int = 0
    distill: Path | None = None
    distill_steps: int = 500
    distill_batch: int = 32
    distill_lr: float = 5e-4
    distill_match: tuple[str, ...] = ()
    distill_layernorm: bool = False
    reconstruct: bool = False
    reconstruct_steps: int = 100
    reconstruct_lr: float = 1e-2
    bits: int = 4
    group_size: int = 64
    learn_rotation: bool = False
    rotation_steps: int = 100
    correction_rank: int = 0
    objective: str = "size"
    latency_batch: int = 1
    latency_seq: int = 1
    fuse: bool | None = None
    max_metric_drop: float | None = None
    workers: int | None = None
    cluster: str | None = None
    work_dir: Path | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("structure", _enum(Structure, "structure", self.structure))
        set_("precision", _enum(Precision, "precision", self.precision))
        if not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"target={self.target!r} must be a target name such as portable or custom-op")
        set_("target", self.target.lower())
        set_("quant_method", _enum(QuantMethod, "quant_method", self.quant_method))
        for name, lo in (("rank", 1), ("residual_rank", 1), ("min_size", 0), ("target_size", 1),
                         ("fix_batch", 1), ("seed", 0), ("calibration_rows", 1), ("distill_steps", 1),
                         ("distill_batch", 1),
                         ("reconstruct_steps", 0), ("rotation_steps", 0), ("correction_rank", 0),
                         ("latency_batch", 1), ("latency_seq", 1)):
            v = getattr(self, name)
            if v is None and name in ("rank", "target_size", "fix_batch"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ConfigError(f"{name}={v!r} must be an integer >= {lo}")
        for name in ("max_error", "max_output_error", "reconstruct_lr", "distill_lr", "max_metric_drop"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive finite number (e.g. 0.05 for 5%)")
            set_(name, float(v))
        for name in ("include", "exclude"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = (v,)
            if not all(isinstance(p, str) and p for p in v):
                raise ConfigError(f"{name}={v!r} must be a list of non-empty node-name patterns")
            set_(name, tuple(v))
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers={self.workers!r} must be an integer >= 1 (1: plan in this process)")
        if self.cluster is not None and (not isinstance(self.cluster, str) or not self.cluster.strip()):
            raise ConfigError(f"cluster={self.cluster!r} must be a Dask scheduler address such as "
                              "tcp://host:8786, or local")
        if self.work_dir is not None:
            set_("work_dir", Path(self.work_dir))
        if self.calibration is not None:
            set_("calibration", Path(self.calibration))
        if self.distill is not None:
            set_("distill", Path(self.distill))
        v = (self.distill_match,) if isinstance(self.distill_match, str) else self.distill_match
        if not isinstance(v, (tuple, list)) or not all(isinstance(n, str) and n for n in v):
            raise ConfigError(f"distill_match={self.distill_match!r} must be a list of tensor names")
        set_("distill_match", tuple(v))
        if not isinstance(self.distill_layernorm, bool):
            raise ConfigError(f"distill_layernorm={self.distill_layernorm!r} must be true or false")
        if not isinstance(self.reconstruct, bool):
            raise ConfigError(f"reconstruct={self.reconstruct!r} must be true or false")
        if self.reconstruct and self.calibration is None:
            raise ConfigError("reconstruct needs calibration data: pass --calibration FILE.npz of model inputs")
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
            raise ConfigError(f"bits={self.bits!r} is not allowed; use 2, 3 or 4 (rotated low-bit weights)")
        if isinstance(self.group_size, bool) or self.group_size not in (32, 64, 128):
            raise ConfigError(f"group_size={self.group_size!r} is not allowed; use 32, 64 or 128")
        if not isinstance(self.learn_rotation, bool):
            raise ConfigError(f"learn_rotation={self.learn_rotation!r} must be true or false")
        if self.fuse is not None and not isinstance(self.fuse, bool):
            raise ConfigError(f"fuse={self.fuse!r} must be true, false or absent (auto)")
        for name in ("verify", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be true or false")
        if not isinstance(self.objective, str) or self.objective.lower() not in ("size", "latency"):
            raise ConfigError(f"objective={self.objective!r} is not allowed; use size or latency")
        set_("objective", self.objective.lower())
        if self.allocating:
            if self.max_output_error is None and self.max_error is None and self.target_size is None:
                raise ConfigError("structure=auto with precision=auto needs a budget: max_output_error (e.g. "
                                  f"{DEFAULT_MAX_OUTPUT_ERROR}), max_error or target_size")
            return
        if self.structure is Structure.AUTO and self.max_error is None and self.target_size is None:
            raise ConfigError("structure=auto with a fixed precision needs a budget: set max_error (e.g. 0.1) or "
                              "target_size, or pick a fixed structure such as monarch")
        if self.precision is Precision.AUTO and self.max_error is None:
            set_("precision", Precision.INT8)     # a fixed structure without a per-layer budget: int8 values

    @property
    def allocating(self) -> bool:
        """structure and precision both auto: the model-level allocator plans (see the class doc)."""
        return self.structure is Structure.AUTO and self.precision is Precision.AUTO

    def replace(self, **changes) -> "OptimizeConfig":
        return replace(self, **changes)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_toml(cls, path, **overrides) -> "OptimizeConfig":
        """Config from a TOML file (same keys as the CLI); ``overrides`` win over the file."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the --config path") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
        return cls.from_dict({**raw, **overrides}, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "OptimizeConfig":
        known = set(cls.keys())
        out = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name == "no_verify":
                name, value = "verify", not value
            if name not in known:
                raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: "
                                  + ", ".join(k.replace("_", "-") for k in sorted(known)))
            out[name] = value
        return cls(**out)
