"""Training the same network in fastgrad and in Keras 3 (on JAX), from the
same initial weights, for the agreement tests of the layers, activations
and losses. Keras is imported by ``keras_or_skip`` only, so that test
modules using this helper still run their other tests without it."""
import contextlib
import os

import numpy as np
import pytest

import fastgrad as fg

os.environ.setdefault("KERAS_BACKEND", "jax")   # read when keras is first imported
# JAX's 64-bit mode, which Keras needs to compute in float64, is read when
# Keras is imported (turning it on later leaves Keras' float64 layers in
# float32); float32 models are unaffected by it
os.environ.setdefault("JAX_ENABLE_X64", "1")

REASON = "needs Keras 3 with JAX, the cross-check peers: pip install '.[peers]'"


def keras_or_skip():
    return pytest.importorskip("keras", reason=REASON)


@contextlib.contextmanager
def precision(keras, dtype):
    """Keras computing in ``dtype`` for the duration."""
    if np.dtype(dtype) != np.float64:
        yield
        return
    old, old_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        if keras.layers.Dense(1)(np.ones((1, 1))).dtype != "float64":
            pytest.skip("Keras was imported before JAX's 64-bit mode was on")
        yield
    finally:
        keras.config.set_floatx(old)
        keras.config.set_dtype_policy(old_policy)


def train_both(fg_layers, keras_layers, x, y, fg_loss, keras_loss, dtype, steps=4,
               batch=8, learning_rate=0.05):
    """Train both models with plain SGD on consecutive batches of (x, y).
    The Keras model takes the fastgrad model's initial weights (the same
    get_weights() order). Returns (fastgrad losses, Keras losses, fastgrad
    weights, Keras weights), the losses one per step."""
    keras = keras_or_skip()
    model = fg.Sequential(fg_layers, dtype=np.dtype(dtype).name, seed=3)
    model.build(x.shape[1])
    model.compile(fg.optimizers.SGD(learning_rate), fg_loss)
    with precision(keras, dtype):
        # layers and losses compute in the floatx of their making: made again here
        keras_layers = [type(la).from_config({**la.get_config(), "dtype": np.dtype(dtype).name})
                        for la in keras_layers]
        kmodel = keras.Sequential([keras.Input((x.shape[1],)), *keras_layers])
        kmodel.set_weights([w.astype(dtype) for w in model.get_weights()])
        if not isinstance(keras_loss, str):
            keras_loss = keras.losses.deserialize(keras.losses.serialize(keras_loss))
        kmodel.compile(keras.optimizers.SGD(learning_rate), keras_loss)
        fl, kl = [], []
        for s in range(steps):
            xb, yb = x[s * batch:(s + 1) * batch], y[s * batch:(s + 1) * batch]
            fl.append(model.train_on_batch(xb, yb))
            kl.append(float(kmodel.train_on_batch(xb.astype(dtype), yb.astype(dtype))))
        kw = [np.asarray(w) for w in kmodel.get_weights()]
    return np.array(fl), np.array(kl), model.get_weights(), kw


def assert_agree(result, dtype, rtol=None):
    """The losses and final weights of train_both agree: to ~1e-12 in
    float64, to float32 rounding (a few 1e-6, grown over the steps) in
    float32. Keras 3 on JAX takes means (its ops.mean, which its losses and
    their reduction over the batch use) to float32 accuracy even in float64,
    so float64 loss values are compared to 1e-6; their gradients, and so
    the weights, are float64-exact there."""
    fl, kl, fw, kw = result
    f64 = np.dtype(dtype) == np.float64
    rtol = rtol or (1e-11 if f64 else 2e-5)
    loss_tol = max(rtol, 1e-6) if f64 else rtol
    np.testing.assert_allclose(fl, kl, rtol=loss_tol, atol=loss_tol)
    assert len(fw) == len(kw)
    for a, b in zip(fw, kw):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * max(1.0, np.abs(b).max()))
