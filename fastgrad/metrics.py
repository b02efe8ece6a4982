"""Metrics, streaming as in Keras 3: ``update_state(y_true, y_pred,
sample_weight=None)`` adds a batch to the metric's state, ``result()``
gives the value over everything added since ``reset_state()``. ``fit``
resets them as each epoch begins, ``evaluate`` as it begins.

Mean metrics hold ``total = sum_i w_i v_i`` and ``count = sum_i w_i`` over
rows (w_i = 1 without sample weights) and give total / count; the row
values v_i:

    CategoricalAccuracy             argmax(y_pred) == argmax(y_true)
    SparseCategoricalAccuracy       argmax(y_pred) == label
    BinaryAccuracy(threshold=0.5)   mean_j [(y_pred_j > threshold) == y_true_j]
    TopKCategoricalAccuracy(k=5)    the true class is among the k largest
    SparseTopKCategoricalAccuracy   (ties counted in its favour)
    MeanSquaredError                mean_j (y_true_j - y_pred_j)^2
    MeanAbsoluteError               mean_j |y_true_j - y_pred_j|
    MeanAbsolutePercentageError     100 mean_j |y_true_j - y_pred_j| / max(|y_true_j|, 1e-7)
    RootMeanSquaredError            sqrt of MeanSquaredError's result

Confusion metrics count over every entry, a prediction p being positive
at threshold t when p > t and a target positive when it is not 0:
``TruePositives``, ``FalsePositives``, ``TrueNegatives``,
``FalseNegatives`` (thresholds=None: 0.5; a list gives a list),
``Precision`` = TP / (TP + FP), ``Recall`` = TP / (TP + FN), 0 where the
denominator is 0, and ``AUC`` (Keras's num_thresholds=200 evenly spaced
thresholds, the first at -1e-7 and the last at 1 + 1e-7; curve "ROC" or
"PR"; summation "interpolation", "minoring" or "majoring", PR
interpolation by Davis and Goadrich's formula, as Keras computes it).

The states accumulate through compiled loops (fastgrad._core) into
preallocated float64 arrays: a step of ``fit`` allocates nothing for its
metrics. Names: a metric given as a string is named by that string
(``"acc"`` logs ``acc``), an object by its ``name`` (by default its class
name in snake case, e.g. ``mean_squared_error``). ``"accuracy"``/``"acc"``
resolves, as in Keras, from the shapes: one output column gives
BinaryAccuracy, integer labels SparseCategoricalAccuracy, otherwise
CategoricalAccuracy.
"""
import math
import re

import numpy as np

from fastgrad import _core
from fastgrad._utils import Hyper, Registry, check_int, check_real


def _snake(name):
    """"TruePositives" -> "true_positives", "AUC" -> "auc" (Keras's rule)."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", name).lower()


def _pred_2d(y_pred):
    p = np.asarray(y_pred)
    if p.dtype.kind not in "biuf":
        raise TypeError(f"y_pred: expected an array of numbers, got dtype {p.dtype}")
    if p.ndim == 1:
        p = p.reshape(-1, 1)
    if p.ndim != 2:
        raise ValueError(f"y_pred: expected a 1-D or 2-D array, got shape {p.shape}")
    dtype = np.float32 if p.dtype == np.float32 else np.float64
    return np.ascontiguousarray(p, dtype)


def _weights(sample_weight, rows, dtype):
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.dtype.kind not in "biuf" or w.size != rows:
        raise ValueError(f"sample_weight: expected {rows} numbers (one per row), got "
                         f"shape {w.shape} of dtype {w.dtype}")
    return np.ascontiguousarray(w.reshape(-1), dtype)


class Metric:
    """Base class: ``name``, ``dtype``, ``update_state``, ``result``,
    ``reset_state``, and ``metric(y_true, y_pred)`` = update_state then
    result (Keras 3's). Subclasses implement ``_update(pred, target, labels,
    weights)`` on checked arrays (pred 2-D float32/float64, target of the
    same dtype and shape or None, labels int64 or None, weights of pred's
    dtype or None)."""

    def __init__(self, name=None, dtype=None):
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected a string, got {name!r}")
        self.name = name or _snake(type(self).__name__)
        self.dtype = dtype or "float32"
        self.reset_state()

    def reset_state(self):
        raise NotImplementedError

    def result(self):
        raise NotImplementedError

    def _update(self, pred, target, labels, weights):
        raise NotImplementedError

    _sparse = False   # whether y_true holds class labels

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Add a batch: y_pred (rows, outputs), y_true of the same shape (class
        labels, one per row, for the sparse metrics), sample_weight one
        number per row."""
        pred = _pred_2d(y_pred)
        y = np.asarray(y_true)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"y_true: expected an array of numbers, got dtype {y.dtype}")
        target = labels = None
        if self._sparse:
            if y.size != pred.shape[0]:
                raise ValueError(f"y_true: expected {pred.shape[0]} class labels, got shape "
                                 f"{y.shape}")
            target = np.ascontiguousarray(y.reshape(-1, 1), pred.dtype)
        else:
            if y.size != pred.size:
                raise ValueError(f"y_true: expected the shape of y_pred {pred.shape}, got "
                                 f"{y.shape}")
            target = np.ascontiguousarray(y.reshape(pred.shape), pred.dtype)
        self._update(pred, target, labels, _weights(sample_weight, pred.shape[0], pred.dtype))

    def __call__(self, y_true, y_pred, sample_weight=None):
        self.update_state(y_true, y_pred, sample_weight)
        return self.result()

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"<{type(self).__name__} name={self.name}>"


class _MeanMetric(Metric):
    """total / count over rows, accumulated by _core.metric_update."""

    _kind = None
    _param = 0.0

    def reset_state(self):
        self._state = np.zeros(2)

    def _update(self, pred, target, labels, weights):
        _core.metric_update(_core.METRIC_CODES[self._kind], pred, target, labels, weights,
                            self._state, self._param)

    def result(self):
        total, count = self._state
        return float(total / count) if count else 0.0


def _mean_metric(cls_name, kind, doc, sparse=False):
    cls = type(cls_name, (_MeanMetric,), {"_kind": kind, "_sparse": sparse, "__doc__": doc})
    cls.__module__ = __name__

    def __init__(self, name=kind, dtype=None):
        Metric.__init__(self, name, dtype)
    cls.__init__ = __init__
    return cls


CategoricalAccuracy = _mean_metric(
    "CategoricalAccuracy", "categorical_accuracy",
    "Share of rows whose largest prediction is the one-hot target's class.")
SparseCategoricalAccuracy = _mean_metric(
    "SparseCategoricalAccuracy", "sparse_categorical_accuracy",
    "Share of rows whose largest prediction is at the integer label.", sparse=True)
MeanSquaredError = _mean_metric(
    "MeanSquaredError", "mean_squared_error",
    "Mean over rows of mean_j (y_true_j - y_pred_j)^2.")
MeanAbsoluteError = _mean_metric(
    "MeanAbsoluteError", "mean_absolute_error",
    "Mean over rows of mean_j |y_true_j - y_pred_j|.")
MeanAbsolutePercentageError = _mean_metric(
    "MeanAbsolutePercentageError", "mean_absolute_percentage_error",
    "Mean over rows of 100 mean_j |y_true_j - y_pred_j| / max(|y_true_j|, 1e-7).")


class RootMeanSquaredError(MeanSquaredError):
    """sqrt(sum_i w_i mean_j (y_true_j - y_pred_j)^2 / sum_i w_i)."""

    def __init__(self, name="root_mean_squared_error", dtype=None):
        Metric.__init__(self, name, dtype)

    def result(self):
        return math.sqrt(super().result())


class BinaryAccuracy(_MeanMetric):
    """Mean over rows of the share of entries with (y_pred > threshold) ==
    y_true (default threshold 0.5; targets 0 or 1, as Keras compares them
    exactly)."""

    _kind = "binary_accuracy"
    threshold = Hyper(check_real, low=0.0, high=1.0, low_open=True, high_open=True)

    def __init__(self, name="binary_accuracy", dtype=None, threshold=0.5):
        self.threshold = threshold
        super().__init__(name, dtype)

    @property
    def _param(self):
        return self.threshold

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold}


class TopKCategoricalAccuracy(_MeanMetric):
    """Share of rows whose one-hot target's class is among the ``k`` (default
    5) largest predictions: fewer than k predictions exceed it."""

    _kind = "top_k_categorical_accuracy"
    k = Hyper(check_int, low=1)

    def __init__(self, k=5, name=None, dtype=None):
        self.k = k
        super().__init__(name or self._kind, dtype)

    @property
    def _param(self):
        return float(self.k)

    def get_config(self):
        return {**super().get_config(), "k": self.k}


class SparseTopKCategoricalAccuracy(TopKCategoricalAccuracy):
    """TopKCategoricalAccuracy with integer labels."""

    _kind = "sparse_top_k_categorical_accuracy"
    _sparse = True


class _Accuracy(Metric):
    """``"accuracy"``/``"acc"``: resolved on the first batch, from the
    shapes as Keras does."""

    def __init__(self, name="accuracy", dtype=None):
        self._inner = None
        super().__init__(name, dtype)

    def reset_state(self):
        if self._inner is not None:
            self._inner.reset_state()

    def resolved(self, outputs, sparse):
        """The accuracy for a model of ``outputs`` columns trained on class
        labels (``sparse``) or targets, named as this one."""
        cls = (BinaryAccuracy if outputs == 1 else
               SparseCategoricalAccuracy if sparse else CategoricalAccuracy)
        return cls(name=self.name)

    def _resolve(self, pred, labels):
        if self._inner is None:
            self._inner = self.resolved(pred.shape[1], labels is not None)
        return self._inner

    def update_state(self, y_true, y_pred, sample_weight=None):
        pred = _pred_2d(y_pred)
        sparse = np.ndim(y_true) < 2 or np.shape(y_true)[-1] == 1
        self._resolve(pred, True if sparse else None).update_state(y_true, pred, sample_weight)

    def _update(self, pred, target, labels, weights):
        self._resolve(pred, labels)._update(pred, target, labels, weights)

    def result(self):
        return 0.0 if self._inner is None else self._inner.result()


# -- confusion metrics ----------------------------------------------------------
def _thresholds(thresholds, default=0.5):
    """(array of thresholds, whether one was given as a number)."""
    if thresholds is None:
        return np.array([default]), True
    single = np.ndim(thresholds) == 0
    t = np.atleast_1d(np.asarray(thresholds, np.float64))
    if t.ndim != 1 or t.size == 0 or not np.all((t >= 0) & (t <= 1)):
        raise ValueError(f"thresholds: expected a number or a list of numbers in [0, 1], "
                         f"got {thresholds!r}")
    return np.ascontiguousarray(t), single


class _Confusion(Metric):
    """Confusion counts at thresholds, over every entry (see the module)."""

    def __init__(self, thresholds=None, name=None, dtype=None):
        self._given = thresholds
        self.thresholds, self._single = _thresholds(thresholds)
        super().__init__(name, dtype)

    def reset_state(self):
        self._counts = np.zeros((4, self.thresholds.size))

    def _update(self, pred, target, labels, weights):
        if target is None or target.shape != pred.shape:
            raise ValueError(f"y: {self.name} needs targets of the predictions' shape "
                             f"{pred.shape}, not class labels")
        _core.confusion_update(pred, target, weights, self.thresholds, self._counts)

    def _value(self, v):
        return float(v[0]) if self._single else [float(a) for a in v]

    def get_config(self):
        return {**super().get_config(), "thresholds": self._given}


def _ratio(a, b):
    """a / b with 0 where b is 0 (Keras's divide_no_nan)."""
    out = np.zeros_like(a, dtype=np.float64)
    np.divide(a, b, out=out, where=b != 0)
    return out


def _count_metric(cls_name, row, doc):
    cls = type(cls_name, (_Confusion,), {
        "__doc__": doc, "result": lambda self: self._value(self._counts[row])})
    cls.__module__ = __name__
    return cls


TruePositives = _count_metric("TruePositives", 0, "Weighted count of p > t where y != 0.")
FalsePositives = _count_metric("FalsePositives", 1, "Weighted count of p > t where y == 0.")
TrueNegatives = _count_metric("TrueNegatives", 2, "Weighted count of p <= t where y == 0.")
FalseNegatives = _count_metric("FalseNegatives", 3, "Weighted count of p <= t where y != 0.")


class Precision(_Confusion):
    """TP / (TP + FP) at ``thresholds`` (default 0.5); 0 without positives.
    ``top_k`` and ``class_id`` are Keras arguments fastgrad does not take."""

    def __init__(self, thresholds=None, top_k=None, class_id=None, name=None, dtype=None):
        if top_k is not None or class_id is not None:
            raise ValueError("top_k, class_id: not supported by fastgrad's "
                             f"{type(self).__name__}; leave them None")
        super().__init__(thresholds, name, dtype)

    def result(self):
        tp, fp = self._counts[0], self._counts[1]
        return self._value(_ratio(tp, tp + fp))


class Recall(Precision):
    """TP / (TP + FN) at ``thresholds`` (default 0.5); 0 without positives."""

    def result(self):
        tp, fn = self._counts[0], self._counts[3]
        return self._value(_ratio(tp, tp + fn))


class AUC(Metric):
    """Area under the ROC or precision-recall curve from confusion counts at
    ``num_thresholds`` (default 200) evenly spaced thresholds (or the given
    ``thresholds``, to which -1e-7 and 1 + 1e-7 are added), as Keras 3
    computes it. curve: "ROC" (x = FP / (FP + TN), y = recall) or "PR" (x =
    recall, y = precision); summation_method: "interpolation" (trapezoids;
    for PR, Davis and Goadrich's interpolation), "minoring" or "majoring"
    (lower or upper Riemann sums). from_logits applies a sigmoid first.
    Multi-label AUC (``multi_label=True``) is not supported."""

    num_thresholds = Hyper(check_int, low=2)

    def __init__(self, num_thresholds=200, curve="ROC", summation_method="interpolation",
                 name=None, dtype=None, thresholds=None, multi_label=False, num_labels=None,
                 label_weights=None, from_logits=False):
        if str(curve).upper() not in ("ROC", "PR"):
            raise ValueError(f"curve: expected 'ROC' or 'PR', got {curve!r}")
        if str(summation_method).lower() not in ("interpolation", "minoring", "majoring"):
            raise ValueError("summation_method: expected 'interpolation', 'minoring' or "
                             f"'majoring', got {summation_method!r}")
        if multi_label or num_labels is not None or label_weights is not None:
            raise ValueError("multi_label, num_labels, label_weights: multi-label AUC is not "
                             "supported by fastgrad; leave them at their defaults")
        self.curve, self.summation_method = str(curve).upper(), str(summation_method).lower()
        self.from_logits = bool(from_logits)
        self._given = thresholds
        if thresholds is not None:
            inner, _ = _thresholds(thresholds)
            inner = np.sort(inner)
            self.num_thresholds = inner.size + 2
            grid = np.concatenate([[0.0], inner, [1.0]])
            self._even = np.allclose(np.diff(grid), 1.0 / (grid.size - 1), atol=1e-7)
        else:
            self.num_thresholds = num_thresholds
            n = self.num_thresholds
            inner = np.array([(i + 1) * 1.0 / (n - 1) for i in range(n - 2)])
            self._even = True
        self.thresholds = np.concatenate([[-1e-7], inner, [1.0 + 1e-7]])
        self._sig = None
        super().__init__(name, dtype)

    def reset_state(self):
        n = self.num_thresholds
        self._hist = np.zeros((2, n))
        self._counts = np.zeros((4, n))

    def _update(self, pred, target, labels, weights):
        if target is None or target.shape != pred.shape:
            raise ValueError(f"y: {self.name} needs targets of the predictions' shape "
                             f"{pred.shape}, not class labels")
        if self.from_logits:
            if self._sig is None or self._sig.shape[0] < pred.shape[0] or \
                    self._sig.shape[1:] != pred.shape[1:] or self._sig.dtype != pred.dtype:
                self._sig = np.empty_like(pred)
            sig = self._sig[:pred.shape[0]]
            with np.errstate(over="ignore"):   # exp(-z) may overflow to inf: sigmoid 0
                np.negative(pred, out=sig)
                np.exp(sig, out=sig)
                sig += 1
                np.reciprocal(sig, out=sig)
            pred = sig
        if self._even:
            _core.bucket_update(pred, target, weights, self._hist)
        else:
            _core.confusion_update(pred, target, weights, self.thresholds, self._counts)

    def result(self):
        method = ("interpolation", "minoring", "majoring").index(self.summation_method)
        return _core.auc_result(self._counts, self._hist if self._even else None,
                                self.curve == "PR", method)

    def get_config(self):
        return {**super().get_config(), "num_thresholds": self.num_thresholds,
                "curve": self.curve, "summation_method": self.summation_method,
                "thresholds": self._given, "from_logits": self.from_logits}


_CLASSES = [CategoricalAccuracy, SparseCategoricalAccuracy, BinaryAccuracy,
            TopKCategoricalAccuracy, SparseTopKCategoricalAccuracy, MeanSquaredError,
            MeanAbsoluteError, MeanAbsolutePercentageError, RootMeanSquaredError, AUC,
            Precision, Recall, TruePositives, FalsePositives, TrueNegatives, FalseNegatives]
REGISTRY = Registry("metrics", Metric, {
    **{_snake(c.__name__): c for c in _CLASSES},
    "accuracy": _Accuracy, "acc": _Accuracy, "auc": AUC,
    "mse": MeanSquaredError, "mae": MeanAbsoluteError, "mape": MeanAbsolutePercentageError},
    classes=_CLASSES + [_Accuracy])


def get(identifier):
    """A new Metric from a name (any case, or a class name; a string names the
    metric, as Keras's compile does: ``get("acc").name == "acc"``), a
    ``serialize`` dict, or an instance (returned as it is)."""
    metric = REGISTRY.get(identifier)
    if isinstance(identifier, str):
        metric.name = identifier
    return metric


def serialize(metric):
    """``{"class_name": "BinaryAccuracy", "config": metric.get_config()}``."""
    return REGISTRY.serialize(metric)


def deserialize(config):
    """The metric a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)
