"""Weight initializers (Keras 3 names, arguments and defaults).

fan_in and fan_out are a kernel's (in_features, units). Truncated normals
redraw values beyond two standard deviations; since that shrinks the
spread, their stddev is divided by 0.87962566103423978 so that the
variance stays the target one.

    glorot_uniform   U(-l, l), l = sqrt(6 / (fan_in + fan_out))    Glorot & Bengio 2010
    glorot_normal    truncated N(0, 2 / (fan_in + fan_out))
    he_uniform       U(-l, l), l = sqrt(6 / fan_in)                 He et al. 2015
    he_normal        truncated N(0, 2 / fan_in)
    lecun_uniform    U(-l, l), l = sqrt(3 / fan_in)                 LeCun et al. 1998
    lecun_normal     truncated N(0, 1 / fan_in)
    orthogonal       gain * Q from the QR decomposition of a normal matrix
                     (Saxe et al. 2014)
    random_normal    N(mean=0, stddev=0.05)
    random_uniform   U(minval=-0.05, maxval=0.05)
    zeros, ones, constant(value)

An initializer made with ``seed`` draws from its own generator, so it gives
the same values each time it is called on the same shape; without one it
draws from the generator the model passes (the model's seed).
"""
import numpy as np

from fastgrad._utils import Hyper, Registry, check_choice, check_int, check_real

_TRUNC_STD = 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]


class Initializer:
    """Base class: ``init(shape, dtype, rng=None) -> ndarray``."""

    def __call__(self, shape, dtype="float32", rng=None):
        seed = getattr(self, "seed", None)
        if seed is not None:
            rng = np.random.default_rng(seed)
        elif rng is None:
            rng = np.random.default_rng()
        return np.asarray(self.sample(tuple(shape), rng), dtype=dtype)

    def get_config(self):
        return {k: v for k, v in vars(self).items()}


def _seed():   # None (the model's generator) or a seed for numpy's default_rng
    return Hyper(check_int, low=0, none=True)


def _finite():
    return Hyper(check_real)


def _fans(shape):
    if len(shape) == 2:
        return shape[0], shape[1]
    n = int(np.prod(shape)) if shape else 1
    return n, n


def _truncated_normal(rng, shape, stddev):
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():  # redraw the tails: about 5% per round
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * stddev


class VarianceScaling(Initializer):
    """N or U with variance ``scale / n``, n = fan_in, fan_out or their mean."""

    scale = Hyper(check_real, low=0.0, low_open=True)
    mode = Hyper(check_choice, choices=("fan_in", "fan_out", "fan_avg"))
    distribution = Hyper(check_choice,
                         choices=("truncated_normal", "untruncated_normal", "uniform"))
    seed = _seed()

    def __init__(self, scale=1.0, mode="fan_in", distribution="truncated_normal", seed=None):
        self.scale, self.mode, self.distribution, self.seed = scale, mode, distribution, seed

    def get_config(self):
        if type(self) is VarianceScaling:
            return super().get_config()
        return {"seed": self.seed}

    def sample(self, shape, rng):
        fan_in, fan_out = _fans(shape)
        n = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[self.mode]
        var = self.scale / max(1.0, n)
        if self.distribution == "uniform":
            limit = np.sqrt(3.0 * var)
            return rng.uniform(-limit, limit, shape)
        if self.distribution == "untruncated_normal":
            return rng.standard_normal(shape) * np.sqrt(var)
        return _truncated_normal(rng, shape, np.sqrt(var) / _TRUNC_STD)


class _Preset(VarianceScaling):
    """VarianceScaling with the fixed (scale, mode, distribution) of
    ``_SETTINGS``; only the seed is free, as in Keras."""

    _SETTINGS = (1.0, "fan_avg", "uniform")

    def __init__(self, seed=None):
        super().__init__(*self._SETTINGS, seed)


class GlorotUniform(_Preset):
    """U(-l, l), l = sqrt(6 / (fan_in + fan_out)) (Glorot and Bengio 2010)."""


class GlorotNormal(_Preset):
    """Truncated N(0, 2 / (fan_in + fan_out))."""
    _SETTINGS = (1.0, "fan_avg", "truncated_normal")


class HeUniform(_Preset):
    """U(-l, l), l = sqrt(6 / fan_in) (He et al. 2015), for ReLU networks."""
    _SETTINGS = (2.0, "fan_in", "uniform")


class HeNormal(_Preset):
    """Truncated N(0, 2 / fan_in)."""
    _SETTINGS = (2.0, "fan_in", "truncated_normal")


class LecunUniform(_Preset):
    """U(-l, l), l = sqrt(3 / fan_in) (LeCun et al. 1998), for SELU networks."""
    _SETTINGS = (1.0, "fan_in", "uniform")


class LecunNormal(_Preset):
    """Truncated N(0, 1 / fan_in)."""
    _SETTINGS = (1.0, "fan_in", "truncated_normal")


class Orthogonal(Initializer):
    """``gain * Q``, Q orthogonal (Haar-distributed); gain any finite number."""

    gain, seed = _finite(), _seed()

    def __init__(self, gain=1.0, seed=None):
        self.gain, self.seed = gain, seed

    def sample(self, shape, rng):
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        cols = shape[-1]
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        q, r = np.linalg.qr(a)
        q *= np.sign(np.diag(r))  # makes the distribution uniform (Haar)
        if rows < cols:
            q = q.T
        return self.gain * q.reshape(shape)


class RandomNormal(Initializer):
    """N(mean, stddev^2); stddev >= 0."""

    mean, stddev, seed = _finite(), Hyper(check_real, low=0.0), _seed()

    def __init__(self, mean=0.0, stddev=0.05, seed=None):
        self.mean, self.stddev, self.seed = mean, stddev, seed

    def sample(self, shape, rng):
        return self.mean + self.stddev * rng.standard_normal(shape)


class RandomUniform(Initializer):
    """U(minval, maxval), both finite."""

    minval, maxval, seed = _finite(), _finite(), _seed()

    def __init__(self, minval=-0.05, maxval=0.05, seed=None):
        self.minval, self.maxval, self.seed = minval, maxval, seed

    def sample(self, shape, rng):
        return rng.uniform(self.minval, self.maxval, shape)


class Constant(Initializer):
    value = _finite()

    def __init__(self, value=0.0):
        self.value = value

    def sample(self, shape, rng):
        return np.full(shape, self.value)

    def get_config(self):
        return super().get_config() if type(self) is Constant else {}


class Zeros(Constant):
    """All 0."""

    def __init__(self):
        super().__init__(0.0)


class Ones(Constant):
    """All 1."""

    def __init__(self):
        super().__init__(1.0)


# Keras' lower-case aliases
glorot_uniform, glorot_normal, he_uniform, he_normal = GlorotUniform, GlorotNormal, HeUniform, \
    HeNormal
lecun_uniform, lecun_normal, orthogonal = LecunUniform, LecunNormal, Orthogonal
random_normal, random_uniform, zeros, ones, constant = RandomNormal, RandomUniform, Zeros, Ones, \
    Constant
variance_scaling = VarianceScaling
REGISTRY = Registry("initializer", Initializer, {
    "glorot_uniform": GlorotUniform, "glorot_normal": GlorotNormal,
    "xavier_uniform": GlorotUniform, "xavier_normal": GlorotNormal,
    "he_uniform": HeUniform, "he_normal": HeNormal,
    "lecun_uniform": LecunUniform, "lecun_normal": LecunNormal,
    "orthogonal": Orthogonal, "random_normal": RandomNormal,
    "random_uniform": RandomUniform, "zeros": Zeros, "ones": Ones,
    "constant": Constant, "variance_scaling": VarianceScaling,
})


def get(identifier):
    """An initializer from a name (any case, or a class name), a
    ``serialize`` dict, a class, or an Initializer (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(initializer):
    """``{"class_name": "HeNormal", "config": initializer.get_config()}``."""
    return REGISTRY.serialize(initializer)


def deserialize(config):
    """The initializer a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)
