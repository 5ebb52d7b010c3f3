"""Fashion-MNIST MLPs trained in-project: a dense baseline and a KS model trained from scratch.

Both are 784 -> 1024 -> 1024 -> 10 ReLU MLPs:
  dense  nn.Linear layers (1.87 M weights)
  ks     KSLinear(784, 1024, chainable_chain(784, 1024, rank=4)),
         KSLinear(1024, 1024, monarch_chain(1024, rank=4)), then a dense 1024 -> 10 head
         (0.49 M weights)
Data: Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``,
or ``$FASHION_MNIST_DIR``).  Training: Adam, lr 1e-3, batch 128, seeded, one torch thread
(see ``train``); an epoch over the 60k images takes ~10-25 s on one core.  Exports go to ``<cache>/fashion_mnist/{dense,ks}.onnx`` (input
``x`` float32 [batch, 784] normalized as ``normalize``, output ``logits`` [batch, 10]),
the KS layers as dense MatMuls that ``bfc optimize`` can re-factorize exactly.

    python models/fashion_mnist.py [--epochs 3] [--quant int8] [--no-export]
"""
from __future__ import annotations

import gzip
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MEAN, STD = 0.2860, 0.3530
HIDDEN = 1024


def data_dir(path=None) -> Path:
    root = Path(path or os.environ.get("FASHION_MNIST_DIR") or DATA_DIR)
    missing = [f for pair in FILES.values() for f in pair if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST files {missing} not found in {root}; install them with "
                                "`apt-get install dataset-fashion-mnist` or set $FASHION_MNIST_DIR")
    return root


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic, = struct.unpack(">I", raw[:4])
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str = "train", path=None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 784], labels int64 [n]) of the ``train`` (60k) or ``test`` (10k) split."""
    root = data_dir(path)
    images, labels = (_read_idx(root / f) for f in FILES[split])
    return images.reshape(len(images), -1), labels.astype(np.int64)


def normalize(images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0) - MEAN) / STD


def build_model(kind: str = "dense", seed: int = 0, quant=None, hidden: int = HIDDEN):
    """The MLP of ``kind`` "dense" or "ks" (``quant``: fake-quant format of the KS layers)."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "dense":
        if quant is not None:
            raise ValueError("quant applies to the KS model only")
        return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))
    if kind == "ks":
        from bfc.ks import chainable_chain, monarch_chain
        from bfc.torch import KSLinear
        gen = torch.Generator().manual_seed(seed)
        return nn.Sequential(
            KSLinear(784, hidden, chainable_chain(784, hidden, rank=4), quant=quant, generator=gen),
            nn.ReLU(),
            KSLinear(hidden, hidden, monarch_chain(hidden, rank=4), quant=quant, generator=gen),
            nn.ReLU(),
            nn.Linear(hidden, 10))
    raise ValueError(f"kind={kind!r} is not one of ('dense', 'ks')")


def n_weights(model) -> int:
    """Weight parameters (biases excluded)."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("bias"))


class _threads:
    """Temporarily set torch's intra-op thread count (None: leave it)."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        import torch
        self.old = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch
        torch.set_num_threads(self.old)


def train(model, x: np.ndarray, y: np.ndarray, epochs: int = 3, batch_size: int = 128,
          lr: float = 1e-3, seed: int = 0, threads: int | None = 1) -> list[float]:
    """Adam training on normalized images; returns the mean loss of each epoch.

    ``threads=1`` by default: for these small GEMMs one thread is as fast as two on an idle
    machine and 10-20x faster on a loaded one (OpenMP workers spin).
    """
    with _threads(threads):
        return _train(model, x, y, epochs, batch_size, lr, seed)


def _train(model, x, y, epochs, batch_size, lr, seed) -> list[float]:
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(normalize(x)), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for start in range(0, len(xt), batch_size):
            idx = perm[start:start + batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        losses.append(total / len(xt))
    model.eval()
    return losses


def predict(model, x: np.ndarray, batch_size: int = 2048, threads: int | None = 1) -> np.ndarray:
    import torch
    xt = torch.from_numpy(normalize(x))
    with torch.no_grad(), _threads(threads):
        return torch.cat([model(xt[i:i + batch_size]) for i in range(0, len(xt), batch_size)]).numpy()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def export(model, path) -> Path:
    """ONNX export (input ``x`` [batch, 784] normalized, output ``logits``) via ``bfc.torch``."""
    import torch

    from bfc.torch import export_onnx
    return export_onnx(model, path, torch.zeros(2, 784), input_names=["x"], output_names=["logits"])


def cache_dir() -> Path:
    return Path(os.environ.get("BFC_CACHE") or Path.home() / ".cache" / "bfc") / "fashion_mnist"


def run(kind: str, epochs: int = 3, quant=None, seed: int = 0, out_dir=None, train_limit=None) -> dict:
    """Train + evaluate (+ export when ``out_dir``) one model; returns the measured facts."""
    xtr, ytr = load("train")
    xte, yte = load("test")
    if train_limit:
        xtr, ytr = xtr[:train_limit], ytr[:train_limit]
    model = build_model(kind, seed=seed, quant=quant)
    t0, c0 = time.perf_counter(), time.process_time()
    losses = train(model, xtr, ytr, epochs=epochs, seed=seed)
    facts = {"kind": kind, "quant": quant, "epochs": epochs, "train_seconds": round(time.perf_counter() - t0, 1),
             "train_cpu_seconds": round(time.process_time() - c0, 1),
             "weights": n_weights(model), "loss": [round(v, 4) for v in losses],
             "test_accuracy": accuracy(predict(model, xte), yte)}
    if out_dir is not None:
        import onnxruntime as ort
        name = kind if quant is None else f"{kind}-{quant}"
        t0 = time.perf_counter()
        path = export(model, Path(out_dir) / f"{name}.onnx")
        facts["export_seconds"] = round(time.perf_counter() - t0, 1)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (logits,) = sess.run(None, {"x": normalize(xte)})
        facts["onnx_path"] = str(path)
        facts["onnx_test_accuracy"] = accuracy(logits, yte)
    return facts


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description="train the Fashion-MNIST dense and KS MLPs")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--kind", choices=["dense", "ks", "both"], default="both")
    ap.add_argument("--quant", choices=["int8", "fp8-e4m3", "fp8-e5m2"], default=None,
                    help="fake-quantize the KS factors during training")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="export folder (default <cache>/fashion_mnist)")
    ap.add_argument("--no-export", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    out = None if args.no_export else (args.out or cache_dir())
    kinds = ["dense", "ks"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        facts = run(kind, args.epochs, quant=args.quant if kind == "ks" else None, seed=args.seed, out_dir=out)
        print("  ".join(f"{k}={v}" for k, v in facts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
