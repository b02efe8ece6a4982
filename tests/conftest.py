"""Fixtures shared by the test modules: the two dtypes, a seeded generator,
and Keras on JAX in float64 for the tests that cross-check against it. The
float64 references, tolerances and layout helpers are in _reference.py."""
import os
import zlib

import numpy as np
import pytest
from _reference import DTYPE_IDS, DTYPES

os.environ.setdefault("KERAS_BACKEND", "jax")   # read when keras is first imported
os.environ.setdefault("JAX_ENABLE_X64", "1")    # float64 arrays stay float64 in JAX


@pytest.fixture(params=DTYPES, ids=DTYPE_IDS)
def dtype(request):
    """Each floating-point dtype fastgrad computes in."""
    return request.param


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: reproducible, different per
    test and per parameter set."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def keras64():
    """Keras on JAX computing in float64 for the test (floatx and JAX's x64
    put back after); skips when Keras is not installed."""
    keras = pytest.importorskip("keras", reason="needs Keras 3 with JAX, the cross-check peers: pip install '.[peers]'")
    import jax

    x64, floatx = jax.config.jax_enable_x64, keras.config.floatx()
    policy = keras.config.dtype_policy()
    jax.config.update("jax_enable_x64", True)
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    yield keras
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)   # Keras keeps a policy made from floatx
    jax.config.update("jax_enable_x64", x64)


@pytest.fixture
def keras_mse(keras64):
    """The mean squared error in float64 throughout: Keras's own "mse" takes
    the mean with keras.ops.mean, which sums float64 in float32 (Keras 3.15
    on JAX), so it agrees with float64 only to ~1e-8. (Keras's tanh is no
    better in float64, hence sigmoid hidden layers in the comparisons.)"""
    ops = keras64.ops

    def mse(y_true, y_pred):
        return ops.sum(ops.square(y_pred - y_true), axis=-1) / y_pred.shape[-1]
    return mse
