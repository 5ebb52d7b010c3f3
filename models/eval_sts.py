"""Sentence-embedding accuracy of an ONNX model: STS-B dev Spearman and fast smoke checks.

All metrics take an ``encode(sentences) -> float array [n, dim]`` callable; ``OnnxEncoder``
runs an ONNX sentence-embedding model (e.g. ``models/minilm.py``'s export, or bfc's
rewrite of it) in onnxruntime.  Similarity is the cosine of mean-pooled embeddings.

- ``stsb_spearman``: Spearman x 100 on the STS benchmark dev split (1500 pairs; read from
  ``$BFC_STSB`` or ``<repo>/../shared/data/stsb/`` or ``/work/shared/data/stsb/``;
  the data stays outside the repository).  all-MiniLM-L6-v2 reference: 86.72.
  ``half="tuning"`` / ``"held-out"`` scores one half of the fixed split of ``models/stsb_split.py``
  (tune on the first, report the second).
- ``wordsim353_spearman``: gensim's ``wordsim353.tsv`` (353 word pairs); reference 0.729.
- ``lee_pearson``: gensim's ``lee.cor`` + ``similarities0-1.txt`` (50 documents, 1225
  rated pairs); reference 0.656.

    python models/eval_sts.py [model.onnx] [--stsb DIR] [--limit N] [--half tuning|held-out] [--smoke]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
STSB_CANDIDATES = (REPO.parent / "shared" / "data" / "stsb", Path("/work/shared/data/stsb"))
REFERENCE = {"stsb_dev_spearman": 86.72, "wordsim353_spearman": 0.729, "lee_pearson": 0.656}


# ---- statistics ---------------------------------------------------------------------------
from bfc.study.evaluators import rankdata, spearman  # noqa: E402,F401  (one implementation, in the package)


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / np.sqrt((x @ x) * (y @ y)))


def cosine_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(min=1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(min=1e-12)
    return np.sum(a * b, axis=1)


# ---- encoders ------------------------------------------------------------------------------
class OnnxEncoder:
    """``encode(sentences)`` with an ONNX model taking ``input_ids``/``attention_mask``.

    Uses the output ``sentence_embedding`` when the graph has one, else mean-pools the
    first output (token embeddings [batch, seq, dim]) with the attention mask.
    Sentences are sorted by length and batched so padding stays small.
    """

    def __init__(self, model, batch_size: int = 64, max_length: int = 256, threads: int | None = None,
                 providers=None, session_options=None):
        import onnxruntime as ort
        try:
            from models import minilm
        except ImportError:        # run as a script from models/
            import minilm
        opts = session_options or ort.SessionOptions()
        if threads and session_options is None:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model), sess_options=opts,
                                            providers=providers or ["CPUExecutionProvider"])
        self.input_names = {i.name for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.output = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]
        self.pooled = self.output == "sentence_embedding"
        self.tokenizer = minilm.load_tokenizer()
        self._tokenize = minilm.tokenize
        self.batch_size, self.max_length = batch_size, max_length

    def __call__(self, sentences) -> np.ndarray:
        sentences = list(sentences)
        lengths = [len(s) for s in sentences]
        order = np.argsort(lengths, kind="stable")
        out = [None] * len(sentences)
        for start in range(0, len(sentences), self.batch_size):
            idx = order[start:start + self.batch_size]
            feed = self._tokenize([sentences[i] for i in idx], self.tokenizer, self.max_length)
            if "token_type_ids" in self.input_names:
                feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
            feed = {k: v for k, v in feed.items() if k in self.input_names}
            (emb,) = self.session.run([self.output], feed)
            if not self.pooled:
                mask = feed["attention_mask"][..., None].astype(emb.dtype)
                emb = (emb * mask).sum(1) / mask.sum(1).clip(min=1e-9)
            for row, i in enumerate(idx):
                out[i] = emb[row]
        return np.stack(out).astype(np.float64)


# ---- data ---------------------------------------------------------------------------------
def stsb_dir(path=None) -> Path:
    """The STS-B folder: ``path``, ``$BFC_STSB``, or the shared data folder; FileNotFoundError if absent."""
    cands = [Path(path)] if path else ([Path(os.environ["BFC_STSB"])] if os.environ.get("BFC_STSB")
                                       else list(STSB_CANDIDATES))
    for c in cands:
        if (c / "sts-dev.csv").is_file():
            return c
        if c.is_file():
            return c.parent
    raise FileNotFoundError(f"STS-B dev split (sts-dev.csv) not found in {[str(c) for c in cands]}; "
                            "pass its folder or set $BFC_STSB")


def load_stsb(path=None, split: str = "dev", half: str | None = None):
    """(sentences1, sentences2, scores 0..5) of an STS-B split (tab-separated csv).

    ``half``: "tuning" or "held-out" keeps only that half of the dev pairs, the fixed split of
    ``models/stsb_split.py`` (None: every pair)."""
    if half is not None:
        if split != "dev":
            raise ValueError(f"half={half!r} applies to the dev split only (split={split!r})")
        return _stsb_split().load_half(half, path)
    from bfc.study.evaluators import load_stsb as read_split
    return read_split(Path(path) if path and Path(path).is_file() else stsb_dir(path) / f"sts-{split}.csv")


def _stsb_split():
    try:
        from models import stsb_split
    except ImportError:          # run as a script from models/
        import stsb_split
    return stsb_split


def gensim_test_data() -> Path:
    try:
        import gensim
    except ImportError as e:
        raise ImportError("the smoke sets come from gensim's test data: pip install gensim") from e
    return Path(gensim.__file__).parent / "test" / "test_data"


def load_wordsim353():
    w1, w2, scores = [], [], []
    for line in (gensim_test_data() / "wordsim353.tsv").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        a, b, s = line.split("\t")[:3]
        w1.append(a)
        w2.append(b)
        scores.append(float(s))
    return w1, w2, np.asarray(scores)


def load_lee():
    """(50 documents, 50x50 human similarity matrix; the upper triangle holds the ratings)."""
    root = gensim_test_data()
    docs = [d for d in (root / "lee.cor").read_text(encoding="latin-1").splitlines() if d.strip()]
    sims = np.loadtxt(root / "similarities0-1.txt")
    if sims.shape != (len(docs), len(docs)):
        raise ValueError(f"Lee data: {len(docs)} documents but a {sims.shape} similarity matrix")
    return docs, sims


# ---- metrics ------------------------------------------------------------------------------
def stsb_spearman(encode, path=None, limit: int | None = None, half: str | None = None) -> float:
    """Spearman x 100 of cosine similarity vs gold scores on STS-B dev (first ``limit`` pairs);
    ``half`` "tuning" / "held-out": only that half of the fixed split (``models/stsb_split.py``)."""
    s1, s2, gold = load_stsb(path, half=half)
    if limit:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    emb = encode(s1 + s2)
    return 100.0 * spearman(cosine_pairs(emb[:len(s1)], emb[len(s1):]), gold)


def stsb_tuning_half(model_path) -> float:
    """The example metric of ``bfc optimize --evaluate models/eval_sts.py:stsb_tuning_half --max-metric-drop
    0.3``: Spearman x 100 on the tuning half of the fixed STS-B dev split (the held-out half stays for
    reporting), 1 onnxruntime thread."""
    if str(REPO) not in sys.path:          # loaded from its path by --evaluate: models/ must import
        sys.path.insert(0, str(REPO))
    return stsb_spearman(OnnxEncoder(model_path, threads=1), half="tuning")


def wordsim353_spearman(encode) -> float:
    w1, w2, gold = load_wordsim353()
    vocab = sorted(set(w1) | set(w2))
    emb = dict(zip(vocab, encode(vocab)))
    return spearman(cosine_pairs(np.stack([emb[w] for w in w1]), np.stack([emb[w] for w in w2])), gold)


def lee_pearson(encode) -> float:
    docs, sims = load_lee()
    emb = encode(docs)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    iu = np.triu_indices(len(docs), k=1)
    return pearson((emb @ emb.T)[iu], sims[iu])


def main(argv=None) -> int:
    import argparse
    import time
    ap = argparse.ArgumentParser(description="STS-B dev Spearman (+ smoke checks) of an ONNX sentence-embedding model")
    ap.add_argument("model", nargs="?", help="ONNX model (default: the MiniLM export, built if missing)")
    ap.add_argument("--stsb", default=None, help="STS-B folder or sts-dev.csv path")
    ap.add_argument("--limit", type=int, default=None, help="only the first N STS-B pairs")
    ap.add_argument("--half", choices=("tuning", "held-out"), default=None,
                    help="only this half of the fixed dev split (models/stsb_split.py)")
    ap.add_argument("--smoke", action="store_true", help="only the fast WordSim353 / Lee checks")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.model is None:
        from models import minilm
        args.model = minilm.onnx_path()
    enc = OnnxEncoder(args.model, threads=args.threads)
    results = {}
    t0 = time.perf_counter()
    results["wordsim353_spearman"] = wordsim353_spearman(enc)
    results["lee_pearson"] = lee_pearson(enc)
    if not args.smoke:
        key = "stsb_dev_spearman" + (f" ({args.half} half)" if args.half else "")
        results[key] = stsb_spearman(enc, args.stsb, args.limit, half=args.half)
    for k, v in results.items():
        ref = REFERENCE.get(k)
        print(f"{k:22s} {v:8.4f}   " + (f"(all-MiniLM-L6-v2 reference {ref})" if ref else "(no reference)"))
    print(f"model: {args.model}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
