"""Keras 3's utilities that dense networks use: ``set_random_seed`` and
``to_categorical``."""
import random

import numpy as np

from fastgrad._utils import check_int

__all__ = ["set_random_seed", "to_categorical"]


_seeds = None   # after set_random_seed: where unseeded models draw their generators


def set_random_seed(seed):
    """Make every later random draw reproducible, as Keras's
    ``set_random_seed`` does: seeds Python's ``random`` and NumPy's global
    generator, and models created afterwards without a ``seed`` take their
    generators (initial weights, shuffling, dropout) one after another
    from a sequence this seed starts. A model's own ``seed`` still wins."""
    global _seeds
    seed = check_int("seed", seed, low=0)
    if seed >= 2**32:
        raise ValueError(f"seed: expected an integer in [0, 2**32), got {seed}")
    random.seed(seed)
    np.random.seed(seed)
    _seeds = np.random.SeedSequence(seed)


def model_generator(seed):
    """The generator of a model created with ``seed`` (None: from the
    sequence set_random_seed started, else fresh entropy)."""
    if seed is None and _seeds is not None:
        return np.random.default_rng(_seeds.spawn(1)[0])
    return np.random.default_rng(seed)


def to_categorical(x, num_classes=None):
    """One-hot rows of integer class labels: ``out[i, x[i]] = 1``, float32,
    shape ``x.shape + (num_classes,)`` (a trailing axis of 1 is dropped
    first, as in Keras). num_classes defaults to max(x) + 1."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x)) or np.any(x != np.round(x)):
            raise ValueError("x: expected integer class labels, got non-integer values")
        x = x.astype(np.int64)
    elif x.dtype.kind not in "biu":
        raise TypeError(f"x: expected integer class labels, got dtype {x.dtype}")
    if x.ndim > 1 and x.shape[-1] == 1:
        x = x.reshape(x.shape[:-1])
    if x.size and x.min() < 0:
        raise ValueError(f"x: class labels must be >= 0, got {x.min()}")
    top = int(x.max()) + 1 if x.size else 0
    if num_classes is None:
        num_classes = top
    num_classes = check_int("num_classes", num_classes, low=1 if x.size else 0)
    if top > num_classes:
        raise ValueError(f"x: label {top - 1} does not fit num_classes={num_classes}")
    out = np.zeros(x.shape + (num_classes,), np.float32)
    np.put_along_axis(out, x[..., None].astype(np.intp), 1.0, axis=-1)
    return out
