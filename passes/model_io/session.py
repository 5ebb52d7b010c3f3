"""Running a model in onnxruntime for calibration and verification (no graph change).

``session(model_or_path, threads)`` is ``bfc.runtime.session``, the one session factory (bfc's
custom-op library registered when present); ``run(model_or_session, feeds)`` runs it and turns an
onnxruntime failure into a one-line ModelError that names the fix (generated feeds: give real
inputs with ``--calibration``).
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort

from bfc.errors import ModelError
from bfc.passes.model_io.feeds import GeneratedFeeds
from bfc.runtime import session

__all__ = ["run", "session"]


def _run_options() -> ort.RunOptions:
    """onnxruntime logs a failed run as an ``[E:onnxruntime:...]`` line on stderr before raising; the
    raised error becomes bfc's one-line message, so the run's own log is off (severity 4: fatal only)."""
    ro = ort.RunOptions()
    ro.log_severity_level = 4
    return ro


def run(model_or_sess, feeds: dict, outputs=None) -> list[np.ndarray]:
    sess = model_or_sess if isinstance(model_or_sess, ort.InferenceSession) else session(model_or_sess)
    try:
        return sess.run(outputs, feeds, _run_options())
    except Exception as e:  # noqa: BLE001
        if isinstance(feeds, GeneratedFeeds):
            raise ModelError(f"onnxruntime failed to run the model on the inputs bfc generated from its declared "
                             f"shapes ({str(e).splitlines()[0][:300]}); give real model inputs with "
                             "--calibration FILE.npz") from None
        raise ModelError(f"onnxruntime failed to run the model on the given inputs "
                         f"({str(e).splitlines()[0][:300]}); check the input shapes and types") from None
