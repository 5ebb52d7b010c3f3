"""Model files: safe open and atomic save of ONNX models, the files a model reads, byte copies.

Matches: a path to an ``.onnx`` file (with or without external data) or a ModelProto.
Ensures on open (``open_skeleton``): the file parses, every external-data location resolves
inside the model's own folder (absolute paths, ``..`` escapes and symlinks leaving the
folder are rejected) and holds the bytes its tensor needs, the default-domain opset is in
``[MIN_OPSET, MAX_OPSET]``, the IR version is one onnx knows, and the graph passes
``onnx.checker``.  The model is read without its weights (``model_io.stream``: a
skeleton whose big initializers are references into the model or its data files); the
checker sees each reference as a scalar of its type (it checks the graph; the references
are checked against their files).  ``load_model`` reads the weights in as well.
Ensures on save: the input file is never touched (the output must be another
path), the output is written to a temporary name in the target folder and renamed
into place, tensor by tensor (one chunk of a weight in memory at a time), models over
2 GB are written with external data (``<name>.data`` next to the model, offsets aligned
to ``stream.ALIGN``), and the IR version is one onnxruntime accepts (``<= MAX_IR``).
No algebra: the graph is not changed except for ``ir_version``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from bfc.errors import ModelError, UnsupportedError
from bfc.passes.model_io import stream
from bfc.passes.model_io.stream import PROTO_LIMIT, proto_size

MIN_OPSET = 13      # per-axis DequantizeLinear, Reshape with -1, Gemm-13
MIN_UPGRADE_OPSET = 7   # opsets 7..12 are read and upgraded to MIN_OPSET (bfc.passes.normalize)
MAX_OPSET = 26      # newest default-domain opset onnxruntime 1.31 loads
MAX_IR = 13         # onnx >= 1.23 writes IR 14, which onnxruntime 1.31 rejects


def _check_external_inside(model: onnx.ModelProto, folder: Path, own: str | None = None) -> None:
    """Every external-data location resolves inside ``folder``; ``own``: the model file's name (a
    reference to it is one of its own raw_data fields, ``bfc.passes.model_io.stream``)."""
    root = folder.resolve()
    tensors = list(onnx.external_data_helper._get_all_tensors(model))
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        if own is not None and loc == own:
            continue
        if not loc or os.path.isabs(loc):
            raise ModelError(f"tensor {t.name!r} points to external data {loc!r} outside the model's "
                             "folder; bfc only reads external data from the model's own folder")
        target = (root / loc).resolve()
        if root != target and root not in target.parents:
            raise ModelError(f"tensor {t.name!r} points to external data {loc!r} that escapes the model's "
                             f"folder {root}; move the data file next to the model")
        if not target.is_file():
            raise ModelError(f"tensor {t.name!r} needs external data file {target}, which is missing; "
                             "copy it next to the model")


def _has_external(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in onnx.external_data_helper._get_all_tensors(model))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def check_versions(model: onnx.ModelProto, where: str = "model") -> None:
    op = default_opset(model)
    if not MIN_UPGRADE_OPSET <= op <= MAX_OPSET:
        raise UnsupportedError(f"{where} uses ONNX opset {op}; bfc supports opsets {MIN_UPGRADE_OPSET}..{MAX_OPSET} "
                               f"(below {MIN_OPSET} upgraded to {MIN_OPSET}): convert it first "
                               "(onnx.version_converter.convert_version(model, 17))")
    if not 3 <= model.ir_version <= onnx.IR_VERSION:
        raise UnsupportedError(f"{where} has IR version {model.ir_version}; bfc reads IR 3..{onnx.IR_VERSION}: "
                               "re-export it with a current exporter")


def open_skeleton(path) -> tuple[onnx.ModelProto, Path]:
    """Read and check a model file without its weights: the skeleton of ``bfc.passes.model_io.stream`` (every
    initializer of at least ``stream.STREAM_MIN`` bytes a reference), and the model file its
    references are relative to (``path``, or the file a symbolic link ``path`` points to: onnxruntime
    reads a reference to the model's own bytes through the real file); raises ModelError or
    UnsupportedError with the fix."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give the path of an .onnx model")
    try:
        model = stream.read_skeleton(path)
    except PermissionError as e:
        raise ModelError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except (DecodeError, RuntimeError, ValueError, IndexError, OSError):
        raise ModelError(f"{path} is not an ONNX model (protobuf parse failed: truncated or another "
                         "format); re-export or re-download it") from None
    if not model.HasField("graph") or not model.opset_import or len(model.graph.node) == 0:
        raise ModelError(f"{path} is not an ONNX model (no graph, nodes or opset); re-export it")
    check_versions(model, str(path))
    real = path.resolve()
    _check_external_inside(model, path.parent, real.name)
    base = path
    try:
        if real.parent != path.absolute().parent:           # a link into another folder
            own = [t for t in stream.refs(model) if stream.ref_of(t, real).virtual]
            if len(own) < len(stream.refs(model)):
                for t in own:                 # external data beside the link, raw data in the real file:
                    stream.resolve(t, real)   # the skeleton keeps the latter in memory
            else:
                base = real
        stream.inline_small_refs(model, base)
        stream.check_refs(model, base)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read external data of {path} ({e}); keep the data files next to the model") from None
    try:
        stream.check_skeleton(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "invalid"
        raise ModelError(f"{path} fails the ONNX checker ({first}); fix or re-export the model") from None
    return model, base


def load_model(path) -> onnx.ModelProto:
    """Load and check a model file with its weights (``open_skeleton``, every reference read in)."""
    return stream.materialize(*open_skeleton(path))


def as_model(model_or_path) -> onnx.ModelProto:
    if isinstance(model_or_path, onnx.ModelProto):
        check_versions(model_or_path)
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        return load_model(model_or_path)
    raise ModelError(f"expected an onnx.ModelProto or a path, got {type(model_or_path).__name__}")


def output_ir_version(model: onnx.ModelProto) -> int:
    """Smallest IR version that covers the model's opsets, never above MAX_IR."""
    need = 3
    op = default_opset(model)
    for _rel, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE:
        if ai_onnx >= op:
            need = ir
            break
    return min(MAX_IR, max(need, min(model.ir_version, MAX_IR)))


def input_files(path, model: onnx.ModelProto | None = None) -> list[Path]:
    """The files a model path reads: the model and every external-data file it references
    (resolved; unreadable models give just the path, and loading then reports the problem).
    ``model``: the skeleton already read from ``path`` (``open_skeleton``), so the file is parsed once."""
    path = Path(path)
    files = [path]
    if model is None:
        try:
            model = stream.read_skeleton(path)
        except Exception:  # noqa: BLE001 - open_skeleton reports the exact problem
            return files
    own = path.resolve().name
    for t in onnx.external_data_helper._get_all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if loc and loc != own and path.parent / loc not in files:
                files.append(path.parent / loc)
    return files


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(out, protected=()) -> Path:
    """``out`` as a Path, refused (ModelError) when it, or the ``<out>.data`` file ``save_model`` may write,
    is one of the ``protected`` input files (or a link to one), or its folder is not writable."""
    out = Path(out)
    if isinstance(protected, (str, os.PathLike)):
        protected = [Path(protected)]
    for p in protected:
        p = Path(p)
        for candidate in (out, Path(str(out) + ".data")):
            if _same_file(candidate, p):
                what = "the input model" if p == Path(protected[0]) else f"the input's external data file {p}"
                raise ModelError(f"output {candidate} is {what}; bfc never overwrites what it reads: "
                                 "choose another path with -o")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ModelError(f"output folder {folder} does not exist; create it or choose another -o path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ModelError(f"output folder {folder} is not writable; choose another -o path")
    if out.is_dir():
        raise ModelError(f"output {out} is a folder; give a file name such as {out / 'model.bfc.onnx'}")
    return out


def save_model(model: onnx.ModelProto, out, protected=(), base=None, check=None) -> Path:
    """Atomic write, tensor by tensor (``stream.write_model``); external data (``<name>.data``) when
    the model exceeds 2 GB.  ``protected``: the files the output may not replace (the input model and
    its data, see ``input_files``).  ``base``: the model file ``model``'s references are relative to
    (a skeleton from ``open_skeleton``; it is consumed: its initializers may point to the output's data
    afterwards); None: an in-memory model, left unchanged.  ``check(path)``: called on the written file
    under its temporary name before it is moved into place (raising leaves nothing at ``out``)."""
    out = check_output_path(out, protected)
    folder = out.parent if str(out.parent) else Path(".")
    if base is None and proto_size(model) > PROTO_LIMIT:
        copy = onnx.ModelProto()          # the external layout moves the data out of the proto it writes
        copy.CopyFrom(model)
        model = copy
    model.ir_version = output_ir_version(model)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".bfc-", dir=folder))
    except OSError as e:
        raise ModelError(f"cannot write in {folder} ({e.strerror}); choose another -o path") from None
    try:
        data_name = stream.write_model(model, tmpdir / out.name, base if base is not None else tmpdir / out.name,
                                       out.name + ".data", PROTO_LIMIT)
        if check is not None:
            check(tmpdir / out.name)
        if data_name is not None:
            os.replace(tmpdir / data_name, folder / data_name)
        os.replace(tmpdir / out.name, out)
    except OSError as e:
        raise ModelError(f"cannot write {out} ({e.strerror}); check free space and permissions") from None
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()
    return out


def copy_model_files(src: Path, files, out: Path) -> int:
    """The model file ``src`` copied to ``out`` byte for byte, its external-data ``files`` (``input_files``
    less the model) beside it under their own relative names; returns the bytes at the destination.
    In ``src``'s own folder the data files are already there: the copy of the model file refers to
    them, and nothing the input reads is written.  Each file is written atomically."""
    folder = out.parent if str(out.parent) else Path(".")
    total = 0
    for data in files:
        dst = folder / Path(data).relative_to(src.parent)
        if not (dst.exists() and os.path.samefile(dst, data)):
            _copy_atomic(Path(data), dst)
        total += dst.stat().st_size
    _copy_atomic(src, out)
    return out.stat().st_size + total


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
