"""Weight penalties (Keras 3 formulas), added to the loss and, as gradients,
inside the optimizer's compiled step:

    L1(l1=0.01)              penalty l1 * sum|w|          gradient l1 * sign(w)
    L2(l2=0.01)              penalty l2 * sum w^2         gradient 2 * l2 * w
    L1L2(l1=0.0, l2=0.0)     both
"""
import numpy as np

from fastgrad._utils import Hyper, Registry, check_real


class Regularizer:
    """Base class; l1 and l2 are finite and >= 0."""

    l1, l2 = Hyper(check_real, low=0.0), Hyper(check_real, low=0.0)

    def __init__(self, l1=0.0, l2=0.0):
        self.l1, self.l2 = l1, l2

    def __call__(self, w):
        """The penalty for weights w."""
        w = np.asarray(w, dtype=np.float64)
        return self.l1 * float(np.abs(w).sum()) + self.l2 * float((w * w).sum())

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1L2(Regularizer):
    pass


class L1(Regularizer):
    def __init__(self, l1=0.01):
        super().__init__(l1=l1)

    def get_config(self):
        return {"l1": self.l1}


class L2(Regularizer):
    def __init__(self, l2=0.01):
        super().__init__(l2=l2)

    def get_config(self):
        return {"l2": self.l2}


l1, l2, l1_l2 = L1, L2, L1L2   # Keras' lower-case aliases
REGISTRY = Registry("regularizer", Regularizer,
                     {"l1": L1, "l2": L2, "l1l2": L1L2, "l1_l2": L1L2}, none=None)


def get(identifier):
    """A Regularizer from None (returned), a name ("l1", "l2", "l1l2" or
    "l1_l2", any case, or a class name), a ``serialize`` dict, a class or an
    instance (returned as it is)."""
    return REGISTRY.get(identifier)


def serialize(regularizer):
    """``{"class_name": "L2", "config": regularizer.get_config()}``; None for None."""
    return REGISTRY.serialize(regularizer)


def deserialize(config):
    """The regularizer a ``serialize`` dict describes."""
    return REGISTRY.deserialize(config)
