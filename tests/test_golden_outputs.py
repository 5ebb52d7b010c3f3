"""Output bytes unchanged by restructuring: every recorded run (tests/golden_outputs.py) gives the
same sha256 as recorded in tests/data/golden_outputs.json."""
import json

import golden_outputs


def test_output_bytes_match_the_record():
    recorded = json.loads(golden_outputs.RECORD.read_text())
    got = golden_outputs.digests()
    changed = sorted(k for k in recorded if got.get(k) != recorded[k])
    assert set(got) == set(recorded)
    assert not changed, f"output bytes changed for {changed}"
