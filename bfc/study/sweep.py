"""The sweep of ``bfc study``: a list of points (bfc configurations and baselines), each
built, measured and appended to a JSON-lines results file; points already in the file
are skipped, so an interrupted sweep resumes where it stopped.

A record (one line) holds: ``key`` (identity of the point), ``kind`` ("reference", "bfc"
or a baseline name), ``params``, ``status`` ("ok" or "error" with ``error``), ``metrics``
(the evaluator's dict; ``metric`` repeats the primary one), ``linear_bytes`` (see
``baselines.linear_bytes``), ``file_bytes`` (the saved .onnx), ``latency_ms`` (median of
``latency_runs`` onnxruntime runs, 1 thread, on the latency feed), ``output_error``
(relative error of the first model output against the original on the check feed),
``layer_error`` / ``layer_error_max`` (bfc: mean / max over the linear layers of the
per-layer error of its report, 0 for layers kept dense; baselines: the same for svd/prune
measured on the layer inputs of the check feed), ``seconds`` (build time) and ``details``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from bfc.api import optimize
from bfc.config import OptimizeConfig
from bfc.errors import BfcError, ConfigError
from bfc.factorize import relative_error
from bfc.passes.model_io.feeds import load_feeds, random_feeds
from bfc.runtime import latency_ms as median_ms
from bfc.study.baselines import BASELINES, BUDGETED, linear_bytes, linear_sites, run_baseline
from bfc.study.evaluators import Evaluator, session

BFC_KEYS = ("structure", "rank", "residual_rank", "precision", "quant_method", "max_error", "max_output_error",
            "target_size", "min_size", "include", "exclude", "calibration_rows", "seed", "reconstruct",
            "reconstruct_steps", "distill", "distill_steps", "distill_batch", "distill_lr", "distill_layernorm",
            "distill_match")
DISTILL_KEYS = ("distill_steps", "distill_batch", "distill_lr", "distill_layernorm", "distill_match")


@dataclass(frozen=True)
class Point:
    kind: str
    params: tuple = ()          # sorted (key, value) pairs

    @property
    def key(self) -> str:
        return " ".join([self.kind] + [f"{k}={_fmt(v)}" for k, v in self.params])

    @property
    def p(self) -> dict:
        return dict(self.params)


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


def bfc_point(**params) -> Point:
    """A bfc configuration (keys of OptimizeConfig, validated now)."""
    unknown = sorted(set(params) - set(BFC_KEYS))
    if unknown:
        raise ConfigError(f"study point: unknown bfc option(s) {unknown}; allowed: {', '.join(BFC_KEYS)}")
    if params.get("distill") is not None:
        params["distill"] = str(params["distill"])
        if not Path(params["distill"]).is_file():
            raise ConfigError(f"study point: distill={params['distill']} is not a file (an .npz of model inputs)")
    else:
        params.pop("distill", None)
        orphans = sorted(k for k in DISTILL_KEYS if k in params)
        if orphans:
            raise ConfigError(f"study point: {', '.join(orphans)} without distill=DATA.npz")
    OptimizeConfig(**params)       # raises ConfigError naming the bad value
    return Point("bfc", tuple(sorted(params.items())))


def with_distill(points, data, steps=(0, 500), **opts) -> list[Point]:
    """Each bfc point of ``points`` (without its own ``distill``) once per entry of ``steps``: 0 = the
    point as is, n > 0 = the same compression distilled for n steps on ``data`` (``opts``: distill_batch,
    distill_lr, distill_layernorm, distill_match); other points unchanged.  The sweep then compares the same
    configuration with and without distillation."""
    out = []
    for pt in points:
        if pt.kind != "bfc" or "distill" in pt.p:
            out.append(pt)
            continue
        for n in steps:
            out.append(pt if not n else bfc_point(**pt.p, distill=data, distill_steps=int(n),
                                                  **{k: v for k, v in opts.items() if v is not None}))
    return list(dict.fromkeys(out))


def baseline_point(name: str, budget: int | None = None, min_size: int | None = None) -> Point:
    """A baseline; ``min_size``: layers with fewer weights stay fp32 (default: every layer)."""
    if name not in BASELINES:
        raise ConfigError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    params = {} if not min_size else {"min_size": int(min_size)}
    if name in BUDGETED:
        if budget is None or budget <= 0:
            raise ConfigError(f"baseline {name} needs a positive byte budget")
        params["budget"] = int(budget)
    return Point(name, tuple(sorted(params.items())))


def grid(structures=("monarch",), ranks=(None,), precisions=("int8",), max_errors=(None,),
         residual_ranks=(8,), **common) -> list[Point]:
    """bfc points: structure x rank x precision x max_error (x residual rank for lowrank-residual)."""
    out = []
    for s in structures:
        for r in ranks:
            for p in precisions:
                for e in max_errors:
                    for k in (residual_ranks if s == "lowrank-residual" else (None,)):
                        params = dict(common, structure=s, precision=p, max_error=e)
                        if r is not None:
                            params["rank"] = r
                        if k is not None:
                            params["residual_rank"] = k
                        out.append(bfc_point(**params))
    return list(dict.fromkeys(out))


# ---- results file ------------------------------------------------------------------------
def load_results(path) -> list[dict]:
    """Records of a results file (missing file: none); a torn last line is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break                  # interrupted while writing: that point runs again
            raise ConfigError(f"results file {path} line {i + 1} is not JSON; fix or remove it") from None
        if not isinstance(rec, dict) or "key" not in rec:
            raise ConfigError(f"results file {path} line {i + 1} is not a bfc study record")
        out.append(rec)
    return out


def _append(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- measurements ------------------------------------------------------------------------
def latency_ms(path, feed: dict, runs: int = 20) -> float:
    """Median wall time (ms) of one onnxruntime run on ``feed``, 1 intra-op thread, after 2 warm-ups."""
    return median_ms(session(path, threads=1), feed, repeats=runs, warmup=2)


def _first_output(path, feed):
    return np.asarray(session(path, threads=1).run(None, feed)[0], np.float64)


def _layer_inputs(model: onnx.ModelProto, feed: dict, sites) -> dict:
    """{weight name: input rows (n, K)} of the linear sites, running a copy of ``model``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = {}
    for n in probe.graph.node:
        for s in sites:
            if n.name == s.node:
                names[n.input[0]] = s.weight
    have = {o.name for o in probe.graph.output}
    for n in names:
        if n not in have:
            probe.graph.output.append(onnx.ValueInfoProto(name=n))
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    vals = sess.run(list(names), feed)
    return {names[n]: np.asarray(v, np.float64).reshape(-1, v.shape[-1])[:2048] for n, v in zip(names, vals)}


# ---- the sweep ---------------------------------------------------------------------------
@dataclass
class Study:
    """Inputs of a sweep; ``run`` measures every point not yet in ``results``."""
    model: Path
    evaluator: Evaluator
    results: Path
    workdir: Path
    calibration: Path | None = None
    latency_runs: int = 20
    keep_models: bool = False
    _orig: onnx.ModelProto | None = field(default=None, repr=False)

    def __post_init__(self):
        self.model, self.results, self.workdir = Path(self.model), Path(self.results), Path(self.workdir)
        if not self.model.is_file():
            raise ConfigError(f"model {self.model} does not exist")
        try:
            self._orig = onnx.load(str(self.model))
        except Exception as e:  # noqa: BLE001 - any load failure is a bad model for the user
            raise ConfigError(f"model {self.model} is not a loadable ONNX file ({e})") from None
        self.sites = linear_sites(self._orig)
        if not self.sites:
            raise ConfigError(f"model {self.model} has no MatMul with a constant 2-D weight; nothing to study")
        self.fp32_bytes = linear_bytes(self._orig)
        self._feed = self._check_feed()
        self._ref_out = None
        self._acts = None

    def _check_feed(self) -> dict:
        """A small input feed: the first 8 calibration rows, the evaluator's sample, or random inputs."""
        if self.calibration is not None:
            return {k: v[:8] if v.ndim else v for k, v in load_feeds(self.calibration, self._orig).items()}
        if self.evaluator.sample is not None:
            return self.evaluator.sample(session(self.model, threads=1))
        return random_feeds(self._orig, 0)

    def done(self) -> dict:
        return {r["key"]: r for r in load_results(self.results)}

    def pending(self, points) -> list[Point]:
        done = self.done()
        return [p for p in dict.fromkeys(points) if p.key not in done]

    def run(self, points, progress=None) -> list[dict]:
        """Measure the pending points (``progress(point)`` after each); returns all records."""
        todo = self.pending([Point("reference")] + list(points))
        for pt in todo:
            _append(self.results, self.measure(pt))
            if progress is not None:
                progress(pt)
        return load_results(self.results)

    def measure(self, pt: Point) -> dict:
        rec = {"key": pt.key, "kind": pt.kind, "params": pt.p, "model": str(self.model),
               "fp32_linear_bytes": self.fp32_bytes, "evaluator": self.evaluator.name}
        out = self.workdir / f"{hashlib.sha1(pt.key.encode()).hexdigest()[:16]}-{os.getpid()}.onnx"
        t0 = time.perf_counter()
        try:
            path, details = self._build(pt, out)
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            rec.update(details)
            model = onnx.load(str(path))
            rec["linear_bytes"] = linear_bytes(self._orig) if pt.kind == "reference" else linear_bytes(self._orig, model)
            rec["file_bytes"] = os.path.getsize(path)
            metrics = self.evaluator(path)
            rec["metrics"], rec["metric"] = metrics, metrics[self.evaluator.metric]
            if self._ref_out is None:
                self._ref_out = _first_output(self.model, self._feed)
            rec["output_error"] = relative_error(self._ref_out, _first_output(path, self._feed))
            rec["latency_ms"] = latency_ms(path, self._feed, self.latency_runs)
            rec["status"] = "ok"
        except BfcError as e:
            rec.update(status="error", error=f"{type(e).__name__}: {e}")
        except Exception as e:  # noqa: BLE001 - onnxruntime/evaluator failure of one point: record it, go on
            rec.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            if out.exists() and not self.keep_models:
                out.unlink()
        return rec

    def _build(self, pt: Point, out: Path):
        if pt.kind == "reference":
            return self.model, {"layer_error": 0.0, "layer_error_max": 0.0}
        out.parent.mkdir(parents=True, exist_ok=True)
        if pt.kind == "bfc":
            cfg = OptimizeConfig(calibration=self.calibration, **{"max_output_error": None, **pt.p})   # the study measures the metric itself
            model, report = optimize(str(self.model), cfg)
            onnx.save(model, str(out))
            errs = [r.error if r.rewritten and r.error is not None else 0.0 for r in report.layers]
            t = report.totals()
            structures = sorted({f"{r.structure} {r.precision}" for r in report.rewritten})
            extra = {}
            dnotes = [n for n in report.notes if n.startswith("distill")]
            if "distill" in pt.p:
                m = re.search(r", (\d+(?:\.\d+)?) s[,)]", " ".join(dnotes))
                extra = {"distill_seconds": float(m.group(1)) if m else None, "distill_notes": dnotes}
            return out, {**extra, "layer_error": float(np.mean(errs)) if errs else 0.0,
                         "layer_error_max": float(np.max(errs)) if errs else 0.0,
                         "error_kind": report.rewritten[0].error_kind if report.rewritten else None,
                         "details": {"rewritten": t["rewritten"], "sites": t["sites"],
                                     "bfc_bytes_after": t["bytes_after"], "params_after": t["params_after"],
                                     "flops_ratio": t["flops_after"] / max(t["flops_before"], 1),
                                     "structures": structures[:12],
                                     "output_check": [[o.name, o.rel_error] for o in report.outputs]}}
        budget = pt.p.get("budget")
        path, details = run_baseline(pt.kind, self.model, out, budget, pt.p.get("min_size", 0))
        rec = {"details": details}
        if pt.kind in ("svd", "prune"):
            rec.update(self._baseline_layer_errors(onnx.load(str(path))))
        return path, rec

    def _baseline_layer_errors(self, model) -> dict:
        """Per-layer output error of svd/prune (their weights are exact fp32 values)."""
        from onnx import numpy_helper
        if self._acts is None:
            self._acts = _layer_inputs(self._orig, self._feed, self.sites)
        inits = {t.name: t for t in self._orig.graph.initializer}
        new = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        errs = []
        for s in self.sites:
            w = numpy_helper.to_array(inits[s.weight]).astype(np.float64)
            if f"{s.node}_svd_U" in new:
                w_hat = new[f"{s.node}_svd_U"].astype(np.float64) @ new[f"{s.node}_svd_V"].astype(np.float64)
            elif f"{s.node}_prune_vals" in new:
                idx = np.cumsum(new[f"{s.node}_prune_gaps"].astype(np.int64))
                flat = np.zeros(w.size)
                flat[idx] = new[f"{s.node}_prune_vals"]
                w_hat = flat.reshape(w.shape)
            else:
                continue
            x = self._acts.get(s.weight)
            errs.append(relative_error(x @ w, x @ w_hat) if x is not None else relative_error(w, w_hat))
        if not errs:
            return {}
        return {"layer_error": float(np.mean(errs)), "layer_error_max": float(np.max(errs)), "error_kind": "output"}
