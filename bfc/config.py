"""Configuration of ``bfc optimize``: one frozen dataclass of frozen sections, validated on construction.

``OptimizeConfig`` holds what to do to which layers and the budgets at its top level, and one
section per concern (see its doc).  The same keys as the CLI options are accepted everywhere
(``OptimizeConfig(bits=3)``, ``cfg.replace(distill_steps=10)``, a TOML file), with dashes or
underscores; each flat key belongs to one section field (``FLAT_KEYS``).  A TOML file
(``--config FILE.toml``) may hold ``version = 1`` and section tables (``[lowbit] bits = 3``) as well
as the flat keys; a key given both ways is an error.  CLI options given explicitly override the file.
"""
from __future__ import annotations

import enum
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from bfc.errors import ConfigError
from bfc.quant.chain import Method as QuantMethod
from bfc.quant.formats import Format, get_format

CONFIG_VERSION = 1      # the ``version`` key of a TOML config this bfc reads


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


class Objective(enum.StrEnum):
    """What the planner minimizes: model bytes, or bytes without slowing a layer down (``bfc.passes.latency``)."""
    SIZE = "size"
    LATENCY = "latency"


class TargetName(enum.StrEnum):
    """The graph targets of ``bfc.passes.targets`` (the registry; tests/test_config.py checks they agree)."""
    CUSTOM_OP = "custom-op"
    ORT = "ort"
    PORTABLE = "portable"


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


def _int(name: str, v, lo: int, optional: bool = False) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ConfigError(f"{name}={v!r} must be an integer >= {lo}")


def _positive(name: str, v, optional: bool = False):
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{name}={v!r} must be a positive finite number (e.g. 0.05 for 5%)")
    return float(v)


def _flag(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ConfigError(f"{name}={v!r} must be true or false")


def _names(name: str, v, what: str) -> tuple[str, ...]:
    v = (v,) if isinstance(v, str) else v
    if not isinstance(v, (tuple, list)) or not all(isinstance(x, str) and x for x in v):
        raise ConfigError(f"{name}={v!r} must be a list of {what}")
    return tuple(v)


@dataclass(frozen=True)
class LowBit:
    """The rotated low-bit family (``structure=rotated`` and the allocator's rotated candidates).

    bits, group_size: the weight format (int2|3|4, one scale per group of 32|64|128 rows)
    learn_rotation: learn each rotation on the calibration Gram (ButterflyQuant-style; needs torch),
                 rotation_steps Adam steps; else the randomized Hadamard-like butterfly
    kronecker_rotation: structure=rotated uses the Kronecker rotation P1 (x) P2 (bfc.lowbit.kron_rotation, two
                 batched MatMuls; the allocator's) instead of the butterfly (learn_rotation does not apply)
    correction_rank: rank of the int8 low-rank correction; 0 = per layer, only when it is the cheapest
                 way to meet max_error
    """
    bits: int = 4
    group_size: int = 64
    learn_rotation: bool = False
    rotation_steps: int = 100
    kronecker_rotation: bool = False
    correction_rank: int = 0

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (2, 3, 4):
            raise ConfigError(f"bits={self.bits!r} is not allowed; use 2, 3 or 4 (rotated low-bit weights)")
        if isinstance(self.group_size, bool) or self.group_size not in (32, 64, 128):
            raise ConfigError(f"group_size={self.group_size!r} is not allowed; use 32, 64 or 128")
        _flag("learn_rotation", self.learn_rotation)
        _int("rotation_steps", self.rotation_steps, 0)
        _flag("kronecker_rotation", self.kronecker_rotation)
        _int("correction_rank", self.correction_rank, 0)


@dataclass(frozen=True)
class Distillation:
    """End-to-end training of the planned layers against the original model (``bfc.distill``; needs torch).

    data:        .npz of unlabeled model inputs (flat key ``distill``); None: no distillation
    steps, batch, lr: Adam steps, samples per step, peak step size (cosine decay)
    match:       names of intermediate tensors matched as well as the outputs (e.g. each block's output)
    layernorm:   also train the LayerNormalization scales and biases
    rotation:    also train the Kronecker rotations of rotated low-bit layers (Cayley map, stays orthogonal;
                 flat key ``distill_rotation``)
    headroom:    with the allocator (structure and precision auto), the plan before training is allocated to
                 headroom x the whole-model error budget (smaller, lower-bit layers than post-training would
                 take); the trained model must measure within the budget itself, else the post-training
                 allocation is written (flat key ``distill_headroom``; default 1: the post-training plan, trained
                 in place -- on MiniLM-L6 training did not bring a 2x plan back under the budget, docs/study.md)
    blockwise_steps: Adam steps of block-wise reconstruction before the ``steps`` end-to-end ones: each span
                 between two consecutive ``match`` tensors is trained to the teacher's value given the
                 teacher's input (``bfc.distill``; needs ``match``; flat key ``distill_blockwise_steps``)
    """
    data: Path | None = None
    steps: int = 500
    batch: int = 32
    lr: float = 5e-4
    match: tuple[str, ...] = ()
    layernorm: bool = False
    rotation: bool = False
    headroom: float = 1.0
    blockwise_steps: int = 0

    def __post_init__(self):
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
        _int("distill_steps", self.steps, 1)
        _int("distill_batch", self.batch, 1)
        object.__setattr__(self, "lr", _positive("distill_lr", self.lr))
        object.__setattr__(self, "match", _names("distill_match", self.match, "tensor names"))
        _flag("distill_layernorm", self.layernorm)
        _flag("distill_rotation", self.rotation)
        object.__setattr__(self, "headroom", _positive("distill_headroom", self.headroom))
        if self.headroom < 1:
            raise ConfigError(f"distill_headroom must be >= 1 (a multiple of the error budget), got {self.headroom}")
        _int("distill_blockwise_steps", self.blockwise_steps, 0)


@dataclass(frozen=True)
class Reconstruction:
    """Per-layer fine-tuning of the quantized factors to the layer's calibration outputs (``bfc.reconstruct``).

    enabled (flat key ``reconstruct``); steps, lr: Adam steps per layer and step size (relative to each
    factor's RMS)
    """
    enabled: bool = False
    steps: int = 100
    lr: float = 1e-2

    def __post_init__(self):
        _flag("reconstruct", self.enabled)
        _int("reconstruct_steps", self.steps, 0)
        object.__setattr__(self, "lr", _positive("reconstruct_lr", self.lr))


@dataclass(frozen=True)
class Schedule:
    """Where the layers are planned (``bfc.passes.layer_runner``); the output bytes never depend on it.

    workers:     processes planning layers; None: the usable cores (in process for small models), 1: in
                 this process
    cluster:     plan on a Dask distributed cluster at this scheduler address (``local``: a LocalCluster
                 of ``workers`` processes); needs ``pip install 'bfc[cluster]'``
    work_dir:    folder of finished layer plans (content-keyed): a rerun loads them instead of planning
                 again, and the folder is kept; None: a folder in the system temp dir, removed once
                 planning finishes (a killed run resumes from it)
    """
    workers: int | None = None
    cluster: str | None = None
    work_dir: Path | None = None

    def __post_init__(self):
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers={self.workers!r} must be an integer >= 1 (1: plan in this process)")
        if self.cluster is not None and (not isinstance(self.cluster, str) or not self.cluster.strip()):
            raise ConfigError(f"cluster={self.cluster!r} must be a Dask scheduler address such as "
                              "tcp://host:8786, or local")
        if self.work_dir is not None:
            object.__setattr__(self, "work_dir", Path(self.work_dir))


@dataclass(frozen=True)
class Latency:
    """The planning objective and the rows its latency measurement uses.

    objective:   size (the smallest plan meeting the budgets) or latency (as size, but a layer whose
                 rewrite runs slower than its dense MatMul in the target stays dense: bfc.passes.latency
                 measures both in onnxruntime, 1 thread, at batch * seq rows)
    batch, seq:  rows per call of the latency measurement = batch * sequence length (flat keys
                 ``latency_batch``, ``latency_seq``)
    """
    objective: Objective = Objective.SIZE
    batch: int = 1
    seq: int = 1

    def __post_init__(self):
        object.__setattr__(self, "objective", _enum(Objective, "objective", self.objective))
        _int("latency_batch", self.batch, 1)
        _int("latency_seq", self.seq, 1)


@dataclass(frozen=True)
class Verification:
    """What happens after the rewrite.

    enabled:     run the original and the optimized model on the same inputs and report the output error
                 (flat key ``verify``; the CLI's ``--no-verify`` turns it off)
    strict:      a run that rewrites nothing is an error (default: the model is written unchanged)
    """
    enabled: bool = True
    strict: bool = False

    def __post_init__(self):
        _flag("verify", self.enabled)
        _flag("strict", self.strict)


#: section name -> its class (the TOML table ``[name]`` and the attribute ``cfg.name``)
SECTIONS = {"lowbit": LowBit, "distillation": Distillation, "reconstruction": Reconstruction,
            "schedule": Schedule, "latency": Latency, "verification": Verification}

#: flat key (the CLI option's name) -> (section, field), for every field that lives in a section
FLAT_KEYS = {
    "bits": ("lowbit", "bits"), "group_size": ("lowbit", "group_size"),
    "learn_rotation": ("lowbit", "learn_rotation"), "rotation_steps": ("lowbit", "rotation_steps"),
    "correction_rank": ("lowbit", "correction_rank"), "kronecker_rotation": ("lowbit", "kronecker_rotation"),
    "distill": ("distillation", "data"), "distill_steps": ("distillation", "steps"),
    "distill_batch": ("distillation", "batch"), "distill_lr": ("distillation", "lr"),
    "distill_match": ("distillation", "match"), "distill_layernorm": ("distillation", "layernorm"),
    "distill_rotation": ("distillation", "rotation"), "distill_headroom": ("distillation", "headroom"),
    "distill_blockwise_steps": ("distillation", "blockwise_steps"),
    "reconstruct": ("reconstruction", "enabled"), "reconstruct_steps": ("reconstruction", "steps"),
    "reconstruct_lr": ("reconstruction", "lr"),
    "workers": ("schedule", "workers"), "cluster": ("schedule", "cluster"), "work_dir": ("schedule", "work_dir"),
    "objective": ("latency", "objective"), "latency_batch": ("latency", "batch"), "latency_seq": ("latency", "seq"),
    "verify": ("verification", "enabled"), "strict": ("verification", "strict"),
}


@dataclass(frozen=True, init=False)
class OptimizeConfig:
    """Options of ``bfc.optimize`` (the CLI flags have the same names with dashes).

    Top level -- what is rewritten, how, and the budgets:

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
    max_metric_drop: with an ``evaluate`` function (``bfc.optimize(..., evaluate=fn)``, ``--evaluate``), the
                 largest drop of the user's metric the allocator may spend; its budget is searched against it
    min_size:    layers with fewer weight elements stay dense
    include/exclude: fnmatch patterns on node names
    target:      the graph target that emits the layers (``TargetName``; ``bfc.passes.targets``: portable,
                 ort, custom-op), checked against the registry when the pipeline starts
    calibration: .npz of model inputs (names as keys) used for calibration and verification
    calibration_rows: at most this many activation rows per layer (seeded subsample) enter its Gram matrix
    fix_batch:   pin the output model's batch dimension to this size
    seed:        every random choice of the run (the output bytes are a function of the inputs and the seed)
    fuse:        onnxruntime's transformer fusions (attention, LayerNormalization, Gelu) before the sites are
                 found (``bfc.passes.fuse``; the projections stay separate MatMuls); None: on for a recognized
                 transformer when the target runs in onnxruntime (ort, custom-op), off for portable

    Sections (frozen dataclasses of their own; the flat keys of ``FLAT_KEYS`` reach their fields):

    lowbit:         ``LowBit`` -- bits, group_size, learn_rotation, rotation_steps, correction_rank
    distillation:   ``Distillation`` -- data (``distill``), steps, batch, lr, match, layernorm
    reconstruction: ``Reconstruction`` -- enabled (``reconstruct``), steps, lr
    schedule:       ``Schedule`` -- workers, cluster, work_dir
    latency:        ``Latency`` -- objective, batch (``latency_batch``), seq (``latency_seq``)
    verification:   ``Verification`` -- enabled (``verify``), strict

    Construction takes top-level fields, sections (instances or dicts of their fields) and flat keys;
    a flat key together with its field in a given section is an error.
    """
    structure: Structure = Structure.AUTO
    rank: int | None = None
    residual_rank: int = 8
    precision: Precision = Precision.AUTO
    quant_method: QuantMethod = QuantMethod.AUTO
    max_error: float | None = None
    max_output_error: float | None = DEFAULT_MAX_OUTPUT_ERROR
    target_size: int | None = None
    max_metric_drop: float | None = None
    min_size: int = 4096
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target: TargetName = TargetName.ORT
    calibration: Path | None = None
    calibration_rows: int = 8192
    fix_batch: int | None = None
    seed: int = 0
    fuse: bool | None = None
    lowbit: LowBit = LowBit()
    distillation: Distillation = Distillation()
    reconstruction: Reconstruction = Reconstruction()
    schedule: Schedule = Schedule()
    latency: Latency = Latency()
    verification: Verification = Verification()

    def __init__(self, **options):
        grouped = _group(options, "OptimizeConfig")
        for f in fields(self):
            if f.name in SECTIONS:
                value = SECTIONS[f.name](**grouped.get(f.name, {}))
            else:
                value = grouped.get(f.name, f.default)
            object.__setattr__(self, f.name, value)
        self.__post_init__()

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        set_("structure", _enum(Structure, "structure", self.structure))
        set_("precision", _enum(Precision, "precision", self.precision))
        if not isinstance(self.target, str) or not self.target:
            raise ConfigError(f"target={self.target!r} must be a target name such as portable or custom-op")
        set_("target", _enum(TargetName, "target", self.target))
        set_("quant_method", _enum(QuantMethod, "quant_method", self.quant_method))
        for name, lo in (("rank", 1), ("residual_rank", 1), ("min_size", 0), ("target_size", 1),
                         ("fix_batch", 1), ("seed", 0), ("calibration_rows", 1)):
            _int(name, getattr(self, name), lo, optional=name in ("rank", "target_size", "fix_batch"))
        for name in ("max_error", "max_output_error", "max_metric_drop"):
            set_(name, _positive(name, getattr(self, name), optional=True))
        for name in ("include", "exclude"):
            set_(name, _names(name, getattr(self, name), "non-empty node-name patterns"))
        if self.calibration is not None:
            set_("calibration", Path(self.calibration))
        if self.fuse is not None and not isinstance(self.fuse, bool):
            raise ConfigError(f"fuse={self.fuse!r} must be true, false or absent (auto)")
        if self.reconstruction.enabled and self.calibration is None:
            raise ConfigError("reconstruct needs calibration data: pass --calibration FILE.npz of model inputs")
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
        """A copy with ``changes`` (top-level fields, sections or flat keys) applied; the rest is kept."""
        current = _group({f.name: getattr(self, f.name) for f in fields(self)}, "OptimizeConfig")
        return OptimizeConfig(**_merge(current, _group(changes, "replace")))

    def flat(self) -> dict:
        """{flat key: value} of every option (the CLI's names with underscores; e.g. for hashing)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in SECTIONS}
        out.update({key: getattr(getattr(self, sec), fld) for key, (sec, fld) in FLAT_KEYS.items()})
        return out

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The flat keys: the CLI options' names with underscores (top-level fields and ``FLAT_KEYS``)."""
        return tuple(f.name for f in fields(cls) if f.name not in SECTIONS) + tuple(FLAT_KEYS)

    @classmethod
    def from_toml(cls, path, **overrides) -> "OptimizeConfig":
        """Config from a TOML file (``version = 1``, section tables and/or the flat CLI keys);
        ``overrides`` (flat keys) win over the file."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the --config path") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {path} is not valid TOML ({e}); fix the syntax") from None
        return cls.from_dict(raw, source=str(path), overrides=overrides)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config", overrides: dict | None = None) -> "OptimizeConfig":
        """Config from a parsed TOML document (see ``from_toml``); ``no_verify`` is read as ``verify = not``."""
        raw = dict(raw)
        version = raw.pop("version", CONFIG_VERSION)
        if isinstance(version, bool) or version != CONFIG_VERSION:
            raise ConfigError(f"{source}: version = {version!r} is not a config version this bfc reads; "
                              f"write version = {CONFIG_VERSION} (or leave the key out)")
        grouped = _group(raw, source)
        return cls(**_merge(grouped, _group(overrides or {}, "command line")))


def _group(raw: dict, source: str) -> dict:
    """{top-level field: value, section: {field: value}} from top-level fields, sections (instances or
    dicts) and flat keys; unknown keys and a key given twice are ConfigErrors that name ``source``."""
    top = {f.name for f in fields(OptimizeConfig)} - set(SECTIONS)
    out: dict = {}
    sections: dict[str, dict] = {}
    from_flat: dict[tuple[str, str], str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "no_verify":
            name, value = "verify", not value
        if name in SECTIONS:
            if isinstance(value, SECTIONS[name]):
                value = {f.name: getattr(value, f.name) for f in fields(value)}
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {key} must be a table of its options ([{name}] in TOML)")
            own = {f.name for f in fields(SECTIONS[name])}
            for k, v in value.items():
                field_name = k.replace("-", "_")
                if field_name not in own:
                    raise ConfigError(f"{source}: unknown key {k!r} in [{name}]; allowed keys: "
                                      + ", ".join(sorted(x.replace("_", "-") for x in own)))
                if (name, field_name) in from_flat:
                    raise ConfigError(f"{source}: {from_flat[(name, field_name)]!r} and [{name}] {k} set the same "
                                      "option; keep one")
                sections.setdefault(name, {})[field_name] = v
        elif name in FLAT_KEYS:
            sec, field_name = FLAT_KEYS[name]
            if field_name in sections.get(sec, {}):
                raise ConfigError(f"{source}: {key!r} and [{sec}] {field_name} set the same option; keep one")
            from_flat[(sec, field_name)] = key
            sections.setdefault(sec, {})[field_name] = value
        elif name in top:
            out[name] = value
        else:
            raise ConfigError(f"{source}: unknown key {key!r}; allowed keys: "
                              + ", ".join(k.replace("_", "-") for k in sorted(OptimizeConfig.keys()))
                              + "; sections: " + ", ".join(f"[{s}]" for s in SECTIONS))
    out.update(sections)
    return out


def _merge(base: dict, over: dict) -> dict:
    """``over`` applied on ``base`` (both from ``_group``): top-level values replaced, section fields updated."""
    out = dict(base)
    for key, value in over.items():
        out[key] = {**base.get(key, {}), **value} if key in SECTIONS else value
    return out
