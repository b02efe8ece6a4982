"""User arrays on their way into a model: checks and conversion, the
validation split, and the batch iterator that fit, evaluate and predict
share.

Data travel as a triple ``(x, target, labels)``: x the inputs, and either
target (the model's dtype, shape (rows, outputs)) or labels (int64 class
labels, for sparse categorical cross-entropy); the other one is None.
"""
import numpy as np

from fastgrad import _core, layers, ops


def converted(a, dtype, name):
    """a as a C-contiguous array of dtype, refused (by row) when it holds
    NaN, inf, or values beyond the dtype's range."""
    src = a
    if a.dtype != dtype or not (a.flags.c_contiguous and a.flags.aligned):
        with np.errstate(over="ignore", invalid="ignore"):
            a = np.require(a, dtype, ["C", "A"])
    bad = _core.first_nonfinite_row(a)
    if bad >= 0:
        if src.dtype.kind == "f" and np.isfinite(src[bad]).all():
            raise ValueError(f"{name}: row {bad} holds values beyond the {dtype} range")
        raise ValueError(f"{name}: row {bad} holds NaN or inf; values must be finite")
    return a


def check_x(model, x, name="x", dim=None):
    """Inputs as the model's dtype, (rows, features) with the features the
    model takes (``dim``, else the built model's or the first layer's)."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected an array of numbers, got dtype {x.dtype}")
    if x.ndim > 2 and model.layers and isinstance(model.layers[0], layers.Flatten):
        # a Flatten first: each sample read as one row (a view when contiguous)
        want = model.layers[0].sample_shape
        if want is not None and x.shape[1:] != want:
            raise ValueError(f"{name}: expected samples of shape {want} (the Flatten layer's "
                             f"input_shape), got shape {x.shape}")
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (batch, features), got shape {x.shape}"
                         " (inputs of more dimensions need a Flatten first layer)")
    if dim is None:
        dim = model.input_dim if model._built else model._known_input_dim()
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}: expected {dim} features per row, got {x.shape[1]} "
                         f"(shape {x.shape})")
    return converted(x, model.dtype, name)


def _output_dim(model, input_dim):
    """The model's outputs for input_dim features, before it is built."""
    dim = input_dim
    for layer in model.layers:
        dim = getattr(layer, "units", dim)
    return dim


def check_y(model, y, rows, name="y", out_dim=None):
    """(target, labels): targets as the model's dtype (rows, outputs), or
    int64 labels for sparse categorical cross-entropy."""
    out_dim = model.output_dim if out_dim is None else out_dim
    if model.loss.name == "sparse_categorical_crossentropy":
        try:
            return None, ops._labels(y, rows, out_dim)
        except (ValueError, TypeError) as e:
            raise type(e)(str(e).replace("y_true:", f"{name}:", 1)) from None
    y = np.asarray(y)
    if y.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected an array of numbers, got dtype {y.dtype}")
    if y.ndim == 1 and out_dim == 1:
        y = y.reshape(-1, 1)
    if y.ndim != 2 or y.shape != (rows, out_dim):
        what = ("one-hot targets " if model.loss.name == "categorical_crossentropy" else "")
        raise ValueError(f"{name}: expected {what}of shape ({rows}, {out_dim}) "
                         f"to match the rows and the model's {out_dim} outputs, got "
                         f"shape {y.shape}")
    return converted(y, model.dtype, name), None


def check_xy(model, x, y, names=("x", "y"), dim=None):
    """(x, target, labels) checked and converted for a compiled model. It
    builds nothing: y is checked against the outputs the model will have, so
    that a refused first call leaves an unbuilt model as it was."""
    x = check_x(model, x, names[0], dim)
    n = len(y) if hasattr(y, "__len__") else None
    if n is not None and n != x.shape[0]:
        raise ValueError(f"{names[1]}: expected {x.shape[0]} rows to match "
                         f"{names[0]}, got {n}")
    out_dim = None if model._built else _output_dim(model, x.shape[1])
    return (x, *check_y(model, y, x.shape[0], names[1], out_dim))


def take_rows(data, rows):
    """The rows (a slice) of each array of the triple."""
    return tuple(None if a is None else a[rows] for a in data)


def split_validation(data, fraction):
    """(training, validation) triples: the last ``fraction`` of the rows are
    held out, taken before any shuffling, as Keras does."""
    n = data[0].shape[0]
    cut = int(n * (1 - fraction))
    if cut < 1 or cut == n:
        raise ValueError(f"validation_split: {fraction} of {n} rows leaves no rows for "
                         "training or none for validation")
    return take_rows(data, slice(None, cut)), take_rows(data, slice(cut, None))


def check_rows(x):
    """Refuse, before anything is built or run, a batch of no rows."""
    if x.shape[0] == 0:
        raise ValueError("x: expected at least one row")


class Batches:
    """Consecutive batches of the rows of arrays (None entries stay None),
    ``size`` rows each and the last one smaller. Calling it yields
    ``(stop, batch)``: the rows done so far and the batch's tuple of arrays.

    Without an order the batches are views. With ``gather=True`` the
    iterator owns one buffer per array, and ``batches(order)`` (order a
    permutation of the rows) gathers each batch's rows into them, so a
    pass over the data allocates no arrays."""

    def __init__(self, arrays, batch_size, gather=False):
        self.arrays = tuple(arrays)
        self.rows = self.arrays[0].shape[0]
        self.size = min(batch_size, max(self.rows, 1))
        self.steps = -(-self.rows // self.size)
        self._bufs = tuple(None if a is None or not gather else
                           np.empty((self.size,) + a.shape[1:], a.dtype) for a in self.arrays)

    def __call__(self, order=None):
        for start in range(0, self.rows, self.size):
            stop = min(start + self.size, self.rows)
            if order is None:
                yield stop, tuple(None if a is None else a[start:stop] for a in self.arrays)
                continue
            idx, b = order[start:stop], stop - start
            # a permutation's indices are valid: mode="clip" gathers straight
            # into the buffer, where the default mode="raise" makes a temporary
            yield stop, tuple(None if a is None else np.take(a, idx, axis=0, out=buf[:b],
                                                             mode="clip")
                              for a, buf in zip(self.arrays, self._bufs))


def check_weights(model, sample_weight, class_weight, data, name="sample_weight"):
    """Row weights of the model's dtype, shape (rows,), for the triple
    ``data``, or None: ``sample_weight`` (one finite number per row) or
    ``class_weight`` ({class index: weight}, other classes 1; the class of
    a row is its label, the argmax of a one-hot target, or a single
    column's value rounded), as Keras turns it into sample weights. Giving
    both is refused, as in Keras."""
    x, target, labels = data
    rows = x.shape[0]
    if sample_weight is not None and class_weight is not None:
        raise ValueError("class_weight: cannot be given together with sample_weight; fold "
                         "the class weights into sample_weight")
    if sample_weight is not None:
        w = np.asarray(sample_weight)
        if w.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected numbers, got dtype {w.dtype}")
        if w.shape not in ((rows,), (rows, 1)):
            raise ValueError(f"{name}: expected {rows} numbers (one per row), got shape "
                             f"{w.shape}")
        return converted(w.reshape(1, rows), model.dtype, name)[0]
    if class_weight is None:
        return None
    if not isinstance(class_weight, dict) or not all(
            isinstance(k, (int, np.integer)) and not isinstance(k, bool)
            and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)
            for k, v in class_weight.items()):
        raise TypeError("class_weight: expected a dict {class index (int): weight (a finite "
                        "number)}, got " + repr(class_weight))
    if labels is not None:
        classes = labels
    elif target.shape[1] > 1:
        classes = np.argmax(target, axis=1)
    else:
        classes = np.round(target[:, 0]).astype(np.int64)
    w = np.ones(rows, model.dtype)
    for k, v in class_weight.items():   # a loop over classes, once per fit
        w[classes == k] = v
    return w
