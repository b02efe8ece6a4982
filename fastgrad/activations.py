"""Activation functions, by the names ``Dense(activation=...)`` accepts.

Each function applies the compiled kernel to a 2-D float array (softmax over
the last axis); ``get(name)`` resolves a name, a function of this module, or
None (linear); ``serialize(fn)`` gives the name back, as Keras 3 does for its
own activations, and ``deserialize(name)`` the function. Formulas, with z the input:

    linear      z
    relu        max(z, 0)
    leaky_relu  z if z > 0 else negative_slope * z     (negative_slope = 0.2)
    elu         z if z > 0 else alpha * (exp(z) - 1)   (alpha = 1.0)
    selu        scale * elu(z, alpha), alpha = 1.67326324, scale = 1.05070098
    gelu        z * Phi(z) = z * erfc(-z / sqrt(2)) / 2   (exact form; Phi the
                normal distribution function, accurate in its left tail)
    silu        z * sigmoid(z)
    sigmoid     1 / (1 + exp(-z))
    tanh        tanh(z)
    softmax     exp(z_j - max z) / sum_k exp(z_k - max z), per row
    softplus    log(1 + exp(z))
    softsign    z / (1 + |z|)
    relu6       min(max(z, 0), 6)
    hard_sigmoid  relu6(z + 3) / 6
    hard_silu   z * hard_sigmoid(z)                    (alias hard_swish)
    mish        z * tanh(softplus(z))
    exponential exp(z)
    log_softmax z_j - log sum_k exp(z_k), per row
    swish       silu's other name

``relu(x, negative_slope, max_value, threshold)`` takes Keras 3's options
(see fastgrad.layers.ReLU).
"""
import types

import numpy as np

from fastgrad import ops
from fastgrad._utils import Registry, named


def _float(x):
    x = np.asarray(x)
    return x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)


def _apply(x, name, alpha=None):
    x = _float(x)
    flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    return ops.activation_forward(flat, name, alpha=alpha).reshape(x.shape)


def _plain(name):
    """The activation without settings called ``name``, a function of x."""
    return named(lambda x: _apply(x, name), name,
                 f"{name}(x) elementwise; the formula is in the module docstring.")


def _rowwise(name):
    """The activation called ``name`` over each row (the last axis)."""
    def fn(x, axis=-1):
        if axis not in (-1, np.ndim(x) - 1):
            raise ValueError(f"axis: only the last axis is supported, got {axis}")
        return _apply(x, name)
    return named(fn, name, f"{name}(x) over the last axis; the formula is in the module "
                           "docstring.")


linear, selu, silu, sigmoid, tanh = map(_plain, ("linear", "selu", "silu", "sigmoid", "tanh"))
softplus, softsign, relu6, hard_sigmoid, hard_silu, mish, exponential = map(
    _plain, ("softplus", "softsign", "relu6", "hard_sigmoid", "hard_silu", "mish", "exponential"))
softmax, log_softmax = map(_rowwise, ("softmax", "log_softmax"))


def relu(x, negative_slope=0.0, max_value=None, threshold=0.0):
    if negative_slope == 0 and max_value is None and threshold == 0:
        return _apply(x, "relu")
    x = _float(x)
    flat = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    return ops.relu_forward(flat, negative_slope, max_value, threshold).reshape(x.shape)


def leaky_relu(x, negative_slope=0.2):
    return _apply(x, "leaky_relu", negative_slope)


def elu(x, alpha=1.0):
    return _apply(x, "elu", alpha)


def gelu(x, approximate=False):
    if approximate:
        raise ValueError("approximate: only the exact (erf) gelu is implemented")
    return _apply(x, "gelu")


swish = silu
hard_swish = hard_silu
_BY_NAME = {f.__name__: f for f in (linear, relu, leaky_relu, elu, selu, gelu, silu,
                                    sigmoid, tanh, softmax, softplus, softsign, relu6,
                                    hard_sigmoid, hard_silu, mish, exponential, log_softmax)}
REGISTRY = Registry("activation", types.FunctionType,
                     {**_BY_NAME, "swish": silu, "hard_swish": hard_silu})


def get(identifier):
    """The activation function for a name (any case), a function of this
    module or None (linear)."""
    return _BY_NAME[name_of(identifier)]


def serialize(activation):
    """The activation's name ("relu", ...)."""
    return name_of(activation)


def deserialize(config):
    """The activation function for a name ``serialize`` gave."""
    if not isinstance(config, str):
        raise TypeError(f"activation: expected a name to deserialize, got {config!r}")
    return get(config)


def name_of(identifier):
    """Canonical name of an activation given as a name, function or None."""
    if identifier is None:
        return "linear"
    if isinstance(identifier, str):
        return REGISTRY.lookup(identifier).__name__
    for name, fn in _BY_NAME.items():
        if identifier is fn:
            return name
    raise TypeError(f"activation: expected a name or a function of fastgrad.activations, "
                    f"got {identifier!r}")
