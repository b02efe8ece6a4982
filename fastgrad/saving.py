"""Model files: one file, no pickle, so loading can never run code.

Layout (little-endian):

    magic        8 bytes  b"FGMODEL\\0"
    version      uint32   FORMAT_VERSION
    header_len   uint64   bytes of the JSON header that follows
    header       JSON     {"format": "fastgrad.model", "fastgrad_version": ...,
                           "model": architecture, "rng": generator state,
                           "layers_random": each Dropout layer's seed and counter,
                           "compile": null or {"optimizer", "loss", "metrics",
                                     "iterations", "skipped_steps"},
                           "arrays": [...]}
    data         the arrays, each at a 64-byte aligned offset from the start
                 of the data section, in the order the header lists them

Every array entry gives name, dtype (float32, float64 or int64), shape,
offset and nbytes. The loader checks the magic, the version, that the
header fits the file and is JSON of the expected form, that each array's
byte count agrees with its shape and dtype, that arrays lie inside the
file in order without overlap and that nothing trails them, and that
every weight matches the shape the architecture gives it. Any failure is a
``ModelFileError`` (a ``ValueError``).

Saving writes a temporary file in the target's folder and moves it over
the target with ``os.replace``, so an interrupted save leaves the previous
file intact.

``save_model(model, path)`` and ``load_model(path)`` turn a model into such
a file and back; ``write_file`` and ``read_file`` handle the layout.
"""
import json
import os
import struct
import tempfile

import numpy as np

from fastgrad import layers

MAGIC = b"FGMODEL\0"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQ")
_ALIGN = 64
_DTYPES = {"float32": np.dtype("<f4"), "float64": np.dtype("<f8"), "int64": np.dtype("<i8")}
_MAX_HEADER = 64 << 20


class ModelFileError(ValueError):
    """A file that is not a valid fastgrad model file."""


def _no_constant(name):
    raise ValueError(f"{name} is not a number a model file may hold")


def _pad(n):
    return (-n) % _ALIGN


def to_bytes(header, arrays):
    """The file's bytes for header (a JSON-able dict) and arrays (list of
    (name, ndarray)), as ``write_file`` would write them."""
    return b"".join(_chunks(header, arrays))


def _chunks(header, arrays):
    entries, offset = [], 0
    for name, a in arrays:
        a = np.ascontiguousarray(a)
        key = a.dtype.name
        if key not in _DTYPES:
            raise TypeError(f"{name}: cannot store dtype {a.dtype}")
        entries.append({"name": name, "dtype": key, "shape": list(a.shape),
                        "offset": offset, "nbytes": a.nbytes})
        offset += a.nbytes + _pad(a.nbytes)
    header = dict(header, arrays=entries)
    blob = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("utf-8")
    start = _PREFIX.size + len(blob)
    start_pad = _pad(start)
    out = [_PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob) + start_pad), blob,
           b" " * start_pad]   # JSON allows trailing whitespace
    for (_, a), e in zip(arrays, entries):
        out.append(np.ascontiguousarray(a, dtype=_DTYPES[e["dtype"]]).tobytes())
        out.append(b"\0" * _pad(e["nbytes"]))
    return out


def write_file(path, header, arrays):
    """Write header (a JSON-able dict) and arrays (list of (name, ndarray))
    atomically to path."""
    write_atomic(path, _chunks(header, arrays))


def write_atomic(path, chunks):
    """Write the byte strings in chunks to path through a temporary file in
    the same folder, moved over path only once complete."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fastgrad-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_file(path):
    """Return (header, {name: ndarray}) after checking the whole layout."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except IsADirectoryError:
        raise ModelFileError(f"{path}: is a folder, not a model file") from None
    return from_bytes(data, path)


def from_bytes(data, path="<bytes>"):
    """``read_file`` on the file's bytes; path only names them in errors."""
    if len(data) < _PREFIX.size:
        raise ModelFileError(f"{path}: too short to be a fastgrad model file "
                             f"({len(data)} bytes)")
    magic, version, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ModelFileError(f"{path}: not a fastgrad model file (unknown signature)")
    if version != FORMAT_VERSION:
        raise ModelFileError(f"{path}: format version {version} is not supported "
                             f"(this fastgrad reads version {FORMAT_VERSION})")
    if header_len > len(data) - _PREFIX.size or header_len > _MAX_HEADER:
        raise ModelFileError(f"{path}: header length {header_len} exceeds the file "
                             f"({len(data)} bytes); the file is truncated or damaged")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + header_len].decode("utf-8"),
                            parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError, NaN/Infinity and over-long numbers
        raise ModelFileError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("arrays"), list):
        raise ModelFileError(f"{path}: the header lacks the array table")
    base = _PREFIX.size + header_len
    arrays, end = {}, 0
    for i, e in enumerate(header["arrays"]):
        name, dt, shape, off, nbytes = _entry(path, i, e, arrays)
        if off < end:
            raise ModelFileError(f"{path}: array {name!r} overlaps the one before it")
        if base + off + nbytes > len(data):
            raise ModelFileError(f"{path}: array {name!r} extends past the end of the file; "
                                 "the file is truncated")
        count = nbytes // _DTYPES[dt].itemsize
        arrays[name] = np.frombuffer(data, _DTYPES[dt], count, base + off).reshape(shape).copy()
        end = off + nbytes + _pad(nbytes)
    if base + end != len(data):
        raise ModelFileError(f"{path}: {len(data) - base - end} bytes after the last array "
                             "do not belong to it (trailing data or a damaged table)")
    return header, arrays


def _entry(path, i, e, arrays):
    """(name, dtype, shape, offset, nbytes) of array table entry i, checked
    on its own: a new name, a known dtype, a bounded shape whose size agrees
    with nbytes."""
    if not isinstance(e, dict):
        raise ModelFileError(f"{path}: array entry {i} is not an object")
    name, dt, shape = e.get("name"), e.get("dtype"), e.get("shape")
    off, nbytes = e.get("offset"), e.get("nbytes")
    if not isinstance(name, str) or name in arrays:
        raise ModelFileError(f"{path}: array entry {i}: missing or repeated name")
    if not isinstance(dt, str) or dt not in _DTYPES:
        raise ModelFileError(f"{path}: array {name!r} has unknown dtype {dt!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**40 for s in shape):
        raise ModelFileError(f"{path}: array {name!r} has an invalid shape {shape!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
               for v in (off, nbytes)):
        raise ModelFileError(f"{path}: array {name!r} has an invalid offset or size")
    count = 1
    for s in shape:
        count *= s
    if count * _DTYPES[dt].itemsize != nbytes:
        raise ModelFileError(f"{path}: array {name!r} holds {nbytes} bytes but its shape "
                             f"{tuple(shape)} and dtype {dt} need "
                             f"{count * _DTYPES[dt].itemsize}")
    return name, dt, shape, off, nbytes


# -- models ---------------------------------------------------------------
def save_model(model, filepath, overwrite=True):
    """Write ``model`` to ``filepath``. A name ending in ``.keras`` gets a
    Keras 3 archive (fastgrad.keras_format); ``.h5``/``.hdf5`` are refused
    (weights only: ``model.save_weights``); any other name gets this
    module's format: architecture, weights, optimizer configuration and
    state, and the random generators' state (shuffling, dropout).
    ``model.save(filepath)`` calls this; ``overwrite`` is accepted for Keras
    compatibility (the file is always replaced, atomically)."""
    from fastgrad import keras_format

    if keras_format.save_kind(filepath) == "keras":
        keras_format.save_model(model, filepath)
        return
    if not model.built:
        raise ValueError("model: it has no weights yet; build it (fit, predict, or give "
                         "the first layer input_dim) before saving")
    write_file(filepath, *describe(model))


def describe(model):
    """(header, arrays) of this format for ``model``; a model not built yet
    (as pickling stores it) has input_dim None and no arrays."""
    from fastgrad import __version__

    if model.built:   # a known input width: the weights are made on first use
        model._require_built()
    header = {
        "format": "fastgrad.model", "fastgrad_version": __version__,
        "model": {"class_name": "Sequential", "config": {
            "name": model.name, "dtype": model.dtype.name, "seed": model.seed,
            "input_dim": model.input_dim if model.built else None,
            "layers": [layers.serialize(layer) for layer in model.layers]}},
        "rng": model._rng.bit_generator.state,
        "layers_random": {layer.name: {"seed": layer._seed, "counter": layer.counter}
                          for layer in model.layers if hasattr(layer, "counter")},
        "compile": None,
    }
    arrays = []
    if model.built:
        arrays = [(f"weights/{name}", w) for (name, _, _), w in
                  zip(model.weight_shapes(), model.get_weights())]
    opt = model.optimizer
    if opt is not None:
        header["compile"] = {**model.get_compile_config(), "iterations": opt.iterations,
                             "skipped_steps": opt.skipped_steps}
        if model.built:
            arrays += [(f"optimizer/{k}", v) for k, v in sorted(opt.variables().items())]
    return header, arrays


def load_model(path, custom_objects=None, compile=True, safe_mode=True):
    """Read a model written by ``model.save(path)``: architecture, weights,
    optimizer and its state, and the random generators' state, so that
    ``fit`` continues exactly where the saved model stopped. A Keras 3
    ``.keras`` archive (recognized by its content, not its name) is read by
    fastgrad.keras_format. Raises ``ModelFileError`` (a ValueError) for any
    file that is not a valid model file.

    Keras's arguments: ``compile=False`` gives the model uncompiled (its
    architecture and weights); ``custom_objects`` must be empty, since only
    fastgrad's own classes load; ``safe_mode`` is accepted and changes
    nothing: loading never runs code from the file."""
    from fastgrad import keras_format
    from fastgrad._model_api import clone_model

    if custom_objects:
        raise ValueError(f"custom_objects: fastgrad loads only its own layers, losses and "
                         f"optimizers; expected None or an empty dict, got "
                         f"{sorted(custom_objects)!r}")
    for name, value in (("compile", compile), ("safe_mode", safe_mode)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name}: expected True or False, got {value!r}")
    kind = keras_format.sniff(path)
    if kind == "keras":
        model = keras_format.load_model(path)
    elif kind == "hdf5":
        raise ModelFileError(f"{path}: an HDF5 file holds weights only; build the model "
                             "and call model.load_weights(path)")
    else:
        model = from_description(*read_file(path), path)
    if compile or model.optimizer is None:
        return model
    bare = clone_model(model)
    if model.weights:
        bare.set_weights(model.get_weights())
    return bare


def from_description(header, arrays, path, unbuilt=False):
    """The model of a (header, arrays) pair already read from ``path``;
    with ``unbuilt``, a model without weights (input_dim None) is allowed,
    as pickling stores one."""
    try:
        model = _model(header, arrays, unbuilt)
        _compile(model, header.get("compile"), arrays)
        if arrays:
            raise ModelFileError(f"unexpected arrays in the file: {', '.join(sorted(arrays))}")
        _restore_random(model, header)
        return model
    except ModelFileError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as e:
        raise ModelFileError(f"{path}: invalid model description ({type(e).__name__}: "
                             f"{e})") from None


def _model(header, arrays, unbuilt=False):
    """The architecture, built, with its weights (taken out of arrays)."""
    from fastgrad.models import Sequential

    if header.get("format") != "fastgrad.model":
        raise ModelFileError("not a fastgrad model description")
    spec = header["model"]
    if spec["class_name"] != "Sequential":
        raise ModelFileError(f"unknown model type {spec['class_name']!r}")
    cfg = spec["config"]
    if not isinstance(cfg["name"], str):
        raise ModelFileError("the model name is not a string")
    model = Sequential([layers.deserialize(entry) for entry in cfg["layers"]],
                       dtype=cfg["dtype"], seed=cfg["seed"], name=cfg["name"])
    if unbuilt and cfg["input_dim"] is None:
        return model
    # every weight is compared with the architecture before anything is
    # allocated: the file's arrays bound what a description may ask for
    weights = []
    for name, shape, _ in model.weight_shapes(cfg["input_dim"]):
        a = arrays.pop(f"weights/{name}", None)
        if a is None:
            raise ModelFileError(f"the weight weights/{name} is missing")
        if a.shape != shape or a.dtype != model.dtype:
            raise ModelFileError(f"the weight weights/{name} has shape {a.shape} and dtype "
                                 f"{a.dtype}; the architecture needs {shape} {model.dtype}")
        weights.append(a)
    model.build(cfg["input_dim"])
    model.set_weights(weights)
    return model


def _compile(model, comp, arrays):
    """Compile the model as saved and put back its optimizer's state."""
    if comp is None:
        return
    # (files from before metric objects were saved hold metric names only)
    model.compile_from_config(comp)
    opt = model.optimizer
    for k, buf in opt.variables().items() if model.built else ():
        a = arrays.pop(f"optimizer/{k}", None)
        if a is None or a.shape != buf.shape or a.dtype != buf.dtype:
            raise ModelFileError(f"the optimizer state optimizer/{k} is missing or has "
                                 "the wrong shape or dtype")
        buf[...] = a
    it, sk = comp["iterations"], comp["skipped_steps"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62
               for v in (it, sk)):
        raise ModelFileError("invalid optimizer step counts")
    opt.iterations, opt.skipped_steps = it, sk


def _restore_random(model, header):
    """The model's generator (shuffling) and the dropout layers' streams."""
    state = header["rng"]
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ModelFileError("invalid random-generator state")
    model._rng.bit_generator.state = state
    for layer in model.layers:
        if hasattr(layer, "counter"):
            r = header["layers_random"][layer.name]
            # a layer of a model not built yet has not drawn its seed
            keys = ("seed", "counter") if model.built or r["seed"] is not None else ("counter",)
            if not all(isinstance(r[k], int) and 0 <= r[k] < 2**64 for k in keys):
                raise ModelFileError(f"invalid random state for layer {layer.name}")
            layer._seed, layer.counter = r["seed"], r["counter"]


def restore_model(model, path):
    """Put the state a ``save_model`` file holds into ``model``, built and
    compiled with the same architecture and optimizer: weights, optimizer
    state and step counts, and the random generators' state, so that fit
    continues as the saved model would (BackupAndRestore's resume). Raises
    ModelFileError when the file does not match the model, before anything
    changes."""
    saved = load_model(path)
    shapes = [(n, s) for n, s, _ in model.weight_shapes()]
    if [(n, s) for n, s, _ in saved.weight_shapes()] != shapes or saved.dtype != model.dtype:
        raise ModelFileError(f"{path}: the saved model's weights do not match this model's")
    opt, src = model.optimizer, saved.optimizer
    if src is None or type(src) is not type(opt) or \
            {k: v.shape for k, v in src.variables().items()} != \
            {k: v.shape for k, v in opt.variables().items()}:
        raise ModelFileError(f"{path}: the saved optimizer does not match this model's")
    model.set_weights(saved.get_weights())
    for k, buf in opt.variables().items():
        buf[...] = src.variables()[k]
    opt.iterations, opt.skipped_steps = src.iterations, src.skipped_steps
    model._rng.bit_generator.state = saved._rng.bit_generator.state
    for layer, old in zip(model.layers, saved.layers):
        if hasattr(layer, "counter"):
            layer._seed, layer.counter = old._seed, old.counter
