"""``bfc study``: sweep bfc configurations and the usual baselines on a task metric.

    bfc study MODEL.onnx --eval stsb --data sts-dev.csv --calibration calib.npz \\
        --structure monarch,lowrank-residual --rank 4,8 --precision int8 \\
        --baselines int8-dynamic,int4-nbits,svd,svd-int8,prune --budgets 0.0625,0.125,0.25 \\
        [--distill distill.npz --distill-steps 0,300] \\
        --results study/results.jsonl --out study/

Each point (a bfc configuration or a baseline) is built, evaluated and appended to the
results file (JSON lines); a rerun skips the points already there.  With ``--distill DATA.npz``
every bfc point is measured once per ``--distill-steps`` entry (0 = as is), so the report
compares the same compression with and without end-to-end distillation (or give
``--bfc ...,distill=DATA.npz,distill_steps=300`` for one point).  The report
(``study.md``) and the plots (``pareto.png``, ``error_vs_drop.png``, ``distill.png``, ``generalization.png``
when the evaluator reports train accuracy) are rewritten from the whole results file.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bfc.config import Precision, Structure
from bfc.errors import BfcError, ConfigError
from bfc.study.baselines import BASELINES, BUDGETED, check_baseline, linear_bytes, linear_sites, run_baseline
from bfc.study.evaluators import Evaluator, get_evaluator
from bfc.study.plots import NO_PLOTS, available, pareto_front, write_plots
from bfc.study.report import markdown, summary
from bfc.study.sweep import Point, Study, baseline_point, bfc_point, grid, load_results, with_distill

__all__ = ["main", "Study", "Point", "grid", "bfc_point", "baseline_point", "with_distill", "load_results", "write_report",
           "Evaluator", "get_evaluator", "run_baseline", "linear_bytes", "linear_sites", "pareto_front",
           "summary", "BASELINES"]


def _list(text, conv=str):
    out = []
    for item in str(text).split(","):
        item = item.strip()
        if not item:
            continue
        if item.lower() == "none":
            out.append(None)
            continue
        try:
            out.append(conv(item))
        except ValueError:
            raise ConfigError(f"{item!r} is not a valid value in {text!r}") from None
    return out


def _value(v: str):
    if v.lower() in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def parse_point(text: str) -> Point:
    """``structure=auto,precision=auto,max_error=0.1`` -> a bfc point."""
    params = {}
    for part in text.replace(";", ",").split(","):
        if not part.strip():
            continue
        k, sep, v = part.partition("=")
        if not sep:
            raise ConfigError(f"--bfc {text!r}: expected key=value pairs separated by commas")
        params[k.strip().replace("-", "_")] = _value(v.strip())
    return bfc_point(**params)


def write_report(records, out_dir, *, title="bfc study", metric_name="metric", command=None) -> Path:
    """Plots + ``study.md`` into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(records, out_dir, metric_name, title)
    md = out_dir / "study.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text(markdown(records, title=title, metric_name=metric_name, plots=plots, command=command,
                            out_dir=out_dir), encoding="utf-8")
    tmp.replace(md)
    return md


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bfc study", description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="ONNX model to study")
    ap.add_argument("--eval", required=True, dest="eval_spec",
                    help="stsb | fashion-mnist | path/to/file.py:function (gets an InferenceSession, returns a float)")
    ap.add_argument("--data", default=None, help="evaluation data (stsb: sts-dev.csv or folder; fashion-mnist: folder)")
    ap.add_argument("--tokenizer", default=None, help="stsb: tokenizer.json or its folder")
    ap.add_argument("--limit", type=int, default=None, help="stsb: first N pairs; fashion-mnist: first N train rows")
    ap.add_argument("--calibration", type=Path, default=None, help=".npz of model inputs for bfc calibration and checks")
    ap.add_argument("--structure", default=None,
                    help=f"comma list ({', '.join(s.value for s in Structure)}: bfc optimize --structure)")
    ap.add_argument("--rank", default="none", help="comma list of block ranks (none = the structure's default)")
    ap.add_argument("--precision", default="int8",
                    help=f"comma list ({', '.join(p.value for p in Precision)}: bfc optimize --precision)")
    ap.add_argument("--max-error", default="none", help="comma list of per-layer error budgets (none = no budget)")
    ap.add_argument("--residual-rank", default="8", help="comma list (lowrank-residual only)")
    ap.add_argument("--min-size", type=int, default=None, help="layers with fewer weights stay dense (bfc points and baselines)")
    ap.add_argument("--bfc", action="append", default=[], metavar="K=V,...",
                    help="one extra bfc configuration, e.g. structure=auto,precision=auto,max_error=0.1 (repeatable)")
    ap.add_argument("--distill", type=Path, default=None, metavar="DATA.npz",
                    help="unlabeled model inputs: measure each bfc point also distilled (see --distill-steps)")
    ap.add_argument("--distill-steps", default="0,500",
                    help="comma list of distillation steps per bfc point; 0 = the point without distillation")
    ap.add_argument("--distill-batch", type=int, default=None, help="distillation samples per step (bfc default 32)")
    ap.add_argument("--distill-lr", type=float, default=None, help="distillation peak step size (bfc default 5e-4)")
    ap.add_argument("--distill-match", default=None, metavar="TENSOR",
                    help="intermediate tensor (or op:TYPE, e.g. op:LayerNormalization) matched too when distilling")
    ap.add_argument("--baselines", default=",".join(BASELINES), help=f"comma list of {', '.join(BASELINES)} or none")
    ap.add_argument("--budgets", default="0.0625,0.125,0.25",
                    help="byte budgets of svd/svd-int8/prune as fractions of the fp32 linear-weight bytes")
    ap.add_argument("--results", type=Path, default=Path("study/results.jsonl"), help="JSON-lines results (resumable)")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: the results file's folder)")
    ap.add_argument("--workdir", type=Path, default=None, help="where models are built (default OUT/models)")
    ap.add_argument("--keep-models", action="store_true", help="keep the built .onnx files")
    ap.add_argument("--latency-runs", type=int, default=20)
    ap.add_argument("--title", default=None)
    ap.add_argument("--report-only", action="store_true", help="only rewrite the report from the results file")
    ap.add_argument("--dry-run", action="store_true", help="list the pending points and exit")
    return ap


def points_from_args(args, fp32_bytes: int) -> list[Point]:
    pts = []            # baselines first: they are fast, so a partial sweep already has them
    names = [b for b in _list(args.baselines) if b is not None]
    budgets = [b for b in _list(args.budgets, float) if b is not None]
    for name in names:
        check_baseline(name)
        if name in BUDGETED:
            if not budgets:
                raise ConfigError(f"baseline {name} needs --budgets (fractions of the fp32 linear-weight bytes)")
            pts += [baseline_point(name, int(round(f * fp32_bytes)), args.min_size) for f in budgets]
        else:
            pts.append(baseline_point(name, None, args.min_size))
    if args.structure:
        common = {} if args.min_size is None else {"min_size": args.min_size}
        pts += grid(_list(args.structure), _list(args.rank, int) or [None], _list(args.precision),
                    _list(args.max_error, float) or [None], _list(args.residual_rank, int) or [8], **common)
    pts += [parse_point(t) for t in args.bfc]
    if args.distill is not None:
        steps = [s for s in _list(args.distill_steps, int) if s is not None]
        if not steps or any(s < 0 for s in steps):
            raise ConfigError(f"--distill-steps {args.distill_steps!r}: give steps >= 0 (0 = without distillation)")
        pts = with_distill(pts, args.distill, steps, distill_batch=args.distill_batch, distill_lr=args.distill_lr,
                           distill_match=args.distill_match)
    return pts


def main(argv=None) -> int:
    """CLI entry of ``bfc study`` (prints; exit 2 on bad input)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    out_dir = args.out or args.results.parent
    title = args.title or f"bfc study: {Path(args.model).name}"
    given = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("--report-only", "--dry-run")]
    command = "bfc study " + " ".join(shlex.quote(a) for a in given)
    try:
        if args.report_only:
            records = load_results(args.results)
            if not records:
                raise ConfigError(f"results file {args.results} has no records; run the sweep first")
            md = write_report(records, out_dir, title=title, metric_name=args.eval_spec, command=command)
            print(f"report: {md}")
            return 0
        if args.latency_runs < 1:
            raise ConfigError(f"--latency-runs {args.latency_runs} must be >= 1")
        evaluator = get_evaluator(args.eval_spec, args.data, args.tokenizer, args.limit)
        study = Study(Path(args.model), evaluator, args.results, args.workdir or out_dir / "models",
                      args.calibration, args.latency_runs, args.keep_models)
        points = points_from_args(args, study.fp32_bytes)
        todo = study.pending([Point("reference")] + points)
        print(f"{len(points) + 1} points, {len(todo)} to run (results: {args.results})", file=sys.stderr)
        if args.dry_run:
            for p in todo:
                print(p.key)
            return 0
        from tqdm import tqdm
        bar = tqdm(total=len(todo), file=sys.stderr, unit="point", dynamic_ncols=True)

        def progress(pt):
            bar.set_postfix_str(pt.key[:60])
            bar.update(1)
        try:
            records = study.run(points, progress=progress)
        finally:
            bar.close()
        md = write_report(records, out_dir, title=title, metric_name=evaluator.metric, command=command)
        s = summary(records)
        ref = s["reference"]
        failed = [r for r in records if r.get("status") != "ok"]
        print(f"report: {md}" + (f"  ({len(failed)} point(s) failed, see the report)" if failed else ""))
        if not available():
            print(f"bfc study: {NO_PLOTS}", file=sys.stderr)
        if ref is not None:
            print(f"reference {evaluator.metric} {ref['metric']:.2f}; "
                  + ("target point: " + s["target_point"]["key"] if s["target_point"] else "no bfc point within 1 "
                     "point at <= 0.5x int8-dynamic bytes"))
        return 0
    except BfcError as e:
        print(f"bfc study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bfc study: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
