"""The ``bfc`` command line (the only module that prints).

    bfc optimize MODEL.onnx -o OUT.onnx [options]     rewrite MatMul/Gemm layers, verify, report
    bfc inspect MODEL.onnx                            list the sites and what each could gain
    bfc demo                                          the bundled Fashion-MNIST MLP, end to end

User problems print one line on stderr and exit 2; bugs exit 1 with a hint to report them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bfc import __version__
from bfc.api import optimize
from bfc.config import DEFAULT_MAX_OUTPUT_ERROR, OptimizeConfig, Precision, Structure
from bfc.errors import BfcError
from bfc.passes.events import LayerPlanned, SitesFound, StageStarted
from bfc.passes.inspect import HEADER as INSPECT_HEADER
from bfc.passes.inspect import inspect_model
from bfc.passes.model_io.files import check_output_path, input_files
from bfc.passes.targets import get_target, names
from bfc.report import size_text
from bfc.runtime import latency_ms, session
from bfc.study import main as study_main
from bfc.study.evaluators import get_evaluator


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints usage over several lines)
        raise _UsageError(f"{message}; see `{self.prog} --help`")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="bfc", description="bfc, the butterfly compiler for ONNX: Kronecker-sparse, quantized "
                                         "MatMul/Gemm layers built from standard ONNX ops.")
    ap.add_argument("--version", action="version", version=f"bfc {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="{optimize,inspect,demo,study}", parser_class=_Parser)
    S = argparse.SUPPRESS
    op = sub.add_parser("optimize", help="rewrite a model's MatMul/Gemm layers as quantized KS layers")
    op.add_argument("model", type=Path, help="input .onnx model (never modified)")
    op.add_argument("-o", "--output", type=Path, required=True, help="output .onnx path (written atomically)")
    op.add_argument("--config", type=Path, help="TOML file with the same keys as these options")
    op.add_argument("--structure", default=S, help="|".join(s.value for s in Structure) + " (default auto)")
    op.add_argument("--rank", type=int, default=S, help="block rank between factors (fixed structures)")
    op.add_argument("--residual-rank", type=int, default=S, help="rank of the low-rank residual (default 8)")
    op.add_argument("--precision", default=S, help="|".join(p.value for p in Precision) + " (default int8)")
    op.add_argument("--max-error", type=float, default=S,
                    help="per-layer relative output error budget (default 0.1); layers that miss it stay dense")
    op.add_argument("--no-max-error", dest="max_error", action="store_const", const=None, default=S,
                    help="no error budget (fixed structures only)")
    op.add_argument("--max-output-error", type=float, default=S,
                    help=f"whole-model relative output error budget (default {DEFAULT_MAX_OUTPUT_ERROR}); it always "
                         "holds: the allocator verifies and backs off, fixed structures keep layers dense")
    op.add_argument("--no-max-output-error", dest="max_output_error", action="store_const", const=None, default=S,
                    help="no whole-model error check")
    op.add_argument("--target-size", type=int, default=S, help="stop once the model has at most this many bytes")
    op.add_argument("--min-size", type=int, default=S, help="keep layers with fewer weights dense (default 4096)")
    op.add_argument("--include", action="append", default=S,
                    help="only nodes whose full name matches this shell-style glob, e.g. '*/mlp/*' (repeatable)")
    op.add_argument("--exclude", action="append", default=S,
                    help="skip nodes whose full name matches this shell-style glob (repeatable)")
    op.add_argument("--calibration", type=Path, default=S, help=".npz of model inputs keyed by input name")
    op.add_argument("--quant-method", default=S, help="auto|rtn|pairwise|l2r|balanced (default auto)")
    op.add_argument("--target", default=S, help="where the layers run: " + "; ".join(
        f"{t.name}: {t.summary}" for t in _targets()) + " (default ort)")
    op.add_argument("--no-verify", dest="verify", action="store_false", default=S, help="skip the verification run")
    op.add_argument("--evaluate", metavar="SPEC", default=None,
                    help="the user's metric (higher is better) as path/to/file.py:function (model path -> number), or "
                         "stsb / fashion-mnist: the allocator searches its budget so that the metric drops at most "
                         "--max-metric-drop (example: models/eval_sts.py:stsb_tuning_half)")
    op.add_argument("--max-metric-drop", type=float, default=S, help="the drop of --evaluate's metric allowed")
    op.add_argument("--fuse", dest="fuse", action="store_true", default=S,
                    help="apply onnxruntime's transformer fusions first (default: on for a recognized transformer "
                         "on the ort and custom-op targets)")
    op.add_argument("--no-fuse", dest="fuse", action="store_false", default=S, help="no transformer fusions")
    op.add_argument("--fix-batch", type=int, default=S, help="pin dynamic batch dimensions to N")
    op.add_argument("--seed", type=int, default=S, help="random seed (default 0)")
    op.add_argument("--distill", type=Path, default=S, metavar="DATA.npz",
                    help="train the planned layers end to end against the original on these model inputs (needs torch)")
    op.add_argument("--distill-steps", type=int, default=S, help="distillation Adam steps (default 500)")
    op.add_argument("--distill-batch", type=int, default=S, help="distillation samples per step (default 32)")
    op.add_argument("--distill-lr", type=float, default=S, help="distillation peak step size, cosine decay (default 5e-4)")
    op.add_argument("--distill-match", action="append", default=S, metavar="TENSOR",
                    help="also match this intermediate tensor of the original (repeatable)")
    op.add_argument("--distill-layernorm", action="store_true", default=S,
                    help="also train the LayerNormalization scales and biases")
    op.add_argument("--distill-rotation", action="store_true", default=S,
                    help="also train the Kronecker rotations of rotated low-bit layers (orthogonal by construction)")
    op.add_argument("--distill-headroom", type=float, default=S, metavar="X",
                    help="with the allocator: plan to X times the error budget before training; the trained model "
                         "must meet the budget, else the post-training plan is written (default 1: train the post-training plan)")
    op.add_argument("--distill-blockwise-steps", type=int, default=S,
                    help="block-wise reconstruction steps before the end-to-end ones (default 0; needs "
                         "--distill-match, the blocks' boundaries)")
    op.add_argument("--reconstruct", action="store_true", default=S,
                    help="fine-tune each quantized layer's factors to its calibration outputs (needs --calibration)")
    op.add_argument("--reconstruct-steps", type=int, default=S, help="reconstruction steps per layer (default 100)")
    op.add_argument("--reconstruct-lr", type=float, default=S, help="reconstruction step size (default 0.01)")
    op.add_argument("--bits", type=int, default=S, help="rotated layers: weight bits 2|3|4 (default 4)")
    op.add_argument("--group-size", type=int, default=S, help="rotated layers: rows per scale 32|64|128 (default 64)")
    op.add_argument("--learn-rotation", action="store_true", default=S,
                    help="rotated layers: learn each rotation on the calibration data (needs torch)")
    op.add_argument("--kronecker-rotation", action="store_true", default=S,
                    help="rotated layers: a Kronecker rotation P1 (x) P2 (two MatMuls) instead of the butterfly")
    op.add_argument("--rotation-steps", type=int, default=S, help="Adam steps of a learned rotation (default 100)")
    op.add_argument("--correction-rank", type=int, default=S,
                    help="rotated layers: rank of the int8 correction (default 0: per layer, when it pays)")
    op.add_argument("--workers", type=int, default=S, metavar="N",
                    help="processes planning layers (default: the usable cores; 1: in this process)")
    op.add_argument("--cluster", default=S, metavar="ADDRESS",
                    help="plan the layers on a Dask cluster (tcp://host:8786, or local); needs bfc[cluster]")
    op.add_argument("--work-dir", type=Path, default=S, metavar="DIR",
                    help="keep finished layer plans here; rerunning the same command resumes from them "
                         "(default: a temporary folder, removed once planning finishes)")
    op.add_argument("--objective", default=S, help="size|latency: latency keeps a layer dense when its rewrite "
                    "is slower than the dense MatMul (measured at optimize time; default size)")
    op.add_argument("--latency-batch", type=int, default=S, help="objective latency: batch size measured (default 1)")
    op.add_argument("--latency-seq", type=int, default=S,
                    help="objective latency: sequence length measured; rows per call = batch * seq (default 1)")
    op.add_argument("--strict", action="store_true", default=argparse.SUPPRESS,
                    help="exit 2 when nothing can be rewritten (default: write the model unchanged, exit 0)")
    op.add_argument("--report", type=Path, help="also write the report as JSON")
    op.add_argument("-q", "--quiet", action="store_true", help="no table, no progress bar")
    ins = sub.add_parser("inspect", help="what optimize would do: per layer the best candidate of each family and "
                                         "the allocator's pick (nothing is written)")
    ins.add_argument("model", type=Path, help="input .onnx model (read only)")
    ins.add_argument("--min-size", type=int, default=S,
                     help="layers with fewer weights stay dense, as in optimize (default 4096)")
    ins.add_argument("--calibration", type=Path, default=S, help="model inputs .npz, as in optimize")
    ins.add_argument("--max-output-error", type=float, default=S,
                     help=f"the whole-model budget, as in optimize (default {DEFAULT_MAX_OUTPUT_ERROR})")
    ins.add_argument("--target", default=S, help="the target, as in optimize (default ort)")
    sub.add_parser("study", add_help=False,
                   help="sweep structure x rank x precision and baselines (bfc study --help)")
    dm = sub.add_parser("demo", help="optimize the bundled Fashion-MNIST MLP and compare it with the original")
    dm.add_argument("-o", "--output", type=Path, help="where to keep the optimized demo model")
    dm.add_argument("--precision", default="auto",
                    help="|".join(p.value for p in Precision) + ": weight format (default auto: the allocator, as "
                         "bfc optimize)")
    dm.add_argument("--max-error", type=float, default=None, help="per-layer output error cap (default none)")
    dm.add_argument("--max-output-error", type=float, default=DEFAULT_MAX_OUTPUT_ERROR,
                    help=f"whole-model (logits) relative error budget (default {DEFAULT_MAX_OUTPUT_ERROR}, as bfc optimize)")
    return ap


def _config(args) -> OptimizeConfig:
    keys = set(OptimizeConfig.keys())
    given = {k: v for k, v in vars(args).items() if k in keys}
    if args.config is not None:
        return OptimizeConfig.from_toml(args.config, **given)
    return OptimizeConfig(**given)


def _metric(evaluator):
    """model path -> the evaluator's primary metric."""
    return lambda path: evaluator(path)[evaluator.metric]


def _targets():
    return [get_target(n) for n in names()]


_PROGRESS_EVERY_S = 10.0          # without a terminal: at most one layer line per 10 s
_PROGRESS_AFTER_S = 5.0           # ... and nothing in a run's first 5 s (a quick error stays one line)


class _Progress:
    """Progress on stderr, drawn from the pipeline's typed events (``bfc.passes.events``).

    On a terminal: a tqdm bar over the planned layers.  Otherwise (a pipe, a log file): plain
    lines, once the run has lasted ``_PROGRESS_AFTER_S`` seconds (env ``BFC_PROGRESS_AFTER_S``
    overrides): one per stage as it starts, and one per planned layer at most every
    ``_PROGRESS_EVERY_S`` seconds (plus the last layer).  ``enabled=False`` (``-q``): nothing."""

    def __init__(self, enabled: bool, stream=None, clock=None):
        import os
        import time
        self.bar, self.enabled = None, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.t0 = self.clock()
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.tty = False
        try:
            self.after = float(os.environ.get("BFC_PROGRESS_AFTER_S", _PROGRESS_AFTER_S))
        except ValueError:
            self.after = _PROGRESS_AFTER_S
        self.stage, self.detail, self.stage_at, self.layer_at = None, None, None, None

    def __call__(self, event):
        if not self.enabled:
            return
        if self.tty:
            self._bar(event)
        else:
            self._line(event)

    def _bar(self, event):
        from tqdm import tqdm

        if isinstance(event, SitesFound):
            self.bar = tqdm(total=event.total, desc="planning", unit="layer", file=self.stream, leave=False,
                            disable=None)
        elif isinstance(event, LayerPlanned) and self.bar is not None:
            eta = f" ETA {event.eta:.0f} s" if event.eta is not None and event.done < event.total else ""
            self.bar.set_postfix_str(event.layer[-30:] + eta)
            self.bar.update(1)
        elif isinstance(event, StageStarted) and self.bar is not None:
            self.bar.set_description(event.stage)

    def _line(self, event):
        now = self.clock()
        if isinstance(event, SitesFound):
            if now - self.t0 >= self.after:
                self._print(now, f"found {event.total} MatMul/Gemm sites, {event.eligible} eligible")
            return
        if isinstance(event, StageStarted):
            repeat = event.stage == self.stage
            self.stage, self.detail = event.stage, event.detail
            if now - self.t0 < self.after:
                return
            # a stage repeats its event to say how far it is (distill steps): those at most every 10 s
            if repeat and self.stage_at is not None and now - self.stage_at < _PROGRESS_EVERY_S:
                return
            self._stage_line(now)
        elif isinstance(event, LayerPlanned):
            if now - self.t0 < self.after:
                return
            if self.stage_at is None and self.stage is not None:
                self._stage_line(now)          # the first line of the run: say which stage it is in
            last = event.done >= event.total
            if not last and self.layer_at is not None and now - self.layer_at < _PROGRESS_EVERY_S:
                return
            self.layer_at = now
            eta = f", ETA {event.eta:.0f} s" if event.eta is not None and not last else ""
            self._print(now, f"planned {event.done}/{event.total} layers (last {event.layer}: "
                             f"{'rewritten' if event.rewritten else 'kept dense'}){eta}")

    def _stage_line(self, now):
        self.stage_at = now
        self._print(now, self.stage + (f": {self.detail}" if self.detail else ""))

    def _print(self, now, text):
        print(f"bfc: {now - self.t0:6.1f} s  {text}", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def cmd_optimize(args) -> int:
    cfg = _config(args)
    if args.report is not None:
        check_output_path(args.report, input_files(args.model) + [args.output])
    if args.quiet:                      # onnxruntime's own log (its default logger) says nothing either
        import onnxruntime
        onnxruntime.set_default_logger_severity(4)
    prog = _Progress(not args.quiet)
    try:
        evaluate = None if args.evaluate is None else _metric(get_evaluator(args.evaluate))
        _, report = optimize(args.model, cfg, output=args.output, on_event=prog, evaluate=evaluate)
    finally:
        prog.close()
    if args.report is not None:
        _write_text(args.report, report.to_json())
    if not args.quiet:
        print(report.table())
        print(f"wrote {args.output}" + (f" and {args.report}" if args.report else ""))
    return 0


def _release_memory() -> None:
    """Hand freed model buffers back to the OS (glibc keeps them otherwise): lower peak RSS."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write_text(path: Path, text: str) -> None:
    import os
    import tempfile
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bfc-", dir=path.parent if str(path.parent) else ".")
        mask = os.umask(0)                 # mkstemp creates 0600: give the file the mode open() would
        os.umask(mask)
        os.fchmod(fd, 0o666 & ~mask)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise BfcError(f"cannot write {path} ({e.strerror}); choose another --report path") from None


def cmd_inspect(args) -> int:
    keys = set(OptimizeConfig.keys())
    rows, totals = inspect_model(args.model, OptimizeConfig(**{k: v for k, v in vars(args).items() if k in keys}))
    table = [INSPECT_HEADER] + [tuple(r) for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(INSPECT_HEADER) - 1)] + [0]
    for r in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print(totals)
    return 0


def _demo_commands(model: Path, data: Path, output, cfg: OptimizeConfig) -> list[str]:
    """The shell commands that redo the demo's optimization from the current folder: the bundled
    files by absolute path, the calibration file written in the current folder first."""
    import json
    import os
    import shlex
    import shutil

    def same(name: str) -> bool:
        found = shutil.which(name)
        return found is not None and os.path.realpath(found) == os.path.realpath(sys.executable)

    python = "python" if same("python") else shlex.quote(sys.executable)
    bfc = "bfc" if shutil.which("bfc") else f"{python} -m bfc.cli"
    code = (f"import numpy as np; d = np.load({json.dumps(str(Path(data).resolve()))}); "
            'np.savez("calibration.npz", image=d["calib_images"])')
    default = OptimizeConfig()
    command = f"{bfc} optimize {shlex.quote(str(Path(model).resolve()))} -o {shlex.quote(str(output))} " \
              "--calibration calibration.npz"
    if cfg.precision is not default.precision:
        command += f" --precision {cfg.precision.value}"
    if cfg.max_error is not None:
        command += f" --max-error {cfg.max_error:g}"
    if cfg.max_output_error != default.max_output_error:
        command += " --no-max-output-error" if cfg.max_output_error is None else \
            f" --max-output-error {cfg.max_output_error:g}"
    return [f"{python} -c {shlex.quote(code)}", command]


def cmd_demo(args) -> int:
    """Optimize the bundled MLP with its bundled calibration images; compare accuracy, size, latency."""
    import tempfile
    from importlib.resources import as_file, files

    import numpy as np
    import onnx

    with as_file(files("bfc") / "data" / "demo_mlp.onnx") as mpath, \
            as_file(files("bfc") / "data" / "demo_data.npz") as dpath, \
            tempfile.TemporaryDirectory() as tmp:
        if not Path(mpath).is_file() or not Path(dpath).is_file():
            raise BfcError("the bundled demo files (bfc/data/demo_mlp.onnx, demo_data.npz) are missing from "
                           "this install; reinstall bfc or run `python models/build_demo.py`")
        with np.load(dpath) as npz:
            data = {k: npz[k] for k in npz.files}
        original = onnx.load(str(mpath))
        calib = Path(tmp) / "calibration.npz"
        np.savez(calib, image=data["calib_images"])
        cfg = OptimizeConfig(precision=args.precision, calibration=calib, max_output_error=args.max_output_error,
                             **({} if args.max_error is None else {"max_error": args.max_error}))
        print(f"bfc demo: Fashion-MNIST MLP {mpath.name} (784-256-256-10), calibration on "
              f"{len(data['calib_images'])} training images, evaluation on {len(data['test_images'])} "
              "held-out test images; the same from this folder:", flush=True)
        for line in _demo_commands(Path(mpath), Path(dpath), args.output or "demo_mlp.bfc.onnx", cfg):
            print(f"$ {line}", flush=True)
        out = Path(args.output) if args.output is not None else Path(tmp) / "demo_mlp.bfc.onnx"
        prog = _Progress(True)
        try:           # written to a file: the sizes below are the file's, as `bfc optimize -o` reports them
            _, report = optimize(mpath, cfg, output=out, on_event=prog)
        finally:
            prog.close()
        print(report.table())
        if args.output is not None:
            print(f"wrote {args.output}")
        optimized = onnx.load(str(out))
        x, y = data["test_images"], data["test_labels"]
        print("\nmodel       accuracy  file size   latency b=1   latency b=256   (onnxruntime CPU, 1 thread, median)")
        for name, m, size in (("original", original, report.model_bytes_before),
                              ("optimized", optimized, report.model_bytes_after)):
            sess = session(m, threads=1)
            acc = float(np.mean(sess.run(None, {"image": x})[0].argmax(1) == y))
            print(f"{name:<10}  {acc:8.4f}  {size_text(size):>9}  {latency_ms(sess, {'image': x[:1]}):8.3f} ms  "
                  f"{latency_ms(sess, {'image': x[:256]}):11.3f} ms")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "study":
            return study_main(argv[1:])
        args = _parser().parse_args(argv)
        if args.command is None:
            _parser().print_help()
            return 2
        return {"optimize": cmd_optimize, "inspect": cmd_inspect, "demo": cmd_demo}[args.command](args)
    except (BfcError, _UsageError) as e:
        print(f"bfc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bfc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line and where to report it
        print(f"bfc: internal error ({type(e).__name__}: {e}); this is a bug in bfc: please report it to the "
              "bfc maintainers with the command and the model", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
