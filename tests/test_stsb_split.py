"""models/stsb_split.py: the fixed STS-B dev split (tuning / held-out halves, row indices only)."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import stsb_split  # noqa: E402


def _csv():
    try:
        return stsb_split.csv_path()
    except FileNotFoundError as e:
        pytest.skip(f"STS-B dev csv absent ({e}); it lives outside the repository (../shared/data/stsb/)")


def test_halves_disjoint_and_cover_every_row():
    tune, held = stsb_split.indices("tuning"), stsb_split.indices("held-out")
    assert len(tune) == len(held) == stsb_split.N_ROWS // 2
    assert not set(tune.tolist()) & set(held.tolist())
    assert np.array_equal(np.sort(np.concatenate([tune, held])), np.arange(stsb_split.N_ROWS))
    assert np.all(np.diff(tune) > 0) and np.all(np.diff(held) > 0)


def test_stored_split_is_the_seeded_draw():
    """Deterministic: the stored indices are exactly the draw with the fixed seed, every time."""
    a, b = stsb_split.make_split(), stsb_split.make_split()
    for half in stsb_split.HALVES:
        assert np.array_equal(a[half], b[half])
        assert np.array_equal(a[half], stsb_split.indices(half))
    assert stsb_split._stored()["seed"] == stsb_split.SEED
    other = stsb_split.make_split(seed=stsb_split.SEED + 1)
    assert not np.array_equal(other["tuning"], a["tuning"])


def test_split_file_holds_no_sentences():
    """The licence forbids copying the data: the stored file is indices and facts only."""
    doc = stsb_split._stored()
    assert set(doc) == {"description", "seed", "rows", "csv_sha256", "draw", "halves"}
    assert all(isinstance(i, int) for h in doc["halves"].values() for i in h)


def test_unknown_half():
    with pytest.raises(ValueError, match="held-out"):
        stsb_split.indices("test")


def test_load_half_reads_the_rows_of_the_csv():
    csv = _csv()
    from models.eval_sts import load_stsb
    s1, s2, gold = load_stsb(csv)
    seen = set()
    for half in stsb_split.HALVES:
        h1, h2, hg = stsb_split.load_half(half, csv)
        idx = stsb_split.indices(half)
        assert h1 == [s1[i] for i in idx] and h2 == [s2[i] for i in idx]
        assert np.array_equal(hg, gold[idx])
        assert stsb_split.load_half(half, csv.parent)[0] == h1          # folder or file
        assert load_stsb(csv, half=half)[0] == h1                        # eval_sts's half= support
        seen |= set(zip(h1, h2, hg.tolist()))
    assert len(seen) == len(set(zip(s1, s2, gold.tolist())))


def test_load_half_refuses_another_file(tmp_path):
    csv = _csv()
    short = tmp_path / "sts-dev.csv"
    short.write_text("".join(csv.read_text(encoding="utf-8").splitlines(keepends=True)[:10]), encoding="utf-8")
    with pytest.raises(ValueError, match="1500"):
        stsb_split.load_half("tuning", short)


def test_stsb_spearman_half_keeps_the_old_api():
    csv = _csv()
    from models.eval_sts import stsb_spearman
    rng = np.random.default_rng(0)
    vocab = {}

    def encode(sentences):      # a bag-of-words encoder: cheap, deterministic, far from random
        out = np.zeros((len(sentences), 64))
        for r, s in enumerate(sentences):
            for w in s.lower().split():
                if w not in vocab:
                    vocab[w] = rng.standard_normal(64)
                out[r] += vocab[w]
        return out + 1e-6
    full = stsb_spearman(encode, csv, limit=200)
    held = stsb_spearman(encode, csv, half="held-out")
    tune = stsb_spearman(encode, csv, half="tuning")
    assert all(np.isfinite([full, held, tune])) and held != tune
