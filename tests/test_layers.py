"""Tests of BatchNormalization and Dropout: the compiled kernels (fg.ops) and
the layers inside Sequential models.

Every number is checked against an independent reference: NumPy forward
passes written from the documented formulas, the Ioffe & Szegedy chain-rule
backward, float64 central finite differences, binomial bounds on dropout
masks, and a NumPy splitmix64 for the documented counter-based generator.

Layout of this file:
  references ............ NumPy batch normalization, dropout generator, helpers
  1. BN forward ......... ops and layer, training / inference, moving statistics
  2. BN large mean ...... float32 data with mean 1e4 and spread 1e-2
  3. BN backward ........ closed form and finite differences, ops and model
  4. BN batch size 1 .... training refuses, inference works
  5. BN weights ......... get_weights order, non-trainable state, summary
  6. Dense(use_bias=False) before BN
  7. Dropout ............ kernel, masks, reproducibility, backward, model
  8. learning ........... Dense -> BN -> relu -> Dropout -> softmax
  9. validation ......... constructor and ops argument errors
"""
import re

import numpy as np
import pytest
from _reference import (
    DTYPES,
    F32,
    F64,
    batch_stats,
    model_fd_gradients,
    numerical_grad,
    ref_bn_backward,
    ref_bn_forward,
    splitmix_keep,
)

import fastgrad as fg
from fastgrad import ops
from fastgrad.layers import Activation, BatchNormalization, Dense, Dropout

# ---------------------------------------------------------------------------
# references (float64)
# ---------------------------------------------------------------------------

def np_bn(x, mu, var, gamma=None, beta=None, eps=1e-3):
    """Normalization by the given statistics (the reference in inference)."""
    return ref_bn_forward(x, gamma, beta, mu, var, training=False, epsilon=eps)[0]


def np_bn_backward(dy, x, gamma, eps):
    """(dx, dgamma, dbeta) of the reference, from the batch statistics."""
    mu, var = batch_stats(x)
    return ref_bn_backward(dy, x, mu, 1.0 / np.sqrt(var + eps), gamma)[:3]


def tol(dtype):
    """Tolerance of BatchNormalization outputs, (x - mean) rstd gamma + beta:
    near 0 they come from the cancellation x - mean, so their error is
    absolute on the scale of the normalized values (about 1), not relative
    to each output."""
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == F32 else {"rtol": 1e-11, "atol": 1e-11}


def binomial_ok(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def rel_err(a, b):
    a, b = np.asarray(a, F64), np.asarray(b, F64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def summary_lines(model):
    lines = []
    model.summary(print_fn=lines.append)
    return lines


def count_in(lines, label):
    row = [l for l in lines if label in l and not (label == "Trainable params" and "Non" in l)]
    assert len(row) == 1, "\n".join(lines)
    return int(re.findall(r"[\d,]+", row[0])[-1].replace(",", ""))


def bn_index(model, layer_pos):
    """Indices in get_weights() of each tensor of the BN layer at layer_pos,
    counted from the documented per-layer orders."""
    i = 0
    for layer in model.layers[:layer_pos]:
        if isinstance(layer, Dense):
            i += 2 if layer.use_bias else 1
        elif isinstance(layer, BatchNormalization):
            i += 2 + int(layer.scale) + int(layer.center)
    bn = model.layers[layer_pos]
    names = (["gamma"] if bn.scale else []) + (["beta"] if bn.center else []) + \
        ["moving_mean", "moving_variance"]
    return {n: i + k for k, n in enumerate(names)}


# ---------------------------------------------------------------------------
# 1. BatchNormalization forward
# ---------------------------------------------------------------------------

SHAPES = [(2, 1), (64, 256), (37, 1100)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("affine", ["both", "none", "gamma_only", "beta_only"])
def test_ops_batchnorm_training_forward_and_moving_update(dtype, shape, affine):
    rng = np.random.default_rng([shape[0], shape[1], ["both", "none", "gamma_only", "beta_only"].index(affine)])
    B, F = shape
    x = (rng.normal(size=shape) * rng.uniform(0.5, 3, F) + rng.normal(size=F) * 2).astype(dtype)
    gamma = rng.uniform(0.5, 2, F).astype(dtype) if affine in ("both", "gamma_only") else None
    beta = rng.normal(size=F).astype(dtype) if affine in ("both", "beta_only") else None
    mm0 = rng.normal(size=F).astype(dtype)
    mv0 = rng.uniform(0.5, 2, F).astype(dtype)
    mm, mv = mm0.copy(), mv0.copy()
    eps, mom = 1e-3, 0.9
    out, mean, rstd = ops.batchnorm_forward(x, gamma, beta, mm, mv, training=True,
                                            momentum=mom, epsilon=eps)
    mu, var = batch_stats(x)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_allclose(out, np_bn(x, mu, var, gamma, beta, eps), **tol(dtype))
    # the statistics handed to backward: the batch mean and 1/sqrt(biased var + eps)
    assert mean.dtype == F64 and rstd.dtype == F64
    np.testing.assert_allclose(mean, mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var + eps), rtol=1e-10)
    # moving = momentum * moving + (1 - momentum) * batch statistic (biased var)
    np.testing.assert_allclose(mm, (mom * mm0.astype(F64) + (1 - mom) * mu).astype(dtype),
                               rtol=1e-6 if dtype == F32 else 1e-12, atol=1e-7)
    np.testing.assert_allclose(mv, (mom * mv0.astype(F64) + (1 - mom) * var).astype(dtype),
                               rtol=1e-6 if dtype == F32 else 1e-12)
    if B == 2:
        # biased, not unbiased: with 2 rows the unbiased estimate is twice as big
        assert not np.allclose(mv, mom * mv0 + (1 - mom) * var * 2, rtol=1e-3)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("affine", [True, False])
def test_ops_batchnorm_inference_uses_moving_statistics_and_keeps_them(dtype, shape, affine):
    rng = np.random.default_rng(shape[1])
    _B, F = shape
    x = rng.normal(3, 2, size=shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, F).astype(dtype) if affine else None
    beta = rng.normal(size=F).astype(dtype) if affine else None
    mm = rng.normal(size=F).astype(dtype)
    mv = rng.uniform(0.1, 3, F).astype(dtype)
    mm0, mv0 = mm.copy(), mv.copy()
    out, _mean, _rstd = ops.batchnorm_forward(x, gamma, beta, mm, mv, training=False,
                                            momentum=0.5, epsilon=1e-2)
    np.testing.assert_allclose(out, np_bn(x, mm0, mv0, gamma, beta, 1e-2), **tol(dtype))
    assert np.array_equal(mm, mm0) and np.array_equal(mv, mv0)
    # and not the batch statistics
    mu, var = batch_stats(x)
    assert not np.allclose(out, np_bn(x, mu, var, gamma, beta, 1e-2), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mom", [0.0, 0.5, 0.99, 1.0])
def test_ops_batchnorm_momentum_edges(mom):
    rng = np.random.default_rng(5)
    x = rng.normal(4, 3, size=(50, 7))
    mm0, mv0 = rng.normal(size=7), rng.uniform(1, 2, 7)
    mm, mv = mm0.copy(), mv0.copy()
    ops.batchnorm_forward(x, None, None, mm, mv, training=True, momentum=mom)
    mu, var = batch_stats(x)
    np.testing.assert_allclose(mm, mom * mm0 + (1 - mom) * mu, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mv, mom * mv0 + (1 - mom) * var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_training_uses_batch_stats_and_updates_moving_stats(dtype):
    dt = np.dtype(dtype).type
    rng = np.random.default_rng(11)
    F, B = 6, 40
    model = fg.Sequential([BatchNormalization(momentum=0.8, epsilon=1e-2, input_dim=F)],
                          dtype=dtype, seed=0)
    model.compile(fg.optimizers.SGD(0.0), "mse")   # lr 0: only the statistics move
    gamma, beta = rng.uniform(0.5, 2, F), rng.normal(size=F)
    mm0, mv0 = rng.normal(size=F), rng.uniform(0.5, 2, F)
    model.set_weights([gamma, beta, mm0, mv0])
    w = model.get_weights()
    x = rng.normal(2, 3, size=(B, F)).astype(dt)
    y = rng.normal(size=(B, F))
    loss, _ = model.compute_gradients(x, y)
    # compute_gradients runs in training mode but restores the statistics
    for a, b in zip(w, model.get_weights()):
        assert np.array_equal(a, b)
    mu, var = batch_stats(x)
    out = np_bn(x, mu, var, w[0], w[1], 1e-2)
    assert loss == pytest.approx(np.mean((out - y) ** 2), rel=1e-5 if dt == F32 else 1e-12)
    # a training step moves the moving statistics
    assert model.train_on_batch(x, y) == pytest.approx(loss, rel=1e-6)
    mm, mv = model.get_weights()[2:]
    rt = 1e-6 if dt == F32 else 1e-12
    np.testing.assert_allclose(mm, 0.8 * w[2].astype(F64) + 0.2 * mu, rtol=rt, atol=1e-7)
    np.testing.assert_allclose(mv, 0.8 * w[3].astype(F64) + 0.2 * var, rtol=rt)
    # inference (predict, evaluate) uses and keeps the moving statistics
    before = model.get_weights()
    pred = model.predict(x)
    np.testing.assert_allclose(pred, np_bn(x, mm, mv, w[0], w[1], 1e-2), **tol(dt))
    model.evaluate(x, y, verbose=0)
    for a, b in zip(before, model.get_weights()):
        assert np.array_equal(a, b)


def test_dense_bn_model_predict_matches_numpy_with_moving_stats():
    rng = np.random.default_rng(2)
    model = fg.Sequential([Dense(5, input_dim=4), BatchNormalization(),
                           Activation("tanh"), Dense(3)], dtype="float64", seed=1)
    ws = model.get_weights()
    ws[2], ws[3] = rng.uniform(0.5, 2, 5), rng.normal(size=5)
    ws[4], ws[5] = rng.normal(size=5), rng.uniform(0.2, 3, 5)
    model.set_weights(ws)
    x = rng.normal(size=(9, 4))
    h = x @ ws[0] + ws[1]
    h = np.tanh(np_bn(h, ws[4], ws[5], ws[2], ws[3], 1e-3))
    np.testing.assert_allclose(model.predict(x), h @ ws[6] + ws[7], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# 2. large-mean stability
# ---------------------------------------------------------------------------

def test_ops_batchnorm_float32_large_mean_small_spread():
    rng = np.random.default_rng(3)
    B, F = 256, 600  # crosses a 512-column block
    x = (1e4 + 1e-2 * rng.standard_normal((B, F))).astype(F32)
    eps = 1e-9
    out, mean, rstd = ops.batchnorm_forward(x, training=True, epsilon=eps)
    mu, var = batch_stats(x)            # float64 from the same float32 values
    assert np.all(var > 1e-5)           # the float32 quantization leaves a real spread
    ref = np_bn(x, mu, var, eps=eps)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5)
    np.testing.assert_allclose(mean, mu, rtol=1e-13)
    np.testing.assert_allclose(rstd, 1 / np.sqrt(var + eps), rtol=1e-6)
    o = out.astype(F64)
    assert np.abs(o.mean(axis=0)).max() < 1e-5
    np.testing.assert_allclose(o.std(axis=0), np.sqrt(var / (var + eps)), atol=1e-5)
    np.testing.assert_allclose(o.std(axis=0), 1.0, atol=1e-4)
    # inference with those statistics as the moving ones gives the same
    out2, _, _ = ops.batchnorm_forward(x, None, None, mu.astype(F32), var.astype(F32),
                                       training=False, epsilon=eps)
    np.testing.assert_allclose(out2, np_bn(x, mu.astype(F32), var.astype(F32), eps=eps),
                               atol=2e-5)
    # the backward keeps the split mean too: dx, dgamma, dbeta against float64
    dy = rng.standard_normal((B, F)).astype(F32)
    dx, dgamma, dbeta = ops.batchnorm_backward(dy, x, mean, rstd)
    want = np_bn_backward(dy, x, None, eps)
    for got, ref in zip((dx, dgamma, dbeta), want):
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, err


def test_layer_float32_large_mean_small_spread_in_training():
    # a model of one BN layer with mse against 0: loss = mean(out^2) = mean var/(var+eps)
    rng = np.random.default_rng(4)
    F = 20
    x = (1e4 + 1e-2 * rng.standard_normal((128, F))).astype(F32)
    model = fg.Sequential([BatchNormalization(epsilon=1e-8, input_dim=F)], seed=0)
    model.compile(fg.optimizers.SGD(0.0), "mse")   # lr 0: only the statistics move
    loss = model.train_on_batch(x, np.zeros_like(x))
    mu, var = batch_stats(x)
    assert loss == pytest.approx(np.mean(var / (var + 1e-8)), abs=1e-4)
    mm, mv = model.get_weights()[2:]
    np.testing.assert_allclose(mm, 0.01 * mu, rtol=1e-6)
    np.testing.assert_allclose(mv, 0.99 + 0.01 * var, rtol=1e-6)


# ---------------------------------------------------------------------------
# 3. backward
# ---------------------------------------------------------------------------

def _bn_objective(x, gamma, beta, dy, eps):
    out, _, _ = ops.batchnorm_forward(x, gamma, beta, training=True, epsilon=eps)
    return float(np.sum(dy * out))


def _fd(f, a, idx, h):
    """Central differences of f() at the listed entries of a."""
    return numerical_grad(f, a, h, idx)[tuple(np.transpose(idx))]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("with_gamma", [True, False])
def test_ops_batchnorm_backward_matches_the_reference(dtype, shape, with_gamma):
    rng = np.random.default_rng(shape[0] * 7 + with_gamma)
    F = shape[1]
    x = rng.normal(1, 2, size=shape).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, F).astype(dtype) if with_gamma else None
    _, mean, rstd = ops.batchnorm_forward(x, gamma, None, training=True, epsilon=1e-3)
    dx, dgamma, dbeta = ops.batchnorm_backward(dy, x, mean, rstd, gamma)
    rdx, rdg, rdb = np_bn_backward(dy, x, gamma, 1e-3)
    assert dx.dtype == dtype and dgamma.dtype == dtype and dbeta.dtype == dtype
    lim = 1e-4 if dtype == F32 else 1e-9
    assert rel_err(dx, rdx) < lim
    assert rel_err(dgamma, rdg) < lim
    assert rel_err(dbeta, rdb) < lim


def test_ops_batchnorm_backward_finite_differences_small():
    rng = np.random.default_rng(8)
    B, F, eps = 6, 5, 1e-3
    x = rng.normal(0.5, 1.5, size=(B, F))
    gamma, beta = rng.uniform(0.5, 2, F), rng.normal(size=F)
    dy = rng.normal(size=(B, F))
    _, mean, rstd = ops.batchnorm_forward(x, gamma, beta, training=True, epsilon=eps)
    dx, dgamma, dbeta = ops.batchnorm_backward(dy, x, mean, rstd, gamma)
    f = lambda: _bn_objective(x, gamma, beta, dy, eps)
    h = 1e-5
    fdx, fdg, fdb = (numerical_grad(f, a, h) for a in (x, gamma, beta))
    assert rel_err(dx, fdx) < 1e-6
    assert rel_err(dgamma, fdg) < 1e-6
    assert rel_err(dbeta, fdb) < 1e-6
    # normalization removes any common shift of a column: dx sums to 0 per feature
    np.testing.assert_allclose(dx.sum(axis=0), 0, atol=1e-12)


def test_ops_batchnorm_backward_finite_differences_wide():
    # sampled entries on both sides of the 512-column blocks
    rng = np.random.default_rng(9)
    B, F, eps = 37, 1100, 1e-3
    x = rng.normal(0, 1, size=(B, F)) + rng.normal(0, 5, F)
    gamma, beta = rng.uniform(0.5, 2, F), rng.normal(size=F)
    dy = rng.normal(size=(B, F))
    _, mean, rstd = ops.batchnorm_forward(x, gamma, beta, training=True, epsilon=eps)
    dx, dgamma, dbeta = ops.batchnorm_backward(dy, x, mean, rstd, gamma)
    f = lambda: _bn_objective(x, gamma, beta, dy, eps)
    cols = [0, 1, 511, 512, 513, 1023, 1024, 1099]
    xi = [(int(rng.integers(B)), c) for c in cols]
    fdx = _fd(f, x, xi, 1e-5)
    fdg, fdb = (_fd(f, a, [(c,) for c in cols], 1e-5) for a in (gamma, beta))
    assert rel_err([dx[i] for i in xi], fdx) < 1e-6
    assert rel_err(dgamma[cols], fdg) < 1e-6
    assert rel_err(dbeta[cols], fdb) < 1e-6


def _model_fd_check(model, x, y, before_each=None):
    """{name: (compute_gradients' gradient, central differences of its own
    loss)} for every trainable weight, all weights (moving statistics
    included) restored before each call."""
    trainable = [k for k, s in enumerate(s for layer in model.layers
                                         for s in layer.weight_specs) if s.trainable]
    assert len(trainable) == len(model.weight_names)
    if before_each:
        before_each()
    _, grads = model.compute_gradients(x, y)
    fds = model_fd_gradients(model, x, y, before_each=before_each, which=trainable)
    return {n: (g, fd) for n, g, fd in zip(model.weight_names, grads, fds)}


@pytest.mark.parametrize("use_bias", [True, False])
def test_model_dense_bn_tanh_dense_gradients_match_finite_differences(use_bias):
    rng = np.random.default_rng(12)
    model = fg.Sequential([Dense(6, use_bias=use_bias, input_dim=4),
                           BatchNormalization(momentum=0.7),
                           Activation("tanh"), Dense(3)], dtype="float64", seed=3)
    model.compile("sgd", "mse")
    ws = model.get_weights()
    gi = bn_index(model, 1)
    ws[gi["gamma"]] = rng.uniform(0.5, 1.5, 6)
    ws[gi["beta"]] = rng.normal(0, 0.5, 6)
    model.set_weights(ws)
    x = rng.normal(size=(10, 4))
    y = rng.normal(size=(10, 3))
    res = _model_fd_check(model, x, y)
    expected = (["dense/kernel"] + (["dense/bias"] if use_bias else []) +
                ["batch_normalization/gamma", "batch_normalization/beta",
                 "dense_1/kernel", "dense_1/bias"])
    assert list(res) == expected
    for name, (g, fd) in res.items():
        if name == "dense/bias":
            # a bias before BN is cancelled by the batch mean: its gradient is 0
            assert np.abs(g).max() < 1e-12 and np.abs(fd).max() < 1e-8
            continue
        assert np.abs(fd).max() > 1e-3, name
        assert rel_err(g, fd) < 1e-6, (name, g, fd)


# ---------------------------------------------------------------------------
# 4. batch size 1
# ---------------------------------------------------------------------------

def _bn_model(dtype="float32", seed=0, extra_dropout=False):
    layers = [Dense(8, input_dim=5)]
    if extra_dropout:
        layers.append(Dropout(0.5))
    layers += [BatchNormalization(), Activation("relu"), Dense(2)]
    model = fg.Sequential(layers, dtype=dtype, seed=seed)
    model.compile(fg.optimizers.SGD(0.1, momentum=0.9), "mse")
    return model


def _same_weights(a, b):
    return len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b))


def test_batch_of_one_row_in_training_matches_the_formula():
    # one row: mean = the row, variance 0, so the normalized output is beta
    # and no gradient reaches the layers below (Keras trains on such a batch:
    # 65 rows at batch 32 leave one; tests/test_keras_api.py compares)
    rng = np.random.default_rng(0)
    model = _bn_model("float64")
    x, y = rng.normal(size=(40, 5)), rng.normal(size=(40, 2))
    model.train_on_batch(x[:8], y[:8])
    w1, b1, gamma, beta, mm, mv, w2, b2 = model.get_weights()
    loss, grads = model.compute_gradients(x[8:9], y[8:9])
    h = x[8:9] @ w1 + b1
    a = np.maximum(beta, 0)[None, :]
    pred = a @ w2 + b2
    dpred = 2 * (pred - y[8:9]) / pred.size
    assert loss == pytest.approx(np.mean((pred - y[8:9]) ** 2), rel=1e-13)
    dbeta = (dpred @ w2.T)[0] * (beta > 0)
    refs = [np.zeros_like(w1), np.zeros_like(b1), np.zeros_like(gamma), dbeta,
            a.T @ dpred, dpred[0]]
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(g, r, rtol=1e-13, atol=1e-300)
    model.train_on_batch(x[8:9], y[8:9])
    ws = model.get_weights()
    np.testing.assert_allclose(ws[4], 0.99 * mm + 0.01 * h[0], rtol=1e-14)
    np.testing.assert_allclose(ws[5], 0.99 * mv, rtol=1e-14)
    # fit with a last batch of one row takes every step
    it = model.optimizer.iterations
    model.fit(x[:33], y[:33], batch_size=32, verbose=0)
    model.fit(x, y, batch_size=1, verbose=0, shuffle=False)
    assert model.optimizer.iterations == it + 2 + 40
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_batch_of_one_row_in_inference_works():
    rng = np.random.default_rng(1)
    model = _bn_model("float64")
    x, y = rng.normal(size=(33, 5)), rng.normal(size=(33, 2))
    model.fit(x[:32], y[:32], batch_size=16, epochs=2, verbose=0)
    ws = model.get_weights()
    p1 = model.predict(x[:1])
    assert p1.shape == (1, 2)
    h = np_bn(x[:1] @ ws[0] + ws[1], ws[4], ws[5], ws[2], ws[3])
    ref = np.maximum(h, 0) @ ws[6] + ws[7]
    np.testing.assert_allclose(p1, ref, rtol=1e-12, atol=1e-12)
    # predict and evaluate in batches whose last one has 1 row
    np.testing.assert_allclose(model.predict(x, batch_size=32)[-1:], model.predict(x[-1:]),
                               rtol=1e-13)
    loss = model.evaluate(x, y, batch_size=32, verbose=0)
    assert np.isfinite(loss)
    assert _same_weights(ws, model.get_weights())
    out, _, _ = ops.batchnorm_forward(x[:1], None, None, np.zeros(5), np.ones(5),
                                      training=False)
    np.testing.assert_allclose(out, x[:1] / np.sqrt(1 + 1e-3), rtol=1e-14)
    with pytest.raises(ValueError, match="x"):
        ops.batchnorm_forward(x[:0], training=True)


def test_refused_empty_batch_does_not_advance_dropout_before_bn():
    # "errors ... before any state changes": a Dropout ahead of the BN must not
    # consume random numbers for a batch that is then refused, or the next
    # fit no longer matches a twin model that never saw the bad call
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(32, 5)), rng.normal(size=(32, 2))
    a = _bn_model(seed=4, extra_dropout=True)
    b = _bn_model(seed=4, extra_dropout=True)
    with pytest.raises(ValueError):
        a.train_on_batch(x[:0], y[:0])
    assert a.layers[1].counter == b.layers[1].counter
    a.fit(x, y, batch_size=8, epochs=1, verbose=0)
    b.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert _same_weights(a.get_weights(), b.get_weights())


# ---------------------------------------------------------------------------
# 5. weights: order, non-trainable state, summary
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("center,scale", [(True, True), (False, True), (True, False),
                                          (False, False)])
def test_bn_get_weights_order_and_meaning(center, scale):
    F = 4
    model = fg.Sequential([BatchNormalization(center=center, scale=scale, epsilon=1e-2,
                                              input_dim=F)], dtype="float64", seed=0)
    ws = model.get_weights()
    names = (["gamma"] if scale else []) + (["beta"] if center else []) + \
        ["moving_mean", "moving_variance"]
    assert len(ws) == len(names)
    assert all(w.shape == (F,) for w in ws)
    init = {"gamma": 1.0, "beta": 0.0, "moving_mean": 0.0, "moving_variance": 1.0}
    for n, w in zip(names, ws):
        assert np.array_equal(w, np.full(F, init[n])), n
    assert model.weight_names == [f"batch_normalization/{n}" for n in names
                                  if n in ("gamma", "beta")]
    # set distinct values and check each lands where the order says (predict)
    rng = np.random.default_rng(6)
    vals = {"gamma": rng.uniform(0.5, 2, F), "beta": rng.normal(size=F),
            "moving_mean": rng.normal(size=F), "moving_variance": rng.uniform(0.5, 2, F)}
    model.set_weights([vals[n] for n in names])
    x = rng.normal(size=(7, F))
    ref = np_bn(x, vals["moving_mean"], vals["moving_variance"],
                vals["gamma"] if scale else None, vals["beta"] if center else None, 1e-2)
    np.testing.assert_allclose(model.predict(x), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        model.set_weights([vals[n] for n in names] + [np.ones(F)])
    lines = summary_lines(model)
    assert count_in(lines, "Trainable params") == F * (int(center) + int(scale))
    assert count_in(lines, "Non-trainable params") == 2 * F
    assert count_in(lines, "Total params") == F * (2 + int(center) + int(scale))


@pytest.mark.parametrize("make_opt", [
    lambda: fg.optimizers.SGD(0.05, momentum=0.9, weight_decay=0.1),
    lambda: fg.optimizers.AdamW(0.01, weight_decay=0.2),
], ids=["sgd_momentum_wd", "adamw"])
def test_moving_stats_follow_the_momentum_formula_only(make_opt):
    # BN first: its input is the data itself, so the batch statistics of every
    # step are known exactly whatever the optimizer does to the weights
    rng = np.random.default_rng(13)
    F, n, bs, epochs, mom = 5, 64, 16, 3, 0.8
    model = fg.Sequential([BatchNormalization(momentum=mom, input_dim=F), Dense(3)],
                          dtype="float64", seed=2)
    model.compile(make_opt(), "mse")
    x = rng.normal(3, 2, size=(n, F)) * rng.uniform(0.5, 3, F)
    y = rng.normal(size=(n, 3))
    mm0, mv0 = rng.normal(size=F), rng.uniform(0.5, 2, F)
    ws = model.get_weights()
    ws[2], ws[3] = mm0, mv0
    model.set_weights(ws)
    model.fit(x, y, batch_size=bs, epochs=epochs, shuffle=False, verbose=0)
    mm, mv = mm0.copy(), mv0.copy()
    for _ in range(epochs):
        for s in range(0, n, bs):
            mu, var = batch_stats(x[s:s + bs])
            mm = mom * mm + (1 - mom) * mu
            mv = mom * mv + (1 - mom) * var
    got = model.get_weights()
    np.testing.assert_allclose(got[2], mm, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(got[3], mv, rtol=1e-12)
    # gamma and beta are trained (the test is not vacuous)
    assert not np.allclose(got[0], 1.0, atol=1e-4)
    assert not np.allclose(got[1], 0.0, atol=1e-4)
    assert model.optimizer.iterations == epochs * n // bs
    assert model.weight_names == ["batch_normalization/gamma", "batch_normalization/beta",
                                  "dense/kernel", "dense/bias"]


def test_summary_counts_bn_parameters():
    model = fg.Sequential([Dense(8, use_bias=False, input_dim=4), BatchNormalization(),
                           Activation("relu"), Dense(2)], seed=0)
    ws = model.get_weights()
    lines = summary_lines(model)
    text = "\n".join(lines)
    row = [l for l in lines if l.strip().startswith("batch_normalization ")]
    assert len(row) == 1, text
    assert "BatchNormalization" in row[0] and "(None, 8)" in row[0]
    assert int(row[0].split()[-1].replace(",", "")) == 4 * 8
    trainable = 4 * 8 + 2 * 8 + 8 * 2 + 2
    assert count_in(lines, "Trainable params") == trainable
    assert count_in(lines, "Non-trainable params") == 2 * 8
    assert count_in(lines, "Total params") == trainable + 16 == sum(w.size for w in ws)
    assert model.count_params() == trainable + 16


# ---------------------------------------------------------------------------
# 6. Dense(use_bias=False) before BN
# ---------------------------------------------------------------------------

def test_dense_without_bias_before_bn():
    rng = np.random.default_rng(14)
    model = fg.Sequential([Dense(6, use_bias=False, input_dim=3), BatchNormalization(),
                           Dense(2)], dtype="float64", seed=5)
    model.compile(fg.optimizers.Adam(0.01), "mse")
    ws = model.get_weights()
    assert [w.shape for w in ws] == [(3, 6), (6,), (6,), (6,), (6,), (6, 2), (2,)]
    assert model.weight_names == ["dense/kernel", "batch_normalization/gamma",
                                  "batch_normalization/beta", "dense_1/kernel",
                                  "dense_1/bias"]
    x = rng.normal(size=(64, 3))
    y = np.stack([x[:, 0] * x[:, 1], x[:, 2]], 1)
    first = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=20, verbose=0)
    assert model.evaluate(x, y, verbose=0) < first
    ws = model.get_weights()
    ref = np_bn(x @ ws[0], ws[3], ws[4], ws[1], ws[2]) @ ws[5] + ws[6]
    np.testing.assert_allclose(model.predict(x), ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# 7. Dropout
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_ops_dropout_scaling_and_keep_fraction(dtype, rate):
    n = 1000 * 1000
    ones = np.ones((1000, 1000), dtype)
    out = ops.dropout(ones, rate, seed=12345, offset=0)
    scale = dtype(1.0 / (1.0 - rate))
    kept = out != 0
    assert out.dtype == dtype
    assert np.all(out[kept] == scale)        # exactly 1 / (1 - rate)
    k = int(kept.sum())
    assert binomial_ok(k, n, 1 - rate), (k, n * (1 - rate))
    # adjacent entries are independent: P(both kept) = (1 - rate)^2
    flat = kept.reshape(-1)
    both = int(np.sum(flat[:-1] & flat[1:]))
    assert binomial_ok(both, n - 1, (1 - rate) ** 2, 6.0)
    # each of 10 blocks of 1e5 keeps its share too
    for blk in flat.reshape(10, -1):
        assert binomial_ok(int(blk.sum()), blk.size, 1 - rate)
    # arbitrary x: kept entries are x * scale, dropped ones 0
    x = np.random.default_rng(0).normal(size=(1000, 1000)).astype(dtype)
    ox = ops.dropout(x, rate, seed=12345, offset=0)
    assert np.array_equal(ox, np.where(kept, x * scale, dtype(0)))


@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 777), (2**64 - 1, 2**40),
                                         (99, 2**64 - 50)])
@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_ops_dropout_mask_is_the_documented_splitmix_stream(seed, offset, rate):
    n = 30 * 17
    out = ops.dropout(np.ones((30, 17)), rate, seed, offset)
    assert np.array_equal(out.reshape(-1) != 0, splitmix_keep(seed, offset, n, rate))


def test_ops_dropout_reproducibility_and_counter_positions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 40)) + 5.0     # no zeros
    a = ops.dropout(x, 0.5, seed=7, offset=100)
    assert np.array_equal(a, ops.dropout(x, 0.5, seed=7, offset=100))
    assert not np.array_equal(a != 0, ops.dropout(x, 0.5, seed=7, offset=101) != 0)
    assert not np.array_equal(a != 0, ops.dropout(x, 0.5, seed=8, offset=100) != 0)
    # element k uses position offset + k: the second half of the rows at
    # offset + half the elements reproduces the second half of the mask
    b = ops.dropout(x[25:], 0.5, seed=7, offset=100 + 25 * 40)
    assert np.array_equal(b, a[25:])
    # masks drawn at disjoint offsets agree only by chance
    c = ops.dropout(x, 0.5, seed=7, offset=100 + x.size)
    agree = int(np.sum((a != 0) == (c != 0)))
    assert binomial_ok(agree, x.size, 0.5)
    # out= is written in place; non-contiguous inputs are accepted
    buf = np.empty_like(x)
    assert ops.dropout(x, 0.5, 7, 100, out=buf) is buf and np.array_equal(buf, a)
    xt = np.asfortranarray(x)
    assert np.array_equal(ops.dropout(xt, 0.5, 7, 100), a)
    # rate 0: identity
    assert np.array_equal(ops.dropout(x, 0.0, 7, 100), x)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_ops_dropout_backward_is_the_same_call_on_the_gradient(dtype):
    rng = np.random.default_rng(2)
    rate, seed, off = 0.3, 4242, 10**6
    x = rng.normal(size=(20, 30)).astype(dtype)
    dy = rng.normal(size=(20, 30)).astype(dtype)
    mask = ops.dropout(np.ones_like(x), rate, seed, off) != 0
    dx = ops.dropout(dy, rate, seed, off)
    np.testing.assert_array_equal(dx, np.where(mask, dy * dtype(1 / (1 - rate)), 0))
    np.testing.assert_allclose(dx, dy * mask / (1 - rate), rtol=1e-6 if dtype == F32 else 1e-15)
    # finite differences of L(x) = sum(dy * dropout(x)) in float64
    if dtype == F64:
        f = lambda: float(np.sum(dy * ops.dropout(x, rate, seed, off)))
        idx = [(int(i), int(j)) for i, j in zip(rng.integers(0, 20, 25),
                                                rng.integers(0, 30, 25))]
        fd = _fd(f, x, idx, 1e-4)
        assert rel_err([dx[i] for i in idx], fd) < 1e-6


def _np_dense_dropout_dense(x, y, ws, mask, rate):
    """Forward and backward of Dense(tanh) -> Dropout -> Dense with mse, NumPy."""
    W1, b1, W2, b2 = ws
    h = np.tanh(x @ W1 + b1)
    d = h * mask / (1 - rate)
    out = d @ W2 + b2
    loss = np.mean((out - y) ** 2)
    dout = 2 * (out - y) / out.size
    dW2, db2 = d.T @ dout, dout.sum(0)
    dd = dout @ W2.T
    dz = dd * mask / (1 - rate) * (1 - h ** 2)
    return loss, [x.T @ dz, dz.sum(0), dW2, db2], out


def test_dropout_identity_in_inference_and_counter_untouched():
    rng = np.random.default_rng(3)
    model = fg.Sequential([Dense(8, "tanh", input_dim=5), Dropout(0.5),
                           Dense(3)], dtype="float64", seed=9)
    model.compile("sgd", "mse")
    x, y = rng.normal(size=(21, 5)), rng.normal(size=(21, 3))
    ws = model.get_weights()
    ref = np.tanh(x @ ws[0] + ws[1]) @ ws[2] + ws[3]
    c0 = model.layers[1].counter
    np.testing.assert_allclose(model.predict(x), ref, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(model.predict(x, batch_size=4), ref, rtol=1e-13, atol=1e-13)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(np.mean((ref - y) ** 2),
                                                            rel=1e-12)
    assert model.layers[1].counter == c0
    # training draws masks: the training loss is not the inference loss;
    # compute_gradients leaves the counter where it was, a training step moves it
    loss, _ = model.compute_gradients(x, y)
    assert loss != pytest.approx(np.mean((ref - y) ** 2), rel=1e-6)
    assert model.layers[1].counter == c0
    model.train_on_batch(x, y)
    assert model.layers[1].counter == c0 + x.size // 5 * 8


def test_dropout_model_gradients_use_the_layer_mask():
    rng = np.random.default_rng(4)
    rate, seed = 0.4, 31337
    model = fg.Sequential([Dense(7, "tanh", input_dim=5), Dropout(rate, seed=seed),
                           Dense(2)], dtype="float64", seed=1)
    model.compile("sgd", "mse")
    x, y = rng.normal(size=(6, 5)), rng.normal(size=(6, 2))
    drop = model.layers[1]
    c0 = 1000
    drop.counter = c0
    loss, grads = model.compute_gradients(x, y)
    assert drop.counter == c0      # compute_gradients restores the counter
    mask = ops.dropout(np.ones((6, 7)), rate, seed, c0) != 0
    assert 0 < mask.sum() < mask.size
    rloss, rgrads, _ = _np_dense_dropout_dense(x, y, model.get_weights(), mask, rate)
    assert loss == pytest.approx(rloss, rel=1e-12)
    for g, r in zip(grads, rgrads):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-13)
    # a different counter draws another mask and another loss
    drop.counter = c0 + 6 * 7
    loss2, _ = model.compute_gradients(x, y)
    assert loss2 != pytest.approx(loss, rel=1e-9)

    def reset():
        drop.counter = c0

    res = _model_fd_check(model, x, y, before_each=reset)
    for name, (g, fd) in res.items():
        assert np.abs(fd).max() > 1e-4, name
        assert rel_err(g, fd) < 1e-6, (name, g, fd)


def _observed_mask(model, x, y):
    """The Dropout mask of one training step of Dense(I) -> Dropout -> Dense
    (compiled with learning rate 0), read from the first kernel's gradient
    (nonzero exactly where kept)."""
    model.train_on_batch(x, y)
    return model.grads[:model.layers[0].units] != 0


def test_dropout_masks_advance_across_training_steps():
    D, rate, seed = 4096, 0.5, 2024
    model = fg.Sequential([Dense(D, use_bias=False, kernel_initializer="ones", input_dim=1),
                           Dropout(rate, seed=seed),
                           Dense(1, use_bias=False, kernel_initializer="ones")],
                          dtype="float64", seed=0)
    model.compile(fg.optimizers.SGD(0.0), "mse")
    x, y = np.ones((1, 1)), np.full((1, 1), -1.0)   # residual > 0: no accidental zeros
    masks = [_observed_mask(model, x, y) for _ in range(4)]
    for t, m in enumerate(masks):
        # step t uses positions t*D .. (t+1)*D - 1 of the layer's stream
        assert np.array_equal(m, splitmix_keep(seed, t * D, D, rate)), t
        assert binomial_ok(int(m.sum()), D, 1 - rate)
    for a in range(4):
        for b in range(a + 1, 4):
            both = int(np.sum(masks[a] & masks[b]))
            assert binomial_ok(both, D, (1 - rate) ** 2), (a, b, both)
    assert model.layers[1].counter == 4 * D
    # train_on_batch advances the same counter
    model.train_on_batch(x, y)
    assert model.layers[1].counter == 5 * D


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_model_fit_is_reproducible_from_the_seed(dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(100, 6))
    y = np.eye(3)[rng.integers(0, 3, 100)]

    def trained(seed, drop_seed=None):
        m = fg.Sequential([Dense(16, "relu", input_dim=6), Dropout(0.3, seed=drop_seed),
                           Dense(16, "relu"), Dropout(0.5), Dense(3, "softmax")],
                          dtype=dtype, seed=seed)
        m.compile("adam", "categorical_crossentropy")
        m.fit(x, y, batch_size=16, epochs=3, verbose=0)
        return m

    a, b = trained(21), trained(21)
    assert _same_weights(a.get_weights(), b.get_weights())
    assert [l.counter for l in a.layers if isinstance(l, Dropout)] == \
        [l.counter for l in b.layers if isinstance(l, Dropout)] == [3 * 100 * 16] * 2
    assert not _same_weights(a.get_weights(), trained(22).get_weights())
    # the layer's own seed changes only the masks: the weights differ too
    c, d = trained(21, drop_seed=1), trained(21, drop_seed=2)
    assert not _same_weights(c.get_weights(), d.get_weights())
    assert _same_weights(c.get_weights(), trained(21, drop_seed=1).get_weights())


# ---------------------------------------------------------------------------
# 8. learning
# ---------------------------------------------------------------------------

def test_dense_bn_relu_dropout_softmax_learns_float32():
    rng = np.random.default_rng(6)
    n, d, k = 3000, 10, 4
    centers = rng.normal(0, 1.5, size=(k, d))
    labels = rng.integers(0, k, n)
    x = centers[labels] + rng.normal(size=(n, d))
    x = x * 20 + 100          # unnormalized inputs: BN has work to do
    y = np.eye(k)[labels]
    model = fg.Sequential([Dense(32, use_bias=False, input_dim=d), BatchNormalization(),
                           Activation("relu"), Dropout(0.2), Dense(k, "softmax")], seed=3)
    model.compile(fg.optimizers.Adam(0.01), "categorical_crossentropy", metrics=["accuracy"])
    hist = model.fit(x[:2400], y[:2400], batch_size=64, epochs=8, verbose=0)
    assert model.predict(x[:5]).dtype == F32
    _loss, acc = model.evaluate(x[2400:], y[2400:], verbose=0)
    pred = np.argmax(model.predict(x[2400:]), 1)
    assert acc == pytest.approx(np.mean(pred == labels[2400:]), abs=1e-6)
    # chance is 0.25
    assert acc > 0.85, (acc, hist.history["loss"])
    assert hist.history["loss"][-1] < hist.history["loss"][0]


# ---------------------------------------------------------------------------
# 9. validation
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,word", [
    ({"momentum": 1.5}, "momentum"), ({"momentum": -0.1}, "momentum"),
    ({"epsilon": 0}, "epsilon"), ({"epsilon": -1e-3}, "epsilon"),
])
def test_bn_constructor_rejects(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BatchNormalization(**kwargs)


@pytest.mark.parametrize("kwargs,word", [
    ({"rate": 1.0}, "rate"), ({"rate": -0.1}, "rate"), ({"rate": 1.5}, "rate"),
    ({"rate": 0.5, "seed": -1}, "seed"), ({"rate": 0.5, "seed": 1.5}, "seed"),
])
def test_dropout_constructor_rejects(kwargs, word):
    with pytest.raises(ValueError, match=word):
        Dropout(**kwargs)


def test_ops_batchnorm_argument_errors_name_the_argument():
    x = np.ones((4, 3))
    x[0] = 2
    with pytest.raises(ValueError, match="gamma"):
        ops.batchnorm_forward(x, np.ones(4))
    with pytest.raises(ValueError, match="gamma"):
        ops.batchnorm_forward(x, np.ones((1, 3)))
    with pytest.raises(TypeError, match="gamma"):
        ops.batchnorm_forward(x, np.ones(3, F32))
    with pytest.raises(ValueError, match="beta"):
        ops.batchnorm_forward(x, np.ones(3), np.zeros(2))
    with pytest.raises(TypeError, match="beta"):
        ops.batchnorm_forward(x, None, np.zeros(3, F32))
    with pytest.raises(ValueError, match="moving_mean"):
        ops.batchnorm_forward(x, moving_mean=np.zeros(2), moving_variance=np.ones(3))
    with pytest.raises(TypeError, match="moving_variance"):
        ops.batchnorm_forward(x, moving_mean=np.zeros(3), moving_variance=np.ones(3, F32))
    with pytest.raises(ValueError, match="moving_mean"):
        ops.batchnorm_forward(x, training=False)
    with pytest.raises(ValueError, match="momentum"):
        ops.batchnorm_forward(x, momentum=1.5)
    with pytest.raises(ValueError, match="epsilon"):
        ops.batchnorm_forward(x, epsilon=0.0)
    with pytest.raises(TypeError, match="x"):
        ops.batchnorm_forward(x.astype(np.int64))
    with pytest.raises(ValueError, match="x"):
        ops.batchnorm_forward(np.ones(3))
    _, mean, rstd = ops.batchnorm_forward(x)
    with pytest.raises(TypeError, match="mean"):
        ops.batchnorm_backward(x, x, mean.astype(F32), rstd)
    with pytest.raises(ValueError, match="rstd"):
        ops.batchnorm_backward(x, x, mean, rstd[:2])
    with pytest.raises(ValueError, match="dout"):
        ops.batchnorm_backward(x[:2], x, mean, rstd)
    with pytest.raises(TypeError, match="gamma"):
        ops.batchnorm_backward(x, x, mean, rstd, np.ones(3, F32))
    # a refused call leaves the moving statistics alone
    mm, mv = np.full(3, 0.5), np.full(3, 2.0)
    with pytest.raises(ValueError, match="gamma"):
        ops.batchnorm_forward(x, np.ones(4), None, mm, mv)
    assert np.all(mm == 0.5) and np.all(mv == 2.0)


def test_ops_dropout_argument_errors():
    x = np.ones((3, 4))
    for rate in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="rate"):
            ops.dropout(x, rate, 0)
    with pytest.raises(ValueError, match="seed"):
        ops.dropout(x, 0.5, -1)
    with pytest.raises(ValueError, match="seed"):
        ops.dropout(x, 0.5, 2**64)
    with pytest.raises(ValueError, match="offset"):
        ops.dropout(x, 0.5, 0, offset=-1)
    with pytest.raises(TypeError, match="x"):
        ops.dropout(x.astype(np.int32), 0.5, 0)
    with pytest.raises(TypeError, match="out"):
        ops.dropout(x, 0.5, 0, out=np.empty((3, 4), F32))
    with pytest.raises(ValueError, match="out"):
        ops.dropout(x, 0.5, 0, out=np.empty((4, 3)))
