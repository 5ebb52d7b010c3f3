"""Save: the output model written atomically, checked BEFORE it is moved into place.

``save(rewritten, out, loaded)`` -> SavedModel.  The model is written tensor by tensor under a
temporary name in the output's folder (``model_io.files.save_model``); the written file is read back as a
skeleton and passes the ONNX checker (``export.check_file``) before it is renamed to ``out``, so
a failed check leaves nothing at ``out``.  A run that rewrote nothing (even when the opset was
upgraded for planning) copies the input's bytes unchanged, external-data files included (``model_io.files.copy_model_files``).
"""
from __future__ import annotations

from pathlib import Path

import onnx

from bfc.passes.export import check_file
from bfc.passes.model_io import files
from bfc.passes.products import LoadedModel, RewrittenModel, SavedModel


def save(rewritten: RewrittenModel, out: Path, loaded: LoadedModel) -> SavedModel:
    """The save stage (see the module doc)."""
    if not rewritten.changed and not isinstance(loaded.source, onnx.ModelProto):
        return _copy_input(loaded, out)
    model = rewritten.model
    if model is loaded.model:
        model = _copy(model)          # saving may move a skeleton's references to the output's data
    files.save_model(model, out, loaded.files, base=rewritten.base, check=check_file)
    external = rewritten.nbytes > files.PROTO_LIMIT     # save_model wrote <out>.data beside it
    data = Path(str(out) + ".data")
    return SavedModel(out, out.stat().st_size + (data.stat().st_size if external else 0))


def _copy_input(loaded: LoadedModel, out: Path) -> SavedModel:
    """The input's bytes at ``out``, its external-data files beside it (``model_io.files.copy_model_files``)."""
    return SavedModel(out, files.copy_model_files(Path(loaded.source), loaded.files[1:], out))


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out
