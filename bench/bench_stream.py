"""Peak memory of ``bfc optimize`` end to end: streaming load/save vs an older checkout, side by side.

    python bench/bench_stream.py [--cases minilm,minilm-calib,vgg-head,decoder] [--ref DIR]
        [--decoder-layers 14] [--workers 1,2] [--work DIR] [--no-write]

Each run is one child process ``bfc optimize IN -o OUT ...`` (the CLI) importing ``bfc``
from this checkout or, with ``--ref DIR``, from ``DIR`` (a folder holding an older
checkout's ``bfc/`` with its ``passes/`` copied to ``bfc/passes``:
``git archive REV bfc passes | tar -x -C DIR && mv DIR/passes DIR/bfc/passes``).
Peak memory: the child's ``ru_maxrss`` (``os.wait4``: the largest single process of its
tree, pool workers included) and the largest sum of the RSS of the child and its
descendants, sampled every 0.1 s with psutil (``tree``).  Cases:
  * ``minilm``: MiniLM-L6 (``~/.cache/bfc/minilm/model.onnx``, 91 MB) forced to Monarch r4
    int8 (every MatMul), verified on random inputs; ``minilm-calib`` the same with its
    calibration set; peak / file size is the figure of merit (target <= 2x);
  * ``vgg-head``: one 25088 x 64 MatMul (a VGG16 classifier head, 6.4 MB) forced to Monarch
    int8 with 4 calibration rows (target <= 2 GB);
  * ``decoder``: ``models/synthetic_decoder.py`` (hidden 2048, FFN 5632, vocabulary 32000,
    ``--decoder-layers`` layers; weights >= 3 GB of external data) forced to Monarch r4 int8
    without verification (onnxruntime would map the whole input to run it), planned on
    ``--workers`` (target <= 2 GB).
The output bytes of the two trees are compared (sha256) where both finish.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MINILM = Path.home() / ".cache/bfc/minilm"
FORCED = ["--structure", "monarch", "--rank", "4", "--precision", "int8", "--no-max-error", "--no-max-output-error"]

CHILD = r'''
import os, sys
tree = os.environ.get("BFC_BENCH_TREE")
if tree:      # an older checkout: import bfc from it, not through the editable install's finder
    sys.meta_path[:] = [f for f in sys.meta_path if "Redirecting" not in type(f).__name__
                        and "Editable" not in type(f).__name__]
    sys.path.insert(0, tree)
from bfc.cli import main
rc = main(sys.argv[1:])
import bfc
print("BFC_FILE", bfc.__file__)
sys.exit(rc)
'''


AS_LIMIT = 12 << 30     # address-space cap of an older checkout's run: a blow-up fails instead of swapping


def _limit():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_child(args, tree: str | None, threads: int = 1) -> dict:
    import psutil
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    env.pop("BFC_BENCH_TREE", None)
    if tree:
        env["BFC_BENCH_TREE"] = tree
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=fo, stderr=fe, env=env, cwd="/",
                                preexec_fn=_limit if tree else None)
        reaped = {}
        waiter = threading.Thread(target=lambda: reaped.update(w=os.wait4(proc.pid, 0)))
        waiter.start()
        ps, tree_peak = psutil.Process(proc.pid), 0
        while waiter.is_alive():
            try:
                total = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                tree_peak = max(tree_peak, total)
            except psutil.Error:
                pass
            waiter.join(0.1)
        _, status, usage = reaped["w"]
        proc.returncode = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        text, err = fo.read().decode(), fe.read().decode()
    res = {"wall_s": time.perf_counter() - t0, "tree_mb": tree_peak / 2**20, "rc": proc.returncode,
           "maxrss_mb": usage.ru_maxrss / 1024.0}          # Linux: kilobytes
    bfc_file = next((ln.split(" ", 1)[1] for ln in text.splitlines() if ln.startswith("BFC_FILE")), "")
    if proc.returncode == 0 and tree and not bfc_file.startswith(tree):
        raise RuntimeError(f"child imported bfc from {bfc_file}, not {tree}")
    if proc.returncode != 0:
        res["failed"] = (err.strip().splitlines() or ["?"])[-1][:160]
    return res


def sha(path: Path) -> str:
    h = hashlib.sha256()
    for p in (path, Path(str(path) + ".data")):
        if p.exists():
            with p.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()[:16]


def vgg_head(folder: Path) -> tuple[Path, Path]:
    import numpy as np
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh
    model, calib = folder / "vgg_head.onnx", folder / "vgg_head_calib.npz"
    if not model.exists():
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((25088, 64)) / np.sqrt(25088)).astype(np.float32)
        g = h.make_graph([h.make_node("MatMul", ["x", "W"], ["y"], name="head")], "vgg_head",
                         [h.make_tensor_value_info("x", T.FLOAT, ["n", 25088])],
                         [h.make_tensor_value_info("y", T.FLOAT, ["n", 64])], [nh.from_array(w, "W")])
        m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
        m.ir_version = 8
        onnx.save(m, str(model))
        x = (rng.standard_normal((4, 25088)) * np.exp(rng.standard_normal(25088))).astype(np.float32)
        np.savez(calib, x=x)
    return model, calib


def decoder(folder: Path, layers: int) -> Path:
    path = folder / f"decoder_l{layers}.onnx"
    if not path.exists():
        subprocess.run([sys.executable, str(ROOT / "models/synthetic_decoder.py"), str(path), "--layers", str(layers),
                        "--hidden", "2048", "--ffn", "5632", "--vocab", "32000"], check=True)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="minilm,minilm-calib,vgg-head,decoder")
    ap.add_argument("--ref", default=None)
    ap.add_argument("--decoder-layers", type=int, default=14)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--decoder-include", default="layers.0/*,lm_head",
                    help="layers planned in the decoder (--include patterns; empty: all)")
    ap.add_argument("--ref-skip", default="decoder", help="cases not run with --ref (e.g. known to exhaust memory)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bfc-bench-stream"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from common import machine_line
    args.work.mkdir(parents=True, exist_ok=True)
    trees = [("current", None)] + ([("ref", str(Path(args.ref).resolve()))] if args.ref else [])
    load0 = os.getloadavg()
    runs = []
    for case in args.cases.split(","):
        if case in ("minilm", "minilm-calib"):
            src = MINILM / "model.onnx"
            extra = ["--calibration", str(MINILM / "calibration.npz")] if case == "minilm-calib" else []
            runs.append((case, src, FORCED + extra + ["--workers", "1"], src.stat().st_size))
        elif case == "vgg-head":
            src, calib = vgg_head(args.work)
            runs.append((case, src, ["--structure", "monarch", "--rank", "1", "--precision", "int8", "--no-max-error",
                                     "--no-max-output-error", "--calibration", str(calib), "--workers", "1"],
                         src.stat().st_size))
        elif case == "decoder":
            src = decoder(args.work, args.decoder_layers)
            size = src.stat().st_size + Path(str(src) + ".data").stat().st_size
            for w in args.workers.split(","):
                inc = [a for p in args.decoder_include.split(",") if p for a in ("--include", p)]
                runs.append((f"decoder w{w}", src, FORCED + inc + ["--no-verify", "--workers", w], size))
    lines = ["| case | tree | wall (s) | peak RSS, largest process (MB) | peak RSS, process tree (MB) | "
             "tree / input bytes | output MB | output sha256 |", "|---|---|---|---|---|---|---|---|"]
    for case, src, opts, size in runs:
        for tname, tree in trees:
            if tree and case.split()[0] in args.ref_skip.split(","):
                continue
            run_dir = args.work / f"out_{case.replace(' ', '_')}_{tname}"    # one output name: the bytes compare
            run_dir.mkdir(exist_ok=True)
            out = run_dir / "out.onnx"
            for p in (out, Path(str(out) + ".data")):
                p.unlink(missing_ok=True)
            r = run_child(["optimize", str(src), "-o", str(out), "-q", *opts], tree)
            out_mb = sum(p.stat().st_size for p in (out, Path(str(out) + ".data")) if p.exists()) / 1e6
            digest = sha(out) if out.exists() and "failed" not in r else "-"
            status = f"failed: {r['failed']}" if "failed" in r else f"{out_mb:.1f}"
            row = (f"| {case} | {tname} | {r['wall_s']:.1f} | {r['maxrss_mb']:.0f} | {r['tree_mb']:.0f} | "
                   f"{r['tree_mb'] * 2**20 / size:.2f}x | {status} | `{digest}` |")
            print(row, flush=True)
            lines.append(row)
            for p in (out, Path(str(out) + ".data")):
                p.unlink(missing_ok=True)
    load1 = os.getloadavg()
    body = (f"Load average before / after (1 min): {load0[0]:.1f} / {load1[0]:.1f} on {os.cpu_count()} cores "
            "(shared machine).\n\n" + "\n".join(lines) + "\n")
    print(body)
    if not args.no_write:
        cmd = "python bench/bench_stream.py " + " ".join(argv if argv is not None else sys.argv[1:])
        path = HERE / "results" / "stream.md"
        path.write_text(f"# Streaming load/save: peak memory of bfc optimize\n\nCommand: `{cmd.strip()}`  \n"
                        f"Machine: {machine_line()}\n\n{body}")
        print(path)


if __name__ == "__main__":
    main()
