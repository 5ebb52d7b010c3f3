"""bfc.torch.export_onnx: KS layers exported as dense MatMuls that run in ORT and that bfc takes over."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="bfc.torch needs PyTorch (pip install 'bfc[torch]')")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")
ort = pytest.importorskip("onnxruntime")
from torch import nn  # noqa: E402

from bfc.factorize import relative_error  # noqa: E402
from bfc.ks import chainable_chain, monarch_chain  # noqa: E402
from bfc.torch import KSLinear, export_onnx, ks_layers_metadata, quantize_values  # noqa: E402


def _model():
    gen = torch.Generator().manual_seed(0)
    return nn.Sequential(
        KSLinear(96, 256, chainable_chain(96, 256, rank=2), quant="int8", generator=gen,
                 row_perm=np.random.default_rng(0).permutation(96)),
        nn.GELU(),
        KSLinear(256, 256, monarch_chain(256, rank=2), quant="fp8-e4m3", residual_rank=2, generator=gen),
        nn.Tanh(),
        nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _model()
    path = export_onnx(model, tmp_path_factory.mktemp("export") / "m.onnx", torch.randn(1, 96),
                       input_names=["x"], output_names=["y"])
    return model, path


@pytest.mark.parametrize("batch", [1, 5])
def test_export_matches_torch(exported, batch):
    model, path = exported
    x = torch.randn(batch, 96, generator=torch.Generator().manual_seed(batch))
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-4)


def test_export_is_dense_matmuls_with_chain_metadata(exported):
    import onnx
    from onnx import numpy_helper
    model, path = exported
    proto = onnx.load(str(path))
    assert proto.ir_version <= 10
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    meta = ks_layers_metadata(path)
    assert [(r["module"], r["quant"], r["shape"]) for r in meta] == [
        ("0", "int8", [96, 256]), ("2", "fp8-e4m3", [256, 256])]
    for rec, layer in zip(meta, (model[0], model[2])):
        w = inits[rec["weight"]]
        assert w.shape == tuple(rec["shape"])
        np.testing.assert_allclose(w, layer.dense_weight().detach().numpy(), atol=1e-7)
        assert [tuple(p) for p in rec["chain"]] == [(p.a, p.b, p.c, p.d) for p in layer.chain]


def test_int8_fake_quant_matches_bfc_quant_absmax():
    quant = pytest.importorskip("bfc.quant.scales", reason="bfc.quant not available")
    from bfc.torch import FakeQuant
    v = torch.randn(2, 3, 8, 5, generator=torch.Generator().manual_seed(1))
    s = quant.absmax_scale(v.numpy(), quant.Granularity.CHANNEL)
    ref = np.clip(np.round(v.numpy() / s), -127, 127) * s
    np.testing.assert_allclose(quantize_values(v, FakeQuant("int8")).numpy(), ref, rtol=1e-6, atol=1e-7)


def test_bfc_optimize_takes_over_exported_ks_layer(tmp_path):
    api = pytest.importorskip("bfc.api", reason="bfc optimize not available")
    from bfc.config import OptimizeConfig
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(KSLinear(256, 256, monarch_chain(256, rank=4), generator=gen), nn.ReLU(),
                          nn.Linear(256, 4)).eval()
    path = export_onnx(model, tmp_path / "ks.onnx", torch.randn(2, 256), input_names=["x"])
    out, report = api.optimize(str(path), OptimizeConfig(precision="fp32", max_error=1e-3))
    rows = [r if isinstance(r, dict) else vars(r) for r in report.layers]
    assert sum(r["structure"] != "dense" for r in rows) >= 1, rows
    x = torch.randn(16, 256, generator=gen)
    sess = ort.InferenceSession(out.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model(x).numpy()
    assert relative_error(ref, y) < 1e-3
