"""The compressions a user would pick instead of bfc, and the byte accounting shared by all.

Linear weights: the constant 2-D right operands (initializers) of MatMul nodes of the
original model.  Linear-weight bytes of a compressed model = the bytes of every
initializer and Constant tensor it holds that is not one of the original model's other
(non-linear-weight) tensors, unchanged under the same name: quantized values, scales, zero
points, factors, indices, shape constants -- whatever the compression added.

Baselines (each writes a runnable ONNX model):
  int8-dynamic  onnxruntime ``quantize_dynamic`` (QInt8 weights, MatMulInteger), restricted
                to the linear-weight MatMuls
  int4-nbits    onnxruntime ``MatMulNBitsQuantizer`` (4 bits, block 32, symmetric; com.microsoft
                MatMulNBits)
  svd           truncated SVD, W ~ U V as two fp32 MatMuls; rank per layer so that every layer
                spends the same fraction of its fp32 bytes (budget x layer share)
  svd-int8      the svd model quantized by ``quantize_dynamic`` (int8 factors): 1 byte per factor value
  prune         per-layer magnitude pruning at the same share of the budget; stored as fp32
                values + uint16 gaps between kept positions (6 bytes per kept weight), decoded
                in-graph by Cast -> CumSum -> ScatterElements -> Reshape
Budgets are bytes for all linear weights together; layers with fewer than ``min_size`` weights stay
fp32 (as bfc's ``min_size``) and the rest of the budget is split over the others in proportion to size.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bfc.api import save
from bfc.errors import ConfigError, ModelError

BASELINES = ("int8-dynamic", "int4-nbits", "svd", "svd-int8", "prune")
BUDGETED = ("svd", "svd-int8", "prune")


@dataclass(frozen=True)
class LinearSite:
    node: str            # MatMul node name
    weight: str          # initializer name
    shape: tuple[int, int]


def _inits(model: onnx.ModelProto) -> dict:
    return {t.name: t for t in model.graph.initializer}


def linear_sites(model: onnx.ModelProto) -> list[LinearSite]:
    """MatMul nodes of the main graph whose second input is a 2-D float initializer."""
    inits = _inits(model)
    out, seen = [], set()
    for i, n in enumerate(model.graph.node):
        if n.op_type != "MatMul" or len(n.input) < 2 or n.input[1] not in inits:
            continue
        t = inits[n.input[1]]
        if len(t.dims) != 2 or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            continue
        if not n.name:
            raise ModelError(f"MatMul node #{i} (weight {n.input[1]}) has no name; name the nodes first "
                             "(e.g. onnx-simplifier or bfc optimize keep names)")
        out.append(LinearSite(n.name, n.input[1], (int(t.dims[0]), int(t.dims[1]))))
        seen.add(n.input[1])
    return out


def _tensor_bytes(t: onnx.TensorProto) -> int:
    return int(numpy_helper.to_array(t).nbytes)


def _constants(model: onnx.ModelProto):
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t is not None:
                    yield n.output[0], a.t


def linear_bytes(original: onnx.ModelProto, model: onnx.ModelProto | None = None) -> int:
    """Linear-weight bytes of ``model`` (default: of ``original`` itself); see the module doc."""
    weights = {s.weight for s in linear_sites(original)}
    if model is None:
        return sum(_tensor_bytes(t) for name, t in _inits(original).items() if name in weights)
    other = {name: t for name, t in _inits(original).items() if name not in weights}
    other.update(dict(_constants(original)))
    total = 0
    for name, t in list(_inits(model).items()) + list(_constants(model)):
        o = other.get(name)
        if o is not None and o.data_type == t.data_type and list(o.dims) == list(t.dims):
            continue
        total += _tensor_bytes(t)
    return total


def _save(model: onnx.ModelProto, path: Path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save(model, path)                         # atomic, external data above 2 GB
    return Path(path)


def eligible(sites: list[LinearSite], min_size: int = 0) -> list[LinearSite]:
    """Sites with at least ``min_size`` weights (the others stay fp32, as bfc's ``min_size``)."""
    return [s for s in sites if s.shape[0] * s.shape[1] >= min_size]


def int8_dynamic(model_path, out_path, nodes=None, min_size: int = 0) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    model = onnx.load(str(model_path))
    nodes = nodes if nodes is not None else [s.node for s in eligible(linear_sites(model), min_size)]
    quantize_dynamic(str(model_path), str(out_path), op_types_to_quantize=["MatMul"], nodes_to_quantize=list(nodes),
                     weight_type=QuantType.QInt8)
    return Path(out_path)


def _nbits_quantizer():
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise ConfigError(f"baseline int4-nbits needs {e.name or 'a package'}, which onnxruntime's "
                          "MatMulNBitsQuantizer imports but does not install: pip install 'bfc[study]', "
                          "or leave int4-nbits out of --baselines") from None
    return MatMulNBitsQuantizer


def check_baseline(name: str) -> None:
    """Raise ConfigError now (before a long sweep) if baseline ``name`` is unknown or cannot run here."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    if name == "int4-nbits":
        _nbits_quantizer()


def int4_nbits(model_path, out_path, block_size: int = 32, min_size: int = 0) -> Path:
    MatMulNBitsQuantizer = _nbits_quantizer()
    model = onnx.load(str(model_path))
    sites = linear_sites(model)
    nodes = [s.node for s in eligible(sites, min_size)]
    small = [s.node for s in sites if s.node not in nodes]      # nodes_to_include alone is not honoured
    q = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=True, nodes_to_include=nodes,
                             nodes_to_exclude=small)
    q.process()
    return _save(q.model.model, out_path)


NBITS_ALGORITHMS = ("rtn", "hqq", "gptq")


class _NpzReader:
    """onnxruntime ``CalibrationDataReader`` over a calibration ``.npz`` (or a dict of arrays): one row
    (batch 1) per call, every model input sliced at the same index along axis 0."""

    def __init__(self, calibration):
        if isinstance(calibration, (str, Path)):
            with np.load(str(calibration)) as d:
                calibration = {k: d[k] for k in d.files}
        self.arrays = {k: np.asarray(v) for k, v in calibration.items()}
        self.n = min(len(v) for v in self.arrays.values())
        self.i = 0

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1:self.i] for k, v in self.arrays.items()}

    def rewind(self):
        self.i = 0

    def __iter__(self):                       # onnxruntime's GPTQ iterates a deep copy
        self.rewind()
        while (row := self.get_next()) is not None:
            yield row


def _algo_config(algorithm: str, bits: int, block_size: int, calibration):
    import onnxruntime.quantization.matmul_nbits_quantizer as q
    if algorithm == "rtn":
        return None
    if algorithm == "hqq":
        if bits not in (2, 4, 8):
            raise ConfigError(f"hqq: bits={bits}; onnxruntime's HQQ packs 2, 4 or 8 bits")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise ConfigError("algorithm hqq needs torch (onnxruntime's HQQ quantizer imports it)") from None
        return q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    if algorithm == "gptq":
        if bits != 4:
            raise ConfigError(f"gptq: bits={bits}; onnxruntime's GPTQ writes MatMulNBits for 4 bits only")
        if calibration is None:
            raise ConfigError("algorithm gptq needs calibration (an .npz of model inputs, e.g. "
                              "models/minilm.calibration_path())")
        return q.GPTQWeightOnlyQuantConfig(calibration_data_reader=_NpzReader(calibration))
    raise ConfigError(f"unknown nbits algorithm {algorithm!r}; allowed: {', '.join(NBITS_ALGORITHMS)}")


def nbits(model_path, out_path, bits: int = 4, block_size: int = 32, min_size: int = 0,
          symmetric: bool = True, algorithm: str = "rtn", calibration=None, accuracy_level: int | None = None) -> Path:
    """onnxruntime ``MatMulNBitsQuantizer`` (com.microsoft.MatMulNBits), ``bits`` 2/4/8 with one scale per
    ``block_size`` rows of K (the low-bit baselines of docs/study.md; ``int4_nbits`` is bits=4).

    ``algorithm``: "rtn" round-to-nearest (``symmetric`` as given); "hqq" half-quadratic quantization
    (onnxruntime's HQQ, asymmetric: fp32 scales and fp32 zero points per block, needs torch; bits 2/4/8);
    "gptq" GPTQ with the Hessian of ``calibration`` (an ``.npz`` or dict of model inputs, one sample per row;
    onnxruntime's bundled neural-compressor code; bits 4 only; ``symmetric`` as given)."""
    MatMulNBitsQuantizer = _nbits_quantizer()
    algo = _algo_config(algorithm, bits, block_size, calibration)
    model = onnx.load(str(model_path))
    sites = linear_sites(model)
    nodes = [s.node for s in eligible(sites, min_size)]
    small = [s.node for s in sites if s.node not in nodes]
    if algorithm == "gptq" and small:
        raise ConfigError("gptq: onnxruntime's GPTQ quantizes every MatMul with a constant weight "
                          "(nodes_to_exclude is ignored); use min_size=0")
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=symmetric, nodes_to_include=nodes,
                             nodes_to_exclude=small, accuracy_level=accuracy_level, algo_config=algo)
    q.process()
    out = q.model.model if hasattr(q.model, "model") else q.model
    return _save(out, out_path)


def _split(model, budget: float, min_size: int, bytes_per_kept: int = 4):
    """(eligible sites, their byte shares): the budget minus the fp32 bytes of the small sites
    that stay dense, split in proportion to the eligible sites' sizes."""
    sites = linear_sites(model)
    elig = eligible(sites, min_size)
    if not elig:
        raise ConfigError(f"no MatMul weight has >= {min_size} elements; lower --min-size")
    rest = budget - sum(bytes_per_kept * s.shape[0] * s.shape[1] for s in sites if s not in elig)
    if rest <= 0:
        raise ConfigError(f"budget {budget:.0f} bytes is below the fp32 bytes of the layers kept dense")
    sizes = np.array([s.shape[0] * s.shape[1] for s in elig], np.float64)
    return elig, list(rest * sizes / sizes.sum())


def _check_budget(budget, model):
    full = linear_bytes(model)
    if not (isinstance(budget, (int, float)) and 0 < budget):
        raise ConfigError(f"budget={budget!r} bytes must be positive")
    return full


def _replace_node(model: onnx.ModelProto, name: str, new_nodes: list, new_inits: list, drop_weight: str):
    g = model.graph
    idx = next(i for i, n in enumerate(g.node) if n.name == name)
    del g.node[idx]
    for k, n in enumerate(new_nodes):
        g.node.insert(idx + k, n)
    still_used = any(drop_weight in n.input for n in g.node)
    if not still_used:
        keep = [t for t in g.initializer if t.name != drop_weight]
        del g.initializer[:]
        g.initializer.extend(keep)
    g.initializer.extend(new_inits)


def svd_lowrank(model_path, out_path, budget: float, bytes_per_value: int = 4, min_size: int = 0,
                kept_budget: float | None = None) -> tuple[Path, dict]:
    """Truncated SVD at ``budget`` linear-weight bytes; returns (path, {layer: rank})."""
    model = onnx.load(str(model_path))
    _check_budget(budget, model)
    inits = _inits(model)
    ranks = {}
    elig, shares = _split(model, budget if kept_budget is None else kept_budget, min_size)
    for site, share in zip(elig, shares):
        m, n = site.shape
        k = int(share // (bytes_per_value * (m + n)))
        k = max(1, min(k, min(m, n)))
        w = numpy_helper.to_array(inits[site.weight]).astype(np.float64)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        a = (u[:, :k] * np.sqrt(s[:k])).astype(np.float32)
        b = (np.sqrt(s[:k])[:, None] * vt[:k]).astype(np.float32)
        node = next(nd for nd in model.graph.node if nd.name == site.node)
        base = f"{site.node}_svd"
        mid = base + "_mid"
        nodes = [helper.make_node("MatMul", [node.input[0], base + "_U"], [mid], name=base + "_a"),
                 helper.make_node("MatMul", [mid, base + "_V"], list(node.output), name=base + "_b")]
        _replace_node(model, site.node, nodes,
                      [numpy_helper.from_array(a, base + "_U"), numpy_helper.from_array(b, base + "_V")], site.weight)
        ranks[site.node] = k
    return _save(model, out_path), ranks


def svd_int8(model_path, out_path, budget: float, min_size: int = 0) -> tuple[Path, dict]:
    """SVD with int8 factors (``quantize_dynamic`` of the svd model), ~1 byte per factor value."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.stem + ".fp32-svd.onnx")
    try:
        # scales/zero points add 5 bytes per factor matrix; 2 per layer; small layers stay fp32
        model = onnx.load(str(model_path))
        n_sites = len(eligible(linear_sites(model), min_size))
        _, ranks = svd_lowrank(model_path, tmp, budget, bytes_per_value=1, min_size=min_size,
                               kept_budget=max(budget - 10 * n_sites, 1))
        nodes = [f"{n}_svd_{x}" for n in ranks for x in ("a", "b")]
        int8_dynamic(tmp, out_path, nodes)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out_path, ranks


def _stepping_stones(pos) -> np.ndarray:
    """``pos`` (sorted) plus extra positions so that no gap (from 0, then between) exceeds 65535."""
    out, prev = [], 0
    for p in (int(v) for v in pos):
        while p - prev > 65535:
            prev += 65535
            out.append(prev)
        out.append(p)
        prev = p
    return np.asarray(out, np.int64)


def magnitude_prune(model_path, out_path, budget: float, min_size: int = 0) -> tuple[Path, dict]:
    """Per-layer magnitude pruning at ``budget`` bytes (fp32 values + uint16 gaps); returns (path, {layer: kept})."""
    model = onnx.load(str(model_path))
    _check_budget(budget, model)
    inits = _inits(model)
    kept = {}
    elig, shares = _split(model, budget, min_size)
    for site, share in zip(elig, shares):
        m, n = site.shape
        base = f"{site.node}_prune"
        overhead = 8 + 16 + 4          # int64 [1] flat size, int64 [2] shape, int32 CumSum axis
        nnz = max(1, min(int((share - overhead) // 6), m * n))
        w = numpy_helper.to_array(inits[site.weight]).astype(np.float32).ravel()
        pos = np.sort(np.argpartition(-np.abs(w), nnz - 1)[:nnz]) if nnz < w.size else np.arange(w.size)
        full = _stepping_stones(pos)       # gaps must fit uint16
        vals = np.where(np.isin(full, pos), w[full], 0).astype(np.float32)
        gaps = np.diff(np.concatenate([[0], full])).astype(np.uint16)
        node = next(nd for nd in model.graph.node if nd.name == site.node)
        new = [helper.make_node("Cast", [base + "_gaps"], [base + "_g64"], to=onnx.TensorProto.INT64, name=base + "_cast"),
               helper.make_node("CumSum", [base + "_g64", base + "_axis"], [base + "_idx"], name=base + "_cumsum"),
               helper.make_node("ConstantOfShape", [base + "_size"], [base + "_zeros"], name=base + "_zeros",
                                value=numpy_helper.from_array(np.zeros(1, np.float32))),
               helper.make_node("ScatterElements", [base + "_zeros", base + "_idx", base + "_vals"], [base + "_flat"],
                                axis=0, name=base + "_scatter"),
               helper.make_node("Reshape", [base + "_flat", base + "_shape"], [base + "_w"], name=base + "_reshape"),
               helper.make_node("MatMul", [node.input[0], base + "_w"], list(node.output), name=base + "_matmul")]
        tensors = [numpy_helper.from_array(vals, base + "_vals"), numpy_helper.from_array(gaps, base + "_gaps"),
                   numpy_helper.from_array(np.array([m * n], np.int64), base + "_size"),
                   numpy_helper.from_array(np.array([m, n], np.int64), base + "_shape"),
                   numpy_helper.from_array(np.array(0, np.int32), base + "_axis")]
        _replace_node(model, site.node, new, tensors, site.weight)
        kept[site.node] = int(pos.size)
    return _save(model, out_path), kept


def run_baseline(name: str, model_path, out_path, budget: float | None = None,
                 min_size: int = 0) -> tuple[Path, dict]:
    """Build baseline ``name`` (see BASELINES); layers with < ``min_size`` weights stay fp32."""
    if name == "int8-dynamic":
        return int8_dynamic(model_path, out_path, min_size=min_size), {}
    if name == "int4-nbits":
        return int4_nbits(model_path, out_path, min_size=min_size), {"bits": 4, "block_size": 32}
    if name in BUDGETED and budget is None:
        raise ConfigError(f"baseline {name} needs a byte budget (--budgets)")
    if name == "svd":
        p, ranks = svd_lowrank(model_path, out_path, budget, min_size=min_size)
        return p, {"mean_rank": float(np.mean(list(ranks.values())))}
    if name == "svd-int8":
        p, ranks = svd_int8(model_path, out_path, budget, min_size=min_size)
        return p, {"mean_rank": float(np.mean(list(ranks.values())))}
    if name == "prune":
        p, kept = magnitude_prune(model_path, out_path, budget, min_size=min_size)
        return p, {"kept_fraction": float(sum(kept.values()) / sum(s.shape[0] * s.shape[1]
                                                                      for s in linear_sites(onnx.load(str(model_path)))))}
    raise ConfigError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
