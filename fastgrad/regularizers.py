"""Weight penalties (Keras 3 formulas), added to the loss and, as gradients,
inside the optimizer's compiled step:

    L1(l1=0.01)              penalty l1 * sum|w|          gradient l1 * sign(w)
    L2(l2=0.01)              penalty l2 * sum w^2         gradient 2 * l2 * w
    L1L2(l1=0.0, l2=0.0)     both
"""
import numpy as np


class Regularizer:
    def __init__(self, l1=0.0, l2=0.0):
        for name, v in (("l1", l1), ("l2", l2)):
            if not (isinstance(v, (int, float, np.floating)) and np.isfinite(v) and v >= 0):
                raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
        self.l1, self.l2 = float(l1), float(l2)

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


_CLASSES = {"l1": L1, "l2": L2, "l1l2": L1L2, "l1_l2": L1L2}
_NAMES = {"L1": L1, "L2": L2, "L1L2": L1L2}


def get(identifier):
    """A Regularizer from None, a name ("l1", "l2", "l1l2"), an instance or a config."""
    if identifier is None or isinstance(identifier, Regularizer):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _CLASSES:
        return _CLASSES[identifier.lower()]()
    if isinstance(identifier, dict) and identifier.get("class_name") in _NAMES:
        return _NAMES[identifier["class_name"]](**identifier.get("config", {}))
    raise ValueError(f"regularizer: expected None, 'l1', 'l2', 'l1l2' or a "
                     f"fastgrad.regularizers.Regularizer, got {identifier!r}")


def serialize(reg):
    if reg is None:
        return None
    return {"class_name": type(reg).__name__, "config": reg.get_config()}
