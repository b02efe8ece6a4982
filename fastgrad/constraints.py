"""Weight constraints, applied to the weights right after each optimizer
update (Keras 3 formulas):

    MaxNorm(max_value=2, axis=0)   w *= clip(n, 0, max_value) / (1e-7 + n), n the
                                   L2 norm over ``axis`` (per unit for a kernel)
    NonNeg()                       w *= (w >= 0)
    ClipValue(clip_value=0.01)     w = clip(w, -clip_value, clip_value)
                                   (weight clipping, as in WGAN)

The optimizer applies them inside its compiled step, so a layer takes only
these three classes, and MaxNorm on a Dense kernel only with axis=0 (one
norm per unit, Keras' default); a bias or BatchNormalization weight is a
vector, where axis 0 and -1 are the same. Layers check this when they are
created, so compile never fails on a constraint.
"""
import numpy as np

from fastgrad._utils import Hyper, Registry, check_int, check_real


class Constraint:
    def __call__(self, w):
        """The constrained copy of w."""
        raise NotImplementedError

    def get_config(self):
        return {}


def _positive():
    return Hyper(check_real, low=0.0, low_open=True)


class MaxNorm(Constraint):
    max_value, axis = _positive(), Hyper(check_int, low=-1, high=1)

    def __init__(self, max_value=2.0, axis=0):
        self.max_value, self.axis = max_value, axis

    def __call__(self, w):
        w = np.asarray(w)
        n = np.sqrt(np.sum(np.square(w, dtype=np.float64), axis=self.axis, keepdims=True))
        return (w * (np.clip(n, 0, self.max_value) / (1e-7 + n))).astype(w.dtype)

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class NonNeg(Constraint):
    def __call__(self, w):
        w = np.asarray(w)
        return w * (w >= 0)


class ClipValue(Constraint):
    clip_value = _positive()

    def __init__(self, clip_value=0.01):
        self.clip_value = clip_value

    def __call__(self, w):
        return np.clip(w, -self.clip_value, self.clip_value)

    def get_config(self):
        return {"clip_value": self.clip_value}


max_norm, non_neg = MaxNorm, NonNeg   # Keras' lower-case aliases
REGISTRY = Registry("constraint", Constraint, {
    "max_norm": MaxNorm, "maxnorm": MaxNorm, "non_neg": NonNeg, "nonneg": NonNeg,
    "clip_value": ClipValue}, none=None)


def get(identifier):
    """A Constraint from None (returned), a name ("max_norm", "non_neg",
    "clip_value", any case, or a class name), a ``serialize`` dict, a class
    or an instance (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(constraint):
    """``{"class_name": "MaxNorm", "config": constraint.get_config()}``; None for None."""
    return REGISTRY.serialize(constraint)


def deserialize(config):
    """The constraint a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)


def check(constraint, ndim, arg):
    """The constraint for a weight of ``ndim`` dimensions given as ``arg``,
    refused (naming arg) when the compiled step cannot apply it."""
    c = get(constraint)
    if c is None:
        return None
    if type(c) not in (MaxNorm, NonNeg, ClipValue):
        raise TypeError(f"{arg}: expected MaxNorm, NonNeg or ClipValue (they run inside the "
                        f"compiled optimizer step), got {type(c).__name__}")
    if isinstance(c, MaxNorm):
        supported = (0,) if ndim == 2 else (0, -1)
        if c.axis not in supported:
            what = "a kernel supports only axis=0 (one norm per unit)" if ndim == 2 else \
                "a vector supports axis=0 or axis=-1"
            raise ValueError(f"{arg}: MaxNorm(axis={c.axis}) is not supported; {what}")
    return c
