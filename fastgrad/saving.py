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
"""
import json
import os
import struct
import tempfile

import numpy as np

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
        arrays_entry_error = f"{path}: array entry {i}"
        if not isinstance(e, dict):
            raise ModelFileError(f"{arrays_entry_error} is not an object")
        name, dt, shape = e.get("name"), e.get("dtype"), e.get("shape")
        off, nbytes = e.get("offset"), e.get("nbytes")
        if not isinstance(name, str) or name in arrays:
            raise ModelFileError(f"{arrays_entry_error}: missing or repeated name")
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
        if off < end:
            raise ModelFileError(f"{path}: array {name!r} overlaps the one before it")
        if base + off + nbytes > len(data):
            raise ModelFileError(f"{path}: array {name!r} extends past the end of the file; "
                                 "the file is truncated")
        arrays[name] = np.frombuffer(data, _DTYPES[dt], count, base + off).reshape(shape).copy()
        end = off + nbytes + _pad(nbytes)
    if base + end != len(data):
        raise ModelFileError(f"{path}: {len(data) - base - end} bytes after the last array "
                             "do not belong to it (trailing data or a damaged table)")
    return header, arrays
