"""Normalize: bring a model to the form the later passes match (opset upgrade; constant weight chains).

``normalize(loaded, preferred_opset)`` -> LoadedModel (an upgraded model is a new ModelProto; the input is never
modified).
Opsets: a model below ``model_io.files.MIN_OPSET`` (13) but at least ``model_io.files.MIN_UPGRADE_OPSET`` (7)
is upgraded with ``onnx.version_converter.convert_version`` to opset 13;
the LoadedModel's ``model`` becomes the upgraded copy (calibration, export and the output use it)
and its notes say so.  When the converter fails the run stops with a one-line
UnsupportedError naming the opset and the fix.
Weight chains are folded where the sites are found (``bfc.passes.fold``).
"""
from __future__ import annotations

from dataclasses import replace

import onnx
from onnx import version_converter

from bfc.errors import UnsupportedError
from bfc.passes.export import keep_io_types
from bfc.passes.model_io.files import MIN_OPSET, default_opset
from bfc.passes.products import LoadedModel


def upgrade_opset(model: onnx.ModelProto, where: str = "model") -> tuple[onnx.ModelProto, str | None]:
    """``model`` at opset >= MIN_OPSET: itself, or an upgraded copy with a note saying what was done."""
    op = default_opset(model)
    if op >= MIN_OPSET:
        return model, None
    fix = (f"re-export it at opset >= {MIN_OPSET} (e.g. torch.onnx.export(..., opset_version=17))")
    try:
        new = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors and more
        first = (str(e).strip().splitlines() or ["conversion failed"])[0][:200]
        raise UnsupportedError(f"{where} uses ONNX opset {op} and onnx's version converter cannot upgrade it to "
                               f"{MIN_OPSET} ({first}); {fix}") from None
    got = default_opset(new)
    if got < MIN_OPSET:
        raise UnsupportedError(f"{where} uses ONNX opset {op} and onnx's version converter reached only opset "
                               f"{got}; {fix}")
    return new, f"upgraded from ONNX opset {op} to {got} (onnx.version_converter); the output has opset {got}"


def normalize(loaded: LoadedModel, preferred_opset: int) -> LoadedModel:
    """The normalize stage: the opset upgrade to MIN_OPSET (see the module doc), and further to
    ``preferred_opset`` when the run's layer forms need it (rotated low-bit codes unpacked in the
    graph: opset 18); a failed upgrade to the preferred opset is a note (those forms are then not
    candidates), not an error.  The weight chains are folded where the sites are found."""
    model, note = upgrade_opset(loaded.model, loaded.name)
    notes = () if note is None else (f"model {note}",)
    if default_opset(model) < preferred_opset:
        try:
            model = version_converter.convert_version(model, preferred_opset)
            notes = (f"model upgraded from ONNX opset {loaded.opset} to {preferred_opset} (onnx.version_converter: "
                     "the rotated low-bit forms unpack their codes with opset-18 ops); the output has opset "
                     f"{preferred_opset}",)
        except Exception as e:  # noqa: BLE001 - the converter raises bare RuntimeErrors and more
            first = (str(e).strip().splitlines() or ["conversion failed"])[0][:200]
            notes += (f"model kept at ONNX opset {default_opset(model)}: onnx's version converter cannot upgrade it "
                      f"to {preferred_opset} ({first}), so the rotated low-bit forms are not candidates",)
    if model is loaded.model:
        return loaded
    keep_io_types(model, loaded.model)
    return replace(loaded, model=model, opset=default_opset(model), upgraded=True, notes=loaded.notes + notes)
