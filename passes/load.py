"""Load: the pipeline's first stage, a model path or ModelProto as a ``LoadedModel``.

``load(source, output)`` -> LoadedModel.  A path is opened as a skeleton (``model_io.files.open_skeleton``:
checked, its weights left in their files, ``base`` the file its references are relative to) together
with the files it reads; a ModelProto is checked and used as it is (``base`` None).  With ``output``,
the output path is checked against those files first (bfc never overwrites what it reads).
"""
from __future__ import annotations

import os
from pathlib import Path

from bfc.passes.model_io.files import as_model, check_output_path, default_opset, input_files, open_skeleton
from bfc.passes.model_io.stream import model_size
from bfc.passes.products import LoadedModel


def load(source, output: Path | None = None) -> LoadedModel:
    """The load stage: a model path (read as a skeleton, its weights left in their files) or a
    ModelProto (checked); ``output``, when given, may be none of the files the input reads."""
    if not isinstance(source, (str, os.PathLike)):
        model = as_model(source)          # a ModelProto (anything else: a typed error)
        return LoadedModel(model, source, None, (), model.graph.name or "model", model_size(model, None),
                           default_opset(model))
    model, base = open_skeleton(source)
    files = tuple(input_files(source, model))
    if output is not None:
        check_output_path(output, files)
    return LoadedModel(model, source, base, files, str(source), model_size(model, base), default_opset(model))
