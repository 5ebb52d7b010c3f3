"""Measure: what a saved model costs when onnxruntime runs it -- resident bytes and latency.

``measure_file(path, feeds)`` runs in a fresh Python process (so nothing of this process is
counted): it reads the process's resident set size (Linux ``/proc/self/status`` VmRSS, after
``malloc_trim`` so freed buffers are not counted), creates an onnxruntime session with 1 intra-op
thread (bfc's custom-op library registered when present), reads VmRSS again, and times ``run`` on
``feeds`` (median of repeated runs after two warm-ups, at most ``BUDGET_S`` seconds).  Returns
(resident bytes added by the session, median latency in ms), or None where the platform has no
/proc or the run fails (the report then says "not measured").
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

BUDGET_S = 1.5
_CHILD = r"""
import ctypes, json, sys, time
import numpy as np
def rss():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
from bfc.runtime import session
feeds = dict(np.load(sys.argv[2]))
before = rss()
sess = session(sys.argv[1], threads=1)
after = rss()
sess.run(None, feeds); sess.run(None, feeds)
times, t_end = [], time.perf_counter() + float(sys.argv[3])
while len(times) < 5 or (time.perf_counter() < t_end and len(times) < 200):
    t = time.perf_counter(); sess.run(None, feeds); times.append(time.perf_counter() - t)
print(json.dumps({"resident": after - before, "ms": 1e3 * float(np.median(times))}))
"""


def measure_file(path, feeds: dict, budget_s: float = BUDGET_S) -> tuple[int, float] | None:
    """(resident bytes of the session, median ms per run) of the model at ``path`` on ``feeds``."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="bfc-measure-") as tmp:
        npz = Path(tmp) / "feeds.npz"
        np.savez(npz, **feeds)
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(npz), str(budget_s)],
                              capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        return None
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return int(out["resident"]), float(out["ms"])


def first_rows(feeds: dict, n: int = 1) -> dict:
    """The first ``n`` samples of every batched input (a latency measurement at batch n)."""
    return {k: (v[:n] if np.ndim(v) else v) for k, v in feeds.items()}
