"""Scale: per-layer planning in a process pool, on Dask, resumable from a work folder (bfc.passes.layer_runner).

The optimized model's bytes must not depend on the worker count, the engine, the
completion order, or on how many layers were loaded from the work folder.
"""
import concurrent.futures
import hashlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from bfc.cli import main as cli_main
from bfc.config import OptimizeConfig
from bfc.errors import ConfigError
from bfc.passes import layer_runner
from bfc.passes import layer_runner as plan_mod  # the engines call plan_site through it
from bfc.passes.events import LayerPlanned
from bfc.passes.pipeline import optimize

D = 128


def _model(path: Path, seed: int = 0) -> Path:
    """x (B, 128) -> h = x W0; q, k, v = h Wq, h Wk, h Wv (one input: a shared rotation); relu(q + k + v) W4 W5."""
    rng = np.random.default_rng(seed)
    shapes = {"W0": (D, D), "Wq": (D, D), "Wk": (D, D), "Wv": (D, D), "W4": (D, 2 * D), "W5": (2 * D, D)}
    inits = [nh.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n) for n, s in shapes.items()]
    nodes = [h.make_node("MatMul", ["x", "W0"], ["h"], name="l0"),
             h.make_node("MatMul", ["h", "Wq"], ["q"], name="q"),
             h.make_node("MatMul", ["h", "Wk"], ["k"], name="k"),
             h.make_node("MatMul", ["h", "Wv"], ["v"], name="v"),
             h.make_node("Add", ["q", "k"], ["qk"]), h.make_node("Add", ["qk", "v"], ["s"]),
             h.make_node("Relu", ["s"], ["r"]),
             h.make_node("MatMul", ["r", "W4"], ["u"], name="up"),
             h.make_node("MatMul", ["u", "W5"], ["y"], name="down")]
    g = h.make_graph(nodes, "scale", [h.make_tensor_value_info("x", T.FLOAT, ["B", D])],
                     [h.make_tensor_value_info("y", T.FLOAT, ["B", D])], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
    m.ir_version = 10
    onnx.save(m, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    calib = d / "calib.npz"
    np.savez(calib, x=np.random.default_rng(1).standard_normal((24, D)).astype(np.float32))
    return _model(d / "model.onnx"), calib


def _bytes(path: Path) -> str:
    data = Path(str(path) + ".data")
    return hashlib.sha256(path.read_bytes() + (data.read_bytes() if data.exists() else b"")).hexdigest()


def _run(src, out, **kw):
    kw.setdefault("verify", False)
    _, report = optimize(src, OptimizeConfig(**kw), output=out)
    return _bytes(out), report


CONFIGS = {
    "monarch": dict(structure="monarch", rank=2, max_error=None, max_output_error=None),
    "auto": dict(max_error=0.3, precision="auto", max_output_error=None),
    "rotated": dict(structure="rotated", bits=4, max_error=None, max_output_error=None),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pool_gives_the_same_bytes(inputs, tmp_path, name):
    src, calib = inputs
    one, r1 = _run(src, tmp_path / "w1.onnx", workers=1, calibration=calib, **CONFIGS[name])
    two, r2 = _run(src, tmp_path / "w2.onnx", workers=2, calibration=calib, **CONFIGS[name])
    assert one == two
    assert r1.rewritten, "the config must rewrite something to be a test"
    assert {r.worker for r in r1.layers if r.plan_seconds is not None} == {"main"}
    pool = {r.worker for r in r2.layers if r.plan_seconds is not None}     # this process and one pool process
    assert pool <= {"main"} | {w for w in pool if w.startswith("pid ")} and any(w.startswith("pid ") for w in pool)
    assert [(r.layer, r.structure, r.precision, r.error) for r in r1.layers] == \
           [(r.layer, r.structure, r.precision, r.error) for r in r2.layers]


def test_uncalibrated_pool_and_target_size(inputs, tmp_path, monkeypatch):
    """Weight error (no statistics shipped) and the sequential target-size cut, applied in order."""
    src, _ = inputs
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    cfg = dict(structure="monarch", rank=1, max_error=None, max_output_error=None, target_size=180_000)
    one, r1 = _run(src, tmp_path / "a.onnx", workers=1, **cfg)
    two, r2 = _run(src, tmp_path / "b.onnx", workers=2, **cfg)
    assert one == two
    reasons = [r.reason for r in r1.layers]
    assert any(r and "target size" in r for r in reasons) and any(r is None for r in reasons)
    assert reasons == [r.reason for r in r2.layers]
    assert not any((tmp_path / "tmp" / "bfc-work").iterdir())     # the cut ends planning: temp records removed


def test_completion_order_does_not_matter(inputs, tmp_path, monkeypatch):
    src, calib = inputs
    cfg = dict(workers=1, calibration=calib, **CONFIGS["rotated"])
    ref, _ = _run(src, tmp_path / "a.onnx", **cfg)
    engine = layer_runner.Runner._engine

    def reversed_engine(self, tasks):
        yield from reversed(list(engine(self, tasks)))

    monkeypatch.setattr(layer_runner.Runner, "_engine", reversed_engine)
    out, _ = _run(src, tmp_path / "b.onnx", **cfg)
    assert out == ref


def test_inflight_tasks_are_bounded(inputs, tmp_path, monkeypatch):
    src, calib = inputs
    seen = {"max": 0}
    real = concurrent.futures.ProcessPoolExecutor

    class Counting(real):
        def submit(self, fn, *a, **k):
            fut = super().submit(fn, *a, **k)
            self._live = getattr(self, "_live", set()) | {fut}
            self._live = {f for f in self._live if not f.done()}
            seen["max"] = max(seen["max"], len(self._live))
            return fut

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Counting)
    monkeypatch.setattr(layer_runner, "INFLIGHT_PER_WORKER", 1)
    _run(src, tmp_path / "a.onnx", workers=2, calibration=calib, **CONFIGS["monarch"])
    assert 1 <= seen["max"] <= 2


def test_dask_local_cluster_gives_the_same_bytes(inputs, tmp_path):
    distributed = pytest.importorskip("distributed", reason="needs Dask: pip install 'bfc[cluster]' "
                                                           "(or pip install 'dask[distributed]')")
    src, calib = inputs
    cfg = dict(calibration=calib, **CONFIGS["rotated"])
    ref, _ = _run(src, tmp_path / "a.onnx", workers=1, **cfg)
    with distributed.LocalCluster(n_workers=2, processes=False, threads_per_worker=1,
                                  dashboard_address=None) as cluster:
        out, report = _run(src, tmp_path / "b.onnx", cluster=cluster.scheduler_address, **cfg)
    assert out == ref
    assert all(r.worker.startswith("dask ") for r in report.layers if r.plan_seconds is not None)


def test_dask_local_cluster_with_this_process_planning(inputs, tmp_path):
    """cluster="local", workers=2: this process and one LocalCluster worker process plan; same bytes."""
    pytest.importorskip("distributed")
    src, calib = inputs
    cfg = dict(calibration=calib, **CONFIGS["auto"])
    ref, _ = _run(src, tmp_path / "a.onnx", workers=1, **cfg)
    out, report = _run(src, tmp_path / "b.onnx", workers=2, cluster="local", **cfg)
    assert out == ref
    who = {r.worker for r in report.layers if r.plan_seconds is not None}
    assert who <= {"main"} | {w for w in who if w.startswith("dask ")}


def test_resume_plans_only_the_missing_layers(inputs, tmp_path, monkeypatch):
    src, calib = inputs
    work = tmp_path / "work"
    cfg = dict(workers=1, calibration=calib, work_dir=work, **CONFIGS["monarch"])
    ref, r0 = _run(src, tmp_path / "a.onnx", **cfg)
    records = sorted(work.glob("*.pkl"))
    planned = sum(r.plan_seconds is not None for r in r0.layers)
    assert len(records) == planned == 6 and not any(r.resumed for r in r0.layers)
    for f in records[::2]:
        f.unlink()
    calls = []
    real = plan_mod.plan_site
    monkeypatch.setattr(plan_mod, "plan_site", lambda site, *a, **k: calls.append(site.weight_name) or real(site, *a, **k))
    out, r1 = _run(src, tmp_path / "b.onnx", **cfg)
    assert out == ref
    assert len(calls) == len(records[::2]) == 3
    assert sum(r.resumed for r in r1.layers) == 3
    calls.clear()
    out, r2 = _run(src, tmp_path / "c.onnx", **cfg)     # everything recorded: nothing planned
    assert out == ref and calls == [] and all(r.resumed for r in r2.layers if r.plan_seconds is not None)


def test_killed_run_resumes_from_the_default_folder(inputs, tmp_path, monkeypatch):
    """Without work_dir: a temp folder keyed by the content; kept when planning dies, removed when it ends."""
    src, calib = inputs
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    cfg = dict(workers=1, calibration=calib, **CONFIGS["monarch"])
    real = plan_mod.plan_site
    calls = []

    def dies_at_the_fourth(site, *a, **k):
        calls.append(site.weight_name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(site, *a, **k)

    monkeypatch.setattr(plan_mod, "plan_site", dies_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        _run(src, tmp_path / "a.onnx", **cfg)
    folders = list((tmp_path / "tmp" / "bfc-work").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.pkl"))) == 3
    calls.clear()
    monkeypatch.setattr(plan_mod, "plan_site", lambda site, *a, **k: calls.append(1) or real(site, *a, **k))
    out, _ = _run(src, tmp_path / "b.onnx", **cfg)
    assert len(calls) == 3
    assert not folders[0].exists()                       # planning finished: the temporary folder is gone
    monkeypatch.setattr(plan_mod, "plan_site", real)
    ref, _ = _run(src, tmp_path / "c.onnx", **cfg)
    assert out == ref


def test_record_key(inputs):
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    cfg = OptimizeConfig(structure="monarch", max_error=None)

    def key(**kw):
        base = dict(index=0, key="W", weight=w, stats=None, config=cfg, target="portable",
                    precisions=(cfg.precision,), opset=21, seed=0)
        return layer_runner.task_key(layer_runner.LayerTask(**{**base, **kw}))

    k = key()
    assert k == key(index=3, key="other")                               # content, not position or name
    assert k == key(config=cfg.replace(workers=2, work_dir="/x", verify=False, max_output_error=None))
    assert k != key(config=cfg.replace(rank=2))
    assert k != key(target="custom-op")
    assert k != key(weight=w + np.float32(1e-6))
    assert k != key(seed=1)


def test_events_carry_progress(inputs, tmp_path):
    src, calib = inputs
    events = []
    optimize(src, OptimizeConfig(workers=2, calibration=calib, verify=False, **CONFIGS["monarch"]),
             output=tmp_path / "a.onnx", on_event=events.append)
    planned = [e for e in events if isinstance(e, LayerPlanned)]
    assert [e.done for e in planned] == list(range(1, 7)) and all(e.total == 6 for e in planned)
    assert all(e.seconds is not None and e.seconds > 0 and (e.worker == "main" or e.worker.startswith("pid "))
               for e in planned)
    assert any(e.worker.startswith("pid ") for e in planned)
    assert all(0 < e.cpu_seconds <= e.seconds * 1.05 + 0.05 for e in planned)   # CPU of the planning thread
    assert planned[-1].eta == 0 and all(e.eta is not None for e in planned)


def test_config_and_cli(inputs, tmp_path, capsys):
    for bad in (dict(workers=0), dict(workers=True), dict(cluster="")):
        with pytest.raises(ConfigError):
            OptimizeConfig(**bad)
    assert OptimizeConfig.from_dict({"workers": 2, "work-dir": "w", "cluster": "local"}).schedule.work_dir == Path("w")
    src, calib = inputs
    rc = cli_main(["optimize", str(src), "-o", str(tmp_path / "a.onnx"), "--structure", "monarch", "--no-max-error", "--no-max-output-error",
                   "--workers", "2", "--work-dir", str(tmp_path / "work"), "-q", "--no-verify",
                   "--calibration", str(calib)])
    assert rc == 0, capsys.readouterr().err
    assert len(list((tmp_path / "work").glob("*.pkl"))) == 6
    assert cli_main(["optimize", str(src), "-o", str(tmp_path / "b.onnx"), "--workers", "0", "-q"]) == 2
    assert "workers" in capsys.readouterr().err


def test_missing_cluster_is_a_user_error(inputs, tmp_path, monkeypatch):
    pytest.importorskip("distributed")
    monkeypatch.setattr(layer_runner, "CONNECT_TIMEOUT", 2)
    src, _ = inputs
    with pytest.raises(ConfigError, match="Dask scheduler"):
        _run(src, tmp_path / "a.onnx", cluster="tcp://127.0.0.1:1", structure="monarch", max_error=None)
