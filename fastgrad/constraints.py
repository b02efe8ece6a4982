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


class Constraint:
    def __call__(self, w):
        """The constrained copy of w."""
        raise NotImplementedError

    def get_config(self):
        return {}


class MaxNorm(Constraint):
    def __init__(self, max_value=2.0, axis=0):
        if not (np.isfinite(max_value) and max_value > 0):
            raise ValueError(f"max_value: expected a positive number, got {max_value!r}")
        if isinstance(axis, bool) or axis not in (0, -1, 1):
            raise ValueError(f"axis: expected 0, 1 or -1, got {axis!r}")
        self.max_value, self.axis = float(max_value), int(axis)

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
    def __init__(self, clip_value=0.01):
        if not (np.isfinite(clip_value) and clip_value > 0):
            raise ValueError(f"clip_value: expected a positive number, got {clip_value!r}")
        self.clip_value = float(clip_value)

    def __call__(self, w):
        return np.clip(w, -self.clip_value, self.clip_value)

    def get_config(self):
        return {"clip_value": self.clip_value}


_CLASSES = {"max_norm": MaxNorm, "maxnorm": MaxNorm, "non_neg": NonNeg, "nonneg": NonNeg,
            "clip_value": ClipValue}
_NAMES = {"MaxNorm": MaxNorm, "NonNeg": NonNeg, "ClipValue": ClipValue}


def get(identifier):
    """A Constraint from None, a name, an instance or a config."""
    if identifier is None or isinstance(identifier, Constraint):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _CLASSES:
        return _CLASSES[identifier.lower()]()
    if isinstance(identifier, dict) and identifier.get("class_name") in _NAMES:
        return _NAMES[identifier["class_name"]](**identifier.get("config", {}))
    raise ValueError(f"constraint: expected None, 'max_norm', 'non_neg', 'clip_value' or "
                     f"a fastgrad.constraints.Constraint, got {identifier!r}")


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


def serialize(c):
    if c is None:
        return None
    return {"class_name": type(c).__name__, "config": c.get_config()}
