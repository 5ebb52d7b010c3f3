"""MiniLM-L6 transfer check: models/configs/minilm-l6.toml on an independent export with other data.

    python bench/bench_minilm_transfer.py [--config models/configs/minilm-l6.toml] [--opset 17]
        [--sentences 50000] [--limit N] [--no-distill]

Everything the config was tuned on is replaced:
  * the model: all-MiniLM-L6-v2 from the same package, exported again with the legacy TorchScript
    exporter (``torch.onnx.export(dynamo=False)``) at ``--opset`` (default 17), with a third
    input ``token_type_ids`` (models/minilm.py's export is the dynamo exporter at opset 20 with
    two inputs); checked against torch before use;
  * the calibration: 48 WordNet / fortune sentences (models/minilm.py's is 48 news sentences of
    gensim's lee_background.cor);
  * the distillation data: ``--sentences`` sentences of the same text pool as
    ``python models/minilm.py distill-data`` (never STS-B), drawn disjoint from that command's
    default seed-0 sample and from the calibration sentences.
Scored on STS-B dev (Spearman x100, 1500 pairs), WordSim353 (Spearman x100, 353 word pairs) and
Lee (Pearson x100, 1225 document pairs; gensim's test data), against the same export's fp32 and
onnxruntime's int8 dynamic quantization; also the config without distillation.  Torch and
onnxruntime on 1 thread.  Writes bench/results/minilm_transfer.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "models"))

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUTS = ("sentence_embedding", "token_embeddings")
CALIBRATION_SENTENCES = 48
EXPORT_TOLERANCE = 1e-4          # max abs difference of the export's embeddings against torch


def export_torchscript(path: Path, opset: int) -> dict:
    """all-MiniLM-L6-v2 with the legacy TorchScript exporter; inputs ``INPUTS``, outputs ``OUTPUTS``."""
    import minilm
    import onnx
    import torch
    bert = minilm.load_torch_model().bert

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=token_type_ids).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            return (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9), tokens

    model = Embedder().eval()
    ex = minilm.tokenize(["A short example.", "Another, somewhat longer example sentence to pad the batch."])
    args = tuple(torch.from_numpy(ex[n]) for n in INPUTS[:2]) + (torch.zeros_like(torch.from_numpy(ex["input_ids"])),)
    axes = {n: {0: "batch", 1: "seq"} for n in INPUTS} | {"sentence_embedding": {0: "batch"},
                                                         "token_embeddings": {0: "batch", 1: "seq"}}
    t0 = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset, input_names=list(INPUTS),
                          output_names=list(OUTPUTS), dynamic_axes=axes)
    secs = time.perf_counter() - t0
    # the export against torch on other shapes than the traced one
    from bfc.runtime import session
    sess = session(str(path), threads=1)
    worst = 0.0
    for sents in (["One sentence only, a little longer than the example ones were."],
                  ["a b", "Three sentences of different length.", "The third is the longest of the three, by far."]):
        feed = minilm.tokenize(sents)
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
        got = sess.run(["sentence_embedding"], feed)[0]
        with torch.no_grad():
            ref = model(*(torch.from_numpy(feed[n]) for n in INPUTS))[0].numpy()
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > EXPORT_TOLERANCE:
        raise SystemExit(f"the TorchScript export differs from torch by {worst:.3g} > {EXPORT_TOLERANCE}")
    proto = onnx.load(str(path), load_external_data=False)
    return {"exporter": "torch.onnx.export(dynamo=False)", "opset": opset, "export_s": round(secs, 1),
            "max_abs_vs_torch": worst, "nodes": len(proto.graph.node),
            "matmuls": sum(n.op_type == "MatMul" for n in proto.graph.node)}


def data_sets(n: int, seed: int = 1) -> tuple[list[str], list[str]]:
    """(calibration, distillation) sentences: disjoint from each other and from ``distill-data``'s seed-0
    sample of ``n`` sentences (same pool, same STS-B exclusion)."""
    import minilm
    used, _ = minilm.distill_sentences(50000, seed=0)
    banned = {minilm._norm(s) for s in used} | {minilm._norm(s) for s in minilm.calibration_sentences(256)}
    banned |= minilm._stsb_sentences()
    folders = minilm.text_folders()
    sources = {"wordnet": minilm.wordnet_sentences(folders["wordnet"]),
               "fortunes": minilm.fortune_sentences(folders["fortunes"]), "gensim": minilm._gensim_sentences()}
    pool, _ = minilm.sentence_pool(sources, banned)
    if len(pool) < n + CALIBRATION_SENTENCES:
        raise SystemExit(f"only {len(pool)} sentences left for the transfer data; use --sentences <= "
                         f"{len(pool) - CALIBRATION_SENTENCES}")
    idx = np.random.default_rng(seed).permutation(len(pool))
    calib = [pool[i] for i in idx[:CALIBRATION_SENTENCES]]
    distill = [pool[i] for i in np.sort(idx[CALIBRATION_SENTENCES:CALIBRATION_SENTENCES + n])]
    return calib, distill


def write_inputs(path: Path, sentences: list[str], max_length: int = 128) -> Path:
    import minilm
    feed = minilm.tokenize(sentences, max_length=max_length)
    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    with open(path, "wb") as f:
        np.savez_compressed(f, **feed)
    return path


def scores(path) -> dict:
    from bench_minilm import stsb
    from bench_minilm_distill import lee, wordsim353
    return {"stsb": stsb(Path(path), None), "held-out": stsb(Path(path), None, "held-out"),
            "wordsim353": wordsim353(path), "lee": lee(path)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "models" / "configs" / "minilm-l6.toml")
    ap.add_argument("--opset", type=int, default=17)
    ap.add_argument("--sentences", type=int, default=50000)
    ap.add_argument("--no-distill", action="store_true", help="only the config without distillation")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bfc-bench-minilm-transfer")
    ap.add_argument("--write", action="store_true", help="only write the results from the work folder's records")
    args = ap.parse_args(argv)
    args.config = args.config.resolve()
    import onnx
    import torch
    torch.set_num_threads(1)
    from common import write_result

    import bfc
    from bfc.study.baselines import int8_dynamic, linear_bytes
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    facts_path = work / "facts.json"
    src = work / f"torchscript-opset{args.opset}.onnx"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    if not src.exists() or "export" not in facts:
        facts["export"] = export_torchscript(src, args.opset)
    calib_path, data_path = work / "calibration.npz", work / f"distill-{args.sentences}.npz"
    if not calib_path.exists() or not data_path.exists():
        calib, distill = data_sets(args.sentences)
        write_inputs(calib_path, calib)
        write_inputs(data_path, distill)
        facts["data"] = {"calibration": len(calib), "distill": len(distill), "calibration_first": calib[:3]}
    facts_path.write_text(json.dumps(facts, indent=2))
    print(json.dumps(facts), flush=True)
    original = onnx.load(str(src))
    i8 = int8_dynamic(src, work / "int8.onnx")
    stem = args.config.stem
    rows = facts.setdefault("rows" if stem == "minilm-l6" else f"rows-{stem}", {})
    if "fp32" not in rows or "held-out" not in rows["fp32"]:
        rows["fp32"] = {**scores(src), "bytes": linear_bytes(original)}
        rows["int8-dynamic"] = {**scores(i8), "bytes": linear_bytes(original, onnx.load(str(i8)))}
        facts_path.write_text(json.dumps(facts, indent=2))
    builds = [("config, no distillation", False)] + ([] if args.no_distill else [("config + distillation", True)])
    builds = [] if args.write else builds
    for name, distill in builds:
        cfg = bfc.OptimizeConfig.from_toml(str(args.config), calibration=str(calib_path), target="portable",
                                           verify=False, **({"distill": str(data_path)} if distill else {}))
        t0 = time.perf_counter()
        model, report = bfc.optimize(str(src), cfg)
        secs = time.perf_counter() - t0
        out = work / f"{'distilled' if distill else 'plain'}.onnx"
        onnx.save(model, str(out))
        t = report.totals()
        rows[name] = {**scores(out), "bytes": linear_bytes(original, model), "build_s": round(secs, 1),
                      "rewritten": t["rewritten"], "flops_ratio": t["flops_after"] / t["flops_before"],
                      "notes": [n for n in report.notes if n.startswith("distill")],
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        facts_path.write_text(json.dumps(facts, indent=2))
        print(name, rows[name], flush=True)

    i8b = rows["int8-dynamic"]["bytes"]
    ref = rows["fp32"]
    lines = ["| model | STS-B dev | vs fp32 | held-out half | vs fp32 | WordSim353 | Lee | linear MB | x int8-dynamic "
             "| linear FLOPs x dense | build s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        ho = (f"{r['held-out']:.2f} | {r['held-out'] - ref['held-out']:+.2f}" if "held-out" in r and "held-out" in ref
              else "- | -")
        lines.append(f"| {name} | {r['stsb']:.2f} | {r['stsb'] - ref['stsb']:+.2f} | {ho} | {r['wordsim353']:.2f} | "
                     f"{r['lee']:.2f} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / i8b:.3f} | "
                     + (f"{r['flops_ratio']:.3f} | {r['build_s']:.0f} |" if "build_s" in r else "1 | - |"))
    e = facts["export"]
    body = [f"Model: all-MiniLM-L6-v2 exported with `{e['exporter']}` at opset {e['opset']}, inputs "
            f"{', '.join(INPUTS)} ({e['nodes']} nodes, {e['matmuls']} MatMuls; max |export - torch| "
            f"{e['max_abs_vs_torch']:.1e}). Config: `{args.config.relative_to(ROOT)}` unchanged. Calibration: "
            f"{CALIBRATION_SENTENCES} WordNet/fortune sentences; distillation data: {args.sentences} sentences of the "
            "distill-data pool disjoint from its default sample and from the calibration (never STS-B).", "",
            "\n".join(lines), "",
            "STS-B: dev split, 1500 pairs, Spearman x100 of the embedding cosine. WordSim353: Spearman x100 of the "
            "cosine of the two words' embeddings (353 pairs). Lee: Pearson x100 of the document cosines against the "
            "human similarities (50 documents, 1225 pairs). linear FLOPs: bfc's report (the attention MatMuls have no "
            "constant weight and are not counted). fp32 and int8-dynamic rows are this export's own."]
    for name, r in rows.items():
        for n in r.get("notes", []):
            body.append(f"\n{name}: {n}.")
        if "peak_rss_gb" in r:
            body.append(f"{name}: peak RSS of the bench process {r['peak_rss_gb']:.2f} GB.")
    cmd = "python bench/bench_minilm_transfer.py" + (f" --opset {args.opset}" if args.opset != 17 else "") + (
        f" --sentences {args.sentences}" if args.sentences != 50000 else "") + (" --no-distill" if args.no_distill else "")
    name = "minilm_transfer" if stem == "minilm-l6" else f"minilm_transfer_{stem.replace('-', '_')}"
    cmd += "" if stem == "minilm-l6" else f" --config {args.config.relative_to(ROOT)}"
    print(write_result(name, f"MiniLM-L6: {stem}.toml on an independent export", cmd, "\n".join(body)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
