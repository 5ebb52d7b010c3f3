"""Output bytes of a fixed set of runs (demo MLP, a MiniLM-sized synthetic decoder; every target),
recorded as sha256 in ``tests/data/golden_outputs.json``: a restructuring must not change them.

    python tests/golden_outputs.py --record     # after a change that is meant to change bytes
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "data" / "golden_outputs.json"
ROOT = HERE.parent

# (name, config keys): explicit structures keep their meaning whatever the defaults become
CASES = {
    "monarch-r4-int8": dict(structure="monarch", rank=4, precision="int8", max_error=None, max_output_error=None),
    "butterfly-fp8": dict(structure="butterfly", precision="fp8-e4m3", max_error=None, max_output_error=None),
    "rotated-int4": dict(structure="rotated", bits=4, group_size=32, max_error=None, max_output_error=None),
    "auto-int8-budget": dict(structure="auto", precision="int8", max_error=0.3, max_output_error=None),
}
TARGETS = ("portable", "ort", "custom-op")


def decoder(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "models"))
    import synthetic_decoder
    out = folder / "decoder.onnx"
    synthetic_decoder.main([str(out), "--layers", "1", "--hidden", "384", "--ffn", "1536", "--vocab", "512",
                            "--heads", "6", "--seed", "3"])
    return out


def models(folder: Path) -> dict[str, Path]:
    from importlib.resources import files
    return {"demo": Path(str(files("bfc") / "data" / "demo_mlp.onnx")), "decoder": decoder(folder)}


def digests() -> dict[str, str]:
    import bfc
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for mname, path in models(tmp).items():
            for case, keys in CASES.items():
                for target in TARGETS:
                    cfg = bfc.OptimizeConfig(target=target, verify=False, workers=1, **keys)
                    dst = tmp / f"{mname}-{case}-{target}.onnx"
                    try:
                        bfc.optimize(str(path), cfg, output=str(dst))
                        out[f"{mname}/{case}/{target}"] = hashlib.sha256(dst.read_bytes()).hexdigest()
                    except bfc.BfcError as e:
                        out[f"{mname}/{case}/{target}"] = f"error: {type(e).__name__}"
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    d = digests()
    if a.record:
        RECORD.write_text(json.dumps(d, indent=1, sort_keys=True) + "\n")
    print(json.dumps(d, indent=1, sort_keys=True))
