"""Metrics, by name for ``compile(metrics=[...])``.

    accuracy   resolved from the loss: categorical (argmax of prediction and
               one-hot target agree), sparse (argmax equals the label) or
               binary (prediction > 0.5, or logit > 0, equals target > 0.5)
    mse, mae   mean squared / absolute error over all entries

A metric is ``metric(y_true, y_pred) -> float`` averaged over the batch;
the model weights per-batch values by batch size over an epoch. A metric
given as an object is saved with its configuration (``get_config``), so
``load_model`` restores it with the same settings.
"""
import numpy as np

from fastgrad._utils import Hyper, Registry, check_real


class Metric:
    name = None

    def __call__(self, y_true, y_pred, from_logits=False):
        raise NotImplementedError

    def get_config(self):
        return {}


def _error(y_true, y_pred):
    """y_pred - y_true in float64, y_true in the shape of y_pred."""
    return np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64).reshape(
        np.shape(y_pred))


class MeanSquaredError(Metric):
    name = "mse"

    def __call__(self, y_true, y_pred, from_logits=False):
        d = _error(y_true, y_pred)
        return float(np.mean(d * d))


class MeanAbsoluteError(Metric):
    name = "mae"

    def __call__(self, y_true, y_pred, from_logits=False):
        d = _error(y_true, y_pred)
        return float(np.mean(np.abs(d)))


class CategoricalAccuracy(Metric):
    name = "accuracy"

    def __call__(self, y_true, y_pred, from_logits=False):
        return float(np.mean(np.argmax(y_pred, 1) == np.argmax(y_true, 1)))


class SparseCategoricalAccuracy(Metric):
    name = "accuracy"

    def __call__(self, y_true, y_pred, from_logits=False):
        return float(np.mean(np.argmax(y_pred, 1) == np.asarray(y_true).reshape(-1)))


class BinaryAccuracy(Metric):
    """Share of predictions on the target's side of ``threshold`` (default
    0.5): ``(y_pred > threshold) == (y_true > 0.5)``; for logits the
    threshold is moved to ``log(threshold / (1 - threshold))``."""

    name = "accuracy"
    threshold = Hyper(check_real, low=0.0, high=1.0, low_open=True, high_open=True)

    def __init__(self, threshold=0.5):
        self.threshold = threshold

    def get_config(self):
        return {"threshold": self.threshold}

    def __call__(self, y_true, y_pred, from_logits=False):
        # a logit above log(t / (1 - t)) is a probability above t
        t = np.log(self.threshold / (1 - self.threshold)) if from_logits else self.threshold
        y_true = np.asarray(y_true).reshape(np.shape(y_pred))
        return float(np.mean((np.asarray(y_pred) > t) == (y_true > 0.5)))


# "accuracy" resolves from the loss in get(); listed for the error message
_REGISTRY = Registry("metrics", Metric, {
    "accuracy": CategoricalAccuracy, "acc": CategoricalAccuracy,
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError, "mean_absolute_error": MeanAbsoluteError,
    "categorical_accuracy": CategoricalAccuracy,
    "sparse_categorical_accuracy": SparseCategoricalAccuracy,
    "binary_accuracy": BinaryAccuracy})


def get(identifier, loss_name=None):
    """A Metric from a name (any case, or a class name), a ``serialize``
    dict or an instance (returned as it is); "accuracy"/"acc" follows the
    loss named ``loss_name``."""
    if isinstance(identifier, str) and identifier.lower() in ("accuracy", "acc"):
        if loss_name == "sparse_categorical_crossentropy":
            return SparseCategoricalAccuracy()
        if loss_name in ("binary_crossentropy", "binary_focal_crossentropy"):
            return BinaryAccuracy()
        return CategoricalAccuracy()
    return _REGISTRY.get(identifier)


def serialize(metric):
    """``{"class_name": "BinaryAccuracy", "config": metric.get_config()}``."""
    return _REGISTRY.serialize(metric)


def deserialize(config):
    """The metric a ``serialize`` dict describes."""
    return _REGISTRY.deserialize(config)
