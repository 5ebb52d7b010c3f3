"""Verify: run the original and the optimized model in onnxruntime on the same inputs.

``verify_result(loaded, result, feeds, verified_on, why_no_feeds)`` (the pipeline's verify stage) -> Verification:
the written file when there is one (read by onnxruntime from disk), else the model in memory.
``verify`` compares two models with the same graph inputs and outputs: per graph output, the relative error ||y_opt - y_ref|| / ||y_ref|| and the mean
cosine similarity of the rows (last axis) over all inputs (run in chunks, accumulated);
non-finite optimized outputs are an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bfc.errors import BfcError, ModelError, NativeLibraryError
from bfc.passes.calibrate import split_feeds
from bfc.passes.model_io.files import open_skeleton
from bfc.passes.model_io.measure import first_rows, measure_file
from bfc.passes.model_io.session import run, session
from bfc.passes.model_io.stream import trim
from bfc.passes.products import LoadedModel, RewrittenModel, SavedModel, Verification


@dataclass(frozen=True)
class OutputCheck:
    name: str
    rel_error: float
    cosine: float


def _cosine_sum(a, b) -> tuple[float, int]:
    """(sum of the row cosines over rows with nonzero norms, number of such rows)."""
    a = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
    b = b.reshape(a.shape)
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    ok = den > 0
    return float(np.sum(num[ok] / den[ok])), int(ok.sum())


def _folder(base):
    return None if base is None else Path(base).absolute().parent


CHUNK = 8     # samples per onnxruntime run (activation memory stays bounded for long input sets)


def verify(original, optimized, feeds: dict, *, original_base=None, optimized_base=None) -> list[OutputCheck]:
    """original/optimized: ModelProtos or model paths.  A skeleton (``bfc.passes.model_io.stream``) comes with
    its ``*_base``, the model file its weight references are relative to: onnxruntime then reads the
    weights from the files once (a path makes it parse the whole file and copy the weights out of it).
    The inputs run CHUNK samples at a time when they share a batch axis; the errors are accumulated
    over the chunks (sums of squares, of row cosines and row counts), so they equal one run's."""
    parts = split_feeds(feeds) if all(np.ndim(v) for v in feeds.values()) else [feeds]
    if len(parts) > 1:
        parts = [{k: v[i:i + CHUNK] for k, v in feeds.items()}
                 for i in range(0, next(iter(feeds.values())).shape[0], CHUNK)]
    sess = session(original, threads=0, arena=False, external_folder=_folder(original_base))
    names = [o.name for o in sess.get_outputs()]
    refs = [run(sess, part, names) for part in parts]
    del sess                                         # one session at a time: peak memory
    trim()
    try:
        sess = session(optimized, threads=0, arena=False, external_folder=_folder(optimized_base))
        gots = [run(sess, part, names) for part in parts]
        del sess
    except NativeLibraryError:
        raise
    except ModelError as e:
        raise RuntimeError(f"bfc's output does not run in onnxruntime ({e}); this is a bug in bfc, not in the "
                           "input model: please report it with the model and command") from None
    out = []
    for i, n in enumerate(names):
        num = den = cos = rows = 0.0
        is_float = True
        for ref, got in zip(refs, gots):
            r, g = np.asarray(ref[i], np.float64), np.asarray(got[i], np.float64)
            if not np.isfinite(g).all():
                raise RuntimeError(f"internal error: optimized output {n!r} is not finite; please report this")
            if np.asarray(ref[i]).dtype.kind not in "fc":
                is_float = False
                num += float(np.sum(r != g))
                den += r.size
                continue
            num += float(np.sum((g - r) ** 2))
            den += float(np.sum(r * r))
            c, k = _cosine_sum(r, g)
            cos += c
            rows += k
        if not is_float:
            out.append(OutputCheck(n, num / max(den, 1), 1.0))
            continue
        err = float(np.sqrt(num) / max(np.sqrt(den), 1e-30))
        out.append(OutputCheck(n, err, cos / rows if rows else 1.0))
    return out


def verify_result(loaded: LoadedModel, result: SavedModel | RewrittenModel, feeds: dict | None,
                  verified_on: str, why_no_feeds: str | None = None) -> Verification:
    """The verify stage: the input as loaded (an opset-upgraded input: the original file) against the
    result; a reason instead when it cannot run (no inputs, no custom-op library)."""
    if loaded.upgraded and not isinstance(loaded.source, onnx.ModelProto):
        original, original_base = loaded.source, None       # the input file as the user gave it
    elif loaded.base is None:
        original, original_base = loaded.model, None
    else:
        original, original_base = loaded.model, loaded.base
    if isinstance(result, SavedModel):
        optimized, optimized_base = open_skeleton(result.path)   # the written files, read by onnxruntime
    else:
        optimized, optimized_base = result.model, None
    try:
        if feeds is None:
            raise BfcError(why_no_feeds)
        checks = verify(original, optimized, feeds, original_base=original_base, optimized_base=optimized_base)
    except BfcError as e:
        return Verification(not_verified=str(e))
    cost = None
    if isinstance(result, SavedModel) and not isinstance(loaded.source, onnx.ModelProto):
        row = first_rows(feeds)
        before, after = measure_file(loaded.source, row), measure_file(result.path, row)
        cost = (before, after) if before is not None and after is not None else None
    return Verification(tuple(checks), verified_on, resident=None if cost is None else (cost[0][0], cost[1][0]),
                        latency_ms=None if cost is None else (cost[0][1], cost[1][1]))
