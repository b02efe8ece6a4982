#!/usr/bin/env python3
"""Fuzz runner for fastgrad.

    python tests/fuzz/fuzz.py --seconds N [--target load_model|load_keras|ops|all] [--seed S]
                         [--engine auto|random|atheris] [--crash-dir DIR]
                         [--replay TARGET:ITERATION] [--strict-warnings]

Runs each chosen harness for N seconds (so ``--target all`` takes 3 N),
prints per harness the number of iterations run and the failures found, and
exits 1 when any harness found a failure (2 for a usage error). A crash of
the interpreter (a fault in compiled code) ends the run with a non-zero
status too; faulthandler prints where, and the input being run is left in
the crash folder as ``current-<target>.*``.

Harnesses

  load_model  fg.load_model on mutated model files. A few valid files of
              different architectures are written with model.save, then
              mutated: bit flips, byte edits, insertions, deletions,
              truncation, prefix edits (magic, version, header length),
              header JSON edits (numbers replaced by huge, negative, float,
              NaN or 5000-digit values, strings swapped, keys dropped or
              added, lists shortened or repeated), array-table edits
              (offset, nbytes, shape, dtype, name, order) and splices of two
              files. The only exception allowed from load_model is
              ValueError (ModelFileError is one). A model that loads must
              then predict, take a training step (when compiled) with only
              ValueError allowed (and FloatingPointError when its optimizer
              says nonfinite="raise"), save, and load again to the same
              weights.

  load_keras  fg.load_model on mutated Keras 3 archives (.keras): the same
              models saved as .keras, then zip-level damage (member names
              with traversal or unknown names, duplicates, added or dropped
              members, compression methods, bytes of headers and data),
              config.json edits through the JSON mutator above, and HDF5
              weights damaged byte-wise or rewritten (datasets dropped or of
              other shapes and dtypes, soft and external links, extra
              groups). Same rules as load_model. Needs h5py (the keras
              extra); without it the harness is left out.

  ops         fg.ops kernels on random shapes (0..40 on each side), random
              layouts (C, Fortran, transposed, strided, negative strides,
              broadcast, read-only, unaligned), random dtypes (wrong ones and
              integers included), random values (inf, NaN, 1e20, subnormals),
              weird scalars, and arguments left out or added. Only ValueError
              and TypeError are allowed; a call that succeeds must return
              what its docstring says, of the documented shape and dtype,
              must not modify its read-only inputs, and (for finite matmul and
              linear dense inputs) must agree with NumPy.

Engines: ``random`` is a seeded mutation loop needing nothing beyond NumPy;
``atheris`` uses the coverage-guided atheris fuzzer (atheris.Setup/Fuzz with
-max_total_time), one child process per harness; ``auto`` (the default)
takes atheris when ``import atheris`` works and the random loop otherwise.
With the random engine, ``--replay ops:1234`` reruns iteration 1234 of the
given seed and prints its arguments and outcome.
"""
import argparse
import faulthandler
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("fastgrad") is None and (_ROOT / "fastgrad").is_dir():
    # not installed: the work tree's package (built in place), as
    # `python -m pytest` from the root would import it
    sys.path.insert(0, str(_ROOT))

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the tests' _reference.py
from _reference import layout

fg = None   # imported lazily, so that atheris can instrument it first


def _import_fastgrad():
    global fg
    if fg is None:
        import fastgrad
        fg = fastgrad
    return fg


# ---------------------------------------------------------------------------
# randomness: one interface over random.Random and atheris' data provider
# ---------------------------------------------------------------------------

class Rand:
    """The choices a harness makes, from a seeded random.Random."""

    def __init__(self, seed):
        self._r = random.Random(seed)

    def int(self, lo, hi):
        return self._r.randint(lo, hi)

    def unit(self):
        return self._r.random()

    def chance(self, p):
        return self._r.random() < p

    def choice(self, seq):
        return seq[self._r.randrange(len(seq))]

    def bytes(self, n):
        return bytes(self._r.getrandbits(8) for _ in range(n))

    def np(self):
        return np.random.default_rng(self._r.getrandbits(64))


class FdpRand(Rand):
    """The same choices drawn from atheris' FuzzedDataProvider, so that the
    coverage-guided engine steers them."""

    def __init__(self, fdp):
        self._f = fdp

    def int(self, lo, hi):
        return self._f.ConsumeIntInRange(lo, hi)

    def unit(self):
        return self._f.ConsumeProbability()

    def chance(self, p):
        # an exhausted provider gives 0: then no optional damage is done
        return self._f.ConsumeProbability() > 1.0 - p

    def choice(self, seq):
        return seq[self._f.ConsumeIntInRange(0, len(seq) - 1)]

    def bytes(self, n):
        b = self._f.ConsumeBytes(n)
        return b + b"\0" * (n - len(b))

    def np(self):
        return np.random.default_rng(self._f.ConsumeIntInRange(0, 2**63 - 1))


# ---------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------

class Failure:
    def __init__(self, target, iteration, what, exc=None, detail="", input_path=None):
        self.target, self.iteration, self.what = target, iteration, what
        self.exc_type = type(exc).__name__ if exc is not None else None
        self.trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) \
            if exc is not None else ""
        self.detail, self.input_path = detail, input_path
        self.key = (what, self.exc_type, _origin(exc))

    def describe(self):
        lines = [f"[{self.target} #{self.iteration}] {self.what}"]
        if self.detail:
            lines.append(self.detail)
        if self.input_path:
            lines.append(f"input: {self.input_path}")
        if self.trace:
            lines.append(self.trace.rstrip())
        return "\n".join(lines)


def _origin(exc):
    """Where an exception was raised (file:line of the innermost frame)."""
    if exc is None or exc.__traceback__ is None:
        return None
    tb = traceback.extract_tb(exc.__traceback__)
    return f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else None


class Stats:
    def __init__(self, target):
        self.target, self.iterations, self.failures, self.seconds = target, 0, [], 0.0
        self.unique = {}
        self.outcomes = {}

    def add(self, failure):
        self.failures.append(failure)
        self.unique.setdefault(failure.key, failure)

    def count(self, outcome):
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def summary(self):
        outs = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return (f"{self.target}: {self.iterations} iterations in {self.seconds:.1f} s, "
                f"{len(self.failures)} failures ({len(self.unique)} distinct)"
                + (f"; {outs}" if outs else ""))


class HarnessFailure(Exception):
    """Raised by a harness for an input that broke a rule."""

    def __init__(self, what, exc=None, detail=""):
        super().__init__(what)
        self.what, self.exc, self.detail = what, exc, detail


# ---------------------------------------------------------------------------
# harness 1: load_model on mutated files
# ---------------------------------------------------------------------------

BIG_DIGITS = "\u0000BIGINT\u0000"
INTERESTING_NUMBERS = [
    0, 1, -1, 2, 3, 7, 64, 2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1,
    2**63, 2**64 - 1, 2**64, -2**63, -2**64, 10**30, 0.5, 1.5, -0.0, 2.5, 1e-300, 1e300,
    float("nan"), float("inf"), float("-inf"), True, False, None, "1", [], {}, BIG_DIGITS,
]
INTERESTING_STRINGS = ["", "x" * 300, "float16", "float32", "float64", "int64", "Dense",
                       "Dropout", "BatchNormalization", "Activation", "Sequential", "relu",
                       "softmax", "PCG64", "MT19937", "Adam", "SGD", "\u0000", "\u00e9\u4e2d",
                       "../../etc/passwd", "__import__('os')", "weights/dense/kernel"]


def _base_models(dirpath, ext=".fgm"):
    """Valid model files of different architectures, saved under names
    ending in ext; returns their bytes."""
    fg = _import_fastgrad()
    from fastgrad.layers import Activation, BatchNormalization, Dense, Dropout

    rng = np.random.default_rng(0)
    x = rng.standard_normal((24, 4)).astype(np.float32)
    models = []

    m = fg.Sequential([Dense(5, activation="relu", input_dim=4),
                       Dense(3, activation="softmax")], seed=1)
    m.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    m.fit(x, rng.integers(0, 3, 24), epochs=1, batch_size=8, verbose=0)
    models.append(m)

    m = fg.Sequential([Dense(6, use_bias=False, input_dim=4), BatchNormalization(momentum=0.9),
                       Activation("elu"), Dropout(0.3, seed=5),
                       Dense(2, activation="sigmoid")], dtype="float64", seed=2)
    m.compile(fg.optimizers.SGD(fg.schedules.ExponentialDecay(0.05, 10, 0.9), momentum=0.9,
                                nesterov=True, clipnorm=1.0),
              "binary_crossentropy", ["accuracy"])
    m.fit(x.astype(np.float64), rng.integers(0, 2, (24, 2)), epochs=1, batch_size=6, verbose=0)
    models.append(m)

    m = fg.Sequential([Dense(3, activation="gelu", input_dim=4), Activation("tanh"),
                       Dense(2)], seed=3)
    m.build()
    models.append(m)   # not compiled: no optimizer state

    m = fg.Sequential([Dense(4, activation="leaky_relu", input_dim=4,
                             kernel_regularizer=fg.regularizers.L2(0.01),
                             kernel_constraint=fg.constraints.MaxNorm(2.0)),
                       BatchNormalization(center=False), Dense(2, activation="silu")], seed=4)
    m.compile(fg.optimizers.RMSprop(0.01, momentum=0.5, centered=True, global_clipnorm=2.0),
              fg.losses.Huber(0.5), ["mae"])
    m.fit(x, rng.standard_normal((24, 2)), epochs=1, batch_size=8, verbose=0)
    models.append(m)

    m = fg.Sequential([Dense(3, activation="selu", input_dim=4),
                       Dense(3, activation="softmax")], seed=6)
    m.compile(fg.optimizers.Adam(amsgrad=True, clipvalue=0.5), "categorical_crossentropy")
    m.fit(x, np.eye(3)[rng.integers(0, 3, 24)], epochs=1, batch_size=8, verbose=0)
    models.append(m)

    out = []
    for i, m in enumerate(models):
        p = os.path.join(dirpath, f"base-{i}{ext}")
        m.save(p)
        with open(p, "rb") as f:
            out.append(f.read())
        os.unlink(p)
    return out


def _split(data):
    import struct
    if len(data) < 20:
        return None
    magic, version, hlen = struct.unpack_from("<8sIQ", data)
    if hlen > len(data) - 20:
        return None
    try:
        header = json.loads(data[20:20 + hlen].decode("utf-8"))
    except (ValueError, RecursionError):
        return None
    return magic, version, header, data[20 + hlen:]


def _join(magic, version, header, body, r, keep_len=None):
    import struct
    compact = r.chance(0.5)
    text = json.dumps(header, separators=(",", ":") if compact else None, allow_nan=True)
    text = text.replace(json.dumps(BIG_DIGITS), "9" * 5000)
    blob = text.encode("utf-8")
    if r.chance(0.3):   # the writer pads the header with spaces to 64 bytes
        blob += b" " * ((-(20 + len(blob))) % 64)
    hlen = len(blob) if keep_len is None else keep_len
    return struct.pack("<8sIQ", magic, version % 2**32, hlen % 2**64) + blob + body


def _paths(node, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


def _set_path(root, path, value):
    if not path:
        return value
    node = root
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return root


def _strings(header):
    return [v for _, v in _paths(header) if isinstance(v, str)] or ["x"]


def _mutate_json_value(header, r):
    paths = list(_paths(header))
    path, value = r.choice(paths)
    if isinstance(value, bool) or value is None:
        new = r.choice([not value if isinstance(value, bool) else 0, 0, 1, "true", None, [],
                        2**64])
    elif isinstance(value, (int, float)):
        op = r.int(0, 3)
        if op == 0:
            new = r.choice(INTERESTING_NUMBERS)
        elif op == 1:
            new = value + r.choice([1, -1, 64, -64, 4, -4, 8])
        elif op == 2:
            new = -value if value else -1
        else:
            new = float(value) if isinstance(value, int) else int(value) \
                if math.isfinite(value) else 0
    elif isinstance(value, str):
        new = r.choice(_strings(header)) if r.chance(0.5) else r.choice(
            INTERESTING_STRINGS + [5, None, [value]])
    elif isinstance(value, list):
        op = r.int(0, 5)
        new = list(value)
        if op == 0 and new:
            del new[r.int(0, len(new) - 1)]
        elif op == 1 and new:
            new.insert(r.int(0, len(new)), json.loads(json.dumps(r.choice(new))))
        elif op == 2:
            new.reverse()
        elif op == 3:
            new = []
        elif op == 4:
            new.append(r.choice([None, 0, "x", {}, []]))
        else:
            new = {"0": value}
    else:   # dict
        op = r.int(0, 3)
        new = dict(value)
        if op == 0 and new:
            del new[r.choice(list(new))]
        elif op == 1:
            new[r.choice(["unexpected", "__class__", "function", "name", "units"])] = \
                r.choice(INTERESTING_NUMBERS + ["x"])
        elif op == 2:
            new = [value]
        else:
            new = r.choice([None, "dict", 0])
    return _set_path(header, path, new)


def _mutate_table(header, r):
    if not isinstance(header, dict):
        return _mutate_json_value(header, r)
    arrays = header.get("arrays")
    if not isinstance(arrays, list) or not arrays:
        return _mutate_json_value(header, r)
    i = r.int(0, len(arrays) - 1)
    e = arrays[i]
    if not isinstance(e, dict):
        return header
    op = r.int(0, 9)
    if op == 0:
        e["offset"] = r.choice([0, e.get("offset", 0) + 64, e.get("offset", 0) - 64, 2**63,
                                2**64 - 64, 2**64 + 64, -64, 1, 63])
    elif op == 1:
        e["nbytes"] = r.choice([0, 2**62, 2**63, 2**64 - 4, 2**64, -4, 1,
                                (e.get("nbytes") or 0) + 4, (e.get("nbytes") or 0) - 4])
    elif op == 2:
        shape = e.get("shape")
        if isinstance(shape, list):
            e["shape"] = r.choice([shape[::-1], shape + [1], shape[:-1], [],
                                   [2**32, 2**32, 2**32], [2**39] * 8, [0] + shape,
                                   [s + 1 for s in shape if isinstance(s, int)],
                                   [2**63], [-1] + shape, [1.0] * len(shape)])
    elif op == 3:
        e["dtype"] = r.choice(["float32", "float64", "int64", "float16", "<f4", None,
                               ["float32"], {"d": 1}, 4])
    elif op == 4:
        e["name"] = r.choice([a.get("name") for a in arrays if isinstance(a, dict)]
                             + ["", None, "weights/x/kernel", "optimizer/zz"])
    elif op == 5:
        del arrays[i]
    elif op == 6:
        arrays.insert(r.int(0, len(arrays)), json.loads(json.dumps(e)))
    elif op == 7:
        j = r.int(0, len(arrays) - 1)
        arrays[i], arrays[j] = arrays[j], arrays[i]
    elif op == 8:   # keep the table consistent with a changed shape
        shape = e.get("shape")
        if isinstance(shape, list) and shape and all(isinstance(s, int) for s in shape):
            shape = shape[::-1] if r.chance(0.5) else [shape[0] + 1] + shape[1:]
            size = {"float32": 4, "float64": 8, "int64": 8}.get(e.get("dtype"), 4)
            n = 1
            for s in shape:
                n *= s
            e["shape"], e["nbytes"] = shape, n * size
    else:
        e[r.choice(["extra", "offset", "nbytes", "shape", "dtype", "name"])] = None
    return header


def _mutate_bytes(data, r, others):
    data = bytearray(data)
    n = len(data)
    op = r.int(0, 10)
    split = _split(bytes(data))
    hend = 20 + len(json.dumps(split[2])) if split else n
    if op == 0 and n:                                   # bit flips, often in the header
        for _ in range(r.int(1, 8)):
            pos = r.int(0, min(n, hend) - 1) if r.chance(0.6) else r.int(0, n - 1)
            data[pos] ^= 1 << r.int(0, 7)
    elif op == 1 and n:                                 # byte edits
        for _ in range(r.int(1, 4)):
            data[r.int(0, n - 1)] = r.choice([0, 0xFF, 0x7F, 0x80, ord('"'), ord("{"),
                                              ord("9"), ord("-"), ord("."), ord("e"),
                                              r.int(0, 255)])
    elif op == 2:                                       # insertion
        pos = r.int(0, n)
        chunk = r.bytes(r.int(1, 32)) if r.chance(0.5) or not n else \
            bytes(data[r.int(0, n - 1):][:r.int(1, 64)])
        data[pos:pos] = chunk
    elif op == 3 and n:                                 # deletion
        pos = r.int(0, n - 1)
        del data[pos:pos + r.int(1, 64)]
    elif op == 4:                                       # truncation
        data = data[:r.int(0, n)]
    elif op == 5:                                       # junk after the end
        data += r.choice([b"\0", b"\0" * 64, r.bytes(r.int(1, 100)), bytes(data[:64])])
    elif op == 6 and n >= 20:                           # the prefix
        import struct
        which = r.int(0, 2)
        if which == 0:
            struct.pack_into("<Q", data, 12, r.choice([0, 1, n, n - 20, n - 19, 2**63,
                                                       2**64 - 1, 2**32, 64 << 20,
                                                       (64 << 20) + 1,
                                                       struct.unpack_from("<Q", data, 12)[0]
                                                       + r.int(-8, 8)]) % 2**64)
        elif which == 1:
            struct.pack_into("<I", data, 8, r.choice([0, 2, 2**32 - 1, 2**31]))
        else:
            data[:8] = r.choice([b"FGMODEL\1", b"fgmodel\0", b"\0" * 8, b"PK\3\4xxxx"])
    elif op == 7 and n:                                 # float specials in the data
        base = n - len(split[3]) if split else 20
        if base < n:
            pos = r.int(base, n - 1)
            special = r.choice([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\x7f\x7f",
                                b"\x01\x00\x00\x00", b"\x00\x00\x00\x80",
                                b"\x00\x00\x00\x00\x00\x00\xf8\x7f"])
            data[pos:pos + len(special)] = special
    elif op == 8 and others:                            # splice two files
        other = r.choice(others)
        cut = r.int(0, min(n, len(other)))
        data = data[:cut] + bytearray(other[cut:])
    elif op == 9 and split and others:                  # one file's header, another's body
        s2 = _split(r.choice(others))
        if s2:
            return _join(split[0], split[1], split[2], s2[3], r)
    return bytes(data)


def mutate_model_file(data, r, others=()):
    """One to three mutations of a model file."""
    for _ in range(r.int(1, 3)):
        kind = r.int(0, 9)
        split = _split(data) if kind < 6 else None
        if split:
            magic, version, header, body = split
            try:
                for _ in range(r.int(1, 3)):
                    if kind < 3:
                        header = _mutate_json_value(header, r)
                    else:
                        header = _mutate_table(header, r)
            except (KeyError, IndexError, TypeError, AttributeError):
                pass
            keep = None
            if r.chance(0.1):
                keep = len(json.dumps(header)) + r.int(-4, 4)
            data = _join(magic, version, header, body, r, keep)
        else:
            data = _mutate_bytes(data, r, others)
    return data


class LoadModelHarness:
    name = "load_model"
    ext = ".fgm"

    def __init__(self, workdir, crash_dir):
        self.workdir, self.crash_dir = workdir, crash_dir
        self.bases = _base_models(workdir)
        self.path = os.path.join(crash_dir, "current-load_model.fgm")
        self.saved = os.path.join(workdir, "resaved.fgm")

    def generate(self, r):
        base = r.choice(self.bases)
        return mutate_model_file(base, r, self.bases)

    def check_bytes(self, data, r=None):
        """Load data as a model file; raise HarnessFailure on a broken rule."""
        fg = _import_fastgrad()
        with open(self.path, "wb") as f:
            f.write(data)
        try:
            model = fg.load_model(self.path)
        except ValueError:
            return "refused"
        except Exception as e:   # noqa: BLE001 - any other exception is the finding
            raise HarnessFailure(f"load_model raised {type(e).__name__}", e) from None
        self._exercise(model, r or Rand(len(data)))
        return "loaded"

    def _exercise(self, model, r):
        fg = _import_fastgrad()
        if not isinstance(model, fg.Sequential):
            raise HarnessFailure(f"load_model returned {type(model).__name__}")
        rng = r.np()
        x = rng.standard_normal((3, model.input_dim))
        step = "predict"
        try:
            p = model.predict(x)
            if p.shape != (3, model.output_dim) or p.dtype != model.dtype:
                raise HarnessFailure(f"predict gave {p.shape} {p.dtype}, expected "
                                     f"{(3, model.output_dim)} {model.dtype}")
            if model.optimizer is not None:
                step = "train_on_batch"
                loss = model.loss.name
                if loss == "sparse_categorical_crossentropy":
                    y = rng.integers(0, model.output_dim, 3)
                elif loss in ("binary_crossentropy", "categorical_crossentropy"):
                    y = np.eye(model.output_dim)[rng.integers(0, model.output_dim, 3)]
                else:
                    y = rng.standard_normal((3, model.output_dim))
                try:
                    model.train_on_batch(x, y)
                except FloatingPointError:
                    if getattr(model.optimizer, "nonfinite", "skip") != "raise":
                        raise
            step = "save"
            model.save(self.saved)
            step = "load after save"
            again = fg.load_model(self.saved)
            a, b = model.get_weights(), again.get_weights()
            if len(a) != len(b) or any(u.tobytes() != v.tobytes() or u.shape != v.shape
                                       for u, v in zip(a, b)):
                raise HarnessFailure("save then load changed the weights")
        except HarnessFailure:
            raise
        except ValueError:
            if step in ("save", "load after save"):
                raise HarnessFailure(f"a loaded model failed at {step}",
                                     sys.exc_info()[1]) from None
        except Exception as e:   # noqa: BLE001
            raise HarnessFailure(f"a loaded model raised {type(e).__name__} in {step}",
                                 e) from None

    def mutate(self, data, r):
        return mutate_model_file(data, r, self.bases)

    def one(self, r):
        data = self.generate(r)
        return self.check_bytes(data, r), data

    def save_input(self, data, iteration):
        p = os.path.join(self.crash_dir, f"{self.name}-{iteration}{self.ext}")
        with open(p, "wb") as f:
            f.write(data)
        return p


KERAS_MEMBERS = ["metadata.json", "config.json", "model.weights.h5"]
ZIP_NAMES = ["../config.json", "/config.json", "C:/config.json", "assets/x", "config.json",
             "model.weights.h5", "a/../../b", "", "config.json/", "x" * 300]


def _unzip(data):
    import io
    import zipfile
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return [(i.filename, zf.read(i), i.compress_type) for i in zf.infolist()]
    except Exception:   # noqa: BLE001 - a mutant that zipfile cannot read
        return None


def _zip(members):
    import io
    import zipfile
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # duplicate names
        with zipfile.ZipFile(buf, "w") as zf:
            for name, blob, method in members:
                zf.writestr(zipfile.ZipInfo(name) if name else zipfile.ZipInfo("_"), blob,
                            compress_type=method)
    return buf.getvalue()


def _mutate_h5(blob, r):
    """Byte damage in the HDF5 weights, or valid HDF5 with changed content."""
    if r.chance(0.5) or not blob:
        return _mutate_bytes(blob, r, ())
    import io

    import h5py
    buf = io.BytesIO(blob)
    try:
        with h5py.File(buf, "r+") as f:
            names = []
            f.visit(names.append)
            if not names:
                return blob
            target = r.choice(names)
            op = r.int(0, 5)
            parent = f[target].parent
            leaf = target.rsplit("/", 1)[-1]
            if op == 0:
                del f[target]
            elif op == 1:
                del f[target]
                parent.create_dataset(leaf, data=r.np().standard_normal(
                    r.choice([(), (1,), (3, 2), (0,), (8, 3), (4, 4)])).astype(
                    r.choice(["f4", "f8", "i4", "i8", "f2", ">f4"])))
            elif op == 2:
                parent[r.choice(["extra", "0", "9", leaf])] = h5py.SoftLink("/" + target)
            elif op == 3:
                parent[r.choice(["ext", "5"])] = h5py.ExternalLink("/etc/hostname", "/")
            elif op == 4:
                parent.create_group(r.choice(["vars", "zz", "10"]))
            else:
                f[target].attrs["name"] = r.choice(INTERESTING_STRINGS)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return blob
    return buf.getvalue()


class LoadKerasHarness(LoadModelHarness):
    """fg.load_model on mutated Keras archives: zip-level damage (names,
    duplicates, sizes, counts, compression, truncation), config.json edits
    through the JSON mutator, and HDF5 damage; then as load_model."""
    name = "load_keras"
    ext = ".keras"

    def __init__(self, workdir, crash_dir):
        self.workdir, self.crash_dir = workdir, crash_dir
        self.bases = _base_models(workdir, ".keras")
        self.path = os.path.join(crash_dir, "current-load_keras.keras")
        self.saved = os.path.join(workdir, "resaved.fgm")

    def mutate(self, data, r):
        for _ in range(r.int(1, 3)):
            members = _unzip(data)
            if not members or r.chance(0.2):
                data = _mutate_bytes(data, r, self.bases)
                continue
            i = r.int(0, len(members) - 1)
            name, blob, method = members[i]
            op = r.int(0, 6)
            if op <= 2 and name == "config.json":
                try:
                    blob = json.dumps(_mutate_json_value(json.loads(blob), r)).encode()
                except (ValueError, KeyError, IndexError, TypeError, AttributeError,
                        RecursionError):
                    pass
            elif op <= 2 and name == "model.weights.h5":
                blob = _mutate_h5(blob, r)
            elif op == 3:
                name = r.choice(ZIP_NAMES)
            elif op == 4:
                members.append((r.choice(ZIP_NAMES + KERAS_MEMBERS),
                                r.choice([b"", b"{}", blob, b"\0" * r.int(0, 5000)]), method))
            elif op == 5:
                del members[i]
            else:
                method = r.choice([0, 8, 12, 14])   # stored, deflate, bzip2, lzma
            if i < len(members):
                members[i] = (name, blob, method)
            data = _zip(members)
        return data

    def generate(self, r):
        return self.mutate(r.choice(self.bases), r)


# ---------------------------------------------------------------------------
# harness 2: fg.ops kernels
# ---------------------------------------------------------------------------

LAYOUTS = ["c", "c", "c", "fortran", "transposed", "strided", "negative", "broadcast",
           "readonly", "unaligned"]
WRONG_DTYPES = [np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64, object]
WEIRD_SCALARS = [None, True, False, 0, -1, 1, 2, 2**63, 2**64, -2**63, 10**400, 0.5, -0.5,
                 1.0, float("nan"), float("inf"), float("-inf"), 1e300, "relu", "", "x", [],
                 {}, np.float32(0.5), np.int64(3), np.uint64(2**64 - 1), np.array(0.5),
                 np.array([1, 2]), b"relu", 1 + 2j]
ACT_NAMES = None   # filled from fg.ops on first use
LOSS_NAMES = None


def _layout(a, kind):
    """a laid out as named (see _reference.layout); other values unchanged."""
    if not isinstance(a, np.ndarray) or (kind == "unaligned" and a.dtype == object):
        return a
    return layout(a, kind)


def _values(rng, shape, dt, r, lo=None, hi=None):
    n = int(np.prod(shape))
    if lo is not None:
        v = rng.uniform(lo, hi, n)
    else:
        v = rng.standard_normal(n) * r.choice([1.0, 1.0, 3.0, 1e-3, 1e10])
    if n and r.chance(0.15):
        k = rng.integers(1, n + 1)
        idx = rng.integers(0, n, k)
        v[idx] = rng.choice([np.inf, -np.inf, np.nan, 1e20, -1e20, 3e38, 0.0, -0.0, 1e-40,
                             5e-324], k)
    if r.chance(0.03):
        v[:] = 0.0
    with np.errstate(all="ignore"):
        if dt is object:
            return v.astype(object).reshape(shape)
        return v.astype(dt).reshape(shape)


class _Call:
    """One generated kernel call: its keyword arguments and what it writes."""

    def __init__(self, kernel, kwargs, written, notes):
        self.kernel, self.kwargs, self.written, self.notes = kernel, kwargs, written, notes

    def describe(self):
        parts = []
        for k, v in self.kwargs.items():
            if isinstance(v, np.ndarray):
                fl = v.flags
                tags = [t for t, on in (("C", fl.c_contiguous), ("F", fl.f_contiguous),
                                        ("ro", not fl.writeable), ("unaligned", not fl.aligned))
                        if on]
                parts.append(f"{k}=ndarray{v.shape} {v.dtype} strides={v.strides} "
                             f"{'/'.join(tags)}")
            else:
                s = repr(v)
                parts.append(f"{k}={s[:60] + '...' if len(s) > 60 else s}")
        return f"ops.{self.kernel}(" + ", ".join(parts) + ")" + \
            (f"  [{'; '.join(self.notes)}]" if self.notes else "")


def _gen_call(r):
    """A random kernel call: mostly well-formed, then damaged at random."""
    global ACT_NAMES, LOSS_NAMES
    fg = _import_fastgrad()
    ops = fg.ops
    if ACT_NAMES is None:
        ACT_NAMES, LOSS_NAMES = list(ops.ACTIVATIONS), list(ops.LOSSES)
    rng = r.np()
    dt = r.choice([np.float32, np.float64])
    d = lambda: r.int(0, 40) if r.chance(0.7) else r.int(0, 3)
    B, I, O = d(), d(), d()
    arr = lambda shape, **kw: _values(rng, shape, dt, r, **kw)
    kernel = r.choice(["matmul", "dense_forward", "dense_backward", "activation_forward",
                       "activation_backward", "loss_forward_backward", "batchnorm_forward",
                       "batchnorm_backward", "dropout", "sum_squares", "sgd_step",
                       "rmsprop_step", "adam_step", "adagrad_step", "layernorm_forward",
                       "layernorm_backward", "relu_forward", "relu_backward",
                       "prelu_forward", "prelu_backward"])
    act = r.choice(ACT_NAMES)
    kw, written, out_like = {}, set(), {}
    if kernel == "matmul":
        ta, tb = r.chance(0.5), r.chance(0.5)
        kw["a"] = arr((I, B) if ta else (B, I))
        kw["b"] = arr((O, I) if tb else (I, O))
        kw["trans_a"], kw["trans_b"] = ta, tb
        out_like["out"] = (B, O)
    elif kernel == "dense_forward":
        kw.update(x=arr((B, I)), kernel=arr((I, O)), bias=arr((O,)) if r.chance(0.7) else None,
                  activation=act)
        if r.chance(0.3):
            kw["alpha"] = r.choice([0.1, 0.0, 2.0])
        out_like.update(out=(B, O), pre=(B, O))
    elif kernel == "dense_backward":
        x, k = arr((B, I)), arr((I, O))
        pre = np.empty((B, O), dt)
        with np.errstate(all="ignore"):
            out = ops.dense_forward(x, k, None, act, pre=pre)
        kw.update(dout=arr((B, O)), x=x, kernel=k, out=out, activation=act, pre=pre,
                  use_bias=r.chance(0.7), need_dx=r.chance(0.7))
        out_like.update(dkernel=(I, O), dbias=(O,), dx=(B, I))
    elif kernel == "activation_forward":
        kw.update(x=arr((B, O)), activation=act)
        out_like.update(out=(B, O), pre=(B, O))
    elif kernel == "activation_backward":
        x = arr((B, O))
        with np.errstate(all="ignore"):
            y = ops.activation_forward(x, act)
        kw.update(dout=arr((B, O)), out=y, activation=act, x=x)
        out_like["dx"] = (B, O)
    elif kernel == "loss_forward_backward":
        loss = r.choice(LOSS_NAMES)
        logits = "crossentropy" in loss and r.chance(0.5)
        O = max(O, 1) if r.chance(0.9) else O
        if loss == "sparse_categorical_crossentropy":
            yt = rng.integers(0, max(O, 1), B)
            if r.chance(0.2):
                yt = r.choice([yt.astype(np.float64), yt.reshape(-1, 1), yt.astype(np.int32),
                               yt.astype(np.uint8) if O <= 255 else yt, yt + O, yt - 1,
                               yt.astype(np.float64) + 0.5, np.full(B, 1e30),
                               np.full(B, np.nan), yt.astype(str), yt.astype(np.uint64)])
        elif loss in ("binary_crossentropy", "categorical_crossentropy") and not logits:
            yt = arr((B, O), lo=0, hi=1)
        else:
            yt = arr((B, O))
        yp = arr((B, O)) if logits or loss in ("mse", "mae", "huber") else arr((B, O), lo=0, hi=1)
        kw.update(y_true=yt, y_pred=yp, loss=loss, from_logits=logits,
                  delta=r.choice([1.0, 0.5, 2.0]), grad=r.chance(0.8),
                  per_sample=r.chance(0.5))
    elif kernel == "batchnorm_forward":
        F = I
        kw.update(x=arr((B, F)), training=r.chance(0.6), momentum=r.choice([0.99, 0.0, 1.0, 0.5]),
                  epsilon=r.choice([1e-3, 1e-7, 1.0]))
        for name in ("gamma", "beta"):
            if r.chance(0.6):
                kw[name] = arr((F,))
        if r.chance(0.7) or not kw["training"]:
            kw["moving_mean"] = arr((F,))
            kw["moving_variance"] = np.abs(arr((F,)))
            written.update(("moving_mean", "moving_variance"))
        out_like["out"] = (B, F)
    elif kernel == "batchnorm_backward":
        F = I
        B = max(B, 2)
        x = arr((B, F))
        with np.errstate(all="ignore"):
            _, mean, rstd = ops.batchnorm_forward(x)
        kw.update(dout=arr((B, F)), x=x, mean=mean, rstd=rstd)
        if r.chance(0.6):
            kw["gamma"] = arr((F,))
        out_like["dx"] = (B, F)
    elif kernel == "layernorm_forward":
        kw.update(x=arr((B, O)), epsilon=r.choice([1e-3, 1e-7, 1.0]))
        for name in ("gamma", "beta"):
            if r.chance(0.6):
                kw[name] = arr((O,))
        out_like["out"] = (B, O)
    elif kernel == "layernorm_backward":
        x = arr((B, max(O, 1)))
        with np.errstate(all="ignore"):
            _, mean, rstd = ops.layernorm_forward(x)
        kw.update(dout=arr(x.shape), x=x, mean=mean, rstd=rstd)
        if r.chance(0.6):
            kw["gamma"] = arr((x.shape[1],))
        out_like["dx"] = x.shape
    elif kernel in ("relu_forward", "relu_backward"):
        kw["x"] = arr((B, O))
        if kernel == "relu_backward":
            kw["dout"] = arr((B, O))
        kw.update(negative_slope=r.choice([0.0, 0.1, 2.0]), threshold=r.choice([0.0, 0.5]),
                  max_value=r.choice([None, 6.0, 0.0]))
        out_like["out" if kernel == "relu_forward" else "dx"] = (B, O)
    elif kernel in ("prelu_forward", "prelu_backward"):
        kw.update(x=arr((B, O)), alpha=arr((O,)))
        if kernel == "prelu_backward":
            kw["dout"] = arr((B, O))
        out_like["out" if kernel == "prelu_forward" else "dx"] = (B, O)
    elif kernel == "dropout":
        kw.update(x=arr((B, O)), rate=r.choice([0.0, 0.1, 0.5, 0.99]),
                  seed=r.int(0, 2**64 - 1), offset=r.choice([0, 1, r.int(0, 2**64 - 1)]))
        out_like["out"] = (B, O)
    elif kernel == "sum_squares":
        shape = r.choice([(B,), (B, O), (B, O, 2), (), (0,)])
        kw["x"] = arr(shape)
    else:
        n = r.int(0, 40)
        kw.update(params=arr((n,)), grads=arr((n,)))
        written.add("params")
        if r.chance(0.5):
            cuts = sorted(rng.integers(0, n + 1, r.int(0, 3)).tolist())
            kw["offsets"] = [0] + cuts + [n]
        for opt in ("clipvalue", "clipnorm", "global_clipnorm", "weight_decay"):
            if r.chance(0.15):
                kw[opt] = r.choice([0.5, 1.0, 1e-3, 0.0])
        if r.chance(0.3):
            kw["learning_rate"] = r.choice([0.1, 0.0, 1e3])
        if kernel == "sgd_step":
            if r.chance(0.5):
                kw.update(momentum=r.choice([0.9, 0.5]), nesterov=r.chance(0.5),
                          velocity=arr((n,)))
                written.add("velocity")
            kw["step"] = r.int(1, 5)
        elif kernel == "rmsprop_step":
            kw["v"] = np.abs(arr((n,)))
            written.add("v")
            if r.chance(0.4):
                kw.update(centered=True, m=arr((n,)))
                written.add("m")
            if r.chance(0.4):
                kw.update(momentum=0.5, momentum_buffer=arr((n,)))
                written.add("momentum_buffer")
            kw["step"] = r.int(1, 5)
        elif kernel == "adam_step":
            kw.update(m=arr((n,)), v=np.abs(arr((n,))), step=r.int(1, 100))
            written.update(("m", "v"))
            if r.chance(0.4):
                kw.update(amsgrad=True, vmax=np.abs(arr((n,))))
                written.add("vmax")
        else:
            kw["accumulator"] = np.abs(arr((n,)))
            written.add("accumulator")
            kw["step"] = r.int(1, 5)
    # caller-provided output buffers, mostly good ones
    for name, shape in out_like.items():
        if r.chance(0.3):
            kw[name] = np.empty(shape, dt)
            written.add(name)
    notes = []
    # damage
    arrays = [k for k, v in kw.items() if isinstance(v, np.ndarray)]
    for k in arrays:
        v = kw[k]
        if r.chance(0.2):
            kind = r.choice(LAYOUTS)
            kw[k] = _layout(v, kind)
            if kind != "c":
                notes.append(f"{k} {kind}")
        if r.chance(0.04):
            wrong = r.choice(WRONG_DTYPES + [np.float64 if dt == np.float32 else np.float32])
            with np.errstate(all="ignore"):
                kw[k] = v.astype(wrong)
            notes.append(f"{k} dtype {np.dtype(wrong).name}")
        if r.chance(0.03):
            new_shape = r.choice([v.shape + (1,), v.shape[:-1], (),
                                  tuple(s + 1 for s in v.shape),
                                  tuple(max(s - 1, 0) for s in v.shape), v.shape[::-1]])
            kw[k] = _values(rng, new_shape, dt, r)
            notes.append(f"{k} shape {new_shape}")
        if r.chance(0.02):
            kw[k] = r.choice([v.tolist(), None, 1.0, "x", [[1.0]]])
            notes.append(f"{k} not an array")
    for k in list(kw):
        if not isinstance(kw[k], np.ndarray) and r.chance(0.05):
            kw[k] = r.choice(WEIRD_SCALARS + ([r.choice(ACT_NAMES)] if k == "activation"
                                              else []))
            notes.append(f"{k} weird")
    if kw and r.chance(0.06):
        k = r.choice(list(kw))
        del kw[k]
        notes.append(f"{k} left out")
    if r.chance(0.01):
        kw["no_such_argument"] = 1
    return _Call(kernel, kw, written, notes)


def _snapshot(v):
    if isinstance(v, np.ndarray) and v.dtype != object:
        return (v.shape, v.dtype, np.ascontiguousarray(v).tobytes())
    return None


def _expect(call, result):
    """Check a successful call's result against the documented shapes."""
    kw = call.kwargs
    first = next(v for v in kw.values() if isinstance(v, np.ndarray))
    dt = first.dtype

    def arrcheck(a, shape, dtype=dt, what="result"):
        if not isinstance(a, np.ndarray):
            raise HarnessFailure(f"{what} is {type(a).__name__}, not an array")
        if a.shape != tuple(shape) or a.dtype != dtype:
            raise HarnessFailure(f"{what} has shape {a.shape} dtype {a.dtype}, expected "
                                 f"{tuple(shape)} {np.dtype(dtype)}")

    k = call.kernel
    if k == "matmul":
        a, b = kw["a"], kw["b"]
        m = a.shape[1] if kw.get("trans_a") else a.shape[0]
        n = b.shape[0] if kw.get("trans_b") else b.shape[1]
        arrcheck(result, (m, n))
        if kw.get("out") is not None and result is not kw["out"]:
            raise HarnessFailure("matmul did not return out")
        _compare(result, _opp(a, kw.get("trans_a")) @ _opp(b, kw.get("trans_b")),
                 np.abs(_opp(a, kw.get("trans_a"))) @ np.abs(_opp(b, kw.get("trans_b"))), dt)
    elif k == "dense_forward":
        arrcheck(result, (kw["x"].shape[0], kw["kernel"].shape[1]))
        if kw.get("out") is not None and result is not kw["out"]:
            raise HarnessFailure("dense_forward did not return out")
        if kw.get("activation", "linear") == "linear":
            x, w = kw["x"].astype(np.float64), kw["kernel"].astype(np.float64)
            b = kw.get("bias")
            want = x @ w + (0 if b is None else b.astype(np.float64))
            _compare(result, want, np.abs(x) @ np.abs(w) + (0 if b is None else np.abs(b)), dt)
    elif k == "dense_backward":
        if not isinstance(result, tuple) or len(result) != 3:
            raise HarnessFailure(f"dense_backward returned {type(result).__name__}")
        dx, dk, db = result
        arrcheck(dk, kw["kernel"].shape, what="dkernel")
        if kw.get("need_dx", True):
            arrcheck(dx, kw["x"].shape, what="dx")
        elif dx is not None:
            raise HarnessFailure("dx returned although need_dx is false")
        if kw.get("use_bias", True):
            arrcheck(db, (kw["kernel"].shape[1],), what="dbias")
        elif db is not None:
            raise HarnessFailure("dbias returned although use_bias is false")
    elif k in ("activation_forward", "dropout"):
        arrcheck(result, kw["x"].shape)
        if kw.get("out") is not None and result is not kw["out"]:
            raise HarnessFailure(f"{k} did not return out")
    elif k == "activation_backward":
        arrcheck(result, kw["dout"].shape)
    elif k == "loss_forward_backward":
        yp = kw["y_pred"]
        n = 3 if kw.get("per_sample") else 2
        if not isinstance(result, tuple) or len(result) != n:
            raise HarnessFailure(f"loss returned {result!r:.80}")
        if not isinstance(result[0], float):
            raise HarnessFailure(f"the loss is {type(result[0]).__name__}, not a float")
        if kw.get("grad", True):
            arrcheck(result[1], yp.shape, yp.dtype, "dy_pred")
        elif result[1] is not None:
            raise HarnessFailure("a gradient returned although grad is false")
        if n == 3:
            arrcheck(result[2], (yp.shape[0],), yp.dtype, "per-sample losses")
    elif k == "batchnorm_forward":
        out, mean, rstd = result
        x = kw["x"]
        arrcheck(out, x.shape, what="out")
        arrcheck(mean, (x.shape[1],), np.float64, "mean")
        arrcheck(rstd, (x.shape[1],), np.float64, "rstd")
    elif k == "batchnorm_backward":
        dx, dg, db = result
        x = kw["x"]
        arrcheck(dx, x.shape, kw["dout"].dtype, "dx")
        arrcheck(dg, (x.shape[1],), kw["dout"].dtype, "dgamma")
        arrcheck(db, (x.shape[1],), kw["dout"].dtype, "dbeta")
    elif k == "layernorm_forward":
        out, mean, rstd = result
        x = kw["x"]
        arrcheck(out, x.shape, what="out")
        arrcheck(mean, (x.shape[0],), np.float64, "mean")
        arrcheck(rstd, (x.shape[0],), np.float64, "rstd")
    elif k in ("layernorm_backward", "prelu_backward"):
        x = kw["x"]
        dx, *rest = result
        arrcheck(dx, x.shape, kw["dout"].dtype, "dx")
        for r_ in rest:
            arrcheck(r_, (x.shape[1],), kw["dout"].dtype, "dgamma, dbeta or dalpha")
    elif k in ("relu_forward", "prelu_forward", "relu_backward"):
        arrcheck(result, kw["x"].shape)
        out = kw.get("out", kw.get("dx"))
        if out is not None and result is not out:
            raise HarnessFailure(f"{k} did not return its output")
    elif k == "sum_squares":
        if not isinstance(result, float):
            raise HarnessFailure(f"sum_squares returned {type(result).__name__}")
        x = kw["x"].astype(np.float64)
        with np.errstate(all="ignore"):
            want = float(np.sum(x * x))
        _compare(np.array(result), np.array(want), np.array(abs(want)), np.float32)
    else:
        keys = {"grad_norms", "global_norm", "clip_scale", "clipped", "nonfinite", "overflow"}
        if not isinstance(result, dict) or set(result) != keys:
            raise HarnessFailure(f"{k} returned {result!r:.80}")
        offsets = kw.get("offsets")
        tensors = 1 if offsets is None else len(offsets) - 1
        arrcheck(result["grad_norms"], (tensors,), np.float64, "grad_norms")
        over = result["overflow"]
        params = kw["params"]
        if over is not None and (not isinstance(over, str) or not over.startswith("tensor_")
                                 or np.all(np.isfinite(params))):
            raise HarnessFailure(f"overflow {over!r} reported with params all finite "
                                 "or not naming a tensor")
        if over is None and not result["nonfinite"] and not np.all(np.isfinite(params)):
            raise HarnessFailure("params not all finite after the step, and no overflow reported")


def _opp(a, t):
    a = a.astype(np.float64)
    return a.T if t else a


def _compare(got, want, bound, dt):
    """Only for finite inputs and results: NumPy and the kernel agree."""
    with np.errstate(all="ignore"):
        if not (np.isfinite(want).all() and np.isfinite(bound).all()) or \
                (bound.size and bound.max() > np.finfo(dt).max / 4):
            return   # not finite, or beyond the dtype's range: overflow is right
        tol = 1e-4 if dt == np.float32 else 1e-10
        err = np.abs(got.astype(np.float64) - want)
        bad = err > tol * (np.abs(want) + bound + 1e-30)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise HarnessFailure(f"result differs from NumPy at {i}: got {got[i]!r}, "
                             f"expected {want[i]!r}")


class OpsHarness:
    name = "ops"

    def __init__(self, workdir, crash_dir):
        self.crash_dir = crash_dir
        _import_fastgrad()

    def generate(self, r):
        return _gen_call(r)

    def check_call(self, call):
        fg = _import_fastgrad()
        fn = getattr(fg.ops, call.kernel)
        before = {k: _snapshot(v) for k, v in call.kwargs.items() if k not in call.written}
        try:
            result = fn(**call.kwargs)
        except (ValueError, TypeError):
            outcome = "refused"
        except Exception as e:   # noqa: BLE001 - any other exception is the finding
            raise HarnessFailure(f"ops.{call.kernel} raised {type(e).__name__}", e,
                                 call.describe()) from None
        else:
            outcome = "ok"
            try:
                _expect(call, result)
            except HarnessFailure as f:
                f.detail = call.describe()
                raise
            except Exception as e:   # noqa: BLE001 - a result the checks could not read
                raise HarnessFailure(f"ops.{call.kernel} returned an unexpected result "
                                     f"({type(e).__name__})", e, call.describe()) from None
        for k, snap in before.items():
            if snap is not None and _snapshot(call.kwargs[k]) != snap:
                raise HarnessFailure(f"ops.{call.kernel} modified its input {k}",
                                     detail=call.describe())
        return outcome

    def one(self, r):
        call = self.generate(r)
        return self.check_call(call), call

    def save_input(self, call, iteration):
        p = os.path.join(self.crash_dir, f"ops-{iteration}.txt")
        with open(p, "w") as f:
            f.write(call.describe() + "\n")
        return p


HARNESSES = {"load_model": LoadModelHarness, "ops": OpsHarness}
if importlib.util.find_spec("h5py") is not None:   # the keras extra
    HARNESSES["load_keras"] = LoadKerasHarness


# ---------------------------------------------------------------------------
# engines
# ---------------------------------------------------------------------------

def _iteration_seed(seed, target, i):
    return f"{seed}:{target}:{i}"


def run_random(target, seconds, seed=0, workdir=None, crash_dir=None, strict_warnings=False,
               max_iterations=None, log=None):
    """The seeded mutation loop for one harness, in this process. Returns
    Stats (iterations, failures)."""
    own = workdir is None
    if own:
        tmp = tempfile.TemporaryDirectory(prefix="fastgrad-fuzz-")
        workdir = tmp.name
    crash_dir = crash_dir or workdir
    os.makedirs(crash_dir, exist_ok=True)
    stats = Stats(target)
    try:
        harness = HARNESSES[target](workdir, crash_dir)
        marker = os.path.join(crash_dir, f"current-{target}.iteration")
        t0 = time.perf_counter()
        deadline = t0 + seconds
        i = 0
        with open(marker, "w") as mark, warnings.catch_warnings():
            warnings.simplefilter("error" if strict_warnings else "ignore")
            while time.perf_counter() < deadline and (max_iterations is None
                                                      or i < max_iterations):
                mark.seek(0)
                mark.write(f"{i:>12}\n")
                mark.flush()
                r = Rand(_iteration_seed(seed, target, i))
                try:
                    outcome, _ = harness.one(r)
                    stats.count(outcome)
                except HarnessFailure as f:
                    r = Rand(_iteration_seed(seed, target, i))   # regenerate to keep it
                    item = harness.generate(r)
                    path = harness.save_input(item, i)
                    failure = Failure(target, i, f.what, f.exc, f.detail, path)
                    new = failure.key not in stats.unique
                    stats.add(failure)
                    if log and new:
                        print(failure.describe(), file=log, flush=True)
                        print(file=log)
                i += 1
        stats.iterations = i
        stats.seconds = time.perf_counter() - t0
        try:
            os.unlink(marker)
        except OSError:
            pass
    finally:
        if own:
            tmp.cleanup()
    return stats


def replay(target, iteration, seed, crash_dir, strict_warnings=False):
    """Regenerate one iteration of the random engine and run it verbosely."""
    with tempfile.TemporaryDirectory(prefix="fastgrad-fuzz-") as workdir:
        harness = HARNESSES[target](workdir, crash_dir or workdir)
        item = harness.generate(Rand(_iteration_seed(seed, target, iteration)))
        if target == "ops":
            print(item.describe())
        else:
            p = harness.save_input(item, iteration)
            print(f"input written to {p}")
        with warnings.catch_warnings():
            warnings.simplefilter("error" if strict_warnings else "ignore")
            try:
                if target == "ops":
                    outcome = harness.check_call(item)
                else:
                    outcome = harness.check_bytes(item, Rand(_iteration_seed(seed, target,
                                                                               iteration)))
            except HarnessFailure as f:
                print(Failure(target, iteration, f.what, f.exc, f.detail).describe())
                return 1
        print(f"outcome: {outcome}")
        return 0


def _atheris_child(target, seconds, seed, crash_dir, strict_warnings):
    """Runs inside a child process: atheris.Fuzz never returns."""
    import atheris

    with atheris.instrument_imports(include=["fastgrad"]):
        _import_fastgrad()
    workdir = tempfile.mkdtemp(prefix="fastgrad-fuzz-")
    harness = HARNESSES[target](workdir, crash_dir)
    if strict_warnings:
        warnings.simplefilter("error")
    else:
        warnings.simplefilter("ignore")
    # no RSS limit: under AddressSanitizer the shadow memory alone passes
    # libFuzzer's default 2 GB and reads as an out-of-memory finding
    args = [sys.argv[0], f"-max_total_time={max(1, int(seconds))}", f"-seed={seed or 1}",
            f"-artifact_prefix={crash_dir.rstrip('/')}/", "-print_final_stats=1",
            "-rss_limit_mb=0"]

    def raise_failure(f):
        # an uncaught exception is what atheris records as a finding
        raise RuntimeError(Failure(target, -1, f.what, f.exc, f.detail).describe()) from None

    if target in ("load_model", "load_keras"):
        corpus = os.path.join(workdir, "corpus")
        os.makedirs(corpus)
        for i, b in enumerate(harness.bases):
            with open(os.path.join(corpus, f"base-{i}"), "wb") as fh:
                fh.write(b)
        args += ["-max_len=1048576", corpus]

        def test_one(data):
            try:
                harness.check_bytes(bytes(data), Rand(len(data)))
            except HarnessFailure as f:
                raise_failure(f)

        def mutator(data, max_size, mseed):
            out = harness.mutate(bytes(data), Rand(mseed))
            return out[:max_size]

        atheris.Setup(args, test_one, custom_mutator=mutator)
    else:
        def test_one(data):
            call = harness.generate(FdpRand(atheris.FuzzedDataProvider(data)))
            try:
                harness.check_call(call)
            except HarnessFailure as f:
                raise_failure(f)

        atheris.Setup(args, test_one)
    atheris.Fuzz()


def run_atheris(target, seconds, seed, crash_dir, strict_warnings):
    """One child process per harness; returns Stats parsed from libFuzzer's
    report."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_atheris-child", "--target", target,
           "--seconds", str(seconds), "--seed", str(seed), "--crash-dir", crash_dir]
    if strict_warnings:
        cmd.append("--strict-warnings")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace", check=False)   # the exit status is read below
    stats = Stats(target)
    stats.seconds = time.perf_counter() - t0
    out = proc.stdout
    runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out) or \
        re.findall(r"Done (\d+) runs", out) or re.findall(r"#(\d+)\s", out)
    stats.iterations = int(runs[-1]) if runs else 0
    if proc.returncode != 0:
        tail = "\n".join(out.splitlines()[-60:])
        stats.add(Failure(target, stats.iterations,
                          f"atheris child exited with status {proc.returncode}",
                          detail=tail))
    return stats


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def _have_atheris():
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, required=True, help="time per harness")
    p.add_argument("--target", choices=[*HARNESSES, "all"], default="all")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=["auto", "random", "atheris"], default="auto")
    p.add_argument("--crash-dir", default=None,
                   help="where failing inputs are kept (default: a new temporary folder)")
    p.add_argument("--replay", default=None, metavar="TARGET:ITERATION")
    p.add_argument("--strict-warnings", action="store_true",
                   help="count any Python warning (e.g. NumPy's RuntimeWarning) as a failure")
    p.add_argument("--_atheris-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    faulthandler.enable()
    crash_dir = args.crash_dir or tempfile.mkdtemp(prefix="fastgrad-fuzz-crashes-")
    os.makedirs(crash_dir, exist_ok=True)

    if args._atheris_child:
        _atheris_child(args.target, args.seconds, args.seed, crash_dir, args.strict_warnings)
        return 0
    if args.replay:
        target, _, it = args.replay.partition(":")
        if target not in HARNESSES or not it.isdigit():
            p.error("--replay expects TARGET:ITERATION, e.g. ops:1234")
        return replay(target, int(it), args.seed, crash_dir, args.strict_warnings)

    engine = args.engine
    if engine == "auto":
        engine = "atheris" if _have_atheris() else "random"
    elif engine == "atheris" and not _have_atheris():
        p.error("--engine atheris: `import atheris` fails; pip install atheris")
    targets = list(HARNESSES) if args.target == "all" else [args.target]
    print(f"fastgrad fuzz: engine {engine}, seed {args.seed}, {args.seconds:g} s per harness, "
          f"failing inputs in {crash_dir}", flush=True)
    results = []
    for t in targets:
        if engine == "random":
            st = run_random(t, args.seconds, args.seed, crash_dir=crash_dir,
                            strict_warnings=args.strict_warnings, log=sys.stdout)
        else:
            st = run_atheris(t, args.seconds, args.seed, crash_dir, args.strict_warnings)
            for f in st.failures:
                print(f.describe(), flush=True)
        results.append(st)
        print(st.summary(), flush=True)
    failed = [s for s in results if s.failures]
    if failed:
        print(f"FAILED: {', '.join(s.target for s in failed)}"
              + (f" (replay one with --seed {args.seed} --replay TARGET:ITERATION)"
                 if engine == "random" else ""))
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
