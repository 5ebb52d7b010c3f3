"""Fuzz: generated real-shaped models (tests/fuzz_models.py) through ``bfc optimize``.

For each seeded model, the default run and three forced configurations, in process through
``bfc.cli.main``:
  - the exit code is 0 or 2, never 1 (an internal error), and no traceback reaches stderr;
  - a run that does not exit 0 leaves nothing at ``-o`` nor ``<out>.data`` (nor any temporary
    file in the output folder);
  - the input files (the model and its external data) are byte-identical after the run;
  - a run that exits 0 after rewriting layers meets the whole-model budget (``max_output_error``,
    0.2 by default, which every one of these configurations keeps) on FRESH inputs generated here
    (another seed than bfc's): max over float outputs of ||y_out - y_in|| / ||y_in|| <=
    BUDGET * FRESH_INPUT_FACTOR;
  - a model whose inputs bfc cannot generate (a string input; no calibration) gets nothing
    rewritten;
  - a run that exits 0 with nothing rewritten writes the input unchanged (issue 21: the same bytes;
    with external data, the same model and still external data).

N models: ``BFC_FUZZ_MODELS`` (CI's heavy step sets 200), default 24.  Each model is one test per
configuration (test ids seedN-config); KNOWN_BUGS marks the (seed, configuration) pairs that fail
on a reported bfc bug as xfails.  Runtime on the shared, loaded 2-core machine: about 10 s per
model (four bfc runs, 9-15 s), 3.6 min at N=24, about 12.5 min at N=60; N=200 about 40 min.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_models  # noqa: E402
from fuzz_models import make_case, save  # noqa: E402

from bfc.cli import main  # noqa: E402
from bfc.factorize import relative_error  # noqa: E402

N_MODELS = int(os.environ.get("BFC_FUZZ_MODELS", "24"))
BUDGET = 0.2               # bfc's default max_output_error; none of the configurations below changes it
# bfc checks the budget on its own generated inputs: one draw (seed 0) with a batch of 32 (MEASURE_BATCH)
# (the batch axis of every input; other symbolic dims 8).  The test draws the
# same distribution (standard normal floats, ids within the table, masks ones) with another seed and a
# batch of FRESH_BATCH, so that its own estimate of the expected error is tight: in a 60-model probe
# (447 draws) the error at batch 16 was 0.83x..1.25x the error at batch 256 (5th..95th percentile).
# FRESH_INPUT_FACTOR = 1.5 is the slack left for bfc's estimate being a small sample: in the same
# probe (expected error at batch 256) / (bfc's own verified error) had quartiles 0.94 / 1.04 / 1.23,
# so 1.5 is beyond ordinary sampling luck plus the test's own noise; an error above 1.5x the budget
# means the budget does not hold on the input distribution bfc says it checked (a finding).
FRESH_INPUT_FACTOR = 1.5
FRESH_SEED = 987_654       # bfc generates its inputs with --seed (default 0); Case.feeds(0) can coincide with them
FRESH_BATCH = 16

CONFIGS = {
    "default": [],
    "monarch-r2": ["--structure", "monarch", "--rank", "2"],
    "rotated-b3": ["--structure", "rotated", "--bits", "3"],
    "butterfly-int8": ["--structure", "butterfly", "--precision", "int8", "--no-max-error"],
}

# (seed, configuration) -> reason: real bfc bugs, each reported with a reproduction; nothing else.  The two
# found by this fuzz (budgets checked on a 2-row draw; no-op runs not byte-identical) are fixed.
_ONE_DRAW = ("the budget is estimated on one generated draw (32 rows); on this model the error on fresh inputs "
             "is 1.5-1.6x the budget (seed 28: an If whose branch depends on the data; seed 36: 1.02x the test's "
             "tolerance): a margin or several draws for uncalibrated checks is the open fix")
KNOWN_BUGS: dict[tuple[int, str], str] = {(28, "rotated-b3"): _ONE_DRAW, (36, "rotated-b3"): _ONE_DRAW}


def _digest(paths) -> dict:
    return {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _session(model_or_path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _fresh_error(src, out, feeds) -> float:
    """max over float outputs of ||y_out - y_in|| / ||y_in||.  The input is loaded with onnx (external
    data read into memory): onnxruntime refuses, by path, a model whose Reshape shape tensor lives in
    external data; bfc's output is loaded by path, as a user would."""
    ref = _session(onnx.load(str(src))).run(None, feeds)
    got = _session(out).run(None, feeds)
    assert len(ref) == len(got)
    errs = [relative_error(r, g) for r, g in zip(ref, got) if np.asarray(r).dtype.kind == "f"]
    return max(errs, default=0.0)


def _optimize(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _params():
    for seed in range(N_MODELS):
        for name in CONFIGS:
            reason = KNOWN_BUGS.get((seed, name))
            # not strict: these sit near the test's tolerance (seed 36 at 1.02x), so another machine's
            # rounding may pass them; an unexpected failure elsewhere still fails the run
            marks = [pytest.mark.xfail(strict=False, reason=reason)] if reason else []
            yield pytest.param(seed, name, marks=marks, id=f"seed{seed}-{name}")


_CASES: dict = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """seed -> (Case, input paths, their digests): each model built and saved once."""
    root = tmp_path_factory.mktemp("fuzz_inputs")

    def get(seed):
        if seed not in _CASES:
            case = make_case(seed)
            d = root / f"seed{seed}"
            d.mkdir()
            paths = save(case, d / "m.onnx")
            _CASES[seed] = (case, paths, _digest(paths))
        return _CASES[seed]
    yield get
    _CASES.clear()


@pytest.mark.slow            # default N=24: 3.6 min on the loaded 2-core dev machine (9 s per model)
@pytest.mark.parametrize(("seed", "config"), list(_params()))
def test_fuzz_model(seed, config, models, tmp_path, capfd, monkeypatch):
    case, inputs, before = models(seed)
    src = Path(inputs[0])
    out, rep = tmp_path / "out" / "out.onnx", tmp_path / "report.json"
    out.parent.mkdir()
    code, err = _optimize(["optimize", str(src), "-o", str(out), "-q", "--report", str(rep)] + CONFIGS[config])
    err += capfd.readouterr().err          # what onnxruntime's C++ logger wrote to fd 2
    where = (f"seed {seed} ({case.family}, opset {case.opset}, {'external data' if case.external else 'inline'}"
             f"{', ' + ', '.join(case.notes) if case.notes else ''}) {config}")
    assert code in (0, 2), f"{where}: exit {code}: {err.strip()[:800]}"
    assert "Traceback" not in err, f"{where}: traceback on stderr:\n{err[:2000]}"
    assert _digest(inputs) == before, f"{where}: the input files changed"
    left = sorted(p.name for p in out.parent.iterdir())
    if code != 0:
        assert not left, f"{where}: exit {code} left {left} behind ({err.strip()[:300]})"
        assert not out.exists() and not Path(str(out) + ".data").exists()
        return
    assert not [n for n in left if n.startswith(".")], f"{where}: temporary files left: {left}"
    report = json.loads(rep.read_text())
    n = report["totals"]["rewritten"]
    if not case.generatable:
        assert n == 0, f"{where}: {n} layers rewritten although bfc cannot generate the inputs (no calibration)"
    if n == 0:
        # issue 21: a run that rewrites nothing copies the input (and its external data layout) unchanged
        same = (out.read_bytes() == src.read_bytes() if not case.external else
                onnx.load(str(out)).SerializeToString() == onnx.load(str(src)).SerializeToString()
                and any(t.data_location == onnx.TensorProto.EXTERNAL
                        for t in onnx.load(str(out), load_external_data=False).graph.initializer))
        assert same, (f"{where}: nothing rewritten, but the output is not the input unchanged "
                      f"({src.stat().st_size} -> {out.stat().st_size} bytes, files {left}; notes {report['notes']})")
        return
    sizes = [sum(f.stat().st_size for f in d.iterdir()) for d in (src.parent, out.parent)]
    assert sizes[1] <= sizes[0], f"{where}: the output files ({sizes[1]} bytes) are larger than the input's ({sizes[0]})"
    monkeypatch.setattr(fuzz_models, "BATCH", FRESH_BATCH)
    e = _fresh_error(src, out, case.feeds(FRESH_SEED + seed))
    assert e <= BUDGET * FRESH_INPUT_FACTOR, (
        f"{where}: {n}/{report['totals']['sites']} layers rewritten, error on fresh inputs {e:.3g} > "
        f"{BUDGET} x {FRESH_INPUT_FACTOR} (bfc verified on {report['verified_on']}: "
        f"{[(o['name'], round(o['rel_error'], 3)) for o in report['outputs']]}; notes {report['notes']})")
