"""Save: the output model written atomically, checked BEFORE it is moved into place.

``save(rewritten, out, loaded)`` -> SavedModel.  The model is written tensor by tensor under a
temporary name in the output's folder (``load.save_model``); the written file is read back as a
skeleton and passes the ONNX checker (``export.check_file``) before it is renamed to ``out``, so
a failed check leaves nothing at ``out``.  A run that rewrote nothing (even when the opset was
upgraded for planning) copies the input's bytes unchanged, external-data files included (``_copy_input``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from bfc.errors import ModelError
from bfc.passes import load as model_files
from bfc.passes.export import check_file
from bfc.passes.products import LoadedModel, RewrittenModel, SavedModel


def save(rewritten: RewrittenModel, out: Path, loaded: LoadedModel) -> SavedModel:
    """The save stage (see the module doc)."""
    if not rewritten.changed and not isinstance(loaded.source, onnx.ModelProto):
        return _copy_input(loaded, out)
    model = rewritten.model
    if model is loaded.model:
        model = _copy(model)          # saving may move a skeleton's references to the output's data
    model_files.save_model(model, out, loaded.files, base=rewritten.base, check=check_file)
    external = rewritten.nbytes > model_files.PROTO_LIMIT     # save_model wrote <out>.data beside it
    data = Path(str(out) + ".data")
    return SavedModel(out, out.stat().st_size + (data.stat().st_size if external else 0))


def _copy_input(loaded: LoadedModel, out: Path) -> SavedModel:
    """The input's bytes at ``out``; its external-data files beside it under their own names (the same
    relative layout).  In the input's own folder those files are already there: the copy of the model
    file refers to them (nothing the input reads is written)."""
    src = Path(loaded.source)
    folder = out.parent if str(out.parent) else Path(".")
    total = 0
    for data in loaded.files[1:]:
        dst = folder / Path(data).relative_to(src.parent)
        if not (dst.exists() and os.path.samefile(dst, data)):
            _copy_atomic(Path(data), dst)
        total += dst.stat().st_size
    _copy_atomic(src, out)
    return SavedModel(out, out.stat().st_size + total)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _copy_atomic(src: Path, out: Path) -> None:
    folder = out.parent if str(out.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".bfc-", dir=folder)
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise ModelError(f"cannot write {out} ({e.strerror}); check free space and permissions") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
