"""Losses (Keras 3 names and formulas), computed by one compiled kernel that
returns the value and the gradient together.

Each loss is averaged over the batch: ``loss = mean_i l_i`` with, for row i
(p the prediction, t the target, j over the row's O entries):

    mse / mean_squared_error   l_i = mean_j (p - t)^2
    mae / mean_absolute_error  l_i = mean_j |p - t|
    huber(delta=1.0)           l_i = mean_j 0.5 e^2 if |e| <= delta
                                           else delta * (|e| - delta / 2),  e = p - t
    binary_crossentropy        l_i = mean_j -(t log p + (1 - t) log(1 - p)),
                               p clipped to [1e-7, 1 - 1e-7]
    categorical_crossentropy   l_i = -sum_j t_j log q_j, q = p / sum(p) clipped
                               to [1e-7, 1 - 1e-7]; t one-hot
    sparse_categorical_crossentropy  the same with integer labels

With ``from_logits=True`` (or when the model's last layer is the matching
sigmoid or softmax, which it fuses) the cross-entropies are computed from the
logits z: ``max(z,0) - z t + log(1 + exp(-|z|))`` and
``sum_j t_j (logsumexp(z) - z_j)``, finite for any finite z.

Classes are called as ``loss(y_true, y_pred) -> float``; functions return the
per-sample losses ``l_i`` as an array, as in Keras.
"""
import numpy as np

from fastgrad import ops
from fastgrad._utils import Hyper, Registry, check_real


class Loss:
    """Base class. ``name`` is the kernel's loss name."""

    name = None

    def __init__(self, from_logits=False):
        self.from_logits = bool(from_logits)
        self.delta = 1.0

    def __call__(self, y_true, y_pred):
        value, _ = ops.loss_forward_backward(y_true, _2d(y_pred), self.name,
                                             self.from_logits, self.delta, grad=False)
        return value

    def get_config(self):
        return {"from_logits": self.from_logits} if self.name in _LOGIT_LOSSES else {}


def _2d(y_pred):
    y_pred = np.asarray(y_pred)
    if y_pred.dtype not in (np.float32, np.float64):
        y_pred = y_pred.astype(np.float32)
    return y_pred.reshape(-1, 1) if y_pred.ndim == 1 else y_pred


class MeanSquaredError(Loss):
    name = "mse"

    def __init__(self):
        super().__init__()


class MeanAbsoluteError(Loss):
    name = "mae"

    def __init__(self):
        super().__init__()


class Huber(Loss):
    name = "huber"
    delta = Hyper(check_real, low=0.0, low_open=True)

    def __init__(self, delta=1.0):
        super().__init__()
        self.delta = delta

    def get_config(self):
        return {"delta": self.delta}


class BinaryCrossentropy(Loss):
    name = "binary_crossentropy"


class CategoricalCrossentropy(Loss):
    name = "categorical_crossentropy"


class SparseCategoricalCrossentropy(Loss):
    name = "sparse_categorical_crossentropy"


_LOGIT_LOSSES = {"binary_crossentropy", "categorical_crossentropy",
                 "sparse_categorical_crossentropy"}


def _per_sample(name, y_true, y_pred, from_logits=False, delta=1.0):
    _, _, rows = ops.loss_forward_backward(y_true, _2d(y_pred), name, from_logits,
                                           delta, grad=False, per_sample=True)
    return rows


def mean_squared_error(y_true, y_pred):
    return _per_sample("mse", y_true, y_pred)


def mean_absolute_error(y_true, y_pred):
    return _per_sample("mae", y_true, y_pred)


def huber(y_true, y_pred, delta=1.0):
    return _per_sample("huber", y_true, y_pred, delta=delta)


def binary_crossentropy(y_true, y_pred, from_logits=False):
    return _per_sample("binary_crossentropy", y_true, y_pred, from_logits)


def categorical_crossentropy(y_true, y_pred, from_logits=False):
    return _per_sample("categorical_crossentropy", y_true, y_pred, from_logits)


def sparse_categorical_crossentropy(y_true, y_pred, from_logits=False):
    return _per_sample("sparse_categorical_crossentropy", y_true, y_pred, from_logits)


mse = mean_squared_error
mae = mean_absolute_error

_REGISTRY = Registry("loss", Loss, {
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError, "mean_absolute_error": MeanAbsoluteError,
    "huber": Huber, "binary_crossentropy": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
})
_FUNCTIONS = {
    mean_squared_error: MeanSquaredError, mean_absolute_error: MeanAbsoluteError,
    huber: Huber, binary_crossentropy: BinaryCrossentropy,
    categorical_crossentropy: CategoricalCrossentropy,
    sparse_categorical_crossentropy: SparseCategoricalCrossentropy,
}


def get(identifier):
    """A Loss instance from a name (any case, or a class name), a
    ``serialize`` dict, a Loss instance (returned as it is), or a loss
    function of this module."""
    if callable(identifier) and not isinstance(identifier, (Loss, type)) \
            and identifier in _FUNCTIONS:
        return _FUNCTIONS[identifier]()
    return _REGISTRY.get(identifier)


def serialize(loss):
    """``{"class_name": "Huber", "config": loss.get_config()}``."""
    return _REGISTRY.serialize(loss)


def deserialize(config):
    """The Loss a ``serialize`` dict describes."""
    return _REGISTRY.deserialize(config)
