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

    log_cosh                   l_i = mean_j log(cosh(p - t))
    kl_divergence / kld        l_i = sum_j t log(t / p), t and p clipped to [1e-7, 1]
    poisson                    l_i = mean_j p - t log(p + 1e-7)
    hinge                      l_i = mean_j max(1 - t p, 0)
    squared_hinge              l_i = mean_j max(1 - t p, 0)^2
                               (hinge targets in {-1, 1}; when all targets of
                               the batch are in {0, 1} they are mapped to 2t - 1)
    categorical_hinge          l_i = max(max_j (1 - t_j) p_j - sum_j t_j p_j + 1, 0)
    mape / mean_absolute_percentage_error
                               l_i = 100 mean_j |t - p| / max(|t|, 1e-7)
    msle / mean_squared_logarithmic_error
                               l_i = mean_j (log(max(p, 1e-7) + 1) - log(max(t, 1e-7) + 1))^2
    binary_focal_crossentropy(apply_class_balancing=False, alpha=0.25, gamma=2.0)
                               l_i = mean_j w (1 - p_t)^gamma bce(t, p),
                               p_t = t p + (1 - t)(1 - p), bce as above (p clipped),
                               w = alpha t + (1 - alpha)(1 - t) when balancing, else 1
    categorical_focal_crossentropy(alpha=0.25, gamma=2.0)
                               l_i = sum_j alpha (1 - q_j)^gamma (-t_j log q_j),
                               q as in categorical_crossentropy
    cosine_similarity          l_i = -sum_j t_j p_j / (|t| |p|), each 1/|.| at most 1e7

With ``from_logits=True`` (or when the model's last layer is the matching
sigmoid or softmax, which it fuses) the cross-entropies are computed from the
logits z: ``max(z,0) - z t + log(1 + exp(-|z|))`` and
``sum_j t_j (logsumexp(z) - z_j)``, finite for any finite z. The focal losses
from logits likewise use ``log p = -softplus(-z)``, ``log(1 - p) =
-softplus(z)`` and ``log q = z - logsumexp(z)``, unclipped (Keras applies
sigmoid or softmax and then clips, so the two differ only where a
probability is within 1e-7 of 0 or 1).

Classes are called as ``loss(y_true, y_pred) -> float``; functions return the
per-sample losses ``l_i`` as an array, as in Keras.
"""
import numpy as np

from fastgrad import ops
from fastgrad._utils import Hyper, Registry, check_real, named


class Loss:
    """Base class. ``name`` is the kernel's loss name."""

    name = None
    # the kernel's settings; the losses that have them override these
    alpha, gamma, apply_class_balancing = 0.25, 2.0, False

    def __init__(self, from_logits=False):
        self.from_logits = bool(from_logits)
        self.delta = 1.0

    def __call__(self, y_true, y_pred):
        value, _ = ops.loss_forward_backward(
            y_true, _2d(y_pred), self.name, self.from_logits, self.delta, grad=False,
            alpha=self.alpha, gamma=self.gamma,
            apply_class_balancing=self.apply_class_balancing)
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


def _plain(name):
    """A loss class without settings, named ``name`` for the kernel."""
    def __init__(self):
        Loss.__init__(self)
    return {"name": name, "__init__": __init__}


LogCosh = type("LogCosh", (Loss,), _plain("log_cosh"))
KLDivergence = type("KLDivergence", (Loss,), _plain("kl_divergence"))
Poisson = type("Poisson", (Loss,), _plain("poisson"))
Hinge = type("Hinge", (Loss,), _plain("hinge"))
SquaredHinge = type("SquaredHinge", (Loss,), _plain("squared_hinge"))
CategoricalHinge = type("CategoricalHinge", (Loss,), _plain("categorical_hinge"))
MeanAbsolutePercentageError = type("MeanAbsolutePercentageError", (Loss,), _plain("mape"))
MeanSquaredLogarithmicError = type("MeanSquaredLogarithmicError", (Loss,), _plain("msle"))


class CosineSimilarity(Loss):
    """Negative cosine similarity over the last axis (``axis=-1`` only)."""

    name = "cosine_similarity"

    def __init__(self, axis=-1):
        super().__init__()
        if axis not in (-1, 1) or isinstance(axis, bool):
            raise ValueError(f"axis: expected -1 (the last axis), got {axis!r}")
        self.axis = -1

    def get_config(self):
        return {"axis": self.axis}


class BinaryFocalCrossentropy(Loss):
    """Focal loss (Lin et al. 2017) on binary targets; Keras 3's defaults."""

    name = "binary_focal_crossentropy"
    alpha = Hyper(check_real, low=0.0, high=1.0)
    gamma = Hyper(check_real, low=0.0)

    def __init__(self, apply_class_balancing=False, alpha=0.25, gamma=2.0, from_logits=False):
        super().__init__(from_logits)
        self.apply_class_balancing = bool(apply_class_balancing)
        self.alpha, self.gamma = alpha, gamma

    def get_config(self):
        return {"apply_class_balancing": self.apply_class_balancing, "alpha": self.alpha,
                "gamma": self.gamma, "from_logits": self.from_logits}


class CategoricalFocalCrossentropy(Loss):
    """Focal loss on one-hot targets; Keras 3's defaults (alpha a scalar)."""

    name = "categorical_focal_crossentropy"
    alpha = Hyper(check_real)
    gamma = Hyper(check_real, low=0.0)

    def __init__(self, alpha=0.25, gamma=2.0, from_logits=False):
        super().__init__(from_logits)
        self.alpha, self.gamma = alpha, gamma

    def get_config(self):
        return {"alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits}


_LOGIT_LOSSES = {"binary_crossentropy", "categorical_crossentropy",
                 "sparse_categorical_crossentropy"}


def _per_sample(name, y_true, y_pred, from_logits=False, **settings):
    _, _, rows = ops.loss_forward_backward(y_true, _2d(y_pred), name, from_logits,
                                           grad=False, per_sample=True, **settings)
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


def _plain_function(public, kernel):
    """The per-sample function of a loss without settings."""
    return named(lambda y_true, y_pred: _per_sample(kernel, y_true, y_pred), public,
                 f"Per-sample {public} loss (formula in the module docstring).")


log_cosh = _plain_function("log_cosh", "log_cosh")
kl_divergence = _plain_function("kl_divergence", "kl_divergence")
poisson = _plain_function("poisson", "poisson")
hinge = _plain_function("hinge", "hinge")
squared_hinge = _plain_function("squared_hinge", "squared_hinge")
categorical_hinge = _plain_function("categorical_hinge", "categorical_hinge")
mean_absolute_percentage_error = _plain_function("mean_absolute_percentage_error", "mape")
mean_squared_logarithmic_error = _plain_function("mean_squared_logarithmic_error", "msle")


def cosine_similarity(y_true, y_pred, axis=-1):
    CosineSimilarity(axis)   # checks axis
    return _per_sample("cosine_similarity", y_true, y_pred)


def binary_focal_crossentropy(y_true, y_pred, apply_class_balancing=False, alpha=0.25,
                              gamma=2.0, from_logits=False):
    loss = BinaryFocalCrossentropy(apply_class_balancing, alpha, gamma, from_logits)
    return _per_sample(loss.name, y_true, y_pred, loss.from_logits, alpha=loss.alpha,
                       gamma=loss.gamma, apply_class_balancing=loss.apply_class_balancing)


def categorical_focal_crossentropy(y_true, y_pred, alpha=0.25, gamma=2.0, from_logits=False):
    loss = CategoricalFocalCrossentropy(alpha, gamma, from_logits)
    return _per_sample(loss.name, y_true, y_pred, loss.from_logits, alpha=loss.alpha,
                       gamma=loss.gamma)


mse = mean_squared_error
mae = mean_absolute_error
logcosh = log_cosh
kld = kl_divergence
mape = mean_absolute_percentage_error
msle = mean_squared_logarithmic_error

REGISTRY = Registry("loss", Loss, {
    "mse": MeanSquaredError, "mean_squared_error": MeanSquaredError,
    "mae": MeanAbsoluteError, "mean_absolute_error": MeanAbsoluteError,
    "huber": Huber, "binary_crossentropy": BinaryCrossentropy,
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "log_cosh": LogCosh, "logcosh": LogCosh,
    "kl_divergence": KLDivergence, "kld": KLDivergence,
    "kullback_leibler_divergence": KLDivergence, "poisson": Poisson,
    "hinge": Hinge, "squared_hinge": SquaredHinge, "categorical_hinge": CategoricalHinge,
    "mape": MeanAbsolutePercentageError,
    "mean_absolute_percentage_error": MeanAbsolutePercentageError,
    "msle": MeanSquaredLogarithmicError,
    "mean_squared_logarithmic_error": MeanSquaredLogarithmicError,
    "binary_focal_crossentropy": BinaryFocalCrossentropy,
    "categorical_focal_crossentropy": CategoricalFocalCrossentropy,
    "cosine_similarity": CosineSimilarity,
})
_FUNCTIONS = {
    mean_squared_error: MeanSquaredError, mean_absolute_error: MeanAbsoluteError,
    huber: Huber, binary_crossentropy: BinaryCrossentropy,
    categorical_crossentropy: CategoricalCrossentropy,
    sparse_categorical_crossentropy: SparseCategoricalCrossentropy,
    log_cosh: LogCosh, kl_divergence: KLDivergence, poisson: Poisson, hinge: Hinge,
    squared_hinge: SquaredHinge, categorical_hinge: CategoricalHinge,
    mean_absolute_percentage_error: MeanAbsolutePercentageError,
    mean_squared_logarithmic_error: MeanSquaredLogarithmicError,
    cosine_similarity: CosineSimilarity, binary_focal_crossentropy: BinaryFocalCrossentropy,
    categorical_focal_crossentropy: CategoricalFocalCrossentropy,
}


def get(identifier):
    """A Loss instance from a name (any case, or a class name), a
    ``serialize`` dict, a Loss instance (returned as it is), or a loss
    function of this module."""
    if callable(identifier) and not isinstance(identifier, (Loss, type)) \
            and identifier in _FUNCTIONS:
        return _FUNCTIONS[identifier]()
    return REGISTRY.get(identifier)


def serialize(loss):
    """``{"class_name": "Huber", "config": loss.get_config()}``."""
    return REGISTRY.serialize(loss)


def deserialize(config):
    """The Loss a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)
