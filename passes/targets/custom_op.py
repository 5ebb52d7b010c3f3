"""Custom-op target: each planned layer becomes ONE ``ai.bfc.KSMatMul`` node (bfc's onnxruntime library).

Algebra:  x @ W_hat + bias = KSMatMul(x; values_l, scale_l; in_perm = row_perm,
out_perm = inverse(col_perm), bias); the op's semantics and its numpy reference are in
:mod:`bfc.ops`.  The kernels compute in float32 (the rewrite casts fp16 models around
the node).  Numerics: for int8 factors the kernel quantizes each factor's input
activation per row (symmetric, 127/amax) and accumulates exactly in int32, so the
planner scores int8 layers with ``bfc.ops.ks_matmul_reference`` (bit-faithful
emulation), not with the float product; fp8/fp16/fp32 factors are decoded exactly and
multiplied in float32 (the float product), except fp8 factors on CPUs with AVX512_BF16: their
input activations are rounded to bf16 (``bfc.ops``); ``simulate`` scores fp8 layers with that
rounding on every machine (the float32 path elsewhere is the more accurate one).

Rotated low-bit layers (``bfc.lowbit.RotatedLayer``, 2/3/4 bits) compute
``quant_rows(x Q) deq(W_r) + bias`` (the rotation chain, per-row int8 activations, the packed
codes unpacked in registers, exact int32 group sums, float32 group scales; spec in
:mod:`bfc.ops`).  The rotation and the activation quantization happen once per input tensor and
rotation, shared by the layers that read it (Q, K and V read the same LayerNorm output):

    q, s = RotateQuantize(x; Q)                       once per (x, Q): int8 [..., K], float32 [..., 1]
    y_j  = LowBitMatMul(q, bias_j, codes_j, scales_j, s; prequantized = 1)     one node per layer

A tensor read by one layer keeps the one-node form (the rotation inside the LowBitMatMul: one
node less, no int8 round trip through memory; measured 3-6% faster than its own RotateQuantize at
128 and 4096 rows of a 1536 x 384 layer, where three 384 x 384 readers of one tensor ran 1.3-1.4x
faster sharing one).

which equals the one-node form ``LowBitMatMul(x, bias_j, codes_j, scales_j, Q)`` bit for bit (the
same kernels compute both halves), so the planner scores the layer with
``bfc.ops.lowbit_matmul_reference`` (+ the correction in float64): the activation quantization is
part of the score.  The bias is the node's ``bias`` input (float32 (N,) biases; others stay an
Add); X keeps its rank (both ops take ``[..., K]``), except with an int8 correction, which runs
on the 2-D rows as the portable target (``bfc.passes.lowbit_emit.finish``).  Q is stored as the
rotation's own numbers (``rot_angles``: the fp16 m x m blocks of factor 0 and one fp16 angle per
2 x 2 block, i.e. ``rotation.nbytes``); the kernel rebuilds the chain's values at session
creation.  Unrotated layers take x directly (one LowBitMatMul node).
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.errors import ConfigError
from bfc.factorize import inverse_perm
from bfc.lowbit import RotatedLayer
from bfc.ops import (
    DOMAIN,
    LOWBIT_BITS,
    LOWBIT_OP_TYPE,
    OP_TYPE,
    ROTATE_QUANTIZE_OP_TYPE,
    VALUE_TYPES,
    ks_matmul_reference,
    lowbit_codes_stream,
    lowbit_matmul_reference,
    patterns_attribute,
)
from bfc.passes.lowbit_emit import correction_tensors, finish, rotate
from bfc.passes.targets import FormEmitter, Target, emits, register
from bfc.quant import QuantizedFactorization


def _perms(q):
    in_perm = None if q.row_perm is None else np.asarray(q.row_perm, np.int64)
    out_perm = None if q.col_perm is None else inverse_perm(np.asarray(q.col_perm, np.int64))
    return in_perm, out_perm


def _lowbit_parts(layer):
    """(codes stream, scales, attributes, rotation factors [values, scale, ...], rotation chain or None)."""
    gq = layer.weight
    if not gq.symmetric:
        raise ConfigError("the custom-op target's LowBitMatMul takes symmetric group formats only")
    k, n = gq.shape
    attrs = {"K": int(k), "N": int(n), "bits": int(gq.bits), "group_size": int(gq.group_size)}
    rot, chain = [], None
    r = layer.rotation
    if r is not None and r.params is not None:
        # the stored numbers (rotation.nbytes): factor 0's block and one angle per 2 x 2 block, in the
        # rotation's storage type (stored_as rounded them to it, so the cast is exact)
        st = np.dtype(r.storage)
        rot = [np.asarray(r.values[0]).astype(st)] + [np.asarray(a).astype(st) for a in r.params.angles]
        attrs["rot_angles"] = 1
    elif r is not None:
        chain = r.chain
        one = np.ones((1, 1, 1, 1), np.float32)
        rot = [t for v in r.values for t in (np.asarray(v).astype(np.dtype(r.storage)), one)]
        attrs["rot_patterns"] = patterns_attribute(chain)
    return lowbit_codes_stream(gq.codes(), gq.group_size, gq.bits), gq.scales, attrs, rot, chain


@register
class CustomOp(Target):
    name = "custom-op"
    summary = "one ai.bfc.KSMatMul node per layer (bfc's onnxruntime library)"
    lowbit_kronecker = False              # LowBitMatMul / RotateQuantize apply butterfly rotations

    def compute_dtype(self, model_dtype):
        return np.dtype(np.float32)

    def check(self, fmt, opset):
        if fmt.name not in VALUE_TYPES:
            return "the KSMatMul kernels take int8/fp8/fp16/fp32 values"
        if fmt.bits == 8 and fmt.is_float and opset < 19:
            return f"{fmt.name} initializers need ONNX opset >= 19 (IR 9 float8 types)"
        return None

    def lowbit_support(self, bits, opset):
        if bits in LOWBIT_BITS:
            return None
        return (f"the custom-op target's LowBitMatMul takes {'/'.join(map(str, LOWBIT_BITS))}-bit weights, "
                f"not {bits}; use --target ort or portable")

    def rotate(self, b, x, rank, rotation):
        """x Q in standard ops, for forms whose node does not fuse the rotation (``Int8Linear``)."""
        return rotate(b, x, rank, rotation)


@emits(CustomOp.name, QuantizedFactorization)
class KSMatMulNode(FormEmitter):
    """One ``ai.bfc.KSMatMul`` node; int8 factors quantize activations per row (``simulate``)."""

    def simulate(self, q):
        fmt = q.fmt
        if fmt not in ("int8", "fp8-e4m3", "fp8-e5m2"):
            return None
        bf16 = fmt != "int8"        # the AVX512_BF16 path (the less accurate one; float32 elsewhere)
        factors = [t for f in q.factors for t in (f.values, f.scale)]
        in_perm, out_perm = _perms(q)
        pats = patterns_attribute(q.chain)

        def run(x):
            return ks_matmul_reference(np.asarray(x, np.float32), None, factors, pats, in_perm, out_perm,
                                       fp8_bf16=bf16)
        return run

    def tensors(self, b, q):
        factors = []
        for l, f in enumerate(q.factors):
            factors += [b.const(f"values{l}", f.values),
                        b.const(f"scale{l}", np.asarray(f.scale, np.float32).reshape(
                            f.scale.shape if np.ndim(f.scale) == 4 else (1, 1, 1, 1)))]
        attrs = {"patterns": patterns_attribute(q.chain)}
        in_perm, out_perm = _perms(q)
        if in_perm is not None:
            attrs["in_perm"] = [int(v) for v in in_perm]
        if out_perm is not None:
            attrs["out_perm"] = [int(v) for v in out_perm]
        return factors, attrs

    def emit(self, b, x, rank, tensors, q, bias, rotated):
        factors, attrs = tensors
        return b.op(OP_TYPE, [x, bias if bias is not None else gs.Variable.empty(), *factors], dict(attrs),
                    domain=DOMAIN)


@emits(CustomOp.name, RotatedLayer)
class LowBitMatMulNode(FormEmitter):
    """One ``ai.bfc.LowBitMatMul`` node (rotation fused), then the correction and the bias."""

    def simulate(self, layer):
        codes, scales, attrs, rot, chain = _lowbit_parts(layer)

        def run(x):
            y = lowbit_matmul_reference(np.asarray(x, np.float32), None, codes, scales, K=attrs["K"], N=attrs["N"],
                                        bits=attrs["bits"], group_size=attrs["group_size"], rot_factors=rot,
                                        rot_patterns=chain, rot_angles="rot_angles" in attrs).astype(np.float64)
            return y if layer.correction is None else y + layer.correction.apply(np.asarray(x, np.float64))
        return run

    def tensors(self, b, layer):
        codes, scales, attrs, rot, _ = _lowbit_parts(layer)
        inputs = [b.const("codes", codes), b.const("scales", np.ascontiguousarray(scales))]
        if layer.rotation is not None:
            # one set of rotation constants per graph and Q (shared by the layers reading the same x)
            # (the rewrite makes one builder per layer: the cache lives on the graph)
            cache = b.graph.__dict__.setdefault("_bfc_lowbit_rotations", {})
            key = id(layer.rotation)
            if key not in cache:
                cache[key] = [b.const(f"rot{l}", t) for l, t in enumerate(rot)]
            inputs += cache[key]
        return (inputs, attrs), correction_tensors(b, layer.correction)

    @staticmethod
    def _prequantized(node, q, s):
        """Turn a one-node LowBitMatMul (X, bias, codes, scales, rotation...) into the prequantized form."""
        ins = [q, node.inputs[1], node.inputs[2], node.inputs[3], s]
        node.inputs.clear()
        node.inputs.extend(ins)
        for a in ("rot_angles", "rot_patterns"):
            node.attrs.pop(a, None)
        node.attrs["prequantized"] = 1

    def _lowbit_node(self, b, x, b_in, layer, inputs, attrs):
        """The layer's LowBitMatMul.  The first layer reading (x, Q) gets the one-node form (rotation inside);
        a second one adds RotateQuantize(x; Q) and switches both to its (q, s), as every later reader
        (one rotation and activation quantization per tensor; a tensor read once keeps one node)."""
        shared = b.graph.__dict__.setdefault("_bfc_rotate_quantize", {})
        first = b.graph.__dict__.setdefault("_bfc_lowbit_first_reader", {})
        key = (x.name, id(layer.rotation))
        if key not in shared and key not in first:
            y = b.op(LOWBIT_OP_TYPE, [x, b_in, *inputs], dict(attrs), domain=DOMAIN)
            first[key] = y.inputs[0]
            return y
        if key not in shared:
            rot_attrs = {k: v for k, v in attrs.items() if k in ("rot_angles", "rot_patterns")}
            shared[key] = b.op_outputs(ROTATE_QUANTIZE_OP_TYPE, [x, *inputs[2:]], [np.int8, np.float32],
                                       {"K": attrs["K"], **rot_attrs}, domain=DOMAIN)
            self._prequantized(first.pop(key), *shared[key])
        q, s = shared[key]
        plain = {a: v for a, v in attrs.items() if a not in ("rot_angles", "rot_patterns")}
        return b.op(LOWBIT_OP_TYPE, [q, b_in, *inputs[:2], s], {**plain, "prequantized": 1}, domain=DOMAIN)

    def emit(self, b, x, rank, tensors, layer, bias, rotated):
        (inputs, attrs), corr = tensors
        k, n = attrs["K"], attrs["N"]
        # the bias as the node's input when it is the float32 (N,) vector the kernel takes
        fuse_bias = (bias is not None and getattr(bias, "dtype", None) is not None
                     and np.dtype(bias.dtype) == np.float32 and getattr(bias, "shape", None) is not None
                     and tuple(bias.shape) == (n,))
        b_in = bias if fuse_bias else gs.Variable.empty()
        xin = x if corr is None or rank == 2 else b.reshape(x, [-1, k])
        if layer.rotation is None:
            y = b.op(LOWBIT_OP_TYPE, [xin, b_in, *inputs], dict(attrs), domain=DOMAIN)
        else:
            y = self._lowbit_node(b, xin, b_in, layer, inputs, attrs)
        rest = None if fuse_bias else bias
        if corr is None:
            return y if rest is None else b.op("Add", [y, rest])
        return finish(b, x, rank, layer, y, corr, rest)
