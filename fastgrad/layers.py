"""Layers. Each layer declares its weights; the model allocates them in its
flat buffers and hands every layer views into them. A layer's forward and
backward are one compiled call each, writing into work buffers allocated
once for the largest batch seen, so they allocate nothing in a steady
training step.

Layer protocol (used by models.Sequential):
    build(input_dim) -> output_dim, and fills self.weight_specs
    bind(values, grads)          dicts name -> view into the flat buffers
    forward(x, training, logits) -> output rows (a view of a work buffer)
    backward(dout, need_dx)      -> dx (a view of a work buffer) or None
"""
import numpy as np

from fastgrad import _core, activations, constraints, initializers, ops, regularizers
from fastgrad._utils import Hyper, Registry, check_int, check_real


class WeightSpec:
    """What a layer asks the model to allocate for one weight tensor."""

    def __init__(self, name, shape, initializer, trainable=True, regularizer=None,
                 constraint=None):
        self.name, self.shape = name, tuple(int(s) for s in shape)
        self.initializer, self.trainable = initializer, trainable
        self.regularizer, self.constraint = regularizer, constraint
        self.size = int(np.prod(self.shape))


class Layer:
    """Base class. ``name`` is given by the model when not set."""

    input_dim = Hyper(check_int, low=1, none=True)

    def __init__(self, name=None, input_dim=None, input_shape=None):
        if input_shape is not None:
            if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 1:
                raise ValueError("input_shape: expected (features,) with features >= 1, "
                                 f"got {input_shape!r}")
            input_dim = check_int("input_shape[0]", input_shape[0], low=1)
        self.name = name
        self.input_dim = input_dim
        self.output_dim = None
        self.weight_specs = []
        self.weights, self.grads = {}, {}
        self._cap = 0
        self._dtype = None

    # -- building ---------------------------------------------------------
    def build(self, input_dim):
        self.input_dim = input_dim
        self.output_dim = input_dim
        return input_dim

    def bind(self, values, grads):
        self.weights, self.grads = values, grads

    def init_random(self, rng):
        """Draw what the layer's randomness needs from the model's generator."""

    def allocate(self, batch, dtype, need_dx):
        """Work buffers for up to ``batch`` rows; grown, never shrunk."""
        if batch > self._cap or dtype != self._dtype:
            self._cap, self._dtype = max(batch, self._cap if dtype == self._dtype else 0), dtype
            self._allocate(self._cap, dtype, need_dx)

    def _allocate(self, cap, dtype, need_dx):
        self._out = np.empty((cap, self.output_dim), dtype)
        self._dx = np.empty((cap, self.input_dim), dtype) if need_dx else None

    @property
    def kind(self):
        return type(self).__name__

    def get_config(self):
        return {"name": self.name}

    def count_params(self):
        return sum(s.size for s in self.weight_specs)


class Dense(Layer):
    """Fully connected layer: ``y = activation(x @ kernel + bias)``.

    kernel is (input_dim, units), bias (units,). Defaults as in Keras:
    glorot_uniform kernel, zero bias. When a BatchNormalization follows, its
    shift makes the bias redundant: pass ``use_bias=False``."""

    units = Hyper(check_int, low=1)

    def __init__(self, units, activation=None, use_bias=True,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None,
                 kernel_constraint=None, bias_constraint=None,
                 input_dim=None, input_shape=None, name=None):
        super().__init__(name, input_dim, input_shape)
        self.units = units
        self.activation = activations.name_of(activation)
        self.use_bias = bool(use_bias)
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self.kernel_constraint = constraints.check(kernel_constraint, 2, "kernel_constraint")
        self.bias_constraint = constraints.check(bias_constraint, 1, "bias_constraint")
        self._code, self._alpha = ops.ACTIVATIONS[self.activation]
        self._needs_pre = self.activation in ops.NEEDS_PRE
        self.collect_stats = False   # set by fastgrad.diagnose
        self.activation_stats = None

    def build(self, input_dim):
        self.input_dim, self.output_dim = input_dim, self.units
        self.weight_specs = [WeightSpec("kernel", (input_dim, self.units),
                                        self.kernel_initializer, True,
                                        self.kernel_regularizer, self.kernel_constraint)]
        if self.use_bias:
            self.weight_specs.append(WeightSpec("bias", (self.units,), self.bias_initializer,
                                                True, self.bias_regularizer,
                                                self.bias_constraint))
        return self.units

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._pre = np.empty((cap, self.units), dtype) if self._needs_pre else None

    def forward(self, x, training=False, logits=False):
        b = x.shape[0]
        out = self._out[:b]
        pre = self._pre[:b] if self._pre is not None else None
        # logits: the model fuses this layer's softmax/sigmoid into the loss
        code = 0 if logits else self._code
        if self.collect_stats:
            alive = np.zeros(self.units, np.uint8)
            sat = _core.dense_forward(x, self.weights["kernel"], self.weights.get("bias"),
                                      out, pre, code, self._alpha, alive, True)
            if code != self._code:
                # fused output: the statistics are those of the real activation
                sat = _core.bias_act_forward(out, None, np.empty_like(out), None, self._code,
                                             self._alpha, alive, True)
            self.activation_stats = _activation_stats(self.activation, alive, sat, out.size)
        else:
            _core.dense_forward(x, self.weights["kernel"], self.weights.get("bias"),
                                out, pre, code, self._alpha)
        self._x, self._y, self._zb, self._code_used = x, out, pre, code
        return out

    def backward(self, dout, need_dx=True):
        b = dout.shape[0]
        dx = self._dx[:b] if need_dx else None
        # dout is the next layer's scratch: the activation gradient overwrites it
        _core.dense_backward(dout, self._x, self.weights["kernel"], self._y, self._zb,
                             dout, self.grads["kernel"], self.grads.get("bias"), dx,
                             self._code_used, self._alpha)
        return dx

    def get_config(self):
        return {
            "name": self.name, "units": self.units, "activation": self.activation,
            "use_bias": self.use_bias,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "bias_initializer": initializers.serialize(self.bias_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "bias_regularizer": regularizers.serialize(self.bias_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "bias_constraint": constraints.serialize(self.bias_constraint),
            "input_dim": self.input_dim,
        }


def _activation_stats(activation, alive, saturated, size):
    """dead_fraction: share of relu units zero for the whole batch;
    saturated_fraction: share of sigmoid/tanh outputs in saturation."""
    return {
        "dead_fraction": float(1.0 - alive.mean()) if activation == "relu" and alive.size
        else 0.0,
        "saturated_fraction": saturated / size if activation in ("sigmoid", "tanh") and size
        else 0.0,
    }


class Activation(Layer):
    """Applies an activation by name: ``y = activation(x)``."""

    def __init__(self, activation, input_dim=None, input_shape=None, name=None):
        super().__init__(name, input_dim, input_shape)
        self.activation = activations.name_of(activation)
        self._code, self._alpha = ops.ACTIVATIONS[self.activation]
        self.collect_stats = False
        self.activation_stats = None

    def forward(self, x, training=False, logits=False):
        out = self._out[:x.shape[0]]
        code = 0 if logits else self._code
        if self.collect_stats:
            alive = np.zeros(self.output_dim, np.uint8)
            sat = _core.bias_act_forward(x, None, out, None, self._code, self._alpha, alive,
                                         True)
            if code != self._code:   # fused output: logits after all, stats as above
                _core.bias_act_forward(x, None, out, None, code, self._alpha)
            self.activation_stats = _activation_stats(self.activation, alive, sat, out.size)
        else:
            _core.bias_act_forward(x, None, out, None, code, self._alpha)
        self._x, self._y, self._code_used = x, out, code
        return out

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        dx = self._dx[:dout.shape[0]]
        _core.act_backward(dout, self._y, self._x, dx, None, self._code_used, self._alpha)
        return dx

    def get_config(self):
        return {"name": self.name, "activation": self.activation,
                "input_dim": self.input_dim}


class BatchNormalization(Layer):
    """Batch normalization (Ioffe & Szegedy 2015) over the features::

        training:  mu, var = mean and biased variance of the batch, per feature
                   moving = momentum * moving + (1 - momentum) * (mu or var)
        inference: mu, var = moving_mean, moving_variance
        y = gamma * (x - mu) / sqrt(var + epsilon) + beta

    gamma (scale=True) and beta (center=True) are trained; the moving
    statistics are state, never touched by the optimizer. Weights in
    get_weights() order: gamma, beta, moving_mean, moving_variance.
    Training needs batches of at least 2 rows. momentum is in [0, 1],
    epsilon finite and > 0."""

    momentum = Hyper(check_real, low=0.0, high=1.0)
    epsilon = Hyper(check_real, low=0.0, low_open=True)

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, axis=-1, input_dim=None, input_shape=None, name=None):
        super().__init__(name, input_dim, input_shape)
        if axis not in (-1, 1):
            raise ValueError(f"axis: expected -1 (the features of a 2-D input), got {axis!r}")
        self.momentum, self.epsilon = momentum, epsilon
        self.center, self.scale = bool(center), bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.check(beta_constraint, 1, "beta_constraint")
        self.gamma_constraint = constraints.check(gamma_constraint, 1, "gamma_constraint")

    def build(self, input_dim):
        self.input_dim = self.output_dim = input_dim
        f = (input_dim,)
        specs = []
        if self.scale:
            specs.append(WeightSpec("gamma", f, self.gamma_initializer, True,
                                    self.gamma_regularizer, self.gamma_constraint))
        if self.center:
            specs.append(WeightSpec("beta", f, self.beta_initializer, True,
                                    self.beta_regularizer, self.beta_constraint))
        specs.append(WeightSpec("moving_mean", f, self.moving_mean_initializer, False))
        specs.append(WeightSpec("moving_variance", f, self.moving_variance_initializer, False))
        self.weight_specs = specs
        return input_dim

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._mean = np.zeros(self.input_dim)
        self._rstd = np.ones(self.input_dim)

    def forward(self, x, training=False, logits=False):
        b = x.shape[0]
        if training and b < 2:
            raise ValueError(f"x: BatchNormalization ({self.name}) needs at least 2 rows "
                             f"per batch in training to estimate a variance, got {b}")
        out = self._out[:b]
        w = self.weights
        _core.batchnorm_forward(x, w.get("gamma"), w.get("beta"), w["moving_mean"],
                                w["moving_variance"], out, self._mean, self._rstd,
                                self.epsilon, self.momentum, training)
        self._x = x
        return out

    def backward(self, dout, need_dx=True):
        dx = self._dx[:dout.shape[0]] if need_dx else dout  # dout is scratch
        _core.batchnorm_backward(dout, self._x, self._mean, self._rstd,
                                 self.weights.get("gamma"), dx, self.grads.get("gamma"),
                                 self.grads.get("beta"))
        return dx if need_dx else None

    def get_config(self):
        return {
            "name": self.name, "momentum": self.momentum, "epsilon": self.epsilon,
            "center": self.center, "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(self.gamma_initializer),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer":
                initializers.serialize(self.moving_variance_initializer),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(self.gamma_regularizer),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
            "input_dim": self.input_dim,
        }


class Dropout(Layer):
    """Inverted dropout (Srivastava et al. 2014): in training each entry is
    kept with probability 1 - rate and scaled by 1 / (1 - rate); in
    inference the layer is the identity. Masks come from a counter-based
    generator: ``seed`` (or, when None, a number drawn from the model's seed)
    and a counter that advances with every training batch, so they are
    reproduced, not stored."""

    rate = Hyper(check_real, low=0.0, high=1.0, high_open=True)
    seed = Hyper(check_int, low=0, none=True)

    def __init__(self, rate, seed=None, input_dim=None, input_shape=None, name=None):
        super().__init__(name, input_dim, input_shape)
        self.rate, self.seed = rate, seed
        self.counter = 0                      # random numbers drawn so far
        self._seed = None if self.seed is None else self.seed % 2**64

    def init_random(self, rng):
        if self._seed is None:
            self._seed = int(rng.integers(0, 2**63))

    def forward(self, x, training=False, logits=False):
        self._active = training and self.rate > 0
        if not self._active:
            return x
        out = self._out[:x.shape[0]]
        self._at = self.counter
        _core.dropout(x, out, self.rate, self._seed, self._at)
        self.counter = (self.counter + x.size) % 2**64   # the generator's positions wrap
        return out

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        if not self._active:
            return dout
        dx = self._dx[:dout.shape[0]]
        _core.dropout(dout, dx, self.rate, self._seed, self._at)
        return dx

    def get_config(self):
        return {"name": self.name, "rate": self.rate, "seed": self.seed,
                "input_dim": self.input_dim}


_REGISTRY = Registry("layer", Layer, {"dense": Dense, "activation": Activation,
                                      "batch_normalization": BatchNormalization,
                                      "dropout": Dropout})


def get(identifier):
    """A layer from a ``serialize`` dict or a Layer (returned as it is)."""
    return _REGISTRY.get(identifier)


def serialize(layer):
    """``{"class_name": "Dense", "config": layer.get_config()}``."""
    return _REGISTRY.serialize(layer)


def deserialize(config):
    """The (unbuilt) layer a ``serialize`` dict describes."""
    return _REGISTRY.deserialize(config)
