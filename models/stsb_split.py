"""One fixed split of the STS-B dev pairs into a tuning half and a held-out half.

Budgets, defaults and evaluator thresholds are tuned on the ``tuning`` half; claims are
measured on the ``held-out`` half (``bench/bench_default.py``).  The split was drawn once,
``numpy.random.default_rng(SEED).permutation(1500)`` (first 750 -> tuning, last 750 ->
held-out, each sorted), and is stored as row indices only in ``models/data/stsb_split.json``:
the licence of the data forbids copying it into the repository, so the sentences are read
from ``sts-dev.csv`` outside it (``models/eval_sts.py``'s ``stsb_dir``: ``$BFC_STSB`` or
``../shared/data/stsb/``).  A row index is the 0-based line of ``sts-dev.csv`` (the file has
no header; one pair per line).  Never regenerate the stored file: the split is fixed forever.

    from models import stsb_split
    s1, s2, scores = stsb_split.load_half("held-out")          # or a csv path / folder
    idx = stsb_split.indices("tuning")                         # int64 row indices, sorted

    python models/stsb_split.py [--stsb DIR]   # sizes, and the csv checked against the stored facts
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np

SEED = 20261206                  # fixed integer seed of the one draw
N_ROWS = 1500                    # pairs in sts-dev.csv
HALVES = ("tuning", "held-out")
SPLIT_FILE = Path(__file__).resolve().parent / "data" / "stsb_split.json"


def make_split(n: int = N_ROWS, seed: int = SEED) -> dict[str, np.ndarray]:
    """The draw itself (deterministic): {half: sorted int64 row indices}; tuning gets n // 2 rows."""
    perm = np.random.default_rng(seed).permutation(n)
    return {"tuning": np.sort(perm[: n // 2]).astype(np.int64),
            "held-out": np.sort(perm[n // 2:]).astype(np.int64)}


def _stored() -> dict:
    return json.loads(SPLIT_FILE.read_text())


def indices(half: str) -> np.ndarray:
    """Sorted 0-based row indices of ``half`` ("tuning" or "held-out") in sts-dev.csv."""
    if half not in HALVES:
        raise ValueError(f"half={half!r}; allowed: {', '.join(HALVES)}")
    return np.asarray(_stored()["halves"][half], dtype=np.int64)


def csv_path(path=None) -> Path:
    """``sts-dev.csv``: ``path`` (the csv itself or its folder) or ``eval_sts.stsb_dir``'s search."""
    if path is not None and Path(path).is_file():
        return Path(path)
    try:
        from models.eval_sts import stsb_dir
    except ImportError:          # run as a script from models/
        from eval_sts import stsb_dir
    return stsb_dir(path) / "sts-dev.csv"


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_half(half: str, path=None):
    """(sentences1, sentences2, scores 0..5) of ``half`` of STS-B dev, in row order.

    ``path``: the csv or its folder (default: ``$BFC_STSB`` or the shared data folder;
    FileNotFoundError if absent).  ValueError if the csv does not have the 1500 rows the
    split was drawn on; a warning if its bytes differ from the copy it was drawn on.
    """
    idx = indices(half)
    csv = csv_path(path)
    try:
        from models.eval_sts import load_stsb
    except ImportError:
        from eval_sts import load_stsb
    s1, s2, gold = load_stsb(csv)
    facts = _stored()
    if len(gold) != facts["rows"]:
        raise ValueError(f"{csv}: {len(gold)} pairs, but the STS-B split (models/data/stsb_split.json) was "
                         f"drawn on the {facts['rows']}-pair dev file; pass the original sts-dev.csv")
    if sha256(csv) != facts["csv_sha256"]:
        warnings.warn(f"{csv} differs from the file the split was drawn on (sha256); the row indices are "
                      "used as they are", stacklevel=2)
    return [s1[i] for i in idx], [s2[i] for i in idx], np.asarray(gold)[idx]


def _write(path: Path, csv: Path) -> None:      # used once, to create the stored file
    split = make_split()
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"description": "STS-B dev (sts-dev.csv) split into a tuning and a held-out half: 0-based row "
                          "indices only (the data stays outside the repository); see models/stsb_split.py",
           "seed": SEED, "rows": N_ROWS, "csv_sha256": sha256(csv),
           "draw": "numpy.random.default_rng(seed).permutation(rows); first rows//2 -> tuning, rest -> held-out",
           "halves": {h: split[h].tolist() for h in HALVES}}
    text = json.dumps(doc, indent=1)
    text = re.sub(r"\[\s+([0-9,\s]+?)\s+\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]", text)
    path.write_text(text + "\n")


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stsb", default=None, help="STS-B folder or sts-dev.csv")
    args = ap.parse_args(argv)
    for half in HALVES:
        s1, _, gold = load_half(half, args.stsb)
        print(f"{half:9s} {len(s1)} pairs, mean score {gold.mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
