"""Build bfc's bundled demo: an MLP trained on Fashion-MNIST with numpy only (seeded, reproducible).

    python models/build_demo.py            # writes bfc/data/demo_mlp.onnx and bfc/data/demo_data.npz

Data: Debian package ``dataset-fashion-mnist`` (Expat licence, Zalando Research), files in
/usr/share/datasets/fashion-mnist/ (``apt-get install -y dataset-fashion-mnist``).
Training: AdamW (lr 1e-3, weight decay 1e-3), batch 128, 8 epochs, He init scaled by 0.05 (small
initial weights leave mostly the learned, structured part in W); 86.1% on the 10k test set.
Model: uint8 image (N, 784) -> Cast, /255 -> Gemm(784x256, transB) -> Relu -> MatMul(256x256) + Add
-> Relu -> Gemm(256x10) -> logits (N, 10); both MatMul and Gemm forms so the demo exercises both.
Bundled data (uint8, compressed): 1000 held-out test images + labels for evaluation and 512
training images for calibration.  Everything stays under 2 MB so it ships inside the wheel.
"""
from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "bfc" / "data"
SIZES = (784, 256, 256, 10)
SEED = 0
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str):
    if not SRC.is_dir():
        raise SystemExit(f"{SRC} is missing: run `apt-get install -y dataset-fashion-mnist` first")
    pre = "train" if split == "train" else "t10k"
    x = read_idx(SRC / f"{pre}-images-idx3-ubyte.gz").reshape(-1, 784)
    y = read_idx(SRC / f"{pre}-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y


def train(x, y, epochs=8, batch=128, lr=1e-3, wd=1e-4, init=1.0, seed=SEED):
    """AdamW on softmax cross-entropy; He-initialized ReLU MLP. Returns [(W, b), ...] with y = x @ W + b."""
    rng = np.random.default_rng(seed)
    params = []
    for m, n in zip(SIZES[:-1], SIZES[1:]):
        params.append([rng.standard_normal((m, n)).astype(np.float32) * np.float32(init * np.sqrt(2.0 / m)),
                       np.zeros(n, np.float32)])
    mom = [[np.zeros_like(p) for p in layer] for layer in params]
    vel = [[np.zeros_like(p) for p in layer] for layer in params]
    xf = x.astype(np.float32) / 255.0
    step = 0
    for _ in range(epochs):
        order = rng.permutation(len(xf))
        for s in range(0, len(order), batch):
            idx = order[s:s + batch]
            acts = [xf[idx]]
            for i, (w, b) in enumerate(params):
                z = acts[-1] @ w + b
                acts.append(np.maximum(z, 0) if i < len(params) - 1 else z)
            logits = acts[-1]
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(idx)), y[idx]] -= 1
            g = p / len(idx)
            step += 1
            for i in range(len(params) - 1, -1, -1):
                w, b = params[i]
                grads = (acts[i].T @ g, g.sum(0))
                if i > 0:
                    g = (g @ w.T) * (acts[i] > 0)
                for j, gr in enumerate(grads):
                    mom[i][j] = 0.9 * mom[i][j] + 0.1 * gr
                    vel[i][j] = 0.999 * vel[i][j] + 0.001 * gr * gr
                    mh = mom[i][j] / (1 - 0.9 ** step)
                    vh = vel[i][j] / (1 - 0.999 ** step)
                    params[i][j] -= (lr * (mh / (np.sqrt(vh) + 1e-8) + wd * params[i][j])).astype(np.float32)
    return [(w.astype(np.float32), b.astype(np.float32)) for w, b in params]


def to_onnx(params) -> onnx.ModelProto:
    (w1, b1), (w2, b2), (w3, b3) = params
    inits = [numpy_helper.from_array(np.ascontiguousarray(w1.T), "fc1.weight"), numpy_helper.from_array(b1, "fc1.bias"),
             numpy_helper.from_array(w2, "fc2.weight"), numpy_helper.from_array(b2, "fc2.bias"),
             numpy_helper.from_array(w3, "fc3.weight"), numpy_helper.from_array(b3, "fc3.bias"),
             numpy_helper.from_array(np.array(1 / 255, np.float32), "inv255")]
    nodes = [helper.make_node("Cast", ["image"], ["xf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["xf", "inv255"], ["x"], name="scale"),
             helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
             helper.make_node("Relu", ["h1"], ["a1"], name="relu1"),
             helper.make_node("MatMul", ["a1", "fc2.weight"], ["h2m"], name="fc2"),
             helper.make_node("Add", ["h2m", "fc2.bias"], ["h2"], name="fc2_bias"),
             helper.make_node("Relu", ["h2"], ["a2"], name="relu2"),
             helper.make_node("Gemm", ["a2", "fc3.weight", "fc3.bias"], ["logits"], name="fc3")]
    graph = helper.make_graph(nodes, "fashion_mnist_mlp",
                              [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="bfc-build-demo")
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--init", type=float, default=0.05, help="scale of the He initialization (small: learned, compressible weights)")
    ap.add_argument("--wd", type=float, default=1e-3, help="decoupled weight decay")
    args = ap.parse_args(argv)
    xtr, ytr = load("train")
    xte, yte = load("test")
    params = train(xtr, ytr, epochs=args.epochs, wd=args.wd, init=args.init)
    model = to_onnx(params)
    rng = np.random.default_rng(SEED)
    test_idx = np.sort(rng.choice(len(xte), 1000, replace=False))
    calib_idx = np.sort(rng.choice(len(xtr), 512, replace=False))
    logits = np.maximum(np.maximum(xte / 255.0 @ params[0][0] + params[0][1], 0) @ params[1][0] + params[1][1], 0) \
        @ params[2][0] + params[2][1]
    acc = float(np.mean(logits.argmax(1) == yte))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo_mlp.onnx").write_bytes(model.SerializeToString())
    np.savez_compressed(args.out / "demo_data.npz", test_images=xte[test_idx], test_labels=yte[test_idx].astype(np.uint8),
                        calib_images=xtr[calib_idx])
    print(f"test accuracy (10000 images): {acc:.4f}; wrote {args.out / 'demo_mlp.onnx'} and demo_data.npz")


if __name__ == "__main__":
    main()
