"""``bfc.optimize`` and ``bfc.save``: the Python front door of the pipeline (``bfc.passes.pipeline``).

    model, report = bfc.optimize("model.onnx", bfc.OptimizeConfig(precision="int8"))
    bfc.save(model, "model.bfc.onnx")            # the same bytes as `bfc optimize ... -o`

or, streaming to a file and verifying from it (the model is then not returned):

    _, report = bfc.optimize("model.onnx", config, output="model.bfc.onnx")
"""
from __future__ import annotations

from bfc.config import OptimizeConfig
from bfc.passes.model_io.files import save_model
from bfc.passes.pipeline import optimize as run


def optimize(model_or_path, config: OptimizeConfig | None = None, *, output=None, on_event=None, evaluate=None):
    """Optimize a model (path or onnx.ModelProto; the input is never modified).

    Returns ``(onnx.ModelProto or None, Report)``; with ``output`` the model is written there
    atomically and verified from the file, and None is returned in its place.  ``on_event``
    receives the typed progress events of ``bfc.passes.events``.  ``evaluate`` (model path -> metric,
    higher is better) with ``config.max_metric_drop``: the allocator searches its budget against it.
    """
    return run(model_or_path, config, output=output, on_event=on_event, evaluate=evaluate)


def save(model, path) -> None:
    """Write ``model`` atomically (external data beside it above 2 GB), as ``bfc optimize -o`` does."""
    save_model(model, path)
