"""Keras 3 files, both ways: ``.keras`` archives and ``.weights.h5`` weights.

A ``.keras`` file is a zip archive of three members, as Keras 3 writes it:

    metadata.json     {"keras_version": ..., "date_saved": ...}
    config.json       the model: {"module": "keras", "class_name": "Sequential",
                      "config": {"name", "dtype", "layers": [InputLayer, ...]},
                      "build_config", "compile_config": optimizer, loss, metrics}
    model.weights.h5  HDF5: layers/<path>/vars/<i> for each layer's weights,
                      optimizer/vars/<i> for the optimizer's state, vars (empty)

A layer's <path> is its class name in snake case, numbered from the second
layer of the same class on (dense, dense_1, ...), whatever the layer's own
name. Optimizer variables are, in order: the step count, the learning rate
(absent when it is a schedule), then the optimizer's slots for each
trainable tensor in ``get_weights()`` order; Adam's m and v alternate per
tensor, and the other slots (AMSGrad's v_hat, RMSprop's momentum and mean
gradient) follow in lists of their own. A ``.weights.h5`` file is the same
HDF5 layout on its own.

What fastgrad writes and reads: Sequential models of every fastgrad layer
(a first Flatten's sample shape goes on the InputLayer; a Normalization
given its mean and variance keeps them in its config and has no
variables, an adapted one has Keras' mean, variance and an unused count
variable), every activation, initializer, regularizer and MaxNorm/NonNeg
constraint fastgrad has, the nine optimizers (with a float learning rate
or any of the schedules), every loss and the compiled metrics.
The archive keeps the weights, the optimizer's configuration and state and
the step count; it does not keep fastgrad's random-generator state, dropout
counters or ``nonfinite`` policy (fastgrad's own format does: exact
resume).

Reading never runs code and never trusts the file:

- the archive is refused unless its end record announces at most
  ``MAX_MEMBERS`` members, each member is one of the three names above,
  none is encrypted, compressed other than stored or deflated, larger than
  its limit (``MAX_JSON`` for the JSON members, ``MAX_WEIGHTS`` for the
  weights) or expanding more than ``MAX_RATIO`` times; member names with
  ``..``, a leading slash or a drive are refused by name;
- every object in config.json must come from Keras' own modules and be one
  of the supported classes; Lambda layers, custom objects (a
  ``registered_name`` of their own or a foreign ``module``), functions and
  unknown classes or options raise ValueError naming the entry;
- the HDF5 weights may hold only the groups and datasets the architecture
  implies (no links, no external or virtual storage, no filters), each
  dataset of the expected shape and a float dtype (the step count an
  integer), read in full before the model takes any of it.

Every failure is a ``KerasFileError``, a ValueError.
"""
import datetime
import inspect
import io
import json
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np

from fastgrad import (
    constraints,
    initializers,
    losses,
    metrics,
    optimizers,
    regularizers,
    saving,
    schedules,
)
from fastgrad import layers as layers_mod

EXTRA = "pip install 'fastgrad[keras]'"
MAX_MEMBERS = 16
MAX_JSON = 16 << 20
MAX_WEIGHTS = 4 << 30
MAX_RATIO = 100
KERAS_VERSION = "3.0.0"   # Keras records its version in metadata.json, unchecked on loading

_CONFIG, _METADATA, _WEIGHTS = "config.json", "metadata.json", "model.weights.h5"
_LIMITS = {_CONFIG: MAX_JSON, _METADATA: MAX_JSON, _WEIGHTS: MAX_WEIGHTS}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_MODULES = {"keras", "keras.models", "keras.layers", "keras.initializers",
            "keras.regularizers", "keras.constraints", "keras.optimizers",
            "keras.optimizers.schedules", "keras.losses", "keras.metrics",
            "keras.activations"}
_FLOATS = ("float32", "float64")
# Keras options with no fastgrad counterpart, accepted at these values only
_NEUTRAL = {
    "trainable": (True,), "input_axes": (None,), "output_axes": (None,),
    "noise_shape": (None,), "synchronized": (False,), "renorm": (False,),
    "renorm_clipping": (None,), "quantization_config": (None,), "lora_rank": (None,),
    "lora_alpha": (None,), "use_ema": (False,), "ema_overwrite_frequency": (None,),
    "loss_scale_factor": (None,), "gradient_accumulation_steps": (None,),
    "reduction": ("sum_over_batch_size", "auto"), "label_smoothing": (0, 0.0),
    "axis": (-1,), "ignore_class": (None,), "sparse": (False,), "ragged": (False,),
    "optional": (False,), "sparse_y_true": (True,), "sparse_y_pred": (False,),
}
# Keras options whose value does not change what fastgrad computes
_IGNORED = {"name", "dtype", "ema_momentum", "renorm_momentum"}


class KerasFileError(saving.ModelFileError):
    """A file that is not a Keras 3 archive or weights file fastgrad reads."""


def h5py_module():
    """h5py, or an ImportError naming the extra that installs it."""
    try:
        import h5py
    except ImportError:
        raise ImportError("Keras .keras and .weights.h5 files need h5py: "
                          f"{EXTRA}") from None
    return h5py


def sniff(path):
    """"keras" for a zip archive, "hdf5" for an HDF5 file, else "fastgrad"."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return "fastgrad"   # the fastgrad reader says what is wrong
    if head[:4] in _ZIP_MAGIC:
        return "keras"
    return "hdf5" if head == _HDF5_MAGIC else "fastgrad"


def save_kind(path):
    """How ``model.save(path)`` writes: "keras" for a name ending in
    ``.keras``, "fastgrad" for any other; HDF5 names are refused."""
    name = os.fspath(path)
    if not isinstance(name, str):
        name = os.fsdecode(name)
    if name.endswith(".keras"):
        return "keras"
    if name.endswith((".h5", ".hdf5")):
        raise ValueError(f"path: {name!r} names an HDF5 file, which holds weights only; "
                         "use model.save_weights('x.weights.h5'), or save the whole model "
                         "as 'x.keras' (Keras) or 'x.fgm' (fastgrad, exact resume)")
    return "fastgrad"


# ---------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------

def _kobj(module, class_name, config):
    return {"module": module, "class_name": class_name, "config": config,
            "registered_name": None}


def _policy(dtype):
    return _kobj("keras", "DTypePolicy", {"name": dtype})


def _nested(module, serialized):
    """A fastgrad {"class_name", "config"} as Keras writes it, or None."""
    return None if serialized is None else _kobj(module, serialized["class_name"],
                                                 serialized["config"])


def _layer_out(layer, dtype):
    cfg = layer.get_config()
    out = {"name": layer.name, "trainable": True, "dtype": _policy(dtype)}
    for key, value in cfg.items():
        if key in ("name", "input_dim", "input_shape"):   # shapes: on the InputLayer
            continue
        if key.endswith("_initializer"):
            value = _nested("keras.initializers", value)
        elif key.endswith("_regularizer"):
            value = _nested("keras.regularizers", value)
        elif key.endswith("_constraint"):
            if value is not None and value["class_name"] not in ("MaxNorm", "NonNeg"):
                raise ValueError(f"model: {layer.name}.{key} is {value['class_name']}, "
                                 "which Keras does not have; save as .fgm instead")
            value = _nested("keras.constraints", value)
        out[key] = value
    if layer.kind == "BatchNormalization":
        out["axis"] = -1
    if _given(layer):   # the values it holds now, in case adapt replaced the given ones
        out["mean"], out["variance"] = (layer.weights[k].tolist() for k in ("mean", "variance"))
    entry = _kobj("keras.layers", layer.kind, out)
    if layer.weight_specs:
        entry["build_config"] = {"input_shape": [None, layer.input_dim]}
    return entry


def _optimizer_out(opt):
    cfg = {k: v for k, v in opt.get_config().items() if k != "nonfinite"}
    if isinstance(cfg["learning_rate"], dict):
        cfg["learning_rate"] = _nested("keras.optimizers.schedules", cfg["learning_rate"])
    cfg["name"] = opt.name
    return _kobj("keras.optimizers", type(opt).__name__, cfg)


def _config_out(model):
    dtype = model.dtype.name
    shape = _input_shape(model)
    layers = [_kobj("keras.layers", "InputLayer",
                    {"batch_shape": shape, "dtype": dtype, "sparse": False,
                     "name": "input_layer"})]
    layers += [_layer_out(layer, dtype) for layer in model.layers]
    config = _kobj("keras", "Sequential", {"name": model.name, "trainable": True,
                                           "dtype": _policy(dtype), "layers": layers,
                                           "build_input_shape": shape})
    config["build_config"] = {"input_shape": shape}
    if model.optimizer is not None:
        loss = model.loss
        mets = [spec if isinstance(spec, str) else _nested("keras.metrics",
                                                           metrics.serialize(m))
                for spec, m in zip(model._metric_specs, model.metrics)]
        config["compile_config"] = {
            "optimizer": _optimizer_out(model.optimizer),
            "loss": _kobj("keras.losses", type(loss).__name__, loss.get_config()),
            "loss_weights": None, "metrics": mets, "weighted_metrics": None,
            "run_eagerly": False, "steps_per_execution": 1, "jit_compile": True}
    return config


def _layer_paths(model):
    """Each layer's group in the HDF5 file: snake-cased class, numbered."""
    seen, paths = {}, []
    for layer in model.layers:
        base = _snake(layer.kind)
        k = seen.get(base, -1) + 1
        seen[base] = k
        paths.append(f"layers/{base}" if k == 0 else f"layers/{base}_{k}")
    return paths


def _snake(name):
    """Keras' group name of a class: an underscore before each capital that
    starts a lower-case run and after each lower-case letter followed by a
    capital, then lower case (PReLU: p_re_lu, LayerNormalization:
    layer_normalization)."""
    out = []
    for i, c in enumerate(name):
        before, after = name[i - 1] if i else "", name[i + 1:i + 2]
        if i and c.isupper() and (after.islower() or before.islower()):
            out.append("_")
        out.append(c.lower())
    return "".join(out)


def _given(layer):
    """True for a Normalization given its mean and variance: Keras keeps
    them in its config and has no variables for them."""
    return layer.kind == "Normalization" and layer.get_config()["mean"] is not None


def _keras_vars(layer):
    """(shape, dtype kinds) of each variable Keras keeps for layer, in its
    order: the layer's weights, but for an adapted Normalization mean,
    variance and Keras' count (unused), for a given one none."""
    if layer.kind != "Normalization":
        return [(s.shape, "f") for s in layer.weight_specs]
    if _given(layer):
        return []
    return [((layer.input_dim,), "f")] * 2 + [((), "iu")]


def _keras_values(layer):
    """The arrays of _keras_vars(layer), from the layer's weights."""
    values = [layer.weights[s.name] for s in layer.weight_specs]
    if layer.kind != "Normalization":
        return values
    return [] if _given(layer) else values + [np.array(0, np.int64)]


def _from_keras(layer, arrays):
    """The layer's weights (get_weights() order) from its Keras variables."""
    if layer.kind != "Normalization":
        return arrays
    return layer.get_weights() if _given(layer) else arrays[:2]


def _input_shape(model):
    """Keras' input shape: (None, features), or (None, d1, d2, ...) before
    a first Flatten given a sample shape."""
    first = model.layers[0]
    sample = first.sample_shape if first.kind == "Flatten" else None
    return [None, *(sample or (model.input_dim,))]


def _slots(opt):
    """The optimizer's slot lists in Keras' variable order: a list of groups,
    each a tuple of fastgrad moment names taken in turn for every tensor."""
    if isinstance(opt, optimizers.Adam):
        return [("m", "v")] + ([("vmax",)] if opt.amsgrad else [])
    if isinstance(opt, optimizers.RMSprop):
        return [("v",)] + ([("vmax",)] if opt.momentum else []) + \
            ([("m",)] if opt.centered else [])
    if isinstance(opt, optimizers.SGD):
        return [("v",)] if opt.momentum else []
    if isinstance(opt, (optimizers.Nadam, optimizers.Adamax)):
        return [("m", "v")]   # Adamax's v is Keras's "norm"
    if isinstance(opt, optimizers.Adadelta):   # accumulated g^2, then delta^2
        return [("v", "m")]
    if isinstance(opt, optimizers.Lion):
        return [("m",)]
    return [("v",)]   # Adagrad's accumulators


def _trailer(opt):
    """Keras's variables after the slots: Nadam's running product of its
    momentum factors, which fastgrad recomputes from the step count."""
    if isinstance(opt, optimizers.Nadam):
        return [np.array(opt._nadam_product(opt.iterations), np.float32)]
    return []


def _optimizer_vars(model):
    """Keras' list of optimizer variables for model's optimizer."""
    opt = model.optimizer
    lr = opt._learning_rate   # the float, or the schedule
    out = [np.array(opt.iterations, np.int64)]
    if not isinstance(lr, schedules.LearningRateSchedule):
        out.append(np.array(lr, np.float32))
    moments = opt.variables()
    for group in _slots(opt):
        for _, off, shape, _, _ in model._tensors:
            size = int(np.prod(shape))
            for slot in group:
                out.append(moments[slot][off:off + size].reshape(shape))
    return out + _trailer(opt)


def _write_h5(model, target):
    h5py = h5py_module()
    with h5py.File(target, "w") as f:
        layer_groups = f.create_group("layers")
        for layer, path in zip(model.layers, _layer_paths(model)):
            g = layer_groups.create_group(path.split("/", 1)[1]).create_group("vars")
            g.attrs["name"] = layer.name
            for i, a in enumerate(_keras_values(layer)):
                g.create_dataset(str(i), data=a)
        if model.optimizer is not None and model.built:
            g = f.create_group("optimizer").create_group("vars")
            g.attrs["name"] = model.optimizer.name
            for i, a in enumerate(_optimizer_vars(model)):
                g.create_dataset(str(i), data=a)
        f.create_group("vars").attrs["name"] = model.name


def require_built(model, doing="saving"):
    """Make model's weights, or raise ValueError when it cannot have them
    yet (its input width unknown); ``doing`` ends the message."""
    if not model.built:
        raise ValueError("model: it has no weights yet; build it (fit, predict, or give "
                         f"the first layer input_dim) before {doing}")
    model._require_built()   # a known input width: the weights are made on first use


def save_model(model, path):
    """Write model as a Keras 3 ``.keras`` archive, atomically."""
    from fastgrad import __version__

    h5py_module()
    require_built(model)
    config = json.dumps(_config_out(model), allow_nan=False).encode()
    meta = json.dumps({"keras_version": KERAS_VERSION, "fastgrad_version": __version__,
                       "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S")
                       }).encode()
    weights = io.BytesIO()
    _write_h5(model, weights)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(_METADATA, meta)
        zf.writestr(_CONFIG, config)
        zf.writestr(_WEIGHTS, weights.getvalue())
    saving.write_atomic(path, [buf.getvalue()])


def save_weights(model, path):
    """Write the weights (and optimizer state when compiled) in Keras'
    ``.weights.h5`` layout, atomically."""
    _weights_name(path, "filepath")
    h5py_module()
    require_built(model)
    buf = io.BytesIO()
    _write_h5(model, buf)
    saving.write_atomic(path, [buf.getvalue()])


def _weights_name(path, arg):
    name = os.fsdecode(os.fspath(path))
    if not name.endswith(".weights.h5"):
        raise ValueError(f"{arg}: expected a name ending in '.weights.h5' (Keras' weights "
                         f"file), got {name!r}")
    return name


# ---------------------------------------------------------------------------
# reading: the archive
# ---------------------------------------------------------------------------

def _read_limited(path, limit):
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise KerasFileError(f"{path}: {size} bytes is more than the {limit} a Keras "
                                 "file may have here")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except IsADirectoryError:
        raise KerasFileError(f"{path}: is a folder, not a Keras file") from None


def _check_end_record(data, path):
    """Refuse archives announcing too many members before zipfile reads
    their central directory."""
    at = data.rfind(b"PK\x05\x06", max(0, len(data) - 22 - 65535))
    if at < 0 or len(data) - at < 22:
        raise KerasFileError(f"{path}: not a zip archive (no end record)")
    _, _, _, on_disk, total, cd_size, cd_offset, _ = struct.unpack_from("<4s4H2IH", data, at)
    if 0xFFFF in (on_disk, total) or 0xFFFFFFFF in (cd_size, cd_offset):
        raise KerasFileError(f"{path}: a ZIP64 archive; Keras archives fastgrad reads "
                             "are plain zip files")
    if total > MAX_MEMBERS or on_disk != total:
        raise KerasFileError(f"{path}: the archive announces {total} members; a Keras "
                             f"archive has 3 (at most {MAX_MEMBERS} are read)")
    if cd_size > 64 * MAX_MEMBERS + 16 * 65535:
        raise KerasFileError(f"{path}: the archive's directory is {cd_size} bytes, far "
                             "more than its members need")


def _bad_name(name):
    parts = name.replace("\\", "/").split("/")
    return (name.startswith(("/", "\\")) or ".." in parts or "\0" in name
            or (len(name) > 1 and name[1] == ":"))


def _members(zf, path):
    infos, seen = {}, set()
    for info in zf.infolist():
        name = info.filename
        if _bad_name(name):
            raise KerasFileError(f"{path}: member {name!r} has an absolute or parent-folder "
                                 "name (path traversal)")
        if name in seen:
            raise KerasFileError(f"{path}: member {name!r} appears twice")
        seen.add(name)
        if name not in _LIMITS:
            raise KerasFileError(f"{path}: unexpected member {name!r}; a Keras archive "
                                 f"holds {_METADATA}, {_CONFIG} and {_WEIGHTS}")
        if info.flag_bits & 1:
            raise KerasFileError(f"{path}: member {name!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise KerasFileError(f"{path}: member {name!r} uses compression method "
                                 f"{info.compress_type}; only stored and deflated are read")
        if info.file_size > _LIMITS[name]:
            raise KerasFileError(f"{path}: member {name!r} declares {info.file_size} bytes, "
                                 f"more than the {_LIMITS[name]} allowed")
        if info.file_size > (1 << 20) and info.file_size > MAX_RATIO * max(info.compress_size,
                                                                           1):
            raise KerasFileError(f"{path}: member {name!r} expands {info.file_size} bytes "
                                 f"from {info.compress_size} (a decompression bomb)")
        infos[name] = info
    for name in (_CONFIG, _WEIGHTS):
        if name not in infos:
            raise KerasFileError(f"{path}: the archive lacks {name}")
    return infos


def _read_member(zf, info, path):
    with zf.open(info) as f:
        data = f.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise KerasFileError(f"{path}: member {info.filename!r} holds {len(data)} bytes, "
                             f"not the {info.file_size} it declares")
    return data


def _parse_json(data, what):
    try:
        value = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise KerasFileError(f"{what} is not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise KerasFileError(f"{what} is not a JSON object")
    return value


def _no_constant(name):
    raise ValueError(f"{name} is not a number a Keras file may hold")


def read_archive(path):
    """(config dict, weights bytes) of a ``.keras`` archive, checked."""
    data = _read_limited(path, MAX_WEIGHTS + 2 * MAX_JSON)
    _check_end_record(data, path)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = _members(zf, path)
            if _METADATA in infos:
                _parse_json(_read_member(zf, infos[_METADATA], path), f"{path}: {_METADATA}")
            config = _parse_json(_read_member(zf, infos[_CONFIG], path), f"{path}: {_CONFIG}")
            weights = _read_member(zf, infos[_WEIGHTS], path)
    except KerasFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError,
            NotImplementedError, struct.error, UnicodeDecodeError, OverflowError,
            ValueError, RuntimeError) as e:
        raise KerasFileError(f"{path}: a damaged zip archive ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
    return config, weights


# ---------------------------------------------------------------------------
# reading: config.json
# ---------------------------------------------------------------------------

def _obj(entry, where, classes):
    """(class_name, config) of a Keras object entry, after the safety checks."""
    if not isinstance(entry, dict):
        raise KerasFileError(f"{where}: expected an object entry, got {_short(entry)}")
    cls = entry.get("class_name")
    module = entry.get("module")
    registered = entry.get("registered_name")
    if not isinstance(cls, str):
        raise KerasFileError(f"{where}: the entry has no class_name")
    if cls in ("Lambda", "function", "__lambda__", "__typespec__"):
        raise KerasFileError(f"{where}: {cls} entries hold code; fastgrad never runs code "
                             "from a file")
    if module is not None and module not in _MODULES:
        raise KerasFileError(f"{where}: {cls} comes from module {_short(module)}, a custom "
                             "object; only Keras' own objects are read")
    if registered is not None and registered != cls:
        raise KerasFileError(f"{where}: {cls} is registered as {_short(registered)}, a "
                             "custom object; only Keras' own objects are read")
    if cls not in classes:
        raise KerasFileError(f"{where}: class {_short(cls)} is not supported here "
                             f"(expected one of {', '.join(sorted(classes))})")
    config = entry.get("config", {})
    if not isinstance(config, dict):
        raise KerasFileError(f"{where}: the config of {cls} is not an object")
    return cls, config


def _short(value):
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def _params(target):
    """The keyword arguments target takes, through **kwargs to its bases."""
    names = set()
    for fn in ([c.__init__ for c in target.__mro__ if "__init__" in vars(c)]
               if isinstance(target, type) else [target]):
        params = inspect.signature(fn).parameters
        names |= set(params)
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    return names


def _kwargs(config, target, where):
    """config's options that target's __init__ takes; Keras-only options
    must hold their neutral value."""
    params = _params(target)
    out = {}
    for key, value in config.items():
        if key in params and key not in ("self", "kwargs", "input_dim", "input_shape"):
            out[key] = value
        elif key in _NEUTRAL:
            if not any(value == v and type(value) is type(v) for v in _NEUTRAL[key]):
                raise KerasFileError(f"{where}: option {key}={_short(value)} is not "
                                     "supported by fastgrad")
        elif key not in _IGNORED:
            raise KerasFileError(f"{where}: unknown option {_short(key)}")
    return out


def _build(cls, kwargs, where):
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise KerasFileError(f"{where}: {str(e)[:200]}") from None


def _nested_in(value, where, names, module_get):
    """An initializer, regularizer or constraint entry (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return _build(module_get, {"identifier": value}, where)
    cls, config = _obj(value, where, names)
    return _build(names[cls], _kwargs(config, names[cls], where), where)


_INITS = {c.__name__: c for c in initializers.REGISTRY.classes.values()}
_INITS["VarianceScaling"] = initializers.VarianceScaling
_INITS["Constant"] = initializers.Constant
_REGS = {"L1": regularizers.L1, "L2": regularizers.L2, "L1L2": regularizers.L1L2}
_CONS = {"MaxNorm": constraints.MaxNorm, "NonNeg": constraints.NonNeg}
_NESTED = {"_initializer": (_INITS, initializers.get),
           "_regularizer": (_REGS, regularizers.get),
           "_constraint": (_CONS, constraints.get)}


def _function_name(value, module):
    """The name of a Keras function entry of module (Keras writes a built-in
    activation, loss or metric given as a function so), else value as is.
    Only the name is used: it must then be one fastgrad knows by name."""
    # Keras 3 writes {"module": "builtins", "class_name": "function",
    # "config": name, "registered_name": "function"} and resolves the name
    # among its own functions; here it is looked up among fastgrad's names
    if isinstance(value, dict) and value.get("class_name") == "function" and \
            value.get("module") in (module, "builtins") and \
            isinstance(value.get("config"), str) and \
            value.get("registered_name") in (None, "function", value["config"]):
        return value["config"]
    return value


def _activation_in(value, where):
    value = _function_name(value, "keras.activations")
    if isinstance(value, dict):
        _obj(value, where, set())   # refuses it, naming what it is
    if not isinstance(value, str):
        raise KerasFileError(f"{where}: expected an activation name, got {_short(value)}")
    try:
        from fastgrad import activations
        return activations.name_of(value)
    except (ValueError, TypeError) as e:
        raise KerasFileError(f"{where}: {e}") from None


def _dtype_in(value, where):
    if isinstance(value, dict):
        _, cfg = _obj(value, where, {"DTypePolicy", "FloatDTypePolicy"})
        value = cfg.get("name")
    if value not in _FLOATS:
        raise KerasFileError(f"{where}: dtype {_short(value)} is not supported (float32 or "
                             "float64)")
    return value


def _layer_in(entry, where):
    cls_name, config = _obj(entry, where, set(layers_mod.REGISTRY.classes))
    if cls_name not in layers_mod.REGISTRY.classes:
        raise KerasFileError(f"{where}: {cls_name} does not exist in fastgrad yet")
    cls = layers_mod.REGISTRY.classes[cls_name]
    kwargs = _kwargs(config, cls, where)
    for key, value in list(kwargs.items()):
        for suffix, (names, get) in _NESTED.items():
            if key.endswith(suffix):
                kwargs[key] = _nested_in(value, f"{where}.{key}", names, get)
        if key == "activation":
            kwargs[key] = _activation_in(value, f"{where}.activation")
    name = config.get("name")
    if not isinstance(name, str) or not name or len(name) > 256:
        raise KerasFileError(f"{where}: the layer name {_short(name)} is not valid")
    kwargs["name"] = name
    return _build(cls, kwargs, where), _dtype_in(config.get("dtype", "float32"), where)


def _architecture(config):
    """(model name, dtype, input_dim, [layers]) of a Sequential entry."""
    _, cfg = _obj(config, "config.json", {"Sequential"})
    entries = cfg.get("layers")
    if not isinstance(entries, list) or not entries:
        raise KerasFileError("config.json: the model has no layers")
    if len(entries) > 10000:
        raise KerasFileError(f"config.json: {len(entries)} layers is more than fastgrad reads")
    sample, built = None, []
    for i, entry in enumerate(entries):
        where = f"config.json: layer {i}"
        if isinstance(entry, dict) and entry.get("class_name") == "InputLayer" and i == 0:
            _, icfg = _obj(entry, where, {"InputLayer"})
            shape = icfg.get("batch_shape", icfg.get("batch_input_shape"))
            sample = _input_sample(shape, where)
            _kwargs({k: v for k, v in icfg.items()
                     if k not in ("batch_shape", "batch_input_shape")}, lambda: None, where)
            continue
        built.append(_layer_in(entry, where))
    if not built:
        raise KerasFileError("config.json: the model has no layers after its input")
    if sample is None:
        shape = cfg.get("build_input_shape") or (config.get("build_config") or {}).get(
            "input_shape")
        sample = _input_sample(shape, "config.json: build_input_shape")
    if len(sample) > 1:   # (batch, d1, d2, ...): a first Flatten reads each sample as a row
        first = built[0][0]
        if first.kind != "Flatten":
            raise KerasFileError(f"config.json: input shape {_short([None, *sample])} has "
                                 "more than one feature axis and no Flatten layer first")
        built[0] = (layers_mod.Flatten(input_shape=sample, name=first.name,
                                       trainable=first.trainable), built[0][1])
    input_dim = int(np.prod(sample))
    dtypes = {d for _, d in built}
    if len(dtypes) != 1:
        raise KerasFileError("config.json: the layers mix dtypes "
                             f"{', '.join(sorted(dtypes))}; fastgrad models have one")
    _kwargs({k: v for k, v in cfg.items() if k not in ("layers", "build_input_shape")},
            lambda name=None: None, "config.json: Sequential")
    name = cfg.get("name", "sequential")
    if not isinstance(name, str) or len(name) > 256:
        raise KerasFileError("config.json: the model name is not a string")
    return name, dtypes.pop(), input_dim, [layer for layer, _ in built]


def _input_sample(shape, where):
    """The sample shape (d1, ...) of a Keras input shape [None, d1, ...]."""
    if not (isinstance(shape, list) and 2 <= len(shape) <= 33 and shape[0] is None
            and all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 2**31
                    for d in shape[1:]) and np.prod(shape[1:], dtype=float) <= 2**31):
        raise KerasFileError(f"{where}: input shape {_short(shape)} is not (None, features) "
                             "or (None, d1, d2, ...)")
    return tuple(shape[1:])


_OPTS = {c.__name__: c for c in optimizers.REGISTRY.classes.values()}
_LOSSES = {c.__name__: c for c in losses.REGISTRY.classes.values()}
_SCHEDULES = {c.__name__: c for c in schedules.REGISTRY.classes.values()}
_METRICS = {c.__name__: c for c in metrics.REGISTRY.classes.values()}


def _compile_args(cc):
    """(optimizer, loss, metrics) of a compile_config."""
    where = "config.json: compile_config"
    if not isinstance(cc, dict):
        raise KerasFileError(f"{where}: expected an object")
    for key in ("loss_weights", "weighted_metrics"):
        if cc.get(key) is not None:
            raise KerasFileError(f"{where}: {key} is not supported by fastgrad")
    unknown = set(cc) - {"optimizer", "loss", "metrics", "loss_weights", "weighted_metrics",
                         "run_eagerly", "steps_per_execution", "jit_compile", "auto_scale_loss"}
    if unknown:
        raise KerasFileError(f"{where}: unknown option {_short(min(unknown))}")
    opt_entry = cc.get("optimizer")
    if isinstance(opt_entry, str):
        opt = _build(optimizers.get, {"identifier": opt_entry}, f"{where}.optimizer")
    else:
        cls_name, ocfg = _obj(opt_entry, f"{where}.optimizer", _OPTS)
        kwargs = _kwargs(ocfg, _OPTS[cls_name], f"{where}.optimizer")
        lr = kwargs.get("learning_rate")
        if isinstance(lr, dict):
            sname, scfg = _obj(lr, f"{where}.optimizer.learning_rate", _SCHEDULES)
            kwargs["learning_rate"] = _build(
                _SCHEDULES[sname], _kwargs(scfg, _SCHEDULES[sname], f"{where}.learning_rate"),
                f"{where}.optimizer.learning_rate")
        name = ocfg.get("name")
        if isinstance(name, str) and len(name) <= 256:
            kwargs["name"] = name
        opt = _build(_OPTS[cls_name], kwargs, f"{where}.optimizer")
    loss_entry = _function_name(cc.get("loss"), "keras.losses")
    if isinstance(loss_entry, str):
        loss = _build(losses.get, {"identifier": loss_entry}, f"{where}.loss")
    else:
        cls_name, lcfg = _obj(loss_entry, f"{where}.loss", _LOSSES)
        loss = _build(_LOSSES[cls_name], _kwargs(lcfg, _LOSSES[cls_name], f"{where}.loss"),
                      f"{where}.loss")
    mets = cc.get("metrics") or []
    if not isinstance(mets, list) or len(mets) > 64:
        raise KerasFileError(f"{where}.metrics: expected a list")
    out = []
    for i, m in enumerate(mets):
        m = _function_name(m, "keras.metrics")
        if isinstance(m, str):
            out.append(m)
            continue
        cls_name, mcfg = _obj(m, f"{where}.metrics[{i}]", _METRICS)
        out.append(_build(_METRICS[cls_name], _kwargs(mcfg, _METRICS[cls_name],
                                                      f"{where}.metrics[{i}]"),
                          f"{where}.metrics[{i}]"))
    return opt, loss, out


# ---------------------------------------------------------------------------
# reading: the HDF5 weights
# ---------------------------------------------------------------------------

def _h5_open(data, where):
    h5py = h5py_module()
    if not data.startswith(_HDF5_MAGIC):
        raise KerasFileError(f"{where}: not an HDF5 file")
    try:
        return h5py.File(io.BytesIO(data), "r")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise KerasFileError(f"{where}: a damaged HDF5 file ({str(e)[:200]})") from None


def _h5_children(h5py, group, where, expected):
    """The names in group after checking they are all hard links to the
    expected kind ("group" or "dataset"); expected maps name -> kind."""
    names = list(group.keys())
    for name in names:
        link = group.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            raise KerasFileError(f"{where}/{name}: a {type(link).__name__}; only plain "
                                 "groups and datasets are read")
        if name not in expected:
            raise KerasFileError(f"{where}: unexpected entry {_short(name)}")
        kind = group.get(name, getclass=True)
        want = h5py.Group if expected[name] == "group" else h5py.Dataset
        if kind is not want:
            raise KerasFileError(f"{where}/{name}: expected a {expected[name]}")
    return names


def _h5_array(h5py, group, name, shape, kinds, where):
    ds = group[name]
    if ds.shape != tuple(shape):
        raise KerasFileError(f"{where}: shape {ds.shape}, the architecture needs "
                             f"{tuple(shape)}")
    if ds.dtype.kind not in kinds or ds.dtype.itemsize not in (4, 8) or \
            ds.dtype.fields is not None:
        raise KerasFileError(f"{where}: dtype {ds.dtype} is not supported")
    if ds.is_virtual or ds.external or ds.compression is not None or ds.chunks is not None:
        raise KerasFileError(f"{where}: chunked, filtered, external or virtual storage "
                             "is not read")
    out = np.empty(ds.shape, ds.dtype.newbyteorder("="))
    if out.size:
        ds.read_direct(out)
    return out


def _expected_layers(model):
    """{group path: (layer, [(shape, dtype kinds)])} in Keras' layer order."""
    return {path: (layer, _keras_vars(layer))
            for layer, path in zip(model.layers, _layer_paths(model))}


def read_weights(data, model, where, want_optimizer):
    """Layer weights (a list like get_weights()) and Keras' optimizer
    variables (a list, or None when the file has none) of an HDF5 file,
    checked against model's architecture. want_optimizer: False (ignore the
    optimizer's state), "strict" (refuse state that does not fit model's
    optimizer) or "lenient" (skip it with a warning)."""
    h5py = h5py_module()
    try:
        with _h5_open(data, where) as f:
            return _read_weights(h5py, f, model, where, want_optimizer)
    except KerasFileError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, IndexError,
            AttributeError, OverflowError, MemoryError) as e:
        raise KerasFileError(f"{where}: unreadable weights ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None


def _read_weights(h5py, f, model, where, want_optimizer):
    top = _h5_children(h5py, f, where, {"layers": "group", "vars": "group",
                                        "optimizer": "group"})
    if "layers" not in top:
        raise KerasFileError(f"{where}: no layers group")
    expected = _expected_layers(model)
    names = {p.split("/", 1)[1]: "group" for p in expected}
    layer_group = f["layers"]
    _h5_children(h5py, layer_group, f"{where}/layers", names)
    weights = []
    for path, (layer, shapes) in expected.items():
        key = path.split("/", 1)[1]
        if key not in layer_group:
            if shapes:
                raise KerasFileError(f"{where}: the weights of layer group {key!r} are "
                                     "missing")
            arrays = []
        else:
            arrays = _read_vars(h5py, layer_group[key], shapes, f"{where}/{path}")
        weights += _from_keras(layer, arrays)
    if "vars" in top:
        _h5_children(h5py, f["vars"], f"{where}/vars", {})
    opt_vars = None
    if "optimizer" in top and want_optimizer:
        g = f["optimizer"]
        try:
            _h5_children(h5py, g, f"{where}/optimizer", {"vars": "group"})
            if "vars" in g:
                opt_vars = _read_optimizer(h5py, g["vars"], model, f"{where}/optimizer/vars")
        except KerasFileError as e:
            if want_optimizer == "strict":
                raise
            warnings.warn(f"the optimizer state was not loaded: {e}", stacklevel=4)
    return weights, opt_vars


def _read_vars(h5py, group, shapes, where):
    """The arrays of a layer's vars group; shapes: [(shape, dtype kinds)]."""
    _h5_children(h5py, group, where, {"vars": "group"})
    if "vars" not in group:
        if shapes:
            raise KerasFileError(f"{where}: no vars group")
        return []
    v = group["vars"]
    _h5_children(h5py, v, f"{where}/vars", {str(i): "dataset" for i in range(len(shapes))})
    if len(v) != len(shapes):
        raise KerasFileError(f"{where}/vars: {len(v)} arrays, the architecture needs "
                             f"{len(shapes)}")
    return [_h5_array(h5py, v, str(i), shape, kinds, f"{where}/vars/{i}")
            for i, (shape, kinds) in enumerate(shapes)]


def _read_optimizer(h5py, group, model, where):
    """Keras' optimizer variables, checked against model's optimizer."""
    opt = model.optimizer
    shapes = [()]
    if not isinstance(opt._learning_rate, schedules.LearningRateSchedule):
        shapes.append(())
    header = len(shapes)   # the step count, and the learning rate unless scheduled
    for group_slots in _slots(opt):
        for _, _, shape, _, _ in model._tensors:
            shapes += [shape] * len(group_slots)
    shapes += [()] * len(_trailer(opt))
    if len(group) == header:   # Keras saves an optimizer it never built (compiled,
        shapes = shapes[:header]   # not trained) as its counters alone
    _h5_children(h5py, group, where, {str(i): "dataset" for i in range(len(shapes))})
    if len(group) != len(shapes):
        raise KerasFileError(f"{where}: {len(group)} optimizer variables, "
                             f"{type(opt).__name__} with these settings has {len(shapes)}")
    values = [_h5_array(h5py, group, str(i), shape, "iu" if i == 0 else "f", f"{where}/{i}")
              for i, shape in enumerate(shapes)]
    if not 0 <= int(values[0]) < 2**62:
        raise KerasFileError(f"{where}/0: invalid step count {values[0]}")
    if len(shapes) > 1 and shapes[1] == () and not (np.isfinite(values[1]) and values[1] >= 0):
        raise KerasFileError(f"{where}/1: invalid learning rate {values[1]}")
    return values


def _set_optimizer(model, values):
    """Apply variables _read_optimizer checked."""
    opt = model.optimizer
    it = int(values[0])
    rest = values[1:]
    if not isinstance(opt._learning_rate, schedules.LearningRateSchedule):
        opt.learning_rate = float(rest[0])
        rest = rest[1:]
    moments = opt.variables()
    k = 0
    for group in _slots(opt) if rest else ():   # no slots: a fresh state
        for _, off, shape, _, _ in model._tensors:
            size = int(np.prod(shape))
            for slot in group:
                moments[slot][off:off + size] = rest[k].reshape(-1)
                k += 1
    opt.iterations = it


# ---------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------

def load_model(path):
    """A fastgrad model from a Keras 3 ``.keras`` archive: architecture,
    weights, and (when the archive was compiled) optimizer, loss, metrics,
    optimizer state and step count."""
    config, weights = read_archive(path)
    try:
        name, dtype, input_dim, layers = _architecture(config)
        cc = config.get("compile_config")
        # Keras writes {} (or no optimizer and no loss) for an uncompiled model
        uncompiled = cc is None or cc == {} or (isinstance(cc, dict) and cc.get(
            "optimizer") is None and cc.get("loss") is None)
        compiled = None if uncompiled else _compile_args(cc)
    except KerasFileError as e:
        raise KerasFileError(f"{path}: {e}") from None
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, OverflowError,
            RecursionError) as e:
        raise KerasFileError(f"{path}: config.json: invalid model description "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    from fastgrad.models import Sequential

    try:
        model = Sequential(layers, dtype=dtype, name=name)
        shapes = model.weight_shapes(input_dim)   # allocates nothing
    except ValueError as e:   # e.g. two layers with one name
        raise KerasFileError(f"{path}: config.json: {e}") from None
    # every weight must be in the file: a config asking for more than the
    # file holds is refused before anything is allocated
    need = 0
    for wname, shape, _ in shapes:
        need += int(np.prod(shape)) * np.dtype(dtype).itemsize
        if need > len(weights):
            raise KerasFileError(f"{path}: config.json: the weights up to {wname} {shape} "
                                 f"need more bytes than the {len(weights)} of {_WEIGHTS}")
    try:   # the initializers draw the (soon replaced) initial weights
        model.build(input_dim)
    except (TypeError, ValueError, OverflowError) as e:   # e.g. a seed that is no number
        raise KerasFileError(f"{path}: config.json: the layers' settings are invalid "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
    if compiled is not None:
        try:
            model.compile(*compiled)
        except (ValueError, TypeError) as e:
            raise KerasFileError(f"{path}: config.json: compile_config: {e}") from None
    values, opt_vars = read_weights(weights, model, f"{path}: {_WEIGHTS}",
                                    "strict" if compiled is not None else False)
    model.set_weights(values)
    if opt_vars is not None:
        _set_optimizer(model, opt_vars)
    return model


def load_weights(model, path):
    """Set model's weights (and its optimizer's state, when both the model
    is compiled and the file holds a matching optimizer) from a Keras
    ``.weights.h5`` file; everything is read and checked before anything
    changes."""
    name = _weights_name(path, "filepath")
    h5py_module()
    if not model.built:
        raise ValueError("model: it has no weights yet; build it (give the first layer "
                         "input_dim, or call predict) before loading weights")
    model._require_built()
    data = _read_limited(name, MAX_WEIGHTS)
    # as in Keras, optimizer state that does not fit the model's optimizer
    # is skipped with a warning
    values, opt_vars = read_weights(data, model, name,
                                    "lenient" if model.optimizer is not None else False)
    model.set_weights(values)
    if opt_vars is not None:
        _set_optimizer(model, opt_vars)
