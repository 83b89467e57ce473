"""ONNX files that keep their weights beside them ("external data"), as ONNX must above protobuf's 2 GB.

A model is written (`save_model`) with its weights in one file `<model file>.data` beside it, a plain name
that travels with it (artifacts, precision variants, Triton version folders; ONNX Runtime and TensorRT look
for it beside the model), when its source kept them so or when it would pass EXTERNAL_DATA_THRESHOLD bytes
serialized; otherwise as one file, as onnx.save writes it. `weight_files` names the files a model needs
beside it and `model_sha256` hashes the model with them, so a changed weights file changes the hash. The
byte work is onnx's own (onnx.save_model's save_as_external_data, onnx.load(load_external_data=False)).
"""
from __future__ import annotations

import stat
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import ExternalDataInfo, convert_model_to_external_data, uses_external_data

from common.hashing import file_sha256

# Serialized bytes above which a model is written with external data: protobuf refuses 2 GiB (onnx.checker's
# MAXIMUM_PROTOBUF), and a later step adds to the model (metadata, Q/DQ scales, casts).
EXTERNAL_DATA_THRESHOLD = 1 << 30
# Integer tensors under this many bytes are written inside the model file even with external data: shapes,
# pads, axes and indices, which ONNX's shape inference reads (and a small layer's int32 bias, no matter).
SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
SHAPE_BYTES = 1024
DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data (ONNX Runtime's quantizer names its own files so too)


class WeightsFileError(ValueError):
    """An ONNX file's external data cannot travel with it: not a plain name beside it, missing, or itself."""


def data_file(model_file: str | Path) -> Path:
    """The weights file `save_model` writes beside `model_file` when it writes external data."""
    model_file = Path(model_file)
    return model_file.with_name(model_file.name + DATA_SUFFIX)


def _node_tensors(nodes) -> list[onnx.TensorProto]:
    found = []
    for node in nodes:
        for attr in node.attribute:
            found += [attr.t] if attr.HasField("t") else []
            found += list(attr.tensors)
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                found += _graph_tensors(graph)
    return found


def _graph_tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    sparse = [t for s in graph.sparse_initializer for t in (s.values, s.indices)]
    return [*graph.initializer, *sparse, *_node_tensors(graph.node)]


def weight_files(model_file: str | Path, nested: bool = False) -> list[str]:
    """The files beside an ONNX file that hold its weights (saved with external data, as models over 2 GB
    must be); [] for a self-contained file or a plan. They must be plain names in its folder: that is
    where ONNX Runtime looks for them, and what the server's version folder can hold (WeightsFileError).
    `nested` also accepts paths below its folder ("weights/part0", as some exporters write them), which
    onnx reads and an import writes again as one file; never a path out of the folder."""
    model_file = Path(model_file)
    if model_file.suffix != ".onnx":
        return []
    model = onnx.load(str(model_file), load_external_data=False)
    tensors = _graph_tensors(model.graph) + [t for f in model.functions for t in _node_tensors(f.node)]
    names = sorted({ExternalDataInfo(t).location for t in tensors if uses_external_data(t)})
    for name in names:
        if not _inside(model_file.parent, name, nested):
            where = "inside its folder can be imported" if nested else "beside it can be served"
            raise WeightsFileError(f"{model_file} keeps weights in {name!r}: only a file {where} "
                                   "(save it with onnx.save(..., save_as_external_data=True, location=<a file name>))")
        if not (model_file.parent / name).is_file():
            raise WeightsFileError(f"{model_file} keeps weights in {name}, which is not "
                                   + ("there" if Path(name).name != name else "beside it"))
        if Path(name) == Path(model_file.name):
            raise WeightsFileError(f"{model_file} names itself as its weights file")
    return names


def _inside(folder: Path, name: str, nested: bool) -> bool:
    """`name` is a plain file name (or, `nested`, a relative path that stays below `folder`)."""
    path = Path(name)
    if not nested or path.is_absolute() or ".." in path.parts or not path.parts:
        return path.name == name and name not in ("", ".", "..")
    return (folder / path).resolve().is_relative_to(folder.resolve())


def model_sha256(model_file: str | Path) -> str:
    """sha256 of an ONNX file followed by its weights files (weight_files, in name order, also below its folder: an
    import's source): the file's own sha256 when it keeps its weights inside (and for a plan), and a hash that
    changes with either file otherwise."""
    model_file = Path(model_file)
    try:
        names = weight_files(model_file, nested=True)
    except DecodeError:  # no ONNX model (a torn or overwritten file): its bytes alone, which its callers compare
        names = []
    return file_sha256(model_file, *(model_file.parent / name for name in names))


def give_model_mode(model_file: str | Path, names: list[str]) -> None:
    """Give the weights files `names` beside `model_file` the model file's mode. onnx creates them readable by
    their owner only (0600) where the model file gets the umask's mode: a server running as another user (a
    container's, over a mounted repository) would read the model but not its weights."""
    model_file = Path(model_file)
    mode = stat.S_IMODE(model_file.stat().st_mode)
    for name in names:
        (model_file.parent / name).chmod(mode)


def save_model(model: onnx.ModelProto, path: str | Path, external: bool = False,
               threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """Write `model` to `path`: with every weight in `data_file(path)` when `external` (its source kept its
    weights so) or when it serializes to more than `threshold` bytes, else as one file (onnx.save's bytes); the
    weights file with the model file's mode. A weights file left there by an earlier write goes first (onnx
    appends to one it finds). Small integer tensors (shapes, pads, axes) stay in the model file: ONNX's shape
    inference, which ONNX Runtime runs as it loads a model, reads their values and fails on external ones
    ("Cannot parse data from external tensors"). Like
    onnx.save_model, writing external data moves the weights out of `model`."""
    path = Path(path)
    data = data_file(path)
    data.unlink(missing_ok=True)
    if external or model.ByteSize() > threshold:
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location=data.name, size_threshold=0)
        for tensor in _graph_tensors(model.graph):
            if uses_external_data(tensor) and tensor.data_type in SHAPE_TYPES and len(tensor.raw_data) < SHAPE_BYTES:
                tensor.data_location = onnx.TensorProto.DEFAULT  # kept in the model file
                del tensor.external_data[:]
        onnx.save_model(model, str(path))  # writes the tensors marked external to `data`
        give_model_mode(path, [data.name] if data.exists() else [])
    else:
        onnx.save_model(model, str(path))
    return path


def save_like(model: onnx.ModelProto, path: str | Path, source: str | Path,
              threshold: int = EXTERNAL_DATA_THRESHOLD) -> Path:
    """`save_model` with external data where the `source` file (`path` itself for a rewrite) keeps its weights
    beside it: a variant is written as its model was."""
    return save_model(model, path, external=bool(weight_files(source)), threshold=threshold)
