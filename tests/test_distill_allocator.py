"""Distillation as a stage of the allocator (``--distill`` with structure/precision auto): the plan before training
is allocated to ``distill_headroom`` x the budget, trained (``TrainableInt8`` for the int8-compute forms), and kept
only when onnxruntime measures the written model within the budget; else the post-training allocation is written."""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch", reason="distillation needs PyTorch (pip install 'bfc[torch]')")

import bfc
import bfc.distill
from bfc.config import OptimizeConfig
from bfc.distill import SiteLayer, site_layer, trainable_layers
from bfc.errors import ConfigError
from bfc.factorize import relative_error
from bfc.lowbit.int8_layer import Int8Linear
from bfc.passes.calibrate import calibrate
from bfc.passes.distill import within_budget
from bfc.passes.find_sites import find_model_sites
from bfc.passes.guard import output_error
from bfc.passes.load import load
from bfc.passes.model_io.feeds import load_feeds
from bfc.passes.model_io.session import run, session
from bfc.passes.normalize import normalize
from bfc.passes.pipeline import preferred_opset
from bfc.passes.products import Sites
from bfc.passes.rewrite import rewritten
from bfc.passes.schedule import VERIFIED_SHARE, plan_layers
from bfc.passes.targets import get_target
from bfc.quant.embedding import QuantizedEmbedding
from bfc.torch.onnx_module import OnnxModule

sys.path.insert(0, str(Path(__file__).parent))
import distill_models as dm

pytestmark = pytest.mark.usefixtures("torch_one_thread")
BUDGET = 0.1
HEADROOM = 3.0
EMITTED_TOL = 1e-4     # relative: onnxruntime vs the torch student (float32 sums in another order)


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    model = dm.block(d=128, ff=256)
    d = tmp_path_factory.mktemp("alloc_distill")
    np.savez(d / "cal.npz", **dm.inputs(model, 64, seed=1))
    np.savez(d / "distill.npz", **dm.inputs(model, 512, seed=2))
    return model, d / "cal.npz", d / "distill.npz"


def _cfg(cal, **kw):
    return OptimizeConfig(**{"calibration": cal, "min_size": 0, "seed": 0, "fuse": False,
                             "max_output_error": BUDGET, **kw})


def _error(model, out, feeds) -> float:
    return output_error(run(session(model), feeds), run(session(out), feeds))


def test_headroom_plans_smaller_and_the_budget_holds(block):
    """With headroom the allocation before training is smaller than post-training's; whatever distillation
    achieves, the written model measures within the budget in onnxruntime (trained, or the post-training
    plan with a note naming the miss)."""
    model, cal, data = block
    post, rep_post = bfc.optimize(model, _cfg(cal))
    out, rep = bfc.optimize(model, _cfg(cal, distill=data, distill_steps=60, distill_lr=1e-3,
                                        distill_headroom=HEADROOM))
    pre = [n for n in rep.notes if n.startswith(f"allocator (before training, {HEADROOM:g}x the budget)")]
    assert pre, rep.notes
    feeds = dict(np.load(cal))
    assert _error(model, out, feeds) <= BUDGET
    verdict = [n for n in rep.notes if "the post-training allocation is written" in n or "within the budget" in n]
    assert len(verdict) == 1, rep.notes
    if "post-training allocation is written" in verdict[0]:
        assert rep.model_bytes_after == rep_post.model_bytes_after
    else:
        assert rep.model_bytes_after < rep_post.model_bytes_after


def test_within_budget_keeps_a_trained_plan_only_under_the_budget(block):
    """``within_budget`` on the headroom allocation itself (untrained): over the budget it returns the
    post-training plan; with a budget the allocation meets, it keeps it and each layer's note names its
    post-training choice where they differ.  Oracle: the error onnxruntime measures on the rewritten model."""
    model, cal, data = block
    cfg = _cfg(cal, distill=data, distill_headroom=HEADROOM)
    loaded = normalize(load(model, None), preferred_opset(cfg))
    sites = Sites(tuple(find_model_sites(loaded.model, loaded.base)))
    feeds = load_feeds(cal, loaded.model)
    target = get_target(cfg.target)
    plan = plan_layers(loaded, sites, calibrate(loaded, sites, feeds, cfg), feeds, cfg, target, ())
    assert plan.post_training is not None
    pre_bytes = sum(p.bytes_after for p in plan.layers)
    post_bytes = sum(p.bytes_after for p in plan.post_training.layers)
    assert pre_bytes < post_bytes
    ref = run(session(loaded.model), feeds)
    measured = output_error(ref, run(session(rewritten(loaded.model, list(plan.rewritten), target, loaded.opset)),
                                     feeds))
    assert measured > BUDGET * VERIFIED_SHARE        # the headroom plan misses the real budget untrained
    fell = within_budget(loaded, plan, plan.post_training, feeds, cfg, target)
    assert [p.precision for p in fell.layers] == [p.precision for p in plan.post_training.layers]
    assert any("the post-training allocation is written" in n for n in fell.notes)
    loose = replace(cfg, max_output_error=measured / VERIFIED_SHARE * 1.01)
    kept = within_budget(loaded, plan, plan.post_training, feeds, loose, target)
    assert [p.precision for p in kept.layers] == [p.precision for p in plan.layers]
    assert kept.output_error == pytest.approx(measured, rel=1e-6) and kept.post_training is None
    differ = [p for p, b in zip(plan.layers, plan.post_training.layers) if p.precision != b.precision]
    assert differ
    for p in kept.layers:
        if any(p.site.name == d.site.name for d in differ):
            assert "post-training: " in p.note


def test_headroom_below_one_is_a_config_error():
    with pytest.raises(ConfigError, match="distill_headroom"):
        OptimizeConfig(distill_headroom=0.5)


@pytest.fixture
def seen(monkeypatch):
    """What ``bfc.distill.distill`` was given and returned (model, layers, res) in the test's optimize run."""
    seen = {}
    real = bfc.distill.distill

    def spy(model, layers, data, **kw):
        res = real(model, layers, data, **kw)
        seen.update(model=model, layers=layers, res=res)
        return res
    monkeypatch.setattr(bfc.distill, "distill", spy)
    return seen


def test_allocated_forms_run_as_trained(block, seen):
    """The allocator's int8-compute layers, trained (headroom 1: the post-training allocation, trained), written
    and run by onnxruntime compute what the torch student computed (EMITTED_TOL)."""
    model, cal, data = block
    out, rep = bfc.optimize(model, _cfg(cal, distill=data, distill_steps=100, distill_lr=1e-4, distill_headroom=1))
    assert any(n.startswith("distill: whole-model output error") for n in rep.notes), rep.notes
    assert all(isinstance(q, Int8Linear) for _, q in seen["layers"])
    mods = trainable_layers(seen["res"].weights)
    student = OnnxModule(seen["model"], {sn.name: SiteLayer(m, sn) for (nodes, _), m in zip(seen["layers"], mods)
                                         for sn in nodes})
    test = dm.inputs(model, 32, seed=3)
    with torch.no_grad():
        torch_out = student(test)
    got = session(out).run(None, test)
    for o, g in zip(model.graph.output, got):
        assert relative_error(torch_out[o.name].numpy(), g) <= EMITTED_TOL


def _embedding_model(vocab=512, d=64, n=96, seed=0):
    rng = np.random.default_rng(seed)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((vocab, d)).astype(np.float32), "table"),
             onnx.numpy_helper.from_array((rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32), "w")]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "w"], ["y"], name="proj")]
    g = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=10)


def test_frozen_embedding_rows_enter_the_student_as_quantized(tmp_path, seen):
    """An embedding table the allocator stores as quantized rows is not trained, but the student reads the
    dequantized rows (``FrozenForm`` / ``GatherLayer``), not the float table: the torch student built from the
    result equals onnxruntime on the written model (EMITTED_TOL)."""
    model = _embedding_model()
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", ids=rng.integers(0, 512, (32, 8)))
    np.savez(tmp_path / "d.npz", ids=rng.integers(0, 512, (256, 8)))
    out, rep = bfc.optimize(model, _cfg(tmp_path / "cal.npz", max_output_error=0.3, distill=tmp_path / "d.npz",
                                        distill_steps=30, distill_lr=3e-4, distill_headroom=1))
    forms = [q for _, q in seen["layers"]]
    assert any(isinstance(q, QuantizedEmbedding) for q in forms), [type(q).__name__ for q in forms]
    trained = any(n.startswith("distill: whole-model output error") for n in rep.notes)   # else the plan is kept
    mods = trainable_layers(seen["res"].weights if trained else forms)
    student = OnnxModule(seen["model"], {sn.name: site_layer(m, sn) for (nodes, _), m in zip(seen["layers"], mods)
                                         for sn in nodes})
    test = {"ids": rng.integers(0, 512, (4, 8))}
    with torch.no_grad():
        got = student(test)["y"].numpy()
    assert relative_error(got, session(out).run(None, test)[0]) <= EMITTED_TOL
