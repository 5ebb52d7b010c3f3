"""Verify: run the original and the optimized model in onnxruntime on the same inputs.

Matches: two models with the same graph inputs and outputs.
Ensures: per graph output, the relative error ||y_opt - y_ref|| / ||y_ref|| and the mean
cosine similarity of the rows (last axis); non-finite optimized outputs are an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bfc.errors import ModelError, NativeLibraryError
from bfc.passes.session import run, session


@dataclass(frozen=True)
class OutputCheck:
    name: str
    rel_error: float
    cosine: float


def _cosine(a, b) -> float:
    a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    b = b.reshape(a.shape)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = den > 0
    return float(np.mean(num[ok] / den[ok])) if ok.any() else 1.0


def verify(original, optimized, feeds: dict) -> list[OutputCheck]:
    """original/optimized: ModelProtos or model paths (paths keep only onnxruntime's copy in memory)."""
    sess = session(original, threads=0)
    names = [o.name for o in sess.get_outputs()]
    ref = run(sess, feeds, names)
    del sess                                         # one session at a time: peak memory
    try:
        got = run(session(optimized, threads=0), feeds, names)
    except NativeLibraryError:
        raise
    except ModelError as e:
        raise RuntimeError(f"bfc's output does not run in onnxruntime ({e}); this is a bug in bfc, not in the "
                           "input model: please report it with the model and command") from None
    out = []
    for n, r, g in zip(names, ref, got):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if not np.isfinite(g).all():
            raise RuntimeError(f"internal error: optimized output {n!r} is not finite; please report this")
        if r.dtype.kind not in "fc":
            out.append(OutputCheck(n, float(np.mean(r != g)), 1.0))
            continue
        err = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
        out.append(OutputCheck(n, err, _cosine(r, g)))
    return out
