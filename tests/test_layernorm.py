"""LayerNormalization: the compiled kernels against a float64 NumPy
reference of the documented formula and against central finite
differences, edge values and memory layouts, the layer in a model (batch
size 1, training equal to inference, saving), and agreement with Keras 3."""
import os

import numpy as np
import pytest

import fastgrad as fg
from fastgrad import _core, ops
from fastgrad.layers import Dense, LayerNormalization
from keras_peer import assert_agree, keras_or_skip, train_both
from _reference import numerical_grad

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
TOL = {F32: 2e-6, F64: 1e-13}
SHAPES = [(1, 1), (1, 7), (5, 1), (4, 16), (33, 17), (3, 1100), (0, 4)]


def ref_forward(x, gamma=None, beta=None, epsilon=1e-3):
    """(out, mean, rstd) in float64, per row."""
    x = np.asarray(x, F64)
    mu = x.mean(axis=1) if x.shape[0] else np.zeros(0)
    var = ((x - mu[:, None]) ** 2).mean(axis=1) if x.shape[0] else np.zeros(0)
    rstd = 1.0 / np.sqrt(var + epsilon)
    g = 1.0 if gamma is None else np.asarray(gamma, F64)
    b = 0.0 if beta is None else np.asarray(beta, F64)
    return g * (x - mu[:, None]) * rstd[:, None] + b, mu, rstd


def ref_backward(dout, x, gamma=None, epsilon=1e-3):
    """(dx, dgamma, dbeta) in float64 by the closed form."""
    x, dout = np.asarray(x, F64), np.asarray(dout, F64)
    _, mu, rstd = ref_forward(x, epsilon=epsilon)
    xhat = (x - mu[:, None]) * rstd[:, None]
    g = dout * (1.0 if gamma is None else np.asarray(gamma, F64))
    dx = rstd[:, None] * (g - g.mean(axis=1, keepdims=True)
                          - xhat * (g * xhat).mean(axis=1, keepdims=True))
    return dx, (dout * xhat).sum(axis=0), dout.sum(axis=0)


def close(got, want, dtype, scale=1.0):
    np.testing.assert_allclose(np.asarray(got, F64), want, rtol=TOL[dtype] * 10,
                               atol=TOL[dtype] * 10 * max(scale, 1.0))


def data(rng, shape, dtype, affine=True):
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0, shape[1])
         + rng.normal(size=shape[1])).astype(dtype)
    gamma = rng.normal(size=shape[1]).astype(dtype) if affine in (True, "gamma") else None
    beta = rng.normal(size=shape[1]).astype(dtype) if affine in (True, "beta") else None
    return x, gamma, beta


# ---------------------------------------------------------------------------
# 1. kernels against the reference
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False, "gamma", "beta"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_forward_and_backward_match_the_reference(dtype, shape, affine):
    rng = np.random.default_rng([shape[0], shape[1], len(str(affine))])
    x, gamma, beta = data(rng, shape, dtype, affine)
    out, mean, rstd = ops.layernorm_forward(x, gamma, beta, epsilon=1e-3)
    want, mu, rs = ref_forward(x, gamma, beta)
    assert out.dtype == dtype and mean.dtype == rstd.dtype == F64
    close(mean, mu, F64, np.abs(x).max(initial=1.0))
    close(rstd, rs, F64)
    close(out, want, dtype, np.abs(want).max(initial=1.0))
    dout = rng.normal(size=shape).astype(dtype)
    dx, dgamma, dbeta = ops.layernorm_backward(dout, x, mean, rstd, gamma)
    rdx, rdg, rdb = ref_backward(dout, x, gamma)
    close(dx, rdx, dtype, np.abs(rdx).max(initial=1.0) * max(1, shape[1]) ** 0.5)
    close(dgamma, rdg, dtype, np.abs(dout).sum(axis=0).max(initial=1.0) * 3)
    close(dbeta, rdb, dtype, np.abs(dout).sum(axis=0).max(initial=1.0))


def _rel(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(a) + np.abs(b)), 1e-300)


@pytest.mark.parametrize("shape", [(1, 5), (4, 6), (3, 1)], ids=str)
def test_gradients_match_finite_differences(shape):
    """d sum(w * out) / d (x, gamma, beta) in float64, relative error < 1e-6."""
    rng = np.random.default_rng(shape)
    x, gamma, beta = data(rng, shape, F64)
    w = rng.normal(size=shape)

    def value():
        return float(np.sum(w * ops.layernorm_forward(x, gamma, beta)[0]))

    _, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    dx, dgamma, dbeta = ops.layernorm_backward(w, x, mean, rstd, gamma)
    for name, got, arr in (("x", dx, x), ("gamma", dgamma, gamma), ("beta", dbeta, beta)):
        assert _rel(got, numerical_grad(value, arr)) < 1e-6, name


def test_work_buffer_and_sizes_are_checked_in_core():
    x = np.ones((2, 3))
    mean, rstd = np.zeros(2), np.ones(2)
    with pytest.raises(ValueError, match="^work:"):
        _core.layernorm_backward(x, x, mean, rstd, None, np.empty_like(x), np.empty(3),
                                 None, np.empty(5))
    with pytest.raises(ValueError, match="^mean:"):
        _core.layernorm_forward(x, None, None, np.empty_like(x), np.zeros(3), rstd, 1e-3)
    with pytest.raises(ValueError, match="^x:"):
        _core.layernorm_forward(np.ones((2, 0)), None, None, np.ones((2, 0)), mean, rstd, 1e-3)


# ---------------------------------------------------------------------------
# 2. numbers: a large mean with a tiny spread, edge values
# ---------------------------------------------------------------------------

def test_float32_rows_with_a_large_mean_and_a_tiny_spread_keep_their_digits():
    """Rows around 1e4 spread by 1e-2 (a few hundred float32 ulps): the
    one-pass float32 variance E[x^2] - E[x]^2 has no correct digit there,
    and the kernel agrees with the float64 reference of the same inputs."""
    rng = np.random.default_rng(1)
    x = (1e4 + 1e-2 * rng.normal(size=(16, 256))).astype(F32)
    naive = (x * x).mean(axis=1) - x.mean(axis=1) ** 2
    _, mu, rstd = ref_forward(x, epsilon=1e-12)
    true_var = 1.0 / rstd ** 2 - 1e-12
    assert np.max(np.abs(naive - true_var) / true_var) > 1.0   # the test can fail
    out, mean, rs = ops.layernorm_forward(x, epsilon=1e-12)
    want = ref_forward(x, epsilon=1e-12)[0]
    np.testing.assert_allclose(out, want, rtol=0, atol=4e-6 * np.abs(want).max())
    np.testing.assert_allclose(rs, rstd, rtol=1e-12)
    dout = rng.normal(size=x.shape).astype(F32)
    dx = ops.layernorm_backward(dout, x, mean, rs)[0]
    rdx = ref_backward(dout, x, epsilon=1e-12)[0]
    np.testing.assert_allclose(dx, rdx, rtol=0, atol=1e-5 * np.abs(rdx).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_zeros_subnormals_huge_values_and_nan(dtype):
    tiny = np.finfo(dtype).tiny
    x = np.array([[0.0, -0.0, 0.0, -0.0],               # no spread: out = beta
                  [tiny / 4, -tiny / 8, tiny / 2, 0.0],  # subnormals
                  [1e20, -1e20, 3e19, 0.0],              # +-1e20
                  [np.nan, 1.0, 2.0, 3.0],               # NaN stays in its row
                  [1.0, 2.0, 4.0, 8.0]], dtype)
    gamma, beta = np.array([1.0, 2.0, -1.0, 0.5], dtype), np.array([0.1, 0.2, 0.3, 0.4], dtype)
    with np.errstate(all="raise"):   # no floating-point warning from the kernel
        out, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    with np.errstate(under="ignore"):
        want = ref_forward(np.where(np.isnan(x), 0, x), gamma, beta)[0]
    np.testing.assert_array_equal(out[0], beta)
    close(out[[1, 2, 4]], want[[1, 2, 4]], dtype)
    assert np.all(np.isnan(out[3])) and np.isnan(mean[3])
    dout = np.ones_like(x)
    dx, dgamma, dbeta = ops.layernorm_backward(dout, x, mean, rstd, gamma)
    assert np.all(np.isnan(dx[3])) and np.all(np.isfinite(dx[[0, 1, 2, 4]]))
    close(dbeta, np.full(4, 5.0), dtype)


# ---------------------------------------------------------------------------
# 3. layouts, in place, overlap, argument checks
# ---------------------------------------------------------------------------

def _layouts(a):
    big = np.zeros((2 * a.shape[0] + 1, 2 * a.shape[1] + 1), a.dtype)
    strided = big[1::2, 1::2]
    strided[...] = a
    ro = a.copy()
    ro.flags.writeable = False
    return {"fortran": np.asfortranarray(a), "transposed": np.ascontiguousarray(a.T).T,
            "strided": strided, "readonly": ro}


@pytest.mark.parametrize("affine", [True, False])
def test_float32_gradients_are_within_a_few_ulps_of_the_largest(affine):
    """The float32 backward forms its products and the last combination in
    float32 and adds in double: each gradient stays within 3 float32 ulps
    (relative to its largest element) of the float64 reference."""
    rng = np.random.default_rng(12)
    x, gamma, _ = data(rng, (64, 1024), F32, affine)
    dout = rng.normal(size=x.shape).astype(F32)
    out, mean, rstd = ops.layernorm_forward(x, gamma)
    got = ops.layernorm_backward(dout, x, mean, rstd, gamma)
    for name, g, want in zip(("dx", "dgamma", "dbeta"), got, ref_backward(dout, x, gamma)):
        if g is not None:
            err = np.abs(g - want).max() / np.abs(want).max()
            assert err < 3 * np.finfo(F32).eps, (name, err)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_every_input_layout_gives_the_same_bits(dtype):
    rng = np.random.default_rng(3)
    x, gamma, beta = data(rng, (6, 9), dtype)
    dout = rng.normal(size=x.shape).astype(dtype)
    out, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    grads = ops.layernorm_backward(dout, x, mean, rstd, gamma)
    for kind, xl in _layouts(x).items():
        o2, m2, r2 = ops.layernorm_forward(xl, gamma[::-1].copy()[::-1], beta)
        assert o2.tobytes() == out.tobytes() and m2.tobytes() == mean.tobytes(), kind
        g2 = ops.layernorm_backward(_layouts(dout)[kind], xl, m2[::-1].copy()[::-1], r2,
                                    gamma)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(g2, grads)), kind


def test_in_place_is_allowed_and_partial_overlap_is_refused():
    rng = np.random.default_rng(4)
    x, gamma, beta = data(rng, (5, 6), F64)
    out, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    a = x.copy()
    ops.layernorm_forward(a, gamma, beta, out=a)
    assert a.tobytes() == out.tobytes()
    dout = rng.normal(size=x.shape)
    dx = ops.layernorm_backward(dout, x, mean, rstd, gamma)[0]
    d = dout.copy()
    ops.layernorm_backward(d, x, mean, rstd, gamma, dx=d)
    assert d.tobytes() == dx.tobytes()
    buf = np.zeros(31)
    xs, shifted = buf[:30].reshape(5, 6), buf[1:].reshape(5, 6)
    xs[...] = x
    with pytest.raises(ValueError, match="^out: overlaps x"):
        ops.layernorm_forward(xs, gamma, beta, out=shifted)
    with pytest.raises(ValueError, match="^dx: overlaps"):
        ops.layernorm_backward(xs, x, mean, rstd, gamma, dx=shifted)
    with pytest.raises(ValueError, match="^dx: overlaps"):
        ops.layernorm_backward(dout, xs, mean, rstd, gamma, dx=xs)
    assert np.array_equal(xs, x)


# ---------------------------------------------------------------------------
# threads: from 131072 elements the kernels split their rows over a pool
# ---------------------------------------------------------------------------

@pytest.fixture
def kernel_threads():
    """Sets the pool's thread count; restores the default afterwards."""
    yield _core.set_kernel_threads
    _core.set_kernel_threads(0)


def _big_case(dtype, affine=True, shape=(301, 613)):
    rng = np.random.default_rng(9)
    x, gamma, beta = data(rng, shape, dtype, affine)
    return x, gamma, beta, rng.normal(size=shape).astype(dtype)


def _ln_bytes(x, gamma, beta, dout, grads=True):
    out, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    got = [out, mean, rstd]
    if grads:
        got += [g for g in ops.layernorm_backward(dout, x, mean, rstd, gamma) if g is not None]
        d = dout.copy()
        _core.layernorm_backward(d, x, mean, rstd, gamma, d, None, None, None)   # in place
        got.append(d)
    return [a.tobytes() for a in got]


@pytest.mark.parametrize("affine", [True, False, "gamma"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_results_do_not_depend_on_the_thread_count(dtype, affine, kernel_threads):
    x, gamma, beta, dout = _big_case(dtype, affine)
    assert x.size >= 131072                     # past the threshold: the pool is used
    kernel_threads(1)
    one = _ln_bytes(x, gamma, beta, dout)
    for n in (2, 7, 3):        # 3 after 7: four of the six workers sit out
        kernel_threads(n)
        assert _ln_bytes(x, gamma, beta, dout) == one, n
    want, (rdx, rdg, rdb) = ref_forward(x, gamma, beta), ref_backward(dout, x, gamma)
    out, mean, rstd = ops.layernorm_forward(x, gamma, beta)
    close(out, want[0], dtype, np.abs(want[0]).max())
    dx, dgamma, dbeta = ops.layernorm_backward(dout, x, mean, rstd, gamma)
    close(dx, rdx, dtype, np.abs(rdx).max())
    close(dgamma, rdg, dtype, np.abs(rdg).max())
    close(dbeta, rdb, dtype, np.abs(rdb).max())


def test_many_python_threads_calling_at_once_get_the_serial_results(kernel_threads):
    """One parallel call at a time uses the pool; the others run alone."""
    import threading
    cases = [_big_case(F32, shape=(260 + 7 * i, 600)) for i in range(6)]
    kernel_threads(1)
    want = [_ln_bytes(*c) for c in cases]
    kernel_threads(2)
    got, errors = [None] * 6, []

    def run(i):
        try:
            for _ in range(5):
                got[i] = _ln_bytes(*cases[i])
                assert got[i] == want[i]
        except Exception as e:   # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors and got == want


def test_a_forked_child_runs_the_threaded_kernels(kernel_threads):
    """The pool's workers do not survive fork(): the child starts its own."""
    import multiprocessing as mp
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs fork()")
    kernel_threads(2)
    case = _big_case(F32)
    want = _ln_bytes(*case)              # the parent's workers are running now
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.apply(_ln_bytes, case) == want


def test_kernel_thread_count_is_checked(kernel_threads):
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="^n: expected"):
            kernel_threads(bad)
    kernel_threads(3)
    assert _core.get_kernel_threads() == 3
    kernel_threads(0)
    assert _core.get_kernel_threads() == min(os.cpu_count() or 1, 64)   # one per CPU


@pytest.mark.parametrize("call, exc, match", [
    (lambda x: ops.layernorm_forward(x, np.ones(4)), ValueError, "^gamma:"),
    (lambda x: ops.layernorm_forward(x, None, np.ones(3, F32)), TypeError, "^beta:"),
    (lambda x: ops.layernorm_forward(x, epsilon=0.0), ValueError, "^epsilon:"),
    (lambda x: ops.layernorm_forward(x, epsilon=np.nan), ValueError, "^epsilon:"),
    (lambda x: ops.layernorm_forward(x.astype(int)), TypeError, "^x:"),
    (lambda x: ops.layernorm_forward(np.ones((2, 0))), ValueError, "^x:"),
    (lambda x: ops.layernorm_forward(x, out=np.empty((2, 3), F32)), TypeError, "^out:"),
    (lambda x: ops.layernorm_forward(x, out=np.empty((3, 2)).T), ValueError, "^out:"),
    (lambda x: ops.layernorm_backward(x, x, np.zeros(3), np.ones(2)), ValueError, "^mean:"),
    (lambda x: ops.layernorm_backward(x, x, np.zeros(2), np.ones(2, F32)), TypeError,
     "^rstd:"),
    (lambda x: ops.layernorm_backward(x[:1], x, np.zeros(2), np.ones(2)), ValueError,
     "^dout:"),
])
def test_bad_arguments_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(np.ones((2, 3)))


# ---------------------------------------------------------------------------
# 4. the layer
# ---------------------------------------------------------------------------

def _model(dtype="float64", **kw):
    m = fg.Sequential([Dense(6, activation="tanh", input_dim=4), LayerNormalization(**kw),
                       Dense(2)], dtype=dtype, seed=5)
    m.compile(fg.optimizers.Adam(0.01), "mse")
    return m


def test_batch_size_one_and_training_equal_inference():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 4)), rng.normal(size=(12, 2))
    m = _model()
    m.fit(x, y, batch_size=1, epochs=1, verbose=0, shuffle=False)   # BN would refuse
    whole = m.predict(x)
    ln = m.layers[1]
    h = m.layers[0].forward(x, False)
    a = ln.forward(h, training=True).copy()
    b = ln.forward(h, training=False).copy()
    assert a.tobytes() == b.tobytes()
    one = np.concatenate([m.predict(x[i:i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(one, whole, rtol=1e-13, atol=1e-15)
    assert [w.shape for w in m.get_weights()] == [(4, 6), (6,), (6,), (6,), (6, 2), (2,)]


def test_save_and_load_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 2))
    m = _model(epsilon=1e-5, center=False, gamma_regularizer="l2")
    m.fit(x, y, batch_size=4, epochs=2, verbose=0)
    m.save(tmp_path / "m.fgm")
    m2 = fg.load_model(tmp_path / "m.fgm")
    assert m2.layers[1].get_config() == m.layers[1].get_config()
    assert m2.layers[1].epsilon == 1e-5 and not m2.layers[1].center
    assert m.predict(x).tobytes() == m2.predict(x).tobytes()
    m.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    m2.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(m.get_weights(), m2.get_weights()))


def test_layer_arguments_are_checked():
    for kw, name in (({"axis": 0}, "^axis:"), ({"epsilon": 0}, "^epsilon:"),
                     ({"rms_scaling": True}, "^rms_scaling:"),
                     ({"gamma_constraint": "max_norm"}, None)):
        if name is None:
            LayerNormalization(**kw)
        else:
            with pytest.raises(ValueError, match=name):
                LayerNormalization(**kw)
    assert fg.layers.get("LayerNormalization").epsilon == 1e-3


# ---------------------------------------------------------------------------
# 5. Keras 3
# ---------------------------------------------------------------------------

def test_defaults_and_configuration_are_keras_ones():
    keras = keras_or_skip()
    k = keras.layers.LayerNormalization().get_config()
    f = LayerNormalization().get_config()
    for key in ("axis", "epsilon", "center", "scale"):
        assert f[key] == k[key], key
    assert k["gamma_initializer"]["class_name"] == "Ones"
    assert k["beta_initializer"]["class_name"] == "Zeros"


def test_keras_float64_statistics_are_float32_accurate():
    """Why the float64 agreement below is ~1e-6 and not ~1e-12: Keras 3 on
    JAX takes the mean and variance of a float64 input to float32 accuracy
    (its jax backend's mean and var), while the kernel is float64-exact."""
    keras = keras_or_skip()
    from keras_peer import precision
    x = np.random.default_rng(9).normal(size=(8, 5)) + 1.0
    want = ref_forward(x)[0]
    with precision(keras, F64):
        got = np.asarray(keras.layers.LayerNormalization()(x))
    assert got.dtype == F64
    assert 1e-9 < np.max(np.abs(got - want)) < 1e-5
    np.testing.assert_allclose(ops.layernorm_forward(x)[0], want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kw", [{}, {"center": False}, {"scale": False, "epsilon": 0.1}],
                         ids=["default", "no-center", "no-scale"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_training_agrees_with_keras(dtype, kw):
    keras = keras_or_skip()
    rng = np.random.default_rng(8)
    x = (3.0 * rng.normal(size=(32, 5)) + 2.0).astype(dtype)
    y = rng.normal(size=(32, 3)).astype(dtype)
    result = train_both(
        [Dense(7, activation="sigmoid"), LayerNormalization(**kw), Dense(3)],
        [keras.layers.Dense(7, activation="sigmoid"), keras.layers.LayerNormalization(**kw),
         keras.layers.Dense(3)], x, y, "mse", "mse", dtype)
    # Keras' statistics are float32-accurate in float64 too (test above)
    assert_agree(result, dtype, rtol=2e-6 if dtype == F64 else 3e-5)
    assert not np.allclose(result[2][2], 1.0 if kw.get("scale", True) else 0.0)  # trained
