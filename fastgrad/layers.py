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
import contextlib

import numpy as np

from fastgrad import _core, activations, constraints, initializers, ops, regularizers
from fastgrad._utils import Hyper, Registry, check_int, check_real
from fastgrad.variables import HasVariables, Variable


def _check_weight(variable, w):
    """set_weights' check of one array against its variable."""
    w = np.asarray(w)
    if w.dtype.kind not in "biuf":
        raise TypeError(f"weights: {variable.path} must be numbers, got dtype {w.dtype}")
    if w.shape != variable.shape:
        raise ValueError(f"weights: {variable.path} expected shape {variable.shape}, "
                         f"got {w.shape}")


class WeightSpec:
    """What a layer asks the model to allocate for one weight tensor."""

    def __init__(self, name, shape, initializer, trainable=True, regularizer=None,
                 constraint=None):
        self.name, self.shape = name, tuple(int(s) for s in shape)
        self.initializer, self.trainable = initializer, trainable
        self.regularizer, self.constraint = regularizer, constraint
        self.size = int(np.prod(self.shape))


def _features(arg, shape):
    """The features of a Keras shape ``(features,)`` (a batch dimension of
    None in front is taken too, as in ``batch_shape``)."""
    if isinstance(shape, (tuple, list)) and len(shape) == 2 and shape[0] is None:
        shape = shape[1:]
    if not isinstance(shape, (tuple, list)) or len(shape) != 1:
        raise ValueError(f"{arg}: expected (features,) with features >= 1 (fastgrad's "
                         f"inputs are 2-D, (batch, features)), got {shape!r}")
    return check_int(f"{arg}[0]", shape[0], low=1)


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return bool(value)


def _weight(name, doc):
    """A read-only attribute giving the layer's weight ``name`` as a Variable."""
    return property(lambda layer: layer._variable(name), doc=doc)


class Layer(HasVariables):
    """Base class. ``name`` is given by the model when not set.

    Keras 3's layer API: ``trainable`` (False freezes the layer: the
    optimizer's compiled step skips its weights and their moments, and a
    frozen BatchNormalization runs in inference mode), ``get_weights()`` /
    ``set_weights()``, ``variables`` / ``trainable_weights`` /
    ``non_trainable_weights`` (fastgrad.variables.Variable), ``get_config``
    / ``from_config``. ``layer.weights`` is the dict name -> array view the
    kernels use (Keras's list of variables is ``layer.variables``)."""

    input_dim = Hyper(check_int, low=1, none=True)

    def __init__(self, name=None, input_dim=None, input_shape=None, trainable=True):
        if input_shape is not None:
            input_dim = _features("input_shape", input_shape)
        self.name = name
        self.input_dim = input_dim
        self.output_dim = None
        self.weight_specs = []
        self.weights, self.grads = {}, {}
        self._variables = {}
        self._model = None     # the model that holds the layer, set by its add
        self._trainable = _check_bool("trainable", trainable)
        self._cap = 0
        self._dtype = None

    # -- Keras's weight API -------------------------------------------------
    @property
    def trainable(self):
        return self._trainable

    @trainable.setter
    def trainable(self, value):
        self._trainable = _check_bool("trainable", value)
        if self._model is not None:
            self._model._sync_frozen()

    @property
    def built(self):
        return bool(self.weights) or (self._model is not None and self._model._built)

    def _materialized(self):
        """Builds the layer's model when its input width is known (Keras
        builds it then; fastgrad allocates on first use)."""
        model = self._model
        if model is not None and not model._built and model.built:
            model.build()

    @property
    def variables(self):
        """Every weight as a Variable, in get_weights() order."""
        self._materialized()
        if not self._variables:   # not built: no weights yet, as in Keras
            return []
        return [self._variables[s.name] for s in self.weight_specs]

    def _variable(self, name):
        self._materialized()
        if not self._variables:
            raise ValueError(f"{name}: the layer {self.name or self.kind} is not built yet "
                             "(give its model an input shape, or fit or predict first)")
        return self._variables.get(name)

    def get_weights(self):
        """Copies of the layer's weights, in weight_specs order."""
        return [v.numpy() for v in self.variables]

    def set_weights(self, weights):
        """Set the layer's weights from a list like get_weights() returns;
        every array is checked (count, shape, numbers) first. Like the
        model's set_weights, and unlike a Variable's assign, it takes
        values that are not finite (a model's weights after an overflow)."""
        variables = self.variables
        weights = list(weights)
        if len(weights) != len(variables):
            raise ValueError(f"weights: {self.name} expected {len(variables)} arrays, got "
                             f"{len(weights)}")
        for v, w in zip(variables, weights):
            _check_weight(v, w)
        lock = self._model._lock if self._model is not None else contextlib.nullcontext()
        with lock:
            for v, w in zip(variables, weights):
                self.weights[v.name][...] = w

    @classmethod
    def from_config(cls, config):
        """The (unbuilt) layer a get_config() dict describes."""
        return cls(**config)

    # -- building ---------------------------------------------------------
    def build(self, input_dim):
        self.input_dim = input_dim
        self.output_dim = input_dim
        return input_dim

    def bind(self, values, grads):
        self.weights, self.grads = values, grads
        self._variables = {s.name: Variable(self, s.name, s.trainable)
                           for s in self.weight_specs}

    def init_random(self, rng):
        """Draw what the layer's randomness needs from the model's generator."""

    def allocate(self, batch, dtype, need_dx):
        """Work buffers for up to ``batch`` rows; grown, never shrunk."""
        if batch > self._cap or dtype != self._dtype:
            cap = max(batch, self._cap if dtype == self._dtype else 0)
            self._allocate(cap, dtype, need_dx)
            # after the buffers: an interrupt in between leaves them to be grown again
            self._cap, self._dtype = cap, dtype

    def _allocate(self, cap, dtype, need_dx):
        self._out = np.empty((cap, self.output_dim), dtype)
        self._dx = np.empty((cap, self.input_dim), dtype) if need_dx else None

    @property
    def kind(self):
        return type(self).__name__

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable}

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
                 input_dim=None, input_shape=None, name=None, trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        self.units = units
        self.activation = activations.name_of(activation)
        self.use_bias = bool(use_bias)
        _set_weight_options(self, "kernel", 2, kernel_initializer, kernel_regularizer,
                            kernel_constraint)
        _set_weight_options(self, "bias", 1, bias_initializer, bias_regularizer, bias_constraint)
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

    kernel = _weight("kernel", "The kernel as a Variable (Keras's ``layer.kernel``).")
    bias = _weight("bias", "The bias as a Variable, or None with ``use_bias=False``.")

    def get_config(self):
        return {
            "name": self.name, "trainable": self.trainable, "units": self.units,
            "activation": self.activation,
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

    def __init__(self, activation, input_dim=None, input_shape=None, name=None, trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
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
        return {"name": self.name, "trainable": self.trainable, "activation": self.activation,
                "input_dim": self.input_dim}


def _set_weight_options(layer, name, ndim, initializer, regularizer, constraint):
    """The attributes ``<name>_initializer``, ``<name>_regularizer`` and
    ``<name>_constraint`` of one weight of ``ndim`` dimensions, as Keras
    names them."""
    setattr(layer, f"{name}_initializer", initializers.get(initializer))
    setattr(layer, f"{name}_regularizer", regularizers.get(regularizer))
    setattr(layer, f"{name}_constraint", constraints.check(constraint, ndim, f"{name}_constraint"))


def _set_affine(layer, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                gamma_regularizer, beta_constraint, gamma_constraint):
    """A normalization layer's settings of its scale gamma and shift beta."""
    layer.center, layer.scale = bool(center), bool(scale)
    _set_weight_options(layer, "beta", 1, beta_initializer, beta_regularizer, beta_constraint)
    _set_weight_options(layer, "gamma", 1, gamma_initializer, gamma_regularizer,
                        gamma_constraint)


def _affine_specs(layer, features):
    """gamma (scale=True) then beta (center=True), Keras' order."""
    specs = []
    if layer.scale:
        specs.append(WeightSpec("gamma", (features,), layer.gamma_initializer, True,
                                layer.gamma_regularizer, layer.gamma_constraint))
    if layer.center:
        specs.append(WeightSpec("beta", (features,), layer.beta_initializer, True,
                                layer.beta_regularizer, layer.beta_constraint))
    return specs


def _affine_config(layer):
    return {
        "center": layer.center, "scale": layer.scale,
        "beta_initializer": initializers.serialize(layer.beta_initializer),
        "gamma_initializer": initializers.serialize(layer.gamma_initializer),
        "beta_regularizer": regularizers.serialize(layer.beta_regularizer),
        "gamma_regularizer": regularizers.serialize(layer.gamma_regularizer),
        "beta_constraint": constraints.serialize(layer.beta_constraint),
        "gamma_constraint": constraints.serialize(layer.gamma_constraint),
    }


class BatchNormalization(Layer):
    """Batch normalization (Ioffe & Szegedy 2015) over the features::

        training:  mu, var = mean and biased variance of the batch, per feature
                   moving = momentum * moving + (1 - momentum) * (mu or var)
        inference: mu, var = moving_mean, moving_variance
        y = gamma * (x - mu) / sqrt(var + epsilon) + beta

    gamma (scale=True) and beta (center=True) are trained; the moving
    statistics are state, never touched by the optimizer. Weights in
    get_weights() order: gamma, beta, moving_mean, moving_variance.
    A batch of one row has variance 0, so in training its output is beta
    (as in Keras). A frozen layer (``trainable = False``) runs in inference
    mode in training too, as in Keras 3: the moving statistics normalize
    and stay as they are, and the gradient is dx = dy * gamma / sqrt(
    moving_variance + epsilon). momentum is in [0, 1], epsilon finite
    and > 0."""

    momentum = Hyper(check_real, low=0.0, high=1.0)
    epsilon = Hyper(check_real, low=0.0, low_open=True)

    def __init__(self, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, axis=-1, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        if axis not in (-1, 1):
            raise ValueError(f"axis: expected -1 (the features of a 2-D input), got {axis!r}")
        self.momentum, self.epsilon = momentum, epsilon
        _set_affine(self, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                    gamma_regularizer, beta_constraint, gamma_constraint)
        self.moving_mean_initializer = initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = initializers.get(moving_variance_initializer)

    def build(self, input_dim):
        self.input_dim = self.output_dim = input_dim
        f = (input_dim,)
        specs = _affine_specs(self, input_dim)
        specs.append(WeightSpec("moving_mean", f, self.moving_mean_initializer, False))
        specs.append(WeightSpec("moving_variance", f, self.moving_variance_initializer, False))
        self.weight_specs = specs
        return input_dim

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._mean = np.zeros(self.input_dim)
        self._rstd = np.ones(self.input_dim)
        self._k = np.ones(self.input_dim, dtype)   # gamma * rstd, for frozen layers

    def forward(self, x, training=False, logits=False):
        out = self._out[:x.shape[0]]
        w = self.weights
        self._training = training and self.trainable   # frozen: inference mode
        _core.batchnorm_forward(x, w.get("gamma"), w.get("beta"), w["moving_mean"],
                                w["moving_variance"], out, self._mean, self._rstd,
                                self.epsilon, self.momentum, self._training)
        self._x = x
        return out

    def backward(self, dout, need_dx=True):
        if not self._training:
            # statistics held fixed: each column is scaled by gamma * rstd
            # (gamma and beta are frozen, their gradients are not needed)
            if not need_dx:
                return None
            gamma = self.weights.get("gamma")
            np.multiply(self._rstd, 1.0 if gamma is None else gamma, out=self._k)
            return np.multiply(dout, self._k, out=self._dx[:dout.shape[0]])
        dx = self._dx[:dout.shape[0]] if need_dx else dout  # dout is scratch
        _core.batchnorm_backward(dout, self._x, self._mean, self._rstd,
                                 self.weights.get("gamma"), dx, self.grads.get("gamma"),
                                 self.grads.get("beta"))
        return dx if need_dx else None

    gamma = _weight("gamma", "gamma as a Variable, or None with ``scale=False``.")
    beta = _weight("beta", "beta as a Variable, or None with ``center=False``.")
    moving_mean = _weight("moving_mean", "The moving mean as a Variable.")
    moving_variance = _weight("moving_variance", "The moving variance as a Variable.")

    def get_config(self):
        return {
            "name": self.name, "trainable": self.trainable, "momentum": self.momentum,
            "epsilon": self.epsilon, **_affine_config(self),
            "moving_mean_initializer": initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer":
                initializers.serialize(self.moving_variance_initializer),
            "input_dim": self.input_dim,
        }


class _Random(Layer):
    """A layer drawing random numbers in training from the counter-based
    generator of the compiled kernels: ``seed`` (or, when None, a number
    drawn from the model's seed) and a counter that advances with every
    training batch, so that masks and noise are recomputed in backward
    rather than stored, and a seed reproduces them. The model saves the
    counter and puts it back when a step is skipped. Subclasses name the
    hyperparameter that sets how much noise (``_AMOUNT``; 0: the layer is
    the identity) and give ``_apply``; backward applies the same numbers to
    the gradient unless ``_apply_backward`` or ``backward`` says otherwise."""

    _AMOUNT = "rate"

    seed = Hyper(check_int, low=0, none=True)

    def __init__(self, seed=None, input_dim=None, input_shape=None, name=None, trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        self.seed = seed
        self.counter = 0                      # random numbers drawn so far
        self._seed = None if self.seed is None else self.seed % 2**64

    def init_random(self, rng):
        if self._seed is None:
            self._seed = int(rng.integers(0, 2**63))

    def forward(self, x, training=False, logits=False):
        self._active = training and self._amount() > 0
        if not self._active:
            return x
        out = self._out[:x.shape[0]]
        self._at = self.counter
        self._apply(x, out)
        self.counter = (self.counter + x.size) % 2**64   # the generator's positions wrap
        return out

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        if not self._active:
            return dout
        dx = self._dx[:dout.shape[0]]
        self._apply_backward(dout, dx)
        return dx

    def _apply_backward(self, dout, dx):
        """The same numbers again: the backward of a multiplicative noise."""
        self._apply(dout, dx)

    def _amount(self):
        return getattr(self, self._AMOUNT)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, self._AMOUNT: self._amount(),
                "seed": self.seed, "input_dim": self.input_dim}


class _Rated(_Random):
    """A random layer set by a rate in [0, 1)."""

    rate = Hyper(check_real, low=0.0, high=1.0, high_open=True)

    def __init__(self, rate, seed=None, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__(seed, input_dim, input_shape, name, trainable)
        self.rate = rate


class Dropout(_Rated):
    """Inverted dropout (Srivastava et al. 2014): in training each entry is
    kept with probability 1 - rate and scaled by 1 / (1 - rate); in
    inference the layer is the identity. Masks come from the counter-based
    generator (see ``_Random``)."""

    def _apply(self, x, out):
        _core.dropout(x, out, self.rate, self._seed, self._at)


class GaussianNoise(_Random):
    """Additive Gaussian noise, in training only: ``y = x + stddev * z`` with
    z standard normal (Box-Muller on the counter-based generator); identity
    in inference. Its gradient passes unchanged. stddev in [0, 1] as Keras."""

    _AMOUNT = "stddev"
    stddev = Hyper(check_real, low=0.0, high=1.0)

    def __init__(self, stddev, seed=None, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__(seed, input_dim, input_shape, name, trainable)
        self.stddev = stddev

    def _apply(self, x, out):
        _core.gaussian_noise(x, out, self.stddev, False, self._seed, self._at)

    def backward(self, dout, need_dx=True):
        return dout if need_dx else None


class GaussianDropout(_Rated):
    """Multiplicative Gaussian noise (Srivastava et al. 2014, section 10), in
    training only: ``y = x * (1 + s z)``, s = sqrt(rate / (1 - rate)), z
    standard normal; identity in inference. Backward: dx = dout (1 + s z)
    with the same z, recomputed. rate in [0, 1)."""

    def _stddev(self):
        return (self.rate / (1.0 - self.rate)) ** 0.5

    def _apply(self, x, out):
        _core.gaussian_noise(x, out, self._stddev(), True, self._seed, self._at)


_SELU_ALPHA_P = -1.6732632423543772848170429916717 * 1.0507009873554804934193349852946


class AlphaDropout(_Rated):
    """Alpha dropout (Klambauer et al. 2017), for self-normalizing (SELU)
    networks: keeps the mean and variance of its inputs. In training, with
    the mask of Dropout (each entry kept with probability 1 - rate),
    alpha' = -selu_alpha * selu_scale, a = ((1 - rate)(1 + rate alpha'^2))^-1/2
    and b = -a alpha' rate::

        y = a x + b where kept,   a alpha' + b where dropped
        dx = a dout where kept,   0 where dropped

    identity in inference. ``noise_shape`` must be None (one draw per entry)."""

    def __init__(self, rate, noise_shape=None, seed=None, input_dim=None, input_shape=None,
                 name=None, trainable=True):
        if noise_shape is not None:
            raise ValueError(f"noise_shape: only None (one draw per entry) is supported, "
                             f"got {noise_shape!r}")
        super().__init__(rate, seed, input_dim, input_shape, name, trainable)
        self.noise_shape = None

    def _affine(self):
        r = self.rate
        a = ((1.0 - r) * (1.0 + r * _SELU_ALPHA_P ** 2)) ** -0.5
        return a, -a * _SELU_ALPHA_P * r

    def _apply(self, x, out):
        a, b = self._affine()
        _core.alpha_dropout(x, out, self.rate, a, b, a * _SELU_ALPHA_P + b, self._seed, self._at)

    def _apply_backward(self, dout, dx):
        _core.alpha_dropout(dout, dx, self.rate, self._affine()[0], 0.0, 0.0, self._seed,
                            self._at)

    def get_config(self):
        return {**super().get_config(), "noise_shape": None}


class Identity(Layer):
    """``y = x``; its gradient passes unchanged."""

    def forward(self, x, training=False, logits=False):
        return x

    def backward(self, dout, need_dx=True):
        return dout if need_dx else None

    def _allocate(self, cap, dtype, need_dx):
        pass

    def get_config(self):
        return {**super().get_config(), "input_dim": self.input_dim}


class Flatten(Identity):
    """Flattens each sample to one row, as Keras's ``Flatten``: as the first
    layer it lets the model take inputs of any rank, ``(batch, d1, d2, ...)``
    read as ``(batch, d1 * d2 * ...)`` (a view, row-major as NumPy and Keras
    order it); on 2-D rows it is the identity. ``input_shape`` may have any
    length."""

    def __init__(self, data_format=None, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        if data_format not in (None, "channels_last"):
            raise ValueError(f"data_format: expected None or 'channels_last', got "
                             f"{data_format!r}")
        shape = None
        if input_shape is not None:
            if not isinstance(input_shape, (tuple, list)) or not input_shape:
                raise ValueError(f"input_shape: expected a tuple of sizes, got {input_shape!r}")
            shape = tuple(check_int(f"input_shape[{i}]", d, low=1)
                          for i, d in enumerate(input_shape))
            input_dim = int(np.prod(shape))
        super().__init__(name, input_dim, trainable=trainable)
        self.sample_shape = shape

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "data_format": None,
                "input_dim": self.input_dim, "input_shape": self.sample_shape}


class Rescaling(Layer):
    """``y = x * scale + offset`` (Keras's Rescaling; scale 1/255 maps pixel
    values to [0, 1]). Backward: dx = dout * scale. scale and offset are
    finite numbers."""

    scale, offset = Hyper(check_real), Hyper(check_real)

    def __init__(self, scale, offset=0.0, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        self.scale, self.offset = scale, offset

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._mul = np.full(self.input_dim, self.scale, dtype)
        self._add = np.full(self.input_dim, self.offset, dtype)

    def forward(self, x, training=False, logits=False):
        self._mul[...], self._add[...] = self.scale, self.offset   # set after build
        return _core.affine(x, self._add, self._mul, self._out[:x.shape[0]], False)

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        return _core.affine(dout, None, self._mul, self._dx[:dout.shape[0]], False)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "scale": self.scale,
                "offset": self.offset, "input_dim": self.input_dim}


class Normalization(Layer):
    """Feature-wise standardization, Keras's preprocessing layer::

        y = (x - mean) / max(sqrt(variance), 1e-7)       (invert: x * that + mean)

    ``mean`` and ``variance`` are given (numbers or one per feature) or
    learned by ``adapt(data)``: the mean and biased variance of each feature
    over the rows, accumulated in float64 (over batches, when ``data`` is an
    iterable of arrays, merged as Keras merges them). They are non-trainable
    weights, saved with the model; get_weights() order: mean, variance.
    Backward: dx = dout / max(sqrt(variance), 1e-7) (invert: times it).
    Only ``axis=-1`` (the features of 2-D rows)."""

    def __init__(self, axis=-1, mean=None, variance=None, invert=False, input_dim=None,
                 input_shape=None, name=None, trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        if axis not in (-1, 1, (-1,), (1,), [-1], [1]):
            raise ValueError(f"axis: expected -1 (the features of 2-D rows), got {axis!r}")
        if (mean is None) != (variance is None):
            raise ValueError("mean, variance: give both or neither")
        self.axis, self.invert = -1, bool(invert)
        self._given = None
        if mean is not None:
            m, v = (np.asarray(a, np.float64) for a in (mean, variance))
            for arg, a in (("mean", m), ("variance", v)):
                if a.ndim > 1 or not np.isfinite(a).all():
                    raise ValueError(f"{arg}: expected finite numbers, one or one per "
                                     f"feature, got {a!r}")
            if (v < 0).any():
                raise ValueError("variance: expected numbers >= 0")
            self._given = (m, v)
        self._values = self._given

    def build(self, input_dim):
        self.input_dim = self.output_dim = input_dim
        if self._values is not None:
            for arg, a in zip(("mean", "variance"), self._values):
                if a.ndim == 1 and a.shape[0] != input_dim:
                    raise ValueError(f"{arg}: expected {input_dim} values, one per feature, "
                                     f"got {a.shape[0]}")
        f = (input_dim,)
        self.weight_specs = [WeightSpec("mean", f, self._initial(0), False),
                             WeightSpec("variance", f, self._initial(1), False)]
        return input_dim

    def _initial(self, which):
        def init(shape, dtype, rng=None):
            if self._values is None:
                return np.full(shape, float(which), dtype)   # mean 0, variance 1
            return np.broadcast_to(self._values[which], shape).astype(dtype)
        return init

    def adapt(self, data):
        """Set mean and variance from ``data``: a 2-D array (rows, features),
        or an iterable of such batches."""
        one = isinstance(data, np.ndarray) or (
            isinstance(data, (list, tuple)) and len(data) > 0
            and isinstance(data[0], (list, tuple)) and len(data[0]) > 0
            and not isinstance(data[0][0], (list, tuple)))
        count, mean, var = 0, None, None
        for i, batch in enumerate([data] if one else data):
            try:
                b = np.asarray(batch)
            except ValueError:   # ragged rows
                raise ValueError(f"data: batch {i}: expected rows of equal length") from None
            if b.dtype.kind not in "biuf" or b.ndim != 2 or b.shape[0] == 0:
                raise ValueError(f"data: batch {i}: expected a non-empty 2-D array of numbers "
                                 f"(rows, features), got shape {b.shape}, dtype {b.dtype}")
            want = self.input_dim if mean is None else mean.shape[0]
            if want is not None and b.shape[1] != want:
                raise ValueError(f"data: batch {i}: expected {want} features, got {b.shape[1]}")
            if not np.isfinite(b).all():
                raise ValueError(f"data: batch {i} holds NaN or inf")
            bm = b.mean(axis=0, dtype=np.float64)
            bv = b.var(axis=0, dtype=np.float64)
            n = count + b.shape[0]
            if mean is None:
                mean, var = bm, bv
            else:   # the combined mean and biased variance of both parts
                wb = b.shape[0] / n
                wa = 1.0 - wb
                new = mean * wa + bm * wb
                var = (var + (mean - new) ** 2) * wa + (bv + (bm - new) ** 2) * wb
                mean = new
            count = n
        if mean is None:
            raise ValueError("data: expected at least one batch")
        self._values = (mean, var)
        if "mean" in self.weights:   # built: into the model's state
            self.weights["mean"][...] = mean
            self.weights["variance"][...] = var

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._den = np.empty(self.input_dim, dtype)

    def forward(self, x, training=False, logits=False):
        d, w = self._den, self.weights
        np.sqrt(w["variance"], out=d)
        np.maximum(d, 1e-7, out=d)
        return _core.affine(x, w["mean"], d, self._out[:x.shape[0]], not self.invert)

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        return _core.affine(dout, None, self._den, self._dx[:dout.shape[0]], not self.invert)

    def get_config(self):
        given = self._given
        return {"name": self.name, "trainable": self.trainable, "axis": -1,
                "invert": self.invert,
                "mean": None if given is None else given[0].tolist(),
                "variance": None if given is None else given[1].tolist(),
                "input_dim": self.input_dim}

    # Keras's read-only views of the statistics: shape (1, features), None
    # until the layer is built or adapted; copies, so the kernels' weights
    # cannot be changed through them
    @property
    def mean(self):
        """The mean in use, shape (1, features) (None before build or adapt)."""
        return self._statistic("mean", 0)

    @property
    def variance(self):
        """The variance in use, shape (1, features) (None before build or adapt)."""
        return self._statistic("variance", 1)

    def _statistic(self, key, which):
        if key in self.weights:
            return self.weights[key].reshape(1, -1).copy()
        if self._values is None or self._values is self._given:
            return None   # Keras sets given values when it builds the layer
        return self._values[which].reshape(1, -1).astype(np.float32)




class InputLayer(Layer):
    """The input of a Sequential model: ``InputLayer(shape=(features,))``
    (or ``batch_shape=(None, features)``), taken as the first element of
    ``Sequential([...])`` or by ``model.add``; it fixes the input width, so
    the model is built from the start, as in Keras. It has no weights and
    is not listed in ``model.layers``. batch_size is accepted and not
    enforced (fastgrad takes batches of any size); dtype, when given, must
    be a float dtype (the model's dtype decides the computation)."""

    def __init__(self, shape=None, batch_size=None, dtype=None, batch_shape=None, name=None,
                 **kwargs):
        extra = set(kwargs) - {"sparse", "ragged", "optional", "input_tensor"}
        if extra:
            raise TypeError(f"InputLayer: unexpected argument {sorted(extra)[0]!r}")
        for key in ("sparse", "ragged", "optional"):
            if kwargs.get(key):
                raise ValueError(f"{key}: fastgrad's inputs are dense 2-D arrays; only "
                                 f"{key}=False is supported")
        if kwargs.get("input_tensor") is not None:
            raise ValueError("input_tensor: fastgrad has no symbolic tensors; give shape=")
        if (shape is None) == (batch_shape is None):
            raise ValueError("shape: give exactly one of shape=(features,) and "
                             "batch_shape=(batch, features)")
        if batch_shape is not None:
            if not isinstance(batch_shape, (tuple, list)) or len(batch_shape) != 2:
                raise ValueError(f"batch_shape: expected (batch, features), got {batch_shape!r}")
            batch_size = batch_shape[0]
            features = _features("batch_shape", (None, batch_shape[1]))
        else:
            features = _features("shape", shape)
        self.batch_size = check_int("batch_size", batch_size, low=1, none=True)
        if dtype is not None and np.dtype(dtype).kind != "f":
            raise ValueError(f"dtype: expected a float dtype (the model computes in its own "
                             f"dtype), got {dtype!r}")
        self.input_dtype = None if dtype is None else np.dtype(dtype).name
        super().__init__(name, features)
        self.output_dim = features

    @property
    def shape(self):
        """(None, features), as Keras's input tensors' shape."""
        return (None, self.input_dim)

    def get_config(self):
        return {"name": self.name, "batch_shape": [self.batch_size, self.input_dim],
                "dtype": self.input_dtype}


def Input(shape=None, batch_size=None, dtype=None, batch_shape=None, name=None, **kwargs):
    """Keras's ``Input``: here an InputLayer (Keras returns a symbolic
    tensor; fastgrad models are Sequential, where both mean the same)."""
    return InputLayer(shape, batch_size, dtype, batch_shape, name, **kwargs)


class LayerNormalization(Layer):
    """Layer normalization (Ba, Kiros & Hinton 2016) of each row over its
    features::

        mu, var = mean and biased variance of the row
        y = gamma * (x - mu) / sqrt(var + epsilon) + beta

    The statistics are the row's own, so the layer is the same in training
    and inference and works at any batch size, 1 included. gamma
    (scale=True) and beta (center=True) are trained; weights in
    get_weights() order: gamma, beta. Statistics are accumulated in double
    in two passes over the row, so rows with a large mean and a tiny spread
    keep their digits in float32. epsilon finite and > 0."""

    epsilon = Hyper(check_real, low=0.0, low_open=True)

    def __init__(self, axis=-1, epsilon=1e-3, center=True, scale=True, rms_scaling=False,
                 beta_initializer="zeros", gamma_initializer="ones", beta_regularizer=None,
                 gamma_regularizer=None, beta_constraint=None, gamma_constraint=None,
                 input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        if isinstance(axis, (list, tuple)) and len(axis) == 1:
            axis = axis[0]   # Keras writes [-1]
        if axis not in (-1, 1) or isinstance(axis, bool):
            raise ValueError(f"axis: expected -1 (the features of a 2-D input), got {axis!r}")
        if rms_scaling:
            raise ValueError("rms_scaling: only False (mean and variance) is implemented")
        self.epsilon = epsilon
        _set_affine(self, center, scale, beta_initializer, gamma_initializer, beta_regularizer,
                    gamma_regularizer, beta_constraint, gamma_constraint)

    def build(self, input_dim):
        self.input_dim = self.output_dim = input_dim
        self.weight_specs = _affine_specs(self, input_dim)
        return input_dim

    def _allocate(self, cap, dtype, need_dx):
        super()._allocate(cap, dtype, need_dx)
        self._mean, self._rstd = np.zeros(cap), np.ones(cap)
        self._work = np.empty(_core.LAYERNORM_WORK * self.input_dim)   # backward's column sums

    def forward(self, x, training=False, logits=False):
        b = x.shape[0]
        out = self._out[:b]
        _core.layernorm_forward(x, self.weights.get("gamma"), self.weights.get("beta"), out,
                                self._mean[:b], self._rstd[:b], self.epsilon)
        self._x = x
        return out

    def backward(self, dout, need_dx=True):
        b = dout.shape[0]
        dx = self._dx[:b] if need_dx else dout   # dout is scratch
        _core.layernorm_backward(dout, self._x, self._mean[:b], self._rstd[:b],
                                 self.weights.get("gamma"), dx, self.grads.get("gamma"),
                                 self.grads.get("beta"), self._work)
        return dx if need_dx else None

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "axis": -1, "epsilon": self.epsilon,
                **_affine_config(self), "input_dim": self.input_dim}


class _ActivationWith(Activation):
    """An Activation layer whose slope or scale is a layer argument
    (``setting`` names it, Keras 3's name)."""

    setting = None

    def __init__(self, activation, value, input_dim, input_shape, name, trainable):
        super().__init__(activation, input_dim, input_shape, name, trainable)
        value = check_real(self.setting, value, low=0.0)
        setattr(self, self.setting, value)
        self._alpha = value

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                self.setting: getattr(self, self.setting), "input_dim": self.input_dim}


class LeakyReLU(_ActivationWith):
    """``y = x if x > 0 else negative_slope * x`` (Keras default 0.3)."""

    setting = "negative_slope"

    def __init__(self, negative_slope=0.3, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__("leaky_relu", negative_slope, input_dim, input_shape, name,
                         trainable)


class ELU(_ActivationWith):
    """``y = x if x > 0 else alpha * (exp(x) - 1)`` (alpha = 1.0)."""

    setting = "alpha"

    def __init__(self, alpha=1.0, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        super().__init__("elu", alpha, input_dim, input_shape, name, trainable)


class Softmax(Activation):
    """Softmax over the features (``axis=-1``)."""

    def __init__(self, axis=-1, input_dim=None, input_shape=None, name=None,
                 trainable=True):
        if axis not in (-1, 1) or isinstance(axis, bool):
            raise ValueError(f"axis: expected -1 (the features of a 2-D input), got {axis!r}")
        super().__init__("softmax", input_dim, input_shape, name, trainable)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "axis": -1,
                "input_dim": self.input_dim}


class ReLU(Layer):
    """Keras 3's ReLU layer, one compiled pass each way::

        y = min(x, max_value)                  for x > threshold
        y = negative_slope * (x - threshold)   for x <= threshold

    max_value None (no cap) or >= 0; negative_slope and threshold >= 0.
    The derivative is 1 on (threshold, max_value), 0 above max_value and
    negative_slope at or below threshold."""

    max_value = Hyper(check_real, low=0.0, none=True)
    negative_slope = Hyper(check_real, low=0.0)
    threshold = Hyper(check_real, low=0.0)

    def __init__(self, max_value=None, negative_slope=0.0, threshold=0.0, input_dim=None,
                 input_shape=None, name=None,
                 trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        self.max_value, self.negative_slope, self.threshold = max_value, negative_slope, threshold

    def _options(self):
        cap = np.inf if self.max_value is None else self.max_value
        return self.negative_slope, self.threshold, cap

    def forward(self, x, training=False, logits=False):
        out = self._out[:x.shape[0]]
        _core.relu_forward(x, out, *self._options())
        self._x = x
        return out

    def backward(self, dout, need_dx=True):
        if not need_dx:
            return None
        dx = self._dx[:dout.shape[0]]
        _core.relu_backward(dout, self._x, dx, *self._options())
        return dx

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable, "max_value": self.max_value,
                "negative_slope": self.negative_slope, "threshold": self.threshold,
                "input_dim": self.input_dim}


class PReLU(Layer):
    """Parametric ReLU (He et al. 2015): ``y = x if x > 0 else alpha * x``
    with alpha (features,) trained; its gradient is
    ``sum over rows of dout * min(x, 0)``. alpha starts at zeros (Keras'
    default, where the layer begins as a ReLU). shared_axes: None only (one
    slope per feature)."""

    def __init__(self, alpha_initializer="zeros", alpha_regularizer=None,
                 alpha_constraint=None, shared_axes=None, input_dim=None, input_shape=None,
                 name=None,
                 trainable=True):
        super().__init__(name, input_dim, input_shape, trainable)
        if shared_axes is not None:
            raise ValueError(f"shared_axes: expected None (one slope per feature of a 2-D "
                             f"input), got {shared_axes!r}")
        _set_weight_options(self, "alpha", 1, alpha_initializer, alpha_regularizer,
                            alpha_constraint)

    def build(self, input_dim):
        self.input_dim = self.output_dim = input_dim
        self.weight_specs = [WeightSpec("alpha", (input_dim,), self.alpha_initializer, True,
                                        self.alpha_regularizer, self.alpha_constraint)]
        return input_dim

    def forward(self, x, training=False, logits=False):
        out = self._out[:x.shape[0]]
        _core.prelu_forward(x, self.weights["alpha"], out)
        self._x = x
        return out

    def backward(self, dout, need_dx=True):
        dx = self._dx[:dout.shape[0]] if need_dx else dout   # dout is scratch
        _core.prelu_backward(dout, self._x, self.weights["alpha"], dx, self.grads["alpha"])
        return dx if need_dx else None

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "alpha_initializer": initializers.serialize(self.alpha_initializer),
                "alpha_regularizer": regularizers.serialize(self.alpha_regularizer),
                "alpha_constraint": constraints.serialize(self.alpha_constraint),
                "shared_axes": None, "input_dim": self.input_dim}


REGISTRY = Registry("layer", Layer, {"dense": Dense, "activation": Activation,
                                      "batch_normalization": BatchNormalization,
                                      "dropout": Dropout, "gaussian_noise": GaussianNoise,
                                      "gaussian_dropout": GaussianDropout,
                                      "alpha_dropout": AlphaDropout, "identity": Identity,
                                      "flatten": Flatten, "rescaling": Rescaling,
                                      "normalization": Normalization,
                                      "input_layer": InputLayer,
                                      "layer_normalization": LayerNormalization,
                                      "relu": ReLU, "leaky_relu": LeakyReLU, "prelu": PReLU,
                                      "elu": ELU, "softmax": Softmax})


def get(identifier):
    """A layer from a ``serialize`` dict or a Layer (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(layer):
    """``{"class_name": "Dense", "config": layer.get_config()}``."""
    return REGISTRY.serialize(layer)


def deserialize(config):
    """The (unbuilt) layer a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)
