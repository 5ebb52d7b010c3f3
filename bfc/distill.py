"""End-to-end distillation of planned KS and rotated low-bit layers against the original model (needs torch).

The student is the ORIGINAL graph run by the torch interpreter (``bfc.torch.onnx_module``)
with each planned MatMul/Gemm node replaced by a ``SiteLayer``: the layer's
``QuantizedFactorization`` (below) or ``RotatedLayer`` (``bfc.torch.rotated``: learned group scales,
straight-through rounding, optionally the Kronecker rotation) as trainable tensors with target-exact
fake quantization.
The teacher is onnxruntime on the original model (outputs, plus the named intermediate
tensors to match), computed once per batch and cached.

Parametrization of one factor l (canonical (a, d, b, c) layout), scale s_l = s0_l * exp(t_l)
(t_l = 0 at the start, so the initial forward is the planned layer bit for bit):
  * int8:   q = s * clamp(round(v / s), -127, 127)              (LSQ straight-through:
            d/dv = 1 inside the range, d/ds = round(v/s) - v/s)
  * fp8:    q = s * fp8(clamp(v / s, -max, max))                 (torch's round-to-nearest-even cast)
  * fp16:   q = fp16(v) (unit scale); fp32: q = v
with v a float32 latent initialized to values * s0.  Trained weights are written back
as values = round(clamp(v / s)) on the same grid and scales s (re-fitted by training),
so every target emits exactly what was trained.
Numerics of the forward, per target (``emulate_rows``):
  * float product (portable; custom-op with float factors): x[..., row_perm] @ K_1 ... K_L,
    scattered by col_perm, in float32 (a two-factor Monarch chain as x @ (K_1 K_2), the product formed
    by ``bfc.torch.linear.monarch_product``: the same values up to float32 summation order);
  * custom-op int8: each factor's input h is quantized per row as ``bfc.ops.quantize_rows``
    (amax per row, r = h * (127/amax), q = rint(clip(r, -127, 127))), acc = q @ values
    (exact integers in float32 for b * 127^2 < 2^24), y = (acc * amax/127) * scale —
    the same float32 operations in the same order as ``bfc.ops.ks_matmul_reference``;
    straight-through gradient for the rounding.
Low-rank residuals (x U) V^T are float32 parameters.
Loss: sum over float graph outputs of the relative MSE ||s - t||^2 / ||t||^2 (plus
``cosine`` x (1 - cos) for rank-2 outputs such as sentence embeddings), plus the mean
relative MSE of the ``match`` tensors.  Adam with a cosine-decayed step size, seeded.
Block-wise reconstruction (``blockwise_steps`` > 0, before the end-to-end steps): the student runs
with every ``match`` tensor forced to the teacher's value (``OnnxModule.forward(force=...)``), so
the planned layers between two consecutive matched tensors (e.g. a transformer sublayer between two
LayerNormalization outputs; the last span ends at the graph outputs) see the teacher's input; the
loss is the mean relative MSE of the matched tensors and float outputs as the student computes them:
each span is fitted to the teacher's output given the teacher's input, independently of the error
of the spans before it.  Its own cosine schedule from
``lr``; the end-to-end phase then starts again from ``lr``.
The teacher's tensors for the next batch are computed by onnxruntime in a second thread while the
student trains on the current one (onnxruntime releases the GIL), with torch's thread count.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from bfc.errors import BfcError, UnsupportedError
from bfc.factorize import inverse_perm
from bfc.lowbit.int8_layer import HalfLinear, Int8Linear
from bfc.lowbit.layer import RotatedLayer
from bfc.quant import QuantizedFactorization
from bfc.quant.api import QuantizedFactor
from bfc.quant.embedding import QuantizedEmbedding
from bfc.quant.formats import get_format
from bfc.runtime import session
from bfc.torch.linear import _ks_apply, monarch_product, monarch_rank
from bfc.torch.onnx_module import OnnxModule
from bfc.torch.rotated import TrainableInt8, TrainableRotated, TrainableRotation

FORMATS = ("int8", "fp8-e4m3", "fp8-e5m2", "fp16", "fp32")
INTERPRETER_TOLERANCE = 1e-5      # relative; the dense interpreter must match onnxruntime to this
_FP8 = {"fp8-e4m3": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}


class QuantizedKS(nn.Module):
    """A ``QuantizedFactorization`` as trainable tensors (see the module doc); ``forward(x2)``
    maps rows (n, M) to (n, N); ``export()`` gives the trained ``QuantizedFactorization``."""

    def __init__(self, q: QuantizedFactorization, emulate_rows: bool = False):
        super().__init__()
        if q.fmt not in FORMATS:
            raise UnsupportedError(f"distillation trains factors stored as {'|'.join(FORMATS)}, not {q.fmt}")
        self.q0, self.fmt = q, q.fmt
        self.emulate_rows = bool(emulate_rows) and q.fmt == "int8"
        self.qmax = float(get_format(q.fmt).max)
        self.scaled = q.fmt in ("int8", "fp8-e4m3", "fp8-e5m2")
        self.latent = nn.ParameterList()
        self.log_scale = nn.ParameterList()
        for l, f in enumerate(q.factors):
            s0 = torch.from_numpy(np.asarray(f.scale, np.float32).copy())
            self.register_buffer(f"s0_{l}", s0)
            v = np.asarray(f.values).astype(np.float32) * np.asarray(f.scale, np.float32)
            self.latent.append(nn.Parameter(torch.from_numpy(np.ascontiguousarray(v, np.float32))))
            self.log_scale.append(nn.Parameter(torch.zeros_like(s0), requires_grad=self.scaled))
        pats = q.chain.patterns       # float product of a Monarch chain: one dense GEMM (monarch_product)
        self.monarch = not self.emulate_rows and len(pats) == 2 and monarch_rank(*pats) is not None
        rp = None if q.row_perm is None else torch.from_numpy(np.asarray(q.row_perm, np.int64))
        cp = None if q.col_perm is None else torch.from_numpy(inverse_perm(np.asarray(q.col_perm, np.int64)))
        self.register_buffer("row_perm", rp)
        self.register_buffer("out_perm", cp)
        if q.low_rank is not None:
            self.lr_u = nn.Parameter(torch.from_numpy(np.asarray(q.low_rank[0], np.float32).copy()))
            self.lr_v = nn.Parameter(torch.from_numpy(np.asarray(q.low_rank[1], np.float32).copy()))
        else:
            self.lr_u = self.lr_v = None

    def scale(self, l: int) -> torch.Tensor:
        s0 = getattr(self, f"s0_{l}")
        return s0 * torch.exp(self.log_scale[l]) if self.scaled else s0

    def _grid(self, l: int):
        """(r, q): the latent in units of the scale (clamped) and its grid point, both float32."""
        s = self.scale(l)
        r = torch.clamp(self.latent[l] / s, -self.qmax, self.qmax)
        with torch.no_grad():
            q = torch.round(r) if self.fmt == "int8" else r.to(_FP8[self.fmt]).to(torch.float32)
        return r, q

    def factor(self, l: int) -> torch.Tensor:
        """The dequantized factor values the forward multiplies by (straight-through)."""
        v = self.latent[l]
        if self.fmt == "fp32":
            return v
        if self.fmt == "fp16":
            return v + (v.detach().half().float() - v.detach())
        r, q = self._grid(l)
        return self.scale(l) * (r + (q - r).detach())

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        h = x2 if self.row_perm is None else x2.index_select(-1, self.row_perm)
        pats = self.q0.chain.patterns
        if self.monarch:
            h = h @ monarch_product(pats[0], self.factor(0), pats[1], self.factor(1))
        else:
            for l, p in enumerate(pats):
                h = self._int8_rows(l, p, h) if self.emulate_rows else _ks_apply(p, self.factor(l), h)
        if self.out_perm is not None:
            h = h.index_select(-1, self.out_perm)
        if self.lr_u is not None:
            h = h + (x2 @ self.lr_u) @ self.lr_v.T
        return h

    def _int8_rows(self, l, p, h):
        """custom-op int8 factor: per-row int8 activations, exact integer products (module doc)."""
        with torch.no_grad():
            amax = h.abs().amax(dim=-1, keepdim=True) if h.shape[-1] else torch.zeros(h.shape[0], 1)
            inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
            cs = amax / torch.tensor(127.0)
        r = torch.clamp(h * inv, -127.0, 127.0)
        hq = r + (torch.round(r.detach()) - r).detach()
        rv, qv = self._grid(l)
        v = rv + (qv - rv).detach()
        acc = _ks_apply(p, v, hq)
        s = self.scale(l)
        s_acd = s.expand(p.a, p.d, 1, p.c)[:, :, 0, :].permute(0, 2, 1).reshape(-1)
        return (acc * cs) * s_acd

    @torch.no_grad()
    def export(self) -> QuantizedFactorization:
        """The trained layer on the format's grid: values = grid points, scales = trained scales."""
        fmt = get_format(self.fmt)
        factors = []
        for l, f in enumerate(self.q0.factors):
            if self.scaled:
                _, q = self._grid(l)
                s = self.scale(l).numpy().astype(np.float32)
                vals = q.numpy().astype(np.float64).astype(fmt.dtype)
            else:
                s = np.asarray(f.scale, np.float32)
                v = self.latent[l].detach().numpy()
                vals = v.astype(np.float16) if self.fmt == "fp16" else v.astype(np.float32)
            factors.append(QuantizedFactor(vals, s))
        low = None if self.lr_u is None else (self.lr_u.detach().numpy().copy(), self.lr_v.detach().numpy().copy())
        return replace(self.q0, factors=tuple(factors), low_rank=low, method=f"{self.q0.method}+distill",
                       rel_error=float("nan"))


class FrozenForm(nn.Module):
    """A planned layer distillation does not train (``HalfLinear``: fp16 weights; ``QuantizedEmbedding``: quantized
    rows): the weight the target computes with (W16 as float32, the dequantized table), frozen, so the student
    carries the target's error and the trained layers can compensate for it; ``export()`` gives the form back."""

    def __init__(self, form):
        super().__init__()
        self.form = form
        w = form.dequantized(np.float32) if isinstance(form, QuantizedEmbedding) else form.to_dense()
        self.register_buffer("w", torch.from_numpy(np.ascontiguousarray(w, np.float32)))

    def forward(self, x2: torch.Tensor) -> torch.Tensor:
        return x2 @ self.w

    def export(self):
        return self.form


FROZEN_FORMS = (HalfLinear, QuantizedEmbedding)


def trainable_layers(weights: list, emulate_rows: bool = False, train_rotation: bool = False,
                     floats: list | None = None) -> list[nn.Module]:
    """One trainable module per planned layer: ``QuantizedKS`` for a ``QuantizedFactorization``,
    ``TrainableRotated`` for a ``RotatedLayer``, ``TrainableInt8`` for an ``Int8Linear`` (the allocator's int8
    per-column and rotated "int8 compute" forms), ``FrozenForm`` for ``FROZEN_FORMS`` (``bfc.torch.rotated``;
    layers sharing a rotation object
    share one ``TrainableRotation``, trained with ``train_rotation``; ``floats``: the layers' float weights
    (K, N) or None, where rotated latent codes start, ``bfc.torch.rotated.latent_codes``)."""
    rots: dict[int, TrainableRotation] = {}
    out = []
    floats = [None] * len(weights) if floats is None else floats
    for q, w in zip(weights, floats):
        if isinstance(q, (RotatedLayer, Int8Linear)):
            r = q.rotation
            if r is not None and id(r) not in rots:
                rots[id(r)] = TrainableRotation(r, train=train_rotation)
            rot = None if r is None else rots[id(r)]
            out.append(TrainableRotated(q, rot, emulate_rows, w) if isinstance(q, RotatedLayer)
                       else TrainableInt8(q, rot, w))
        elif isinstance(q, FROZEN_FORMS):
            out.append(FrozenForm(q))
        else:
            out.append(QuantizedKS(q, emulate_rows))
    return out


def export_layers(mods: list[nn.Module]) -> list:
    """The trained forms of ``trainable_layers``' modules; a shared rotation is exported once (one object)."""
    rots: dict[int, object] = {}
    out = []
    for m in mods:
        if isinstance(m, (TrainableRotated, TrainableInt8)):
            r = None
            if m.rot is not None:
                if id(m.rot) not in rots:
                    rots[id(m.rot)] = m.rot.export()
                r = rots[id(m.rot)]
            out.append(m.export(r))
        else:
            out.append(m.export())
    return out


class GatherLayer(nn.Module):
    """A planned Gather node (an embedding table, axis 0): rows of the layer's frozen table (``FrozenForm``)."""

    def __init__(self, frozen: FrozenForm):
        super().__init__()
        self.frozen = frozen

    def forward(self, args):
        table, idx = self.frozen.w, args[1].long()
        idx = torch.where(idx < 0, idx + table.shape[0], idx)
        return nn.functional.embedding(idx, table)


def site_layer(mod: nn.Module, node) -> nn.Module:
    """The interpreter override of one site node: ``GatherLayer`` for an embedding, else ``SiteLayer``."""
    return GatherLayer(mod) if node.op == "Gather" else SiteLayer(mod, node)


class SiteLayer(nn.Module):
    """One planned site node (MatMul ``x @ W`` / ``W @ x`` or Gemm) computed with a shared
    ``QuantizedKS``: called by the interpreter with the node's inputs, ignores the weight."""

    def __init__(self, ks: QuantizedKS, node):
        super().__init__()
        self.ks = ks
        self.op, self.alpha, self.beta = node.op, float(node.alpha), float(node.beta)
        self.trans_a, self.trans_out = bool(node.trans_a), bool(node.trans_out)

    def forward(self, args):
        x = args[1] if self.trans_out else args[0]
        if self.trans_a:
            x = x.t()
        lead = x.shape[:-1]
        y = self.ks(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)
        if self.alpha != 1.0:
            y = y * self.alpha
        if self.op == "Gemm" and len(args) > 2 and args[2] is not None:
            y = y + (args[2] * self.beta if self.beta != 1.0 else args[2])
        return y.t() if self.trans_out else y


# ---- data and teacher ----------------------------------------------------------------------
def batches(data: dict, size: int, seed: int) -> list[dict]:
    """Fixed seeded batches of ``size`` rows; with a 2-D ``attention_mask`` input, rows of similar
    length share a batch (sorted by length, ties in seeded random order) and each batch is cut to its
    longest row (padding to the batch's max, not the file's)."""
    n = next(iter(data.values())).shape[0]
    order = np.random.default_rng(seed).permutation(n)
    mask = data.get("attention_mask")
    if mask is not None and mask.ndim == 2:
        order = order[np.argsort(mask[order].sum(axis=1), kind="stable")]
    out = []
    for i in range(0, n, size):
        idx = np.sort(order[i:i + size])
        b = {k: v[idx] for k, v in data.items()}
        mask = b.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            cols = np.nonzero(mask.any(axis=0))[0]
            keep = int(cols[-1]) + 1 if cols.size else mask.shape[1]
            b = {k: (v[:, :keep] if v.ndim >= 2 and v.shape[:2] == mask.shape else v) for k, v in b.items()}
        out.append(b)
    return out


TEACHER_CACHE_BYTES = 1 << 30     # teacher outputs kept for batches seen again (1 GiB)


class Teacher:
    """onnxruntime on the original model: outputs + ``match`` tensors per batch, cached while the
    cache holds at most ``cache_bytes`` (a batch past the budget is recomputed when seen again: with
    more batches than steps, e.g. 50k sentences, each batch is seen once and caching would only
    grow memory)."""

    def __init__(self, model: onnx.ModelProto, match=(), cache_bytes: int = TEACHER_CACHE_BYTES, threads: int = 0):
        self.outputs = [o.name for o in model.graph.output]
        self.names = self.outputs + [m for m in match if m not in self.outputs]
        added = self.names[len(self.outputs):]
        outs = model.graph.output
        for n in added:
            outs.append(onnx.ValueInfoProto(name=n))
        try:
            self.sess = session(model, threads=threads)
        finally:
            for _ in added:
                del outs[len(outs) - 1]
        self.cache: dict[int, dict] = {}
        self.cache_bytes, self.cached_bytes = int(cache_bytes), 0

    def __call__(self, key: int, feeds: dict, cache: bool = True) -> dict[str, np.ndarray]:
        """The teacher's tensors for batch ``key``; ``cache=False``: not kept (a batch seen once)."""
        if key in self.cache:
            return self.cache[key]
        try:
            vals = dict(zip(self.names, self.sess.run(self.names, feeds)))
        except Exception as e:  # noqa: BLE001
            raise BfcError(f"onnxruntime failed on the distillation data ({str(e).splitlines()[0][:200]}); "
                           "check that the .npz holds the model's inputs") from None
        size = sum(np.asarray(v).nbytes for v in vals.values())
        if cache and self.cached_bytes + size <= self.cache_bytes:
            self.cache[key] = vals
            self.cached_bytes += size
        return vals


def _rel(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ((s - t) ** 2).sum() / (t * t).sum().clamp_min(1e-30)


def output_error(student: OnnxModule, teacher: Teacher, feeds: list[dict], keys: list[int]) -> float:
    """max over float graph outputs of ||student - teacher|| / ||teacher|| over all of ``feeds``."""
    num, den = {}, {}
    with torch.no_grad():
        for k, f in zip(keys, feeds):
            got = student(f)
            ref = teacher(k, f)
            for n in teacher.outputs:
                r = np.asarray(ref[n], np.float64)
                if r.dtype.kind != "f":
                    continue
                g = got[n].double().numpy()
                num[n] = num.get(n, 0.0) + float(((g - r) ** 2).sum())
                den[n] = den.get(n, 0.0) + float((r * r).sum())
    return max((math.sqrt(num[n] / max(den[n], 1e-30)) for n in num), default=0.0)


@dataclass
class DistillResult:
    weights: list[QuantizedFactorization]
    error_before: float
    error_after: float
    interpreter_error: float
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    layernorm: dict[str, np.ndarray] = field(default_factory=dict)


def layernorm_params(model: onnx.ModelProto) -> list[str]:
    """Initializers that are the scale/bias of a LayerNormalization node."""
    inits = {t.name for t in model.graph.initializer}
    return sorted({n for node in model.graph.node if node.op_type == "LayerNormalization"
                   for n in node.input[1:3] if n in inits})


def distill(model: onnx.ModelProto, layers: list, data: dict, *, steps: int = 500, batch: int = 32,
            lr: float = 5e-4, match=(), cosine: float = 0.0, layernorm: bool = False, seed: int = 0,
            eval_data: dict | None = None, emulate_rows: bool = False, checkpoint: Path | None = None,
            train_rotation: bool = False, floats: list | None = None, blockwise_steps: int = 0,
            on_step: Callable[[int, float], None] | None = None) -> DistillResult:
    """Train the planned layers of ``model``: ``blockwise_steps`` of block-wise reconstruction on the
    ``match`` tensors, then ``steps`` end to end (module doc).

    ``layers``: ``[(site_nodes, QuantizedFactorization)]``, each site node with ``name`` (the
    graph node's key), ``op``, ``alpha``, ``beta``, ``trans_a``, ``trans_out``.
    ``data``: model inputs (first axis = samples); ``eval_data``: where the before/after
    output error is measured (default: the first batch of ``data``, held out of training).
    ``checkpoint``: a file to save the trainable state to every 100 steps and to resume from.
    ``floats``: per layer its float weight (K, N) or None (where rotated layers' latent codes start).
    """
    t0 = time.perf_counter()
    if blockwise_steps and not match:
        raise BfcError("block-wise reconstruction needs matched intermediate tensors (distill match, "
                       "e.g. op:LayerNormalization): they are the blocks' boundaries")
    torch.manual_seed(seed)
    kss = trainable_layers([q for _, q in layers], emulate_rows, train_rotation, floats)
    overrides = {sn.name: site_layer(ks, sn) for (nodes, _), ks in zip(layers, kss) for sn in nodes}
    student = OnnxModule(model, overrides)
    dense = OnnxModule(model)
    teacher = Teacher(model, match, threads=torch.get_num_threads())
    all_batches = batches(data, batch, seed)
    if eval_data is None:
        if len(all_batches) < 2:
            raise BfcError(f"distillation data has {next(iter(data.values())).shape[0]} samples: need more than "
                           f"one batch of {batch} (one is held out to measure the error)")
        mid = len(all_batches) // 2          # a batch of typical length (batches are length-sorted)
        eval_batches, train = all_batches[mid:mid + 1], all_batches[:mid] + all_batches[mid + 1:]
    else:
        eval_batches, train = batches(eval_data, batch, seed), all_batches
    ekeys = [-1 - i for i in range(len(eval_batches))]
    interp = output_error(dense, teacher, eval_batches[:1], ekeys[:1])
    del dense
    if interp > INTERPRETER_TOLERANCE:
        raise BfcError(f"the torch interpreter differs from onnxruntime by {interp:.3g} (relative) on the "
                       f"original model (> {INTERPRETER_TOLERANCE:g}); distillation would train the wrong "
                       "function: run without --distill")
    ln = {}
    if layernorm:
        for name in layernorm_params(model):
            buf = student._const_names[name]
            p = nn.Parameter(getattr(student, buf).clone())
            delattr(student, buf)
            student.register_parameter(buf, p)
            ln[name] = p
    before = output_error(student, teacher, eval_batches, ekeys)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    bw, total = int(blockwise_steps), int(blockwise_steps) + steps

    def rate(i):              # a cosine from lr to 0 over each phase
        t = i / bw if i < bw else (min(i, total) - bw) / steps
        return 0.5 * (1 + math.cos(math.pi * t))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    start, losses = 0, []
    if checkpoint is not None and Path(checkpoint).exists():
        ck = torch.load(checkpoint, weights_only=False)
        student.load_state_dict(ck["student"], strict=False)
        opt.load_state_dict(ck["opt"])
        sched.load_state_dict(ck["sched"])
        start, losses = ck["step"], ck["losses"]
    rng = np.random.default_rng(seed + 1)
    revisit = total > len(train)          # fewer steps than batches: each batch is seen once, nothing to cache
    keys = [int(k) for _ in range(-(-total // len(train))) for k in rng.permutation(len(train))][start:total]
    prefetch = ThreadPoolExecutor(1)
    pending = prefetch.submit(teacher, keys[0], train[keys[0]], revisit) if keys else None
    for step in range(start, total):
        k = keys[step - start]
        feeds = train[k]
        ref = pending.result()
        if step + 1 < total:
            nk = keys[step + 1 - start]
            pending = prefetch.submit(teacher, nk, train[nk], revisit)
        refs = {m: torch.from_numpy(np.asarray(ref[m])) for m in match}
        if step < bw:             # block-wise: each span (to a matched tensor or an output) from the teacher's input
            got = student(feeds, capture=tuple(match), force=refs)
            ends = list(match) + [n for n in teacher.outputs if np.asarray(ref[n]).dtype.kind == "f"]
            loss = sum(_rel(got[n], refs[n] if n in refs else torch.from_numpy(np.asarray(ref[n])))
                       for n in ends) / len(ends)
        else:
            got = student(feeds, capture=tuple(match))
            loss = torch.zeros(())
            for n in teacher.outputs:
                t = torch.from_numpy(np.asarray(ref[n]))
                if not t.dtype.is_floating_point:
                    continue
                s = got[n]
                loss = loss + _rel(s, t)
                if cosine and s.dim() == 2:
                    loss = loss + cosine * (1 - nn.functional.cosine_similarity(s, t, dim=-1)).mean()
            if match:
                loss = loss + sum(_rel(got[m], refs[m]) for m in match) / len(match)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
        if checkpoint is not None and ((step + 1) % 100 == 0 or step + 1 == total):
            tmp = Path(str(checkpoint) + ".tmp")
            torch.save({"student": {k: v for k, v in student.state_dict().items()
                                    if not k.startswith("c") or k in {student._const_names[n] for n in ln}},
                        "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step + 1,
                        "losses": losses}, tmp)
            tmp.replace(checkpoint)
    prefetch.shutdown()
    after = output_error(student, teacher, eval_batches, ekeys)
    return DistillResult(export_layers(kss), before, after, interp, total - start,
                         time.perf_counter() - t0, losses,
                         {n: p.detach().numpy().copy() for n, p in ln.items()})
