"""Polish of the command line and its messages (issue 21 items 9 and 10): progress lines without
a terminal, one size per model, comparisons printed with enough digits, a demo command that runs
from the current folder, study's structures from optimize's enum, help texts, legends, quiet
onnxruntime logs, and the report file's mode."""
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h

from bfc.errors import ModelError
from bfc.passes.model_io.session import run

BFC = [sys.executable, "-m", "bfc.cli"]


def _broadcast_mismatch():
    m = h.make_model(h.make_graph([h.make_node("Add", ["a", "b"], ["c"])], "g",
                                  [h.make_tensor_value_info("a", T.FLOAT, ["n", 4]),
                                   h.make_tensor_value_info("b", T.FLOAT, ["m", 4])],
                                  [h.make_tensor_value_info("c", T.FLOAT, None)]),
                     opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_failed_run_raises_without_onnxruntime_log_lines(capfd):
    """A run onnxruntime refuses is one ModelError; its `[E:onnxruntime:...]` log line stays off stderr."""
    with pytest.raises(ModelError, match="onnxruntime failed to run the model"):
        run(_broadcast_mismatch(), {"a": np.zeros((2, 4), np.float32), "b": np.zeros((3, 4), np.float32)})
    err = capfd.readouterr().err
    assert "[E:" not in err and "onnxruntime" not in err


def _mlp(path, width=64, seed=0):
    rng = np.random.default_rng(seed)
    nh = onnx.numpy_helper
    g = h.make_graph([h.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"), h.make_node("Relu", ["h"], ["r"]),
                      h.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", width])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", width])],
                     [nh.from_array(rng.standard_normal((width, width)).astype(np.float32), "W1"),
                      nh.from_array(rng.standard_normal((width, width)).astype(np.float32), "W2")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


# ---- item 9: progress lines when stderr is not a terminal ------------------------------------
def test_progress_lines_on_a_pipe(tmp_path):
    """stderr a pipe: one line per stage (and the planned layers), no progress-bar control characters."""
    src = _mlp(tmp_path / "m.onnx")
    env = dict(os.environ, BFC_PROGRESS_AFTER_S="0")
    p = subprocess.run(BFC + ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "--min-size", "0",
                              "--workers", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    stages = [re.match(r"bfc: +[0-9.]+ s  ([a-z]+)", ln).group(1) for ln in lines if ln.startswith("bfc: ")]
    assert all(ln.startswith("bfc: ") for ln in lines), p.stderr
    for stage in ("load", "sites", "plan", "save", "verify"):
        assert stages.count(stage) == 1, (stage, p.stderr)
    assert any("planned 2/2 layers" in ln for ln in lines) and "\r" not in p.stderr and "\x1b" not in p.stderr
    assert "TOTAL" in p.stdout and "TOTAL" not in p.stderr


def test_progress_lines_quiet_and_short_runs_print_nothing(tmp_path):
    src = _mlp(tmp_path / "m.onnx")
    env = dict(os.environ, BFC_PROGRESS_AFTER_S="0")
    p = subprocess.run(BFC + ["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-q", "--workers", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and p.stderr == "" and p.stdout == "", p.stderr


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class _Pipe:
    def __init__(self):
        self.text = ""

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return False


def test_progress_layer_lines_at_most_every_10_s(monkeypatch):
    """400 layers, one per second: a layer line every 10 s (40) plus the last, one line per stage,
    nothing in the first 5 s (a quick failure stays one line)."""
    from bfc.cli import _Progress
    from bfc.passes.events import LayerPlanned, SitesFound, StageStarted
    monkeypatch.delenv("BFC_PROGRESS_AFTER_S", raising=False)
    clock, pipe = _Clock(), _Pipe()
    prog = _Progress(True, stream=pipe, clock=clock)
    for stage in ("load", "normalize", "sites"):
        prog(StageStarted(stage))
    prog(SitesFound(400, 400))
    clock.t = 1.0
    prog(StageStarted("plan"))
    assert pipe.text == ""                                 # within the first 5 s: nothing yet
    for i in range(400):
        clock.t = 2.0 + i
        prog(LayerPlanned(f"layer{i}", i % 3 > 0, i + 1, 400, eta=400.0 - i))
    for step in range(0, 500, 1):                          # a stage that repeats its event (distill steps)
        clock.t = 402.0 + step * 0.5
        prog(StageStarted("distill", f"step {step}/500"))
    clock.t = 700.0
    prog(StageStarted("verify"))
    lines = pipe.text.splitlines()
    layer_lines = [ln for ln in lines if "planned" in ln]
    times = [float(ln.split()[1]) for ln in layer_lines]
    assert all(b - a >= 10 for a, b in zip(times[:-2], times[1:-1]))
    assert 38 <= len(layer_lines) <= 42 and "planned 400/400 layers" in layer_lines[-1]
    assert "ETA" in layer_lines[0] and "ETA" not in layer_lines[-1]
    assert sum(" plan" in ln and "planned" not in ln for ln in lines) == 1     # the stage, said once
    distill = [ln for ln in lines if "distill" in ln]
    assert 24 <= len(distill) <= 26                         # 250 s of steps: one line per 10 s
    assert lines[-1].endswith("verify") and times[0] >= 5


# ---- item 10: onnxruntime's log under -q, the report file's mode ------------------------------
def test_quiet_run_of_a_model_generated_inputs_cannot_run_prints_nothing(tmp_path):
    """The generated inputs do not fit a fixed Reshape: onnxruntime fails (the report notes it) but its
    `[E:onnxruntime:...]` log line does not reach stderr, under -q nothing does."""
    rng = np.random.default_rng(2)
    nh = onnx.numpy_helper
    g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y0"], name="fc"),
                      h.make_node("Reshape", ["y0", "shape"], ["y"])], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", 64])],
                     [h.make_tensor_value_info("y", T.FLOAT, [3, "k"])],
                     [nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
                      nh.from_array(np.array([3, -1], np.int64), "shape")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "m.onnx")
    p = subprocess.run(BFC + ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-q",
                              "--min-size", "0", "--workers", "1", "--report", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300)
    assert p.stderr == "" and p.stdout == "", p.stderr
    import json
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["outputs"] == [] and "onnxruntime failed" in (rep["not_verified"] or "") + " ".join(rep["notes"])


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_report_file_mode_follows_the_umask(tmp_path, umask, mode, capsys):
    from bfc.cli import main
    src = _mlp(tmp_path / "m.onnx")
    old = os.umask(umask)
    try:
        rc = main(["optimize", str(src), "-o", str(tmp_path / "o.onnx"), "-q", "--workers", "1",
                   "--report", str(tmp_path / "r.json")])
    finally:
        os.umask(old)
    assert rc == 0
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".bfc-")] == []   # no temporary left


# ---- item 8 (part): inspect counts stored bytes and honours --min-size --------------------------
def _int8_weight_model(path, k=128, n=128, small=(40, 64)):
    """A weight-only int8 layer (int8 W -> DequantizeLinear -> MatMul) and a float layer of 2560 weights."""
    rng = np.random.default_rng(7)
    nh = onnx.numpy_helper
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    g = h.make_graph([h.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"]),
                      h.make_node("MatMul", ["x", "W"], ["h"], name="big"),
                      h.make_node("Slice", ["h", "st", "en", "ax"], ["hs"]),
                      h.make_node("MatMul", ["hs", "W2"], ["y"], name="small")], "g",
                     [h.make_tensor_value_info("x", T.FLOAT, ["N", k])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["N", small[1]])],
                     [nh.from_array(wq, "Wq"), nh.from_array(np.array(0.01, np.float32), "s"),
                      nh.from_array(np.array(0, np.int8), "z"),
                      nh.from_array(rng.standard_normal(small).astype(np.float32), "W2"),
                      nh.from_array(np.array([0], np.int64), "st"), nh.from_array(np.array([small[0]], np.int64), "en"),
                      nh.from_array(np.array([1], np.int64), "ax")])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def test_inspect_counts_stored_bytes_and_min_size(tmp_path):
    from bfc.config import OptimizeConfig
    from bfc.passes.inspect import HEADER, inspect_model
    src = _int8_weight_model(tmp_path / "q.onnx")
    rows, summary = inspect_model(src)
    by = {r[0]: dict(zip(HEADER, r)) for r in rows}
    assert "too small (2560 weights < min-size 4096)" in by["small"]["picked"] and by["small"]["int8"] == "-"
    assert by["big"]["stored"] == "16.39 kB"              # 128*128 int8 + scale + zero point, not 65.5 kB fp32
    _, summary0 = inspect_model(src, OptimizeConfig(min_size=0, max_output_error=None, max_error=0.5))
    assert "of 2 sites rewritten" in summary0 and "of 2 sites rewritten" in summary


def test_inspect_cli_help_and_min_size(tmp_path, capsys):
    from bfc.cli import main
    src = _int8_weight_model(tmp_path / "q.onnx")
    assert main(["inspect", str(src), "--min-size", "0"]) == 0
    assert "of 2 sites rewritten" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    out = capsys.readouterr().out
    assert "input .onnx model" in out and "--min-size" in out


# ---- item 10: the demo -----------------------------------------------------------------------
@pytest.mark.slow            # 35 s on the loaded 2-core dev machine (the demo's full comparison)
def test_demo_one_size_per_model_and_a_command_that_runs_here(tmp_path, capsys, monkeypatch):
    """The summary and the comparison print the same size for each model (the file written); the
    printed commands, run from another folder, redo the optimization."""
    from bfc.cli import main
    from bfc.report import size_text
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "-o", "d.onnx"]) == 0
    out = capsys.readouterr().out
    before, after = re.search(r"model file: (\S+ \S+) -> (\S+ \S+)", out).groups()
    sizes = {ln.split()[0]: " ".join(ln.split()[2:4]) for ln in out.splitlines()
             if ln.startswith(("original ", "optimized "))}
    assert sizes == {"original": before, "optimized": after}, out
    assert after == size_text((tmp_path / "d.onnx").stat().st_size)
    cmds = [ln[2:] for ln in out.splitlines() if ln.startswith("$ ")]
    assert len(cmds) == 2 and "calibration.npz" in cmds[0] and " -o d.onnx " in cmds[1]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cmd in cmds:
        p = subprocess.run(cmd, shell=True, cwd=elsewhere, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (cmd, p.stderr)
    assert (elsewhere / "calibration.npz").is_file() and (elsewhere / "d.onnx").is_file()


def test_demo_and_study_help(capsys, monkeypatch):
    """`bfc demo --precision` has help; study offers exactly optimize's structures and precisions."""
    from bfc.cli import main
    monkeypatch.setenv("COLUMNS", "400")                  # argparse wraps at the terminal width
    from bfc.config import Precision, Structure
    from bfc.study import build_parser
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    demo = capsys.readouterr().out
    assert re.search(r"--precision PRECISION\s+\S", demo) and "int4" in demo
    text = build_parser().format_help()
    listed = re.search(r"--structure STRUCTURE\s+comma list \(([^:]+):", text).group(1)
    assert [x.strip() for x in listed.split(",")] == [s.value for s in Structure]
    assert "block-rank" not in text and all(p.value in text for p in Precision)


# ---- item 10: numbers in messages, the error legend ---------------------------------------------
@pytest.mark.parametrize("value,bound,want", [(0.2004, 0.2, ("0.2004", "0.2")), (0.19996, 0.2, ("0.19996", "0.2")),
                                              (0.2, 0.2, ("0.2", "0.2")), (0.123456, 0.05, ("0.123", "0.05")),
                                              (1e-9 + 0.05, 0.05, ("0.050000001", "0.05"))])
def test_compared_prints_enough_digits(value, bound, want):
    from bfc.report import compared
    a, b = compared(value, bound)
    assert (a, b) == want
    assert (a == b) == (value == bound)              # printed equal only when equal


def _report(kind, verified_on=None, calibrated=None):
    from bfc.report import LayerRow, Report
    row = LayerRow("fc", 1, (64, 64), "monarch r2", "int8", 4096, 1024, 16384, 1100, 4096, 1024, 0.01, kind, None)
    return Report("m", "portable", [row], verified_on=verified_on, calibrated=calibrated)


def test_error_legend_says_where_errors_were_measured():
    weight = _report("weight", "random").table()
    assert "(w) = relative weight error" in weight and "calibration" not in weight
    assert "verified output" not in weight            # no outputs in this report
    gen = _report("output", "random").table()
    assert "output error on generated inputs" in gen and "calibration" not in gen
    cal = _report("output", "calibration").table()
    assert "output error on calibration data" in cal
    assert "output error on calibration data" in _report("output", None, calibrated=True).table()
    assert "output error on generated inputs" in _report("output", "calibration", calibrated=False).table()
