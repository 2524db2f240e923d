"""Reading and writing ONNX models whose weights may live in external data files.

A model above 2 GiB cannot be one protobuf: its weights are *external data*, raw bytes in files
beside the ``.onnx`` that each tensor names (``location``, ``offset``, ``length``). The bridge
never loads those bytes into the model:

* :func:`load_model` reads the graph only and makes every external location absolute, so the
  model can be handed around, rewritten and copied without knowing where it came from;
* :func:`session_source` serialises the graph for an onnxruntime session with the locations made
  relative to one folder, which the session is told (``session.model_external_initializers_
  file_folder_path``): onnxruntime reads the weights from the original files itself;
* :func:`save_model` writes a model atomically: the weights are streamed, 16 MiB at a time, from
  wherever they are into ``OUT.data`` beside ``OUT`` (offsets aligned to 4 KiB, so onnxruntime
  can map them), both through temporary files renamed at the end. An inline model that fits in
  one protobuf is written as one file, as before.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import DtypeError, InvalidArgument
from ..paths import atomic_file, check_output_path

__all__ = ["load_model", "has_external_data", "data_files", "session_source", "configure_session",
           "save_model", "tensor_value", "tensor_dims", "check_model_paths", "EXTERNAL_THRESHOLD"]

EXTERNAL_THRESHOLD = 1024     # bytes: tensors at least this large go to the data file
_INLINE_LIMIT = 1 << 30       # a model above this many bytes inline is written with external data
_ALIGN = 4096
_CHUNK = 16 << 20
_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def _tensors(graph) -> Iterator:
    """Every TensorProto of ``graph``: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _tensors(sub)


def _external(model) -> list:
    from onnx import TensorProto
    return [t for t in _tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]


def _info(t) -> dict:
    return {e.key: e.value for e in t.external_data}


def _set_info(t, **values) -> None:
    kept = [(e.key, e.value) for e in t.external_data if e.key not in values]
    del t.external_data[:]
    for k, v in [*kept, *values.items()]:
        e = t.external_data.add()
        e.key, e.value = k, str(v)


def has_external_data(model) -> bool:
    """Whether any tensor of ``model`` keeps its bytes in an external file."""
    return bool(_external(model))


def load_model(model_or_path: Any):
    """An ``onnx.ModelProto`` of a path (external data not read, locations made absolute) or a
    copy of a ModelProto. A missing or unreadable file, or a missing data file, raises
    :class:`~kvcl.errors.InvalidArgument` naming ``model``."""
    import onnx
    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        if not path.is_file():
            raise InvalidArgument(f"model: no such file {str(path)!r}")
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX model
            raise InvalidArgument(f"model: {str(path)!r} is not a readable ONNX model ({exc})") from None
        folder = path.resolve().parent
        for t in _external(model):
            info = _info(t)
            where = folder / info.get("location", "")
            if not where.is_file():
                raise InvalidArgument(f"model: the external data file {info.get('location', '')!r} of tensor "
                                      f"{t.name!r} is not in {str(folder)!r}")
            _set_info(t, location=str(where))
        return model
    if isinstance(model_or_path, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(model_or_path)
        return model
    raise DtypeError(f"model_or_path: expected a path or onnx.ModelProto, got {type(model_or_path).__name__}")


def data_files(model) -> set:
    """The absolute paths of the external data files ``model`` reads."""
    return {str(Path(_info(t)["location"]).resolve()) for t in _external(model)}


@contextlib.contextmanager
def _locations_relative_to(model, folder: str):
    """Within the block, every external location is relative to ``folder``."""
    saved = [(t, _info(t)["location"]) for t in _external(model)]
    try:
        for t, loc in saved:
            _set_info(t, location=os.path.relpath(loc, folder))
        yield
    finally:
        for t, loc in saved:
            _set_info(t, location=loc)


def session_source(model) -> "tuple[bytes, str | None]":
    """``(serialised model, folder)`` for an onnxruntime session: ``folder`` (None for a model
    without external data) is the folder the relative external locations start from; give it to
    the session with :func:`configure_session`."""
    files = data_files(model)
    if not files:
        return model.SerializeToString(), None
    folder = os.path.commonpath([os.path.dirname(f) for f in files])
    with _locations_relative_to(model, folder):
        return model.SerializeToString(), folder


def configure_session(options, folder: "str | None") -> None:
    """Point ``options`` (``onnxruntime.SessionOptions``) at the external data ``folder``."""
    if folder is not None:
        options.add_session_config_entry(_FOLDER_KEY, folder)


def _read(location: str, offset: int, length: int) -> bytes:
    with open(location, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise InvalidArgument(f"model: external data file {location!r} ends before byte {offset + length}")
    return data


def _nbytes(t) -> "int | None":
    from onnx import helper
    try:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None
    return int(np.prod(t.dims, dtype=np.int64)) * itemsize


def tensor_dims(t) -> tuple:
    return tuple(int(d) for d in t.dims)


def tensor_value(t) -> np.ndarray:
    """The numpy value of a TensorProto, reading external data (absolute location) if it has any."""
    from onnx import TensorProto, numpy_helper
    if t.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(t)
    info = _info(t)
    length = int(info["length"]) if "length" in info else _nbytes(t)
    inline = TensorProto()
    inline.CopyFrom(t)
    del inline.external_data[:]
    inline.data_location = TensorProto.DEFAULT
    inline.raw_data = _read(info["location"], int(info.get("offset", 0)), length)
    return numpy_helper.to_array(inline)


def check_model_paths(output: "str | os.PathLike", sources: "list[str | os.PathLike]" = ()) -> Path:
    """``output`` as a Path if a model can be written there without replacing one of ``sources``
    (the input model and the data files it reads); else InvalidArgument naming ``output``."""
    out = check_output_path(output, "output")
    data = out.with_name(out.name + ".data")
    taken = {str(Path(s).resolve()) for s in sources}
    if str(out.resolve()) in taken:
        raise InvalidArgument(f"output: {str(output)!r} is the input model; write the result somewhere else")
    if str(data.resolve()) in taken:
        raise InvalidArgument(f"output: {str(output)!r} would write its weights to {str(data)!r}, a data file "
                              "the input model reads; write the result somewhere else")
    return out


def save_model(model, path: "str | os.PathLike", *, external: "bool | None" = None) -> "list[Path]":
    """Write ``model`` to ``path`` atomically; return the files written (``path``, and
    ``path.data`` where the weights went there).

    ``external`` None: weights go to ``path.data`` when the model has external data or is larger
    than 1 GiB inline; else one file. The model is left as it was (its external tensors still
    name their original files). A path that cannot be written, or one that would replace a file
    the model reads, raises :class:`~kvcl.errors.InvalidArgument` before anything is written.
    """
    path = check_model_paths(path, data_files(model))
    if external is None:
        external = has_external_data(model) or model.ByteSize() > _INLINE_LIMIT
    if not external:
        data = model.SerializeToString()
        with atomic_file(path) as f:
            f.write(data)
        return [path]
    from onnx import TensorProto
    data_path = path.with_name(path.name + ".data")
    moved = []   # (tensor, what to restore)
    try:
        with atomic_file(data_path) as out:
            for t in _tensors(model.graph):
                if t.data_location == TensorProto.EXTERNAL:
                    info = _info(t)
                    length = int(info["length"]) if "length" in info else _nbytes(t)
                    moved.append((t, dict(info)))
                    offset = _pad(out)
                    _copy(info["location"], int(info.get("offset", 0)), length, out)
                elif t.HasField("raw_data") and len(t.raw_data) >= EXTERNAL_THRESHOLD:
                    raw = t.raw_data
                    moved.append((t, raw))
                    offset = _pad(out)
                    out.write(raw)
                    length = len(raw)
                    t.ClearField("raw_data")
                    t.data_location = TensorProto.EXTERNAL
                else:
                    continue
                del t.external_data[:]
                _set_info(t, location=data_path.name, offset=offset, length=length)
            graph = model.SerializeToString()
            with atomic_file(path) as f:   # inside: the data file is renamed only if this succeeds
                f.write(graph)
    finally:
        for t, was in moved:
            del t.external_data[:]
            if isinstance(was, dict):
                _set_info(t, **was)
            else:
                t.data_location = TensorProto.DEFAULT
                t.raw_data = was
    return [path, data_path]


def _pad(f) -> int:
    pos = f.tell()
    gap = -pos % _ALIGN
    if gap:
        f.write(b"\0" * gap)
    return pos + gap


def _copy(location: str, offset: int, length: int, out) -> None:
    """Stream ``length`` bytes of ``location`` from ``offset`` to ``out``; runs of zeros become
    holes (seeked over) where the file system keeps them sparse."""
    with open(location, "rb") as src:
        src.seek(offset)
        left = length
        zeros = bytes(_CHUNK)
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise InvalidArgument(f"model: external data file {location!r} ends before byte {offset + length}")
            if chunk == zeros[:len(chunk)]:
                out.seek(len(chunk), os.SEEK_CUR)
            else:
                out.write(chunk)
            left -= len(chunk)
    out.truncate(out.tell())   # a hole at the end still counts in the size
