"""Variables: Keras 3's handle on one weight tensor.

A Variable does not own its numbers: it reads and writes the layer's view
into the model's flat buffers, so ``assign`` changes the weight in place
(the optimizer, the layer and ``model.params`` see it at once) and the
handle stays valid when the model rebuilds its buffers (``add``, ``pop``).
"""
import numpy as np

from fastgrad import _core


class Variable:
    """One weight tensor of a built layer.

    name       the weight's name in its layer ("kernel", "bias", "gamma", ...)
    path       "model/layer/name", as Keras 3 writes it
    shape      tuple; dtype: "float32" or "float64"
    trainable  whether the optimizer updates it (False for BatchNormalization's
               moving statistics and for every weight of a frozen layer)
    value      a read-only view of the weights (no copy); ``numpy()`` a copy
    assign(v)  writes v in place, after checking its shape (exactly the
               variable's), that it holds numbers, and that they are finite
    """

    def __init__(self, layer, name, trainable):
        self._layer, self.name, self._trainable = layer, name, trainable

    @property
    def _array(self):
        return self._layer.weights[self.name]

    @property
    def path(self):
        model = self._layer._model
        prefix = f"{model.name}/" if model is not None else ""
        return f"{prefix}{self._layer.name}/{self.name}"

    @property
    def shape(self):
        return self._array.shape

    @property
    def dtype(self):
        return self._array.dtype.name

    @property
    def trainable(self):
        return self._trainable and self._layer.trainable

    @property
    def value(self):
        view = self._array.view()
        view.flags.writeable = False
        return view

    def numpy(self):
        return self._array.copy()

    def __array__(self, dtype=None, copy=None):
        return self._array.astype(dtype) if dtype is not None else self._array.copy()

    def assign(self, value):
        """Set the weight to ``value`` (same shape), in place; returns self.
        TypeError for non-numbers, ValueError for a wrong shape or values
        that are not finite; nothing changes when it refuses."""
        array = self._array
        v = np.asarray(value.numpy() if isinstance(value, Variable) else value)
        if v.dtype.kind not in "biuf":
            raise TypeError(f"value: {self.path} takes numbers, got dtype {v.dtype}")
        if v.shape != array.shape:
            raise ValueError(f"value: {self.path} has shape {array.shape}, got {v.shape}")
        with np.errstate(over="ignore"):
            cast = np.ascontiguousarray(v, dtype=array.dtype).reshape(-1, max(v.size, 1)) \
                if v.size else None
        if cast is not None and _core.first_nonfinite_row(cast) >= 0:
            raise ValueError(f"value: {self.path} takes finite numbers (within the "
                             f"{array.dtype} range); got NaN, inf or an overflowing value")
        model = self._layer._model
        if model is None:
            array[...] = v
        else:
            with model._lock:
                array[...] = v
        return self

    def __repr__(self):
        return (f"<Variable path={self.path}, shape={self.shape}, dtype={self.dtype}, "
                f"trainable={self.trainable}>")


class HasVariables:
    """Keras's lists of a layer's or a model's variables, from its
    ``variables`` (all of them, in get_weights() order)."""

    @property
    def trainable_weights(self):
        return [v for v in self.variables if v.trainable]

    @property
    def non_trainable_weights(self):
        return [v for v in self.variables if not v.trainable]
