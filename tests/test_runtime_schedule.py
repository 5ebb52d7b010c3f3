"""KSMatMul execution schedule: shapes that exercise every path of run_chain.

* several batch panels (4096-wide chains: a panel holds two 16-row tiles), a partial
  last tile and partial 8-column halves;
* small-block runs (b, c <= 4) executed tile by tile, the depth-first tail with
  group sizes that change along the chain (private ping-pong buffers), int8 factors at
  the start of, before, and (rejected from) inside the tail;
* big-block factors streamed in weight chunks between small-block runs;
* in_perm / out_perm folded into the transposing gather / scatter, column tails.
Every case is compared with the numpy reference, for both ISAs and 1 or 2 threads.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest

from bfc import ops, runtime
from bfc.factorize import relative_error
from bfc.ks.chain import Chain, butterfly_chain, chainable_chain, monarch_chain

pytestmark = pytest.mark.skipif(not runtime.is_available(), reason="bfc custom-op library not built")



ISAS = runtime.supported_isas() if runtime.is_available() else ["portable"]
FLOAT_REL_TOL = 2e-5
BF16_EMULATED_REL_TOL = 3e-4   # fp8 on avx512bf16 vs the reference rounding the same activations to bf16
INT8_EMULATED_SQNR_DB = 50


def _run(chain, fmts, batch, isa, threads, seed, perms=True):
    rng = np.random.default_rng(seed)
    vals = chain.random_values(rng)
    qs = [ops.quantize_factor(v, f, "column") for v, f in zip(vals, fmts)]
    M, N = chain.shape
    in_perm = rng.permutation(M) if perms else None
    out_perm = rng.permutation(N) if perms else None
    bias = rng.standard_normal(N).astype(np.float32)
    model = ops.make_ks_matmul_model(chain, [q for q, _ in qs], [s for _, s in qs], in_perm=in_perm,
                                     out_perm=out_perm, bias=bias, onnx_opset=21)
    os.environ["BFC_KS_ISA"] = isa
    try:
        sess = runtime.session(model, threads=threads)
    finally:
        os.environ.pop("BFC_KS_ISA", None)
    x = rng.standard_normal((batch, M)).astype(np.float32)
    y = sess.run(None, {"X": x})[0]
    factors = [t for q, s in qs for t in (q, s)]
    bf16 = isa == "avx512bf16" and any(f.startswith("fp8") for f in fmts)
    ref = ops.ks_matmul_reference(x, bias, factors, chain, in_perm, out_perm, fp8_bf16=bf16)
    if "int8" in fmts:
        noise = float(np.sum((y.astype(np.float64) - ref) ** 2))
        sqnr = np.inf if noise == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise)
        assert sqnr > INT8_EMULATED_SQNR_DB, (chain, fmts, batch, sqnr)
    else:
        err = relative_error(ref, y)
        assert err < (BF16_EMULATED_REL_TOL if bf16 else FLOAT_REL_TOL), (chain, fmts, batch, err)


CASES = {
    "butterfly4096": butterfly_chain(4096),
    "monarch4096": monarch_chain(4096),
    "chainable384x1536": chainable_chain(384, 1536),        # tail group sizes grow (c > b)
    "chainable1536x384": chainable_chain(1536, 384),        # and shrink
    "big_small_big": Chain([(1, 16, 16, 8), (16, 2, 2, 4), (32, 2, 2, 2), (64, 2, 2, 1), (8, 16, 16, 1)]),
    "small_then_big": Chain([(1, 2, 2, 64), (2, 2, 2, 32), (4, 32, 8, 1)]),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["fp32", "int8", "fp8-e4m3", "mixed"])
@pytest.mark.parametrize("name", list(CASES))
def test_schedule_paths(name, fmt, isa):
    chain = CASES[name]
    L = len(chain)
    if fmt == "mixed":  # int8 every third factor: int8 before, at the start of and inside a tail
        fmts = ["int8" if i % 3 == 1 else ("fp8-e4m3" if i % 3 == 2 else "fp32") for i in range(L)]
    else:
        fmts = [fmt] * L
    seed = zlib.crc32(f"{name}/{fmt}/{isa}".encode())
    for batch, threads in ((1, 1), (37, 2), (70, 1)):
        _run(chain, fmts, batch, isa, threads, seed + batch, perms=batch != 70)
