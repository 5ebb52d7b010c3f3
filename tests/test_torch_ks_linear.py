"""bfc.torch.KSLinear: forward vs the dense chain product, fake quant + STE, conversions."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="bfc.torch needs PyTorch (pip install 'bfc[torch]')")
from torch import nn  # noqa: E402

from bfc.errors import ChainError, ConfigError, InvalidInputError  # noqa: E402
from bfc.ks import butterfly_chain, chainable_chain, monarch_chain  # noqa: E402
from bfc.torch import (  # noqa: E402
    FakeQuant,
    KSLinear,
    compose_chains,
    kaleidoscope_chain,
    quantize_values,
    transpose_chain,
    transpose_values,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


CHAINS = {
    "butterfly64": butterfly_chain(64),
    "monarch384": monarch_chain(384),
    "monarch384_r4": monarch_chain(384, rank=4),
    "rect_784x1024_r4": chainable_chain(784, 1024, rank=4),
    "rect_1536x384_3f": chainable_chain(1536, 384, rank=2, n_factors=3),
    "kaleidoscope32": kaleidoscope_chain(32),
}


def _dense(layer):
    return layer.chain.to_dense([v.detach().double().numpy() for v in layer.quantized_factors()])


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_forward_equals_dense_product(name):
    chain = CHAINS[name]
    m, n = chain.shape
    gen = torch.Generator().manual_seed(1)
    layer = KSLinear(m, n, chain, generator=gen)
    x = torch.randn(3, 5, m, generator=gen)
    y = layer(x).detach().double().numpy()
    ref = x.double().numpy() @ _dense(layer) + layer.bias.detach().double().numpy()
    assert y.shape == (3, 5, n)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.dense_weight().detach().double().numpy(), _dense(layer),
                               atol=1e-5, rtol=1e-5)
    assert layer.n_params == chain.nnz < m * n or len(chain) == 1


def test_parameters_are_factors_in_canonical_layout():
    chain = monarch_chain(384, rank=2)
    layer = KSLinear(384, 384, chain, bias=False)
    shapes = [tuple(p.shape) for p in layer.factors]
    assert shapes == [p.value_shape for p in chain.patterns]
    assert [tuple(p.shape) for p in layer.parameters()] == shapes


def test_init_matches_linear_output_scale():
    torch.manual_seed(0)
    x = torch.randn(4096, 512)
    ref = nn.Linear(512, 512, bias=False)(x).std().item()
    got = KSLinear(512, 512, monarch_chain(512), bias=False)(x).std().item()
    assert 0.7 * ref < got < 1.3 * ref


def test_kaleidoscope_is_b_times_b_transpose():
    b = butterfly_chain(16)
    k = kaleidoscope_chain(16)
    assert k == compose_chains(b, transpose_chain(b)) and len(k) == 8 and not k.is_chainable
    layer = KSLinear(16, 16, k, bias=False, dtype=torch.float64)
    # tie the second half to the transpose of the first: the product is B B^T (symmetric PSD)
    with torch.no_grad():
        for l in range(4):
            layer.factors[7 - l].copy_(transpose_values(layer.factors[l]))
    w = layer.dense_weight().detach().numpy()
    bd = b.to_dense([v.detach().numpy() for v in list(layer.factors)[:4]])
    np.testing.assert_allclose(w, bd @ bd.T, atol=1e-10)
    assert np.linalg.eigvalsh(w).min() > -1e-9


def test_bad_shapes_raise():
    with pytest.raises(ChainError, match="shape"):
        KSLinear(64, 32, butterfly_chain(64))
    layer = KSLinear(64, 64, butterfly_chain(64))
    with pytest.raises(InvalidInputError, match="64"):
        layer(torch.zeros(2, 63))
    with pytest.raises(ConfigError, match="fmt"):
        FakeQuant(fmt="int4")
    with pytest.raises(ConfigError, match="int8"):
        FakeQuant(fmt="int8", scaling="none")


# ---- fake quant -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt,levels_max,rel_bound", [("int8", 255, 1 / 254 + 1e-7),
                                                      ("fp8-e4m3", None, 2 ** -4 + 1e-7),
                                                      ("fp8-e5m2", None, 2 ** -3 + 1e-7)])
def test_quantize_values_grid(fmt, levels_max, rel_bound):
    gen = torch.Generator().manual_seed(2)
    v = torch.randn(2, 3, 16, 5, generator=gen)
    spec = FakeQuant(fmt)
    q = quantize_values(v, spec)
    amax = v.abs().amax(dim=-2, keepdim=True)
    # per-channel absmax: the largest entry of each (a, d, :, c) column is kept exactly
    np.testing.assert_allclose(q.abs().amax(dim=-2, keepdim=True), amax, rtol=1e-6)
    if fmt == "int8":
        scale = amax / 127
        codes = q / scale
        np.testing.assert_allclose(codes, torch.round(codes), atol=1e-4)
        assert (codes.abs() <= 127 + 1e-4).all()
        assert ((q - v).abs() <= scale / 2 + 1e-7).all()
    else:
        # relative rounding error of a normal fp8 number is at most half an ulp
        big = v.abs() > amax / 8
        assert ((q - v).abs()[big] <= rel_bound * v.abs()[big]).all()
        assert not torch.equal(q, v)


def test_fp8_saturates_without_scale():
    v = torch.tensor([[[[1e6, -1e6, 1.0]]]]).transpose(-1, -2)
    q = quantize_values(v, FakeQuant("fp8-e5m2", scaling="none"))
    assert torch.isfinite(q).all() and q.flatten().tolist() == [57344.0, -57344.0, 1.0]
    q = quantize_values(v, FakeQuant("fp8-e4m3", scaling="none"))
    assert q.flatten().tolist() == [448.0, -448.0, 1.0]


@pytest.mark.parametrize("fmt", ["int8", "fp8-e4m3", "fp8-e5m2"])
def test_fake_quant_forward_and_straight_through_gradient(fmt):
    chain = monarch_chain(64, rank=2)
    gen = torch.Generator().manual_seed(3)
    layer = KSLinear(64, 64, chain, quant=fmt, generator=gen)
    plain = KSLinear(64, 64, chain)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(8, 64, generator=gen)
    yq, y = layer(x), plain(x)
    # the forward uses the quantized factors: equals the dense product of q(factors)
    ref = x.double().numpy() @ _dense(layer) + layer.bias.detach().double().numpy()
    np.testing.assert_allclose(yq.detach().double().numpy(), ref, atol=1e-5, rtol=1e-5)
    err = (yq - y).norm() / y.norm()
    assert 0 < err < 0.1
    # STE: gradients flow to every factor, and equal those of the unquantized graph
    # evaluated at the quantized values
    yq.square().sum().backward()
    grads = [p.grad for p in layer.factors]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    probe = KSLinear(64, 64, chain)
    with torch.no_grad():
        for p, v in zip(probe.factors, layer.quantized_factors()):
            p.copy_(v)
        probe.bias.copy_(layer.bias)
    probe(x).square().sum().backward()
    for g, gp in zip(grads, (p.grad for p in probe.factors)):
        torch.testing.assert_close(g, gp, rtol=1e-4, atol=1e-5)


def test_fake_quant_training_step_reduces_loss():
    torch.manual_seed(4)
    chain = butterfly_chain(32)
    layer = KSLinear(32, 32, chain, quant="int8")
    target = KSLinear(32, 32, chain).dense_weight().detach()   # reachable: exactly butterfly
    x = torch.randn(256, 32)
    y = x @ target
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = (layer(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


# ---- conversions -----------------------------------------------------------------------
def test_to_factorization_roundtrip_with_perms_and_residual():
    chain = chainable_chain(48, 96, rank=2)
    rng = np.random.default_rng(5)
    layer = KSLinear(48, 96, chain, row_perm=rng.permutation(48), col_perm=rng.permutation(96),
                     residual_rank=3, dtype=torch.float64)
    with torch.no_grad():
        layer.lr_v.normal_()
    fac = layer.to_factorization()
    x = rng.standard_normal((4, 48))
    y = layer(torch.as_tensor(x)).detach().numpy() - layer.bias.detach().numpy()
    np.testing.assert_allclose(fac.apply(x), y, atol=1e-10)
    np.testing.assert_allclose(x @ fac.to_dense(), y, atol=1e-10)
    back = KSLinear.from_factorization(fac, layer.bias, dtype=torch.float64)
    np.testing.assert_allclose(back(torch.as_tensor(x)).detach().numpy(),
                               layer(torch.as_tensor(x)).detach().numpy(), atol=1e-12)


def test_to_factorization_quantized_values():
    layer = KSLinear(64, 64, monarch_chain(64), quant="fp8-e4m3")
    fac = layer.to_factorization()
    assert fac.info["quant"] == "fp8-e4m3"
    np.testing.assert_allclose(fac.to_dense(), layer.dense_weight().detach().double().numpy(),
                               atol=1e-6)
    raw = layer.to_factorization(quantized=False)
    assert not np.allclose(raw.to_dense(), fac.to_dense())


@pytest.mark.parametrize("chain", [monarch_chain(384, rank=4), chainable_chain(384, 1536, rank=2),
                                   butterfly_chain(64), chainable_chain(96, 48, rank=3, n_factors=3)],
                         ids=str)
def test_from_linear_recovers_ks_structured_linear_exactly(chain):
    pytest.importorskip("bfc.factorize", reason="bfc.factorize not available yet")
    m, n = chain.shape
    truth = KSLinear(m, n, chain, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    linear = nn.Linear(m, n, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(truth.dense_weight().T)   # nn.Linear stores (out, in)
    layer = KSLinear.from_linear(linear, chain)
    assert layer.init_rel_error < 1e-10
    x = torch.randn(7, m, dtype=torch.float64)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-9, atol=1e-9)
    # factors are unique only up to diagonal scalings: compare products, not factors
    torch.testing.assert_close(layer.dense_weight(), linear.weight.T, rtol=1e-9, atol=1e-9)


def test_from_linear_dense_weight_is_an_approximation():
    pytest.importorskip("bfc.factorize", reason="bfc.factorize not available yet")
    torch.manual_seed(7)
    linear = nn.Linear(256, 256)
    layer = KSLinear.from_linear(linear, monarch_chain(256, rank=4), quant="int8")
    err = ((layer.dense_weight() - linear.weight.T).norm() / linear.weight.norm()).item()
    assert 0.3 < err < 1.0            # a random matrix is far from KS, but the fit helps
    assert abs(err - layer.init_rel_error) < 0.05
    assert layer.quant.fmt.value == "int8"
