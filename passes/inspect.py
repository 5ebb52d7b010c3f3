"""Inspect: what ``bfc optimize`` would do with a model, per layer, without writing anything.

``inspect_model(path, config)`` runs the stages up to the plan (``bfc.passes.pipeline.run_passes``)
with the given config (the default: the allocator at the default budget) and returns one row per
site: the layer, its shape, the bytes it is stored in (an int8 weight behind a DequantizeLinear
counts its int8 values, scales and zero points, not the float value the layer computes with),
the best candidate of each family the allocator considered (the smallest one; its bytes and its
own relative output error; "-" where the family offered none: a KS family whose most accurate chain
misses ``candidates.KS_MAX_ERROR`` or is beaten in bytes and error by another candidate), and what the
plan picks, or why the site is not rewritten.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from bfc.config import OptimizeConfig
from bfc.passes.pipeline import run_passes
from bfc.report import size_text

FAMILIES = (("int8", ("int8 per-column",)), ("fp16", ("fp16",)), ("rotated", ("rotated",)),
            ("ks", ("monarch",)), ("rows", ("int8 rows", "int4 rows", "int2 rows")))


def _stored_bytes(site) -> int:
    """Bytes of the constants the model computes ``site``'s weight from (its storage types), or the
    weight's own bytes when the chain cannot be followed."""
    sn = site.nodes[0] if site.nodes else None
    node = getattr(sn, "node", None)
    if node is None:
        return int(site.weight.nbytes)
    weights = [t for t in node.inputs[:2] if t.name != sn.input]
    if len(weights) != 1:
        return int(site.weight.nbytes)
    total, seen, todo = 0, set(), [weights[0]]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        if isinstance(t, gs.Constant):
            v = t.values
            total += int(v.nbytes if hasattr(v, "nbytes") else np.asarray(v).nbytes)
        elif len(t.inputs) == 1 and t.inputs[0].op == "Constant" and "value" in t.inputs[0].attrs:
            v = t.inputs[0].attrs["value"]
            total += int(np.asarray(getattr(v, "values", v)).nbytes)
        elif len(t.inputs) == 1:
            todo.extend(i for i in t.inputs[0].inputs if i.name)
        else:
            return int(site.weight.nbytes)
    return total


def _best(alternatives, prefixes) -> str:
    """The smallest candidate whose label starts with one of ``prefixes``: "bytes (error)", or "-"."""
    found = [a for a in alternatives if a[0].startswith(prefixes)]
    if not found:
        return "-"
    label, nbytes, err = min(found, key=lambda a: a[1])
    return f"{size_text(nbytes)} ({err:.2g})" + (f" {label.split(' (')[0]}" if prefixes != ("int8 per-column",) and
                                                    prefixes != ("fp16",) else "")


HEADER = ("layer", "shape", "stored") + tuple(f for f, _ in FAMILIES) + ("picked",)


def inspect_model(model_or_path, config: OptimizeConfig | None = None) -> tuple[list[tuple], str]:
    """(rows, summary line) for ``bfc inspect`` (see the module doc)."""
    cfg = (config or OptimizeConfig()).replace(verify=False)
    done = run_passes(model_or_path, cfg)
    rows, before, after = [], 0, 0
    for p in done.plans:
        s = p.site
        shape = "x".join(map(str, s.shape)) or "-"
        stored = _stored_bytes(s) if s.weight is not None else 0
        fams = tuple(_best(p.alternatives, prefixes) for _, prefixes in FAMILIES)
        if p.rewritten:
            picked = f"{p.precision}: {size_text(p.bytes_after)} ({p.error:.2g})"
            before, after = before + stored, after + p.bytes_after
        else:
            picked = p.reason or "kept dense"
        rows.append((s.name, shape, size_text(stored) if stored else "-") + fams + (picked,))
    n = sum(p.rewritten for p in done.plans)
    budget = "no whole-model budget" if cfg.max_output_error is None else f"max-output-error {cfg.max_output_error:g}"
    summary = (f"{n} of {len(done.plans)} sites rewritten at {budget} (target {cfg.target}): their weights "
               f"{size_text(before)} -> {size_text(after)}; the error in parentheses is each candidate's own "
               f"relative output error ({'calibration' if cfg.calibration else 'white inputs'})")
    return rows, summary
