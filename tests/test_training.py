"""Tests of training, callbacks, saving and input validation of fastgrad.

Every expected number comes from an independent reference: NumPy forward
passes and losses written from ``get_weights()`` (recorded by callbacks
before each optimizer step), NumPy metrics on ``predict`` output, a second
model trained by a different route (manual ``train_on_batch`` loops, one
``fit`` split in two around ``save``/``load_model``), a reference
implementation of Keras' EarlyStopping rule, and model files taken apart
and rebuilt by hand from the documented layout.

Layout of this file:
  helpers ............ data, models, NumPy references, a recording callback
  1. fit ............. History keys, batch weighting, partial batches,
                       validation, initial_epoch, shuffle=False, penalties
  2. metrics ......... accuracy resolution, mse/mae, metric objects
  3. callbacks ....... hook order, EarlyStopping, TerminateOnNaN,
                       LearningRateScheduler, ModelCheckpoint
  4. verbose ......... what fit prints
  5. save / load ..... round trip, bit-identical resume, float64
  6. atomic save ..... failures during the write
  7. loader .......... damaged and foreign files
  8. validation ...... errors naming the argument, no state change
  9. inference ....... predict / evaluate change nothing
 10. summary
"""
import json
import math
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile

import numpy as np
import pytest

import fastgrad as fg
import fastgrad.saving
from fastgrad.layers import BatchNormalization, Dense, Dropout

F32, F64 = np.float32, np.float64
PROB_EPS = 1e-7


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def blobs(n=100, d=4, k=3, seed=0, dtype=F32):
    """Features and integer labels of k noisy linearly separated classes."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    w = rng.standard_normal((d, k))
    y = np.argmax(x @ w + 0.7 * rng.standard_normal((n, k)), axis=1)
    return x, y


def regression(n=100, d=4, seed=1, dtype=F32):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    y = (np.sin(x @ rng.standard_normal((d, 1))) + 0.1 * rng.standard_normal((n, 1))).astype(dtype)
    return x, y


def one_hot(y, k):
    out = np.zeros((len(y), k), F32)
    out[np.arange(len(y)), y] = 1
    return out


def mlp(d=4, k=3, out_act="softmax", seed=0, dtype="float32", hidden=8, act="tanh", **kw):
    return fg.Sequential([Dense(hidden, activation=act, input_dim=d, **kw),
                          Dense(k, activation=out_act, **kw)], dtype=dtype, seed=seed)


def bn_dropout_model(seed=3, dtype="float32", d=5, k=3):
    return fg.Sequential([
        Dense(16, activation="relu", input_dim=d, use_bias=False),
        BatchNormalization(momentum=0.9),
        Dropout(0.3),
        Dense(8, activation="tanh"),
        Dropout(0.2, seed=11),
        Dense(k, activation="softmax"),
    ], dtype=dtype, seed=seed)


def same_bits(a, b):
    """Bitwise equality of two lists of arrays (NaNs included)."""
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
        if u.tobytes() != v.tobytes():
            return False
    return True


def assert_same_bits(a, b):
    assert same_bits(a, b), "arrays differ: max |diff| = %g" % max(
        float(np.max(np.abs(np.asarray(u, F64) - np.asarray(v, F64)), initial=0))
        for u, v in zip(a, b))


_NP_ACT = {
    None: lambda z: z, "linear": lambda z: z, "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "softmax": lambda z: (lambda e: e / e.sum(1, keepdims=True))(
        np.exp(z - z.max(1, keepdims=True))),
}


def np_forward(weights, acts, x):
    """Float64 forward pass of a Dense-only model from get_weights()."""
    h = np.asarray(x, F64)
    for i, act in enumerate(acts):
        h = _NP_ACT[act](h @ np.asarray(weights[2 * i], F64) + np.asarray(weights[2 * i + 1], F64))
    return h


def np_loss(kind, p, y):
    """Batch-mean loss in float64 from predictions (probabilities or
    outputs, or logits for 'bce_logits')."""
    p = np.asarray(p, F64)
    if kind == "mse":
        return float(np.mean((p - np.asarray(y, F64).reshape(p.shape)) ** 2))
    if kind == "mae":
        return float(np.mean(np.abs(p - np.asarray(y, F64).reshape(p.shape))))
    if kind == "sparse":
        q = np.clip(p[np.arange(len(y)), np.asarray(y)], PROB_EPS, 1 - PROB_EPS)
        return float(-np.mean(np.log(q)))
    if kind == "categorical":
        q = np.clip(p, PROB_EPS, 1 - PROB_EPS)
        return float(-np.mean(np.sum(np.asarray(y, F64) * np.log(q), 1)))
    if kind == "binary":
        t = np.asarray(y, F64).reshape(p.shape)
        q = np.clip(p, PROB_EPS, 1 - PROB_EPS)
        return float(-np.mean(t * np.log(q) + (1 - t) * np.log(1 - q)))
    if kind == "bce_logits":
        t = np.asarray(y, F64).reshape(p.shape)
        return float(np.mean(np.maximum(p, 0) - p * t + np.log1p(np.exp(-np.abs(p)))))
    raise AssertionError(kind)


def np_accuracy(kind, p, y, threshold=0.5):
    p = np.asarray(p, F64)
    if kind == "sparse":
        return float(np.mean(np.argmax(p, 1) == np.asarray(y)))
    if kind == "categorical":
        return float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
    t = np.asarray(y, F64).reshape(p.shape) > 0.5
    if kind == "binary":
        return float(np.mean((p > threshold) == t))
    if kind == "bce_logits":
        return float(np.mean((p > 0) == t))
    raise AssertionError(kind)


class Recorder(fg.callbacks.Callback):
    """Records every hook; with ``x`` and ``batch_size`` (shuffle=False runs)
    also the weights and the predictions on each batch before its step."""

    def __init__(self, x=None, batch_size=None, record_weights=False, record_preds=False):
        super().__init__()
        self.x, self.bs = x, batch_size
        self.record_weights, self.record_preds = record_weights, record_preds
        self.events, self.epoch = [], None
        self.batch_losses, self.weights_before, self.preds_before = {}, {}, {}
        self.epoch_logs, self.epoch_weights, self.lr_at_epoch_begin = {}, {}, {}
        self.batch_sizes = {}

    def on_train_begin(self, logs=None):
        self.events.append(("train_begin",))

    def on_train_end(self, logs=None):
        self.events.append(("train_end",))

    def on_epoch_begin(self, epoch, logs=None):
        self.events.append(("epoch_begin", epoch))
        self.epoch = epoch
        for d in (self.batch_losses, self.weights_before, self.preds_before, self.batch_sizes):
            d[epoch] = []
        opt = self.model.optimizer
        self.lr_at_epoch_begin[epoch] = opt.learning_rate

    def on_batch_begin(self, batch, logs=None):
        self.events.append(("batch_begin", batch))
        if self.x is not None:
            sl = slice(batch * self.bs, min((batch + 1) * self.bs, len(self.x)))
            self.batch_sizes[self.epoch].append(sl.stop - sl.start)
            if self.record_weights:
                self.weights_before[self.epoch].append(self.model.get_weights())
            if self.record_preds:
                self.preds_before[self.epoch].append(self.model.predict(self.x[sl]))

    def on_batch_end(self, batch, logs=None):
        self.events.append(("batch_end", batch))
        self.batch_losses[self.epoch].append(logs["loss"])

    def on_epoch_end(self, epoch, logs=None):
        self.events.append(("epoch_end", epoch))
        self.epoch_logs[epoch] = dict(logs)
        self.epoch_weights[epoch] = self.model.get_weights()


class Inject(fg.callbacks.Callback):
    """Puts a crafted value under ``key`` into the epoch logs (place it before
    the callback that monitors it) and keeps the weights of each epoch."""

    def __init__(self, key, values):
        super().__init__()
        self.key, self.values, self.weights = key, list(values), {}

    def on_epoch_end(self, epoch, logs=None):
        logs[self.key] = self.values[epoch]
        self.weights[epoch] = self.model.get_weights()


def batch_slices(n, bs):
    return [slice(s, min(s + bs, n)) for s in range(0, n, bs)]


# ---------------------------------------------------------------------------
# 1. fit
# ---------------------------------------------------------------------------

def test_history_keys_and_lengths():
    x, labels = blobs(120)
    xv, lv = blobs(40, seed=5)
    y, yv = one_hot(labels, 3), one_hot(lv, 3)
    model = mlp()
    model.compile("adam", "categorical_crossentropy", metrics=["accuracy", "mae"])
    h = model.fit(x, y, epochs=3, batch_size=32, validation_data=(xv, yv), verbose=0)
    assert isinstance(h, fg.callbacks.History)
    assert model.history is h
    assert set(h.history) == {"loss", "accuracy", "mae", "val_loss", "val_accuracy", "val_mae",
                              "grad_norm", "clip_rate"}
    assert all(len(v) == 3 for v in h.history.values())
    assert h.epoch == [0, 1, 2]
    assert all(isinstance(v, float) and math.isfinite(v) for vs in h.history.values() for v in vs)
    assert all(0 <= v <= 1 for v in h.history["accuracy"] + h.history["clip_rate"])
    assert all(v > 0 for v in h.history["grad_norm"])

    # without validation nor metrics: only the training keys
    model2 = mlp()
    model2.compile("sgd", "categorical_crossentropy")
    h2 = model2.fit(x, y, epochs=2, verbose=0)
    assert set(h2.history) == {"loss", "grad_norm", "clip_rate"}


@pytest.mark.parametrize("n,bs", [(100, 32), (64, 32), (37, 50), (10, 3)])
def test_epoch_loss_is_batch_size_weighted_mean_and_matches_numpy(n, bs):
    x, y = blobs(n)
    model = mlp()
    model.compile(fg.optimizers.SGD(0.2), "sparse_categorical_crossentropy", ["accuracy"])
    rec = Recorder(x, bs, record_weights=True, record_preds=True)
    h = model.fit(x, y, epochs=3, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec])
    sl = batch_slices(n, bs)
    sizes = np.array([s.stop - s.start for s in sl])
    for e in range(3):
        losses = np.array(rec.batch_losses[e])
        assert len(losses) == len(sl) == math.ceil(n / bs)
        assert rec.batch_sizes[e] == list(sizes)
        # every batch's reported loss: NumPy's loss at the weights before the step
        for i, s in enumerate(sl):
            p = np_forward(rec.weights_before[e][i], ["tanh", "softmax"], x[s])
            assert losses[i] == pytest.approx(np_loss("sparse", p, y[s]), rel=2e-5)
            np.testing.assert_allclose(rec.preds_before[e][i], p, rtol=2e-5, atol=1e-6)
        expected = float(np.sum(losses * sizes) / n)
        assert h.history["loss"][e] == pytest.approx(expected, rel=1e-12, abs=1e-15)
        acc = np.array([np_accuracy("sparse", p, y[s])
                        for p, s in zip(rec.preds_before[e], sl)])
        assert h.history["accuracy"][e] == pytest.approx(float(np.sum(acc * sizes) / n),
                                                         abs=1e-12)
    if len(set(sizes)) > 1:
        # the weighting matters for this data: an unweighted mean is different
        unweighted = [float(np.mean(rec.batch_losses[e])) for e in range(3)]
        assert any(abs(u - w) > 1e-6 for u, w in zip(unweighted, h.history["loss"]))


def test_grad_norm_and_clip_rate_match_numpy_gradients():
    x, y = regression(90, 3)
    bs = 16
    sl = batch_slices(90, bs)

    def run(clip):
        model = fg.Sequential([Dense(1, input_dim=3)], seed=4)
        model.compile(fg.optimizers.SGD(0.05, global_clipnorm=clip), "mse")
        rec = Recorder(x, bs, record_weights=True)
        h = model.fit(x, y, epochs=4, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec])
        norms = []
        for e in range(4):
            row = []
            for w, s in zip(rec.weights_before[e], sl):
                k, b = np.asarray(w[0], F64), np.asarray(w[1], F64)
                r = x[s].astype(F64) @ k + b - y[s].astype(F64)
                gk = 2.0 / len(r) * x[s].astype(F64).T @ r
                gb = 2.0 / len(r) * r.sum(0)
                row.append(math.sqrt(float(np.sum(gk ** 2) + np.sum(gb ** 2))))
            norms.append(row)
        return h, np.array(norms)

    h, norms = run(None)
    np.testing.assert_allclose(h.history["grad_norm"], norms.mean(1), rtol=1e-4)
    assert h.history["clip_rate"] == [0.0] * 4
    # a clip threshold in the widest gap between the observed norms
    flat = np.sort(norms.ravel())
    gaps = flat[1:] / flat[:-1]
    j = int(np.argmax(gaps[2:-2])) + 2
    c = float(math.sqrt(flat[j] * flat[j + 1]))
    h2, norms2 = run(c)
    assert np.min(np.abs(norms2 / c - 1)) > 1e-3, "ill-posed threshold"
    np.testing.assert_allclose(h2.history["grad_norm"], norms2.mean(1), rtol=1e-4)
    np.testing.assert_allclose(h2.history["clip_rate"], (norms2 > c).mean(1), atol=1e-12)
    assert 0 < np.mean(h2.history["clip_rate"]) < 1
    h3, _ = run(1e-6)
    assert h3.history["clip_rate"] == [1.0] * 4


def test_validation_data_matches_numpy_on_predictions():
    x, y = blobs(146)
    x, y, xv, yv = x[:96], y[:96], x[96:], y[96:]
    model = mlp()
    model.compile(fg.optimizers.Adam(0.02), "sparse_categorical_crossentropy", ["accuracy"])

    class ValRef(fg.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ref = []

        def on_epoch_end(self, epoch, logs=None):
            p = np_forward(self.model.get_weights(), ["tanh", "softmax"], xv)
            self.ref.append((np_loss("sparse", p, yv), np_accuracy("sparse", p, yv),
                             self.model.evaluate(xv, yv, batch_size=7, verbose=0)))

    ref = ValRef()
    h = model.fit(x, y, epochs=4, batch_size=20, validation_data=(xv, yv), verbose=0,
                  callbacks=[ref])
    for e, (loss, acc, ev) in enumerate(ref.ref):
        assert h.history["val_loss"][e] == pytest.approx(loss, rel=2e-5)
        assert h.history["val_accuracy"][e] == pytest.approx(acc, abs=1e-12)
        assert h.history["val_loss"][e] == pytest.approx(ev[0], rel=1e-5)
        assert h.history["val_accuracy"][e] == pytest.approx(ev[1], abs=1e-12)
    # training improved the validation loss
    assert h.history["val_loss"][-1] < h.history["val_loss"][0]
    # validation_data as a list works the same way
    m2 = mlp()
    m2.compile(fg.optimizers.Adam(0.02), "sparse_categorical_crossentropy", ["accuracy"])
    h2 = m2.fit(x, y, epochs=4, batch_size=20, validation_data=[xv, yv], verbose=0)
    assert h2.history == {k: v for k, v in h.history.items()}


@pytest.mark.parametrize("split,n", [(0.25, 100), (0.2, 50), (0.1, 73)])
def test_validation_split_takes_the_last_rows_before_shuffling(split, n):
    x, y = blobs(n)
    cut = int(math.floor(n * (1 - split)))   # Keras: floor(n * (1 - split)) training rows
    a = mlp(seed=2)
    a.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    ha = a.fit(x, y, epochs=3, batch_size=16, validation_split=split, shuffle=True, verbose=0)
    b = mlp(seed=2)
    b.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    hb = b.fit(x[:cut], y[:cut], epochs=3, batch_size=16, validation_data=(x[cut:], y[cut:]),
               shuffle=True, verbose=0)
    assert_same_bits(a.get_weights(), b.get_weights())
    assert ha.history == hb.history
    p = a.predict(x[cut:])
    assert ha.history["val_loss"][-1] == pytest.approx(np_loss("sparse", p, y[cut:]), rel=2e-5)
    # the first rows instead would give other weights
    c = mlp(seed=2)
    c.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    c.fit(x[n - cut:], y[n - cut:], epochs=3, batch_size=16, shuffle=True, verbose=0)
    assert not same_bits(a.get_weights(), c.get_weights())


def test_initial_epoch():
    x, y = blobs(80)
    a = mlp(seed=6)
    a.compile("adam", "sparse_categorical_crossentropy")
    rec = Recorder()
    h = a.fit(x, y, epochs=5, initial_epoch=3, batch_size=16, verbose=0, callbacks=[rec])
    assert h.epoch == [3, 4]
    assert len(h.history["loss"]) == 2
    assert [e for e in rec.events if e[0] == "epoch_begin"] == [("epoch_begin", 3),
                                                               ("epoch_begin", 4)]
    assert a.optimizer.iterations == 2 * 5
    # the same as two epochs from epoch 0
    b = mlp(seed=6)
    b.compile("adam", "sparse_categorical_crossentropy")
    hb = b.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert_same_bits(a.get_weights(), b.get_weights())
    assert h.history == hb.history
    # initial_epoch == epochs trains nothing
    w = a.get_weights()
    h0 = a.fit(x, y, epochs=5, initial_epoch=5, verbose=0)
    assert h0.history == {} and h0.epoch == []
    assert_same_bits(w, a.get_weights())


@pytest.mark.parametrize("build", ["mlp", "bn_dropout"])
@pytest.mark.parametrize("metrics", [None, ["accuracy"]])
def test_shuffle_false_is_a_train_on_batch_loop(build, metrics):
    n, bs, epochs = 100, 32, 3
    x, y = blobs(n, d=5)

    def make():
        m = mlp(d=5, seed=8) if build == "mlp" else bn_dropout_model(seed=8)
        m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", metrics)
        return m

    a = make()
    rec = Recorder()
    a.fit(x, y, epochs=epochs, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec])
    b = make()
    manual = []
    for _ in range(epochs):
        for s in batch_slices(n, bs):
            r = b.train_on_batch(x[s], y[s])
            manual.append(r if metrics is None else r[0])
    assert_same_bits(a.get_weights(), b.get_weights())
    assert_same_bits(list(a.optimizer.variables().values()),
                     list(b.optimizer.variables().values()))
    assert a.optimizer.iterations == b.optimizer.iterations == epochs * math.ceil(n / bs)
    fit_losses = [l for e in range(epochs) for l in rec.batch_losses[e]]
    assert fit_losses == manual
    # shuffling changes the result (the test above can fail)
    c = make()
    c.fit(x, y, epochs=epochs, batch_size=bs, shuffle=True, verbose=0)
    assert not same_bits(a.get_weights(), c.get_weights())


def test_regularization_penalties_are_in_the_reported_loss():
    x, y = regression(70, 4)
    xv, yv = regression(30, 4, seed=2)
    l2k, l1b, l1o, l2o = 0.01, 0.02, 0.003, 0.02
    model = fg.Sequential([
        Dense(6, activation="tanh", input_dim=4, kernel_regularizer=fg.regularizers.L2(l2k),
              bias_regularizer=fg.regularizers.L1(l1b)),
        Dense(1, kernel_regularizer=fg.regularizers.L1L2(l1=l1o, l2=l2o)),
    ], seed=5)
    model.compile(fg.optimizers.SGD(0.05), "mse")
    bs = 16
    rec = Recorder(x, bs, record_weights=True)
    h = model.fit(x, y, epochs=3, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec],
                  validation_data=(xv, yv))

    def penalty(w):
        w = [np.asarray(a, F64) for a in w]
        return (l2k * np.sum(w[0] ** 2) + l1b * np.sum(np.abs(w[1]))
                + l1o * np.sum(np.abs(w[2])) + l2o * np.sum(w[2] ** 2))

    sl = batch_slices(70, bs)
    for e in range(3):
        sizes = np.array([s.stop - s.start for s in sl])
        expect = []
        for w, s in zip(rec.weights_before[e], sl):
            data = np_loss("mse", np_forward(w, ["tanh", None], x[s]), y[s])
            pen = penalty(w)
            assert pen > 1e-3 * data   # big enough to be seen
            expect.append(data + pen)
        np.testing.assert_allclose(rec.batch_losses[e], expect, rtol=2e-5)
        assert h.history["loss"][e] == pytest.approx(np.sum(np.array(expect) * sizes) / 70,
                                                     rel=2e-5)
        wend = rec.epoch_weights[e]
        val = np_loss("mse", np_forward(wend, ["tanh", None], xv), yv) + penalty(wend)
        assert h.history["val_loss"][e] == pytest.approx(val, rel=2e-5)
    # train_on_batch and evaluate report it too
    w = model.get_weights()
    ev = model.evaluate(xv, yv, verbose=0)
    assert ev == pytest.approx(np_loss("mse", np_forward(w, ["tanh", None], xv), yv)
                               + penalty(w), rel=2e-5)
    tb = model.train_on_batch(x[:10], y[:10])
    assert tb == pytest.approx(np_loss("mse", np_forward(w, ["tanh", None], x[:10]), y[:10])
                               + penalty(w), rel=2e-5)


# ---------------------------------------------------------------------------
# 2. metrics
# ---------------------------------------------------------------------------

def _classification_case(kind, n=90, seed=0):
    x, labels = blobs(n, k=3 if kind in ("sparse", "categorical") else 2, seed=seed)
    if kind == "sparse":
        return x, labels, mlp(), "sparse_categorical_crossentropy"
    if kind == "categorical":
        return x, one_hot(labels, 3), mlp(), "categorical_crossentropy"
    y = labels.reshape(-1, 1).astype(F32)
    if kind == "binary":
        return x, y, mlp(k=1, out_act="sigmoid"), "binary_crossentropy"
    return x, y, mlp(k=1, out_act=None), fg.losses.BinaryCrossentropy(from_logits=True)


@pytest.mark.parametrize("kind", ["sparse", "categorical", "binary", "bce_logits"])
def test_accuracy_resolves_from_the_loss(kind):
    x, y, model, loss = _classification_case(kind)
    model.compile(fg.optimizers.SGD(0.1), loss, metrics=["accuracy"])
    # evaluate against NumPy on predictions (untrained: accuracy strictly between 0 and 1)
    p = model.predict(x)
    acc0 = np_accuracy(kind, p, y)
    assert 0 < acc0 < 1
    loss0, accm = model.evaluate(x, y, batch_size=16, verbose=0)
    assert accm == pytest.approx(acc0, abs=1e-12)
    assert loss0 == pytest.approx(np_loss(kind, p, y), rel=2e-5)
    # fit: per-epoch training accuracy is the weighted mean over batches of the
    # accuracy of the predictions before each step
    bs = 25
    rec = Recorder(x, bs, record_preds=True)
    h = model.fit(x, y, epochs=2, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec])
    sl = batch_slices(len(x), bs)
    sizes = np.array([s.stop - s.start for s in sl])
    for e in range(2):
        accs = [np_accuracy(kind, p, y[s]) for p, s in zip(rec.preds_before[e], sl)]
        assert h.history["accuracy"][e] == pytest.approx(float(np.sum(np.array(accs) * sizes)
                                                               / len(x)), abs=1e-12)
        for i, (p, s) in enumerate(zip(rec.preds_before[e], sl)):
            assert rec.batch_losses[e][i] == pytest.approx(np_loss(kind, p, y[s]), rel=2e-5)
    # the alias "acc" is the same metric, logged as "accuracy"
    m2 = _classification_case(kind)[2]
    m2.compile(fg.optimizers.SGD(0.1), loss, metrics=["acc"])
    assert m2.evaluate(x, y, verbose=0)[1] == pytest.approx(np_accuracy(kind, m2.predict(x), y),
                                                            abs=1e-12)


def test_mse_and_mae_metrics():
    x, y = regression(77, 4)
    model = mlp(k=1, out_act=None)
    model.compile(fg.optimizers.Adam(0.01), "huber", metrics=["mse", "mae"])
    p = model.predict(x)
    loss, mse, mae = model.evaluate(x, y, batch_size=10, verbose=0)
    assert mse == pytest.approx(np_loss("mse", p, y), rel=1e-6)
    assert mae == pytest.approx(np_loss("mae", p, y), rel=1e-6)
    e = np.asarray(p, F64) - y
    huber = np.mean(np.where(np.abs(e) <= 1, 0.5 * e * e, np.abs(e) - 0.5))
    assert loss == pytest.approx(huber, rel=2e-5)
    bs = 20
    rec = Recorder(x, bs, record_preds=True)
    h = model.fit(x, y, epochs=2, batch_size=bs, shuffle=False, verbose=0, callbacks=[rec])
    assert set(h.history) == {"loss", "mse", "mae", "grad_norm", "clip_rate"}
    sl = batch_slices(77, bs)
    sizes = np.array([s.stop - s.start for s in sl])
    for ep in range(2):
        for name in ("mse", "mae"):
            vals = [np_loss(name, p, y[s]) for p, s in zip(rec.preds_before[ep], sl)]
            assert h.history[name][ep] == pytest.approx(np.sum(np.array(vals) * sizes) / 77,
                                                        rel=1e-5)
    # long names and a single string
    m2 = mlp(k=1, out_act=None)
    m2.compile("sgd", "mse", metrics="mean_absolute_error")
    assert m2.evaluate(x, y, verbose=0)[1] == pytest.approx(np_loss("mae", m2.predict(x), y),
                                                            rel=1e-6)


def test_metric_objects():
    x, labels = blobs(120, k=2, seed=4)
    y = labels.reshape(-1, 1).astype(F32)
    model = mlp(k=1, out_act="sigmoid", seed=1)
    model.compile(fg.optimizers.Adam(0.05), "binary_crossentropy",
                  metrics=[fg.metrics.BinaryAccuracy(threshold=0.7),
                           fg.metrics.MeanAbsoluteError()])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    p = model.predict(x)
    loss, acc, mae = model.evaluate(x, y, verbose=0)
    assert acc == pytest.approx(np_accuracy("binary", p, y, threshold=0.7), abs=1e-12)
    # the threshold matters on this data
    assert np_accuracy("binary", p, y, 0.7) != np_accuracy("binary", p, y, 0.5)
    assert mae == pytest.approx(np_loss("mae", p, y), rel=1e-6)
    # a metric object on a fused sigmoid trained from logits keeps its threshold
    m2 = mlp(k=1, out_act=None, seed=1)
    m2.compile("adam", fg.losses.BinaryCrossentropy(from_logits=True),
               metrics=[fg.metrics.BinaryAccuracy(threshold=0.7)])
    z = m2.predict(x)
    thr = math.log(0.7 / 0.3)
    assert m2.evaluate(x, y, verbose=0)[1] == pytest.approx(
        float(np.mean((z > thr) == (y > 0.5))), abs=1e-12)
    # categorical/sparse accuracy objects
    xs, ys = blobs(60)
    m3 = mlp()
    m3.compile("adam", "sparse_categorical_crossentropy",
               metrics=[fg.metrics.SparseCategoricalAccuracy()])
    p3 = m3.predict(xs)
    assert m3.evaluate(xs, ys, verbose=0)[1] == pytest.approx(np_accuracy("sparse", p3, ys),
                                                              abs=1e-12)
    m4 = mlp(k=3, out_act="softmax")
    m4.compile("adam", "categorical_crossentropy",
               metrics=[fg.metrics.CategoricalAccuracy(), fg.metrics.MeanSquaredError()])
    p4 = m4.predict(xs)
    _, a4, mse4 = m4.evaluate(xs, one_hot(ys, 3), verbose=0)
    assert a4 == pytest.approx(np_accuracy("categorical", p4, one_hot(ys, 3)), abs=1e-12)
    assert mse4 == pytest.approx(np_loss("mse", p4, one_hot(ys, 3)), rel=1e-6)
    with pytest.raises(ValueError, match="metric"):
        m3.compile("adam", "sparse_categorical_crossentropy", metrics=["f1_score_xyz"])
    with pytest.raises((TypeError, ValueError), match="metric"):
        m3.compile("adam", "sparse_categorical_crossentropy", metrics=[42])


# ---------------------------------------------------------------------------
# 3. callbacks
# ---------------------------------------------------------------------------

def test_callback_hook_order_and_counts():
    n, bs, epochs = 100, 32, 3
    x, y = blobs(n)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    r1, r2 = Recorder(), Recorder()
    model.fit(x, y, epochs=epochs, batch_size=bs, verbose=0, callbacks=[r1, r2])
    nb = math.ceil(n / bs)
    expected = [("train_begin",)]
    for e in range(epochs):
        expected.append(("epoch_begin", e))
        for b in range(nb):
            expected += [("batch_begin", b), ("batch_end", b)]
        expected.append(("epoch_end", e))
    expected.append(("train_end",))
    assert r1.events == expected
    assert r2.events == expected
    assert r1.model is model and r2.model is model
    # epoch logs carry the loss
    assert all("loss" in r1.epoch_logs[e] for e in range(epochs))
    # the base class's hooks all exist and do nothing
    cb = fg.callbacks.Callback()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[cb])
    assert cb.model is model


class KerasStyle(fg.callbacks.Callback):
    """Overrides only the Keras 3 names of the batch hooks."""

    def __init__(self):
        super().__init__()
        self.events = []

    def on_train_batch_begin(self, batch, logs=None):
        self.events.append(("train_batch_begin", batch))

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_batch_end", batch, logs["loss"]))


class BothNames(Recorder):
    """Overrides on_train_batch_end and hands on to on_batch_end, as a Keras
    subclass calling super() does."""

    def on_train_batch_end(self, batch, logs=None):
        self.events.append(("train_batch_end", batch))
        super().on_train_batch_end(batch, logs)


def test_keras_batch_hooks_fire_and_default_to_the_old_names():
    n, bs, epochs = 50, 16, 2
    x, y = blobs(n)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    keras_cb, old_names, both = KerasStyle(), Recorder(), BothNames()
    patched = fg.callbacks.Callback()
    patched_ends = []
    patched.on_batch_end = lambda batch, logs=None: patched_ends.append(batch)
    model.fit(x, y, epochs=epochs, batch_size=bs, verbose=0, shuffle=False,
              callbacks=[keras_cb, old_names, both, patched])
    nb = math.ceil(n / bs)
    assert [e[:2] for e in keras_cb.events] == [
        (k, b) for _ in range(epochs) for b in range(nb)
        for k in ("train_batch_begin", "train_batch_end")]
    losses = [e[2] for e in keras_cb.events if e[0] == "train_batch_end"]
    assert losses == old_names.batch_losses[0] + old_names.batch_losses[1]
    assert [e for e in old_names.events if "batch" in e[0]] == [
        (k, b) for _ in range(epochs) for b in range(nb) for k in ("batch_begin", "batch_end")]
    assert [e for e in both.events if "batch" in e[0]] == [
        e for _ in range(epochs) for b in range(nb)
        for e in (("batch_begin", b), ("train_batch_end", b), ("batch_end", b))]
    assert patched_ends == list(range(nb)) * epochs


def test_callbacks_get_the_keras_params_and_the_model():
    x, y = blobs(50)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    cb = fg.callbacks.Callback()
    assert cb.params is None and cb.model is None
    h = model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[cb])
    assert cb.params == {"verbose": 0, "epochs": 3, "steps": 4}
    assert cb.model is model and h.params == cb.params and h.model is model
    model.fit(x, y, epochs=1, batch_size=50, verbose=2, callbacks=[cb])
    assert cb.params == {"verbose": 2, "epochs": 1, "steps": 1}


def keras_early_stopping(values, mode, min_delta, patience):
    """Keras 3's rule: returns (stopped_epoch or None, best_epoch)."""
    best, best_epoch, wait = None, None, 0
    for epoch, v in enumerate(values):
        wait += 1
        if best is None or (v + min_delta < best if mode == "min" else v - min_delta > best):
            best, best_epoch, wait = v, epoch, 0
            continue
        if wait >= patience and epoch > 0:
            return epoch, best_epoch
    return None, best_epoch


class DummyModel:
    def __init__(self):
        self.stop_training = False
        self.epoch = None
        self.restored = []
        self.optimizer = None

    def get_weights(self):
        return [np.array([float(self.epoch)])]

    def set_weights(self, w):
        self.restored.append([a.copy() for a in w])


def drive_early_stopping(cb, values, key):
    d = DummyModel()
    cb.set_model(d)
    cb.on_train_begin()
    ran = 0
    for epoch, v in enumerate(values):
        d.epoch = epoch
        cb.on_epoch_begin(epoch)
        cb.on_epoch_end(epoch, {"loss": 1.0, "val_loss": 1.0, key: v})
        ran += 1
        if d.stop_training:
            break
    cb.on_train_end()
    return d, ran


@pytest.mark.parametrize("values,monitor,mode,min_delta,patience,stop,best", [
    ([1.0, 0.8, 0.79, 0.85, 0.9, 0.1], "val_loss", "min", 0.05, 2, 3, 1),
    ([1.0, 0.8, 0.79, 0.85, 0.9, 0.1], "val_loss", "min", 0.0, 2, 4, 2),
    ([1.0, 1.0], "val_loss", "min", 0.0, 0, 1, 0),             # equal is no improvement
    ([0.5, 0.6, 0.7, 0.65, 0.6, 0.55], "val_accuracy", "auto", 0.0, 2, 4, 2),  # auto: max
    ([0.5, 0.4, 0.3, 0.2], "val_loss", "max", 0.0, 1, 1, 0),
    ([3.0, 2.0, 1.0, 0.5], "val_loss", "auto", 0.0, 0, None, 3),  # never stops
    ([5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1], "loss", "min", 0.0, 3, 6, 3),
])
def test_early_stopping_driven_directly(values, monitor, mode, min_delta, patience, stop, best):
    resolved = mode if mode != "auto" else ("max" if "acc" in monitor else "min")
    assert keras_early_stopping(values, resolved, min_delta, patience) == (stop, best)
    cb = fg.callbacks.EarlyStopping(monitor=monitor, min_delta=min_delta, patience=patience,
                                    mode=mode, restore_best_weights=True)
    d, ran = drive_early_stopping(cb, values, monitor)
    if stop is None:
        assert ran == len(values) and not d.stop_training
    else:
        assert ran == stop + 1 and d.stop_training
        assert cb.stopped_epoch == stop
        assert len(d.restored) == 1 and d.restored[0][0][0] == best
    assert cb.best_epoch == best
    # without restore_best_weights nothing is put back
    cb2 = fg.callbacks.EarlyStopping(monitor=monitor, min_delta=min_delta, patience=patience,
                                     mode=mode)
    d2, ran2 = drive_early_stopping(cb2, values, monitor)
    assert ran2 == ran and d2.restored == []


def test_early_stopping_matches_reference_on_random_sequences():
    rng = np.random.default_rng(0)
    for trial in range(300):
        # multiples of 1/8: every comparison is exact in binary floating point
        values = list(rng.integers(0, 16, rng.integers(2, 12)) / 8.0)
        mode = ["min", "max"][trial % 2]
        min_delta = float(rng.integers(0, 3)) / 8.0
        patience = int(rng.integers(0, 4))
        stop, best = keras_early_stopping(values, mode, min_delta, patience)
        cb = fg.callbacks.EarlyStopping(monitor="m", min_delta=min_delta, patience=patience,
                                        mode=mode, restore_best_weights=True)
        d, ran = drive_early_stopping(cb, values, "m")
        assert ran == (len(values) if stop is None else stop + 1), (values, mode, min_delta,
                                                                    patience)
        if stop is not None:
            assert d.restored[-1][0][0] == best, (values, mode, min_delta, patience)
    # the instance can be reused: on_train_begin resets it
    cb = fg.callbacks.EarlyStopping(monitor="m", patience=0)
    drive_early_stopping(cb, [1.0, 2.0], "m")
    d, ran = drive_early_stopping(cb, [5.0, 4.0, 3.0], "m")
    assert ran == 3 and not d.stop_training


def test_early_stopping_without_its_metric_warns_and_training_goes_on():
    """Keras 3: EarlyStopping() (val_loss) without validation data warns
    each epoch, naming the metric and the logged ones, and never stops."""
    x, y = blobs(60)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    es = fg.callbacks.EarlyStopping(patience=0)
    with pytest.warns(UserWarning) as record:
        h = model.fit(x, y, epochs=3, verbose=0, callbacks=[es])
    assert len(h.history["loss"]) == 3 and model.optimizer.iterations == 6
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert all("'val_loss'" in m and "loss" in m and "accuracy" in m for m in messages)
    # with the metric there, the same callback works as usual
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.fit(x, y, epochs=2, verbose=0, validation_split=0.2, callbacks=[es])


def test_early_stopping_through_fit_restores_the_best_weights():
    x, y = blobs(64)
    model = mlp()
    model.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    seq = [0.9, 0.5, 0.6, 0.55, 0.7, 0.1, 0.1, 0.1]
    inj = Inject("crafted", seq)
    es = fg.callbacks.EarlyStopping(monitor="crafted", patience=3, mode="min",
                                    restore_best_weights=True)
    h = model.fit(x, y, epochs=len(seq), batch_size=16, verbose=0, callbacks=[inj, es])
    stop, best = keras_early_stopping(seq, "min", 0.0, 3)
    assert (stop, best) == (4, 1)
    assert len(h.history["loss"]) == stop + 1
    assert model.optimizer.iterations == (stop + 1) * 4
    assert_same_bits(model.get_weights(), inj.weights[best])
    assert not same_bits(inj.weights[stop], inj.weights[best])
    # monitoring a real logged value (val_loss) also works
    m2 = mlp()
    m2.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    es2 = fg.callbacks.EarlyStopping(monitor="val_loss", patience=1, min_delta=1e9)
    h2 = m2.fit(x, y, epochs=10, verbose=0, validation_data=(x, y), callbacks=[es2])
    assert len(h2.history["loss"]) == 2   # nothing improves by 1e9: stops at epoch 1


def test_terminate_on_nan_driven_directly(capsys):
    cb = fg.callbacks.TerminateOnNaN()
    d = DummyModel()
    cb.set_model(d)
    for v in (1.0, 1e300, -5.0):
        cb.on_batch_end(0, {"loss": v})
        assert not d.stop_training
    for v in (float("nan"), float("inf"), -float("inf")):
        d.stop_training = False
        cb.on_batch_end(3, {"loss": v})
        assert d.stop_training


def test_terminate_on_nan_stops_an_exploding_fit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(F32)
    y = rng.standard_normal((64, 1)).astype(F32)

    def run(cbs):
        m = fg.Sequential([Dense(8, input_dim=4), Dense(1)], seed=0)
        m.compile(fg.optimizers.SGD(learning_rate=100.0), "mse")
        rec = Recorder()
        h = m.fit(x, y, epochs=5, batch_size=8, verbose=0, callbacks=cbs + [rec])
        return m, h, rec

    _, h0, rec0 = run([])
    losses = [l for e in sorted(rec0.batch_losses) for l in rec0.batch_losses[e]]
    bad = [i for i, l in enumerate(losses) if not math.isfinite(l)]
    assert bad, "the learning rate does not make the loss explode"
    first = bad[0]
    m, h, rec = run([fg.callbacks.TerminateOnNaN()])
    ran = [l for e in sorted(rec.batch_losses) for l in rec.batch_losses[e]]
    assert len(ran) == first + 1
    assert not math.isfinite(ran[-1])
    assert len(h.history["loss"]) == first // 8 + 1     # the stopping epoch is logged
    assert rec.events[-1] == ("train_end",)
    assert all(np.isfinite(w).all() for w in m.get_weights())


def test_learning_rate_scheduler_sets_the_rate_per_epoch():
    x, y = blobs(90)
    bs, epochs = 32, 4
    rates = [0.2 * 0.5 ** e for e in range(epochs)]
    model = mlp()
    model.compile(fg.optimizers.SGD(0.7), "sparse_categorical_crossentropy")
    sched = fg.callbacks.LearningRateScheduler(lambda epoch: 0.2 * 0.5 ** epoch)
    rec = Recorder()
    h = model.fit(x, y, epochs=epochs, batch_size=bs, shuffle=False, verbose=0,
                  callbacks=[sched, rec])
    assert [rec.lr_at_epoch_begin[e] for e in range(epochs)] == pytest.approx(rates,
                                                                               rel=1e-15)
    assert model.optimizer.learning_rate == pytest.approx(rates[-1], rel=1e-15)
    # the same as SGD at those rates, step by step
    ref = mlp()
    ref.compile(fg.optimizers.SGD(rates[0]), "sparse_categorical_crossentropy")
    for e in range(epochs):
        ref.optimizer.learning_rate = rates[e]
        for s in batch_slices(90, bs):
            ref.train_on_batch(x[s], y[s])
    assert_same_bits(model.get_weights(), ref.get_weights())
    # a constant rate would give other weights
    other = mlp()
    other.compile(fg.optimizers.SGD(0.2), "sparse_categorical_crossentropy")
    other.fit(x, y, epochs=epochs, batch_size=bs, shuffle=False, verbose=0)
    assert not same_bits(model.get_weights(), other.get_weights())

    # the two-argument form receives the current rate
    seen = []

    def halve(epoch, lr):
        seen.append((epoch, lr))
        return lr / 2

    m2 = mlp()
    m2.compile(fg.optimizers.SGD(0.4), "sparse_categorical_crossentropy")
    m2.fit(x, y, epochs=3, verbose=0, callbacks=[fg.callbacks.LearningRateScheduler(halve)])
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [lr for _, lr in seen] == pytest.approx([0.4, 0.2, 0.1], rel=1e-15)
    assert m2.optimizer.learning_rate == pytest.approx(0.05, rel=1e-15)


def test_learning_rate_scheduler_refuses_an_optimizer_with_a_schedule():
    """Keras raises TypeError rather than replace a schedule with a float."""
    x, y = blobs(60)
    model = mlp()
    sched = fg.schedules.CosineDecay(0.01, 100)
    model.compile(fg.optimizers.Adam(sched), "sparse_categorical_crossentropy")
    before = _state(model)
    cb = fg.callbacks.LearningRateScheduler(lambda epoch, lr: 0.1)
    with pytest.raises(TypeError, match=r"learning_rate.*CosineDecay"):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[cb])
    _assert_state(model, before)
    assert model.optimizer.learning_rate is sched
    model.fit(x, y, epochs=1, verbose=0)      # trains on with its schedule


def test_optimizer_learning_rate_assignment_follows_keras():
    opt = fg.optimizers.SGD(fg.schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match=r"learning_rate.*ExponentialDecay"):
        opt.learning_rate = 0.01
    assert isinstance(opt.learning_rate, fg.schedules.ExponentialDecay)
    opt.learning_rate = fg.schedules.PiecewiseConstantDecay([5], [0.2, 0.1])  # allowed
    assert opt.current_learning_rate() == 0.2
    opt = fg.optimizers.SGD(0.1)
    opt.learning_rate = 0.05
    assert opt.learning_rate == 0.05 and opt.get_config()["learning_rate"] == 0.05
    for bad in (-0.1, float("nan"), "fast", None):
        with pytest.raises((ValueError, TypeError), match="learning_rate"):
            opt.learning_rate = bad
    assert opt.learning_rate == 0.05
    opt.learning_rate = fg.schedules.CosineDecay(0.1, 10)
    assert opt.current_learning_rate() == pytest.approx(0.1)


def test_learning_rate_scheduler_rate_is_in_the_history():
    """Keras' LearningRateScheduler adds "learning_rate" to the epoch logs,
    and History (which Keras runs after the user's callbacks) records it."""
    x, y = blobs(40)
    model = mlp()
    model.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    rec = Recorder()
    h = model.fit(x, y, epochs=3, verbose=0, callbacks=[
        fg.callbacks.LearningRateScheduler(lambda e: 0.1 / (e + 1)), rec])
    rates = [0.1 / (e + 1) for e in range(3)]
    assert [rec.epoch_logs[e]["learning_rate"] for e in range(3)] == pytest.approx(rates)
    assert "learning_rate" in h.history, sorted(h.history)
    assert h.history["learning_rate"] == pytest.approx(rates)


def test_model_checkpoint_every_epoch(tmp_path):
    x, y = blobs(64)
    xv, yv = blobs(20, seed=3)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    rec = Recorder()
    pattern = str(tmp_path / "ck-{epoch}.fgm")
    ck = fg.callbacks.ModelCheckpoint(pattern, save_best_only=False)
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, validation_data=(xv, yv),
              callbacks=[ck, rec])
    assert sorted(os.listdir(tmp_path)) == ["ck-1.fgm", "ck-2.fgm", "ck-3.fgm"]
    for e in range(3):
        loaded = fg.load_model(str(tmp_path / f"ck-{e + 1}.fgm"))
        assert_same_bits(loaded.get_weights(), rec.epoch_weights[e])
        assert loaded.optimizer.iterations == (e + 1) * 4
    # logged values in the name
    ck2 = fg.callbacks.ModelCheckpoint(str(tmp_path / "v-{epoch:02d}-{val_loss:.4f}.fgm"),
                                       monitor="val_loss")
    h = model.fit(x, y, epochs=2, verbose=0, validation_data=(xv, yv), callbacks=[ck2])
    for e in range(2):
        assert (tmp_path / f"v-{e + 1:02d}-{h.history['val_loss'][e]:.4f}.fgm").is_file()


def test_model_checkpoint_save_best_only(tmp_path):
    x, y = blobs(48)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    seq = [3.0, 1.0, 2.0, 0.5, 0.5, 0.7]
    inj = Inject("crafted", seq)
    ck = fg.callbacks.ModelCheckpoint(str(tmp_path / "best-{epoch}.fgm"), monitor="crafted",
                                      mode="min", save_best_only=True)
    model.fit(x, y, epochs=len(seq), batch_size=16, verbose=0, callbacks=[inj, ck])
    improved = [e for e in range(len(seq)) if seq[e] < min(seq[:e], default=math.inf)]
    assert improved == [0, 1, 3]
    assert sorted(os.listdir(tmp_path)) == sorted(f"best-{e + 1}.fgm" for e in improved)
    for e in improved:
        assert_same_bits(fg.load_model(str(tmp_path / f"best-{e + 1}.fgm")).get_weights(),
                         inj.weights[e])
    # one fixed file: it ends holding the best epoch's weights; max mode
    seq2 = [0.1, 0.3, 0.2, 0.25]
    inj2 = Inject("score", seq2)
    path = tmp_path / "fixed.fgm"
    ck2 = fg.callbacks.ModelCheckpoint(str(path), monitor="score", mode="max",
                                       save_best_only=True)
    model.fit(x, y, epochs=4, verbose=0, callbacks=[inj2, ck2])
    assert_same_bits(fg.load_model(str(path)).get_weights(), inj2.weights[1])


def test_model_checkpoint_best_only_without_its_metric_warns_and_saves_nothing(tmp_path):
    """Keras 3: save_best_only with val_loss but no validation data warns each
    epoch and saves nothing; training goes on."""
    x, y = blobs(48)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    ck = fg.callbacks.ModelCheckpoint(str(tmp_path / "best.fgm"), save_best_only=True)
    with pytest.warns(UserWarning, match="'val_loss' available") as record:
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[ck])
    assert len(record) == 2 and len(h.history["loss"]) == 2
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# 4. verbose
# ---------------------------------------------------------------------------

def _fit_printing(capsys, verbose, epochs=3):
    x, y = blobs(70)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    h = model.fit(x, y, epochs=epochs, batch_size=16, verbose=verbose,
                  validation_data=(x[:20], y[:20]))
    return h, capsys.readouterr()


def test_verbose_0_prints_nothing(capsys):
    _, out = _fit_printing(capsys, 0)
    assert out.out == "" and out.err == ""
    x, y = blobs(20)
    m = mlp()
    m.compile("adam", "sparse_categorical_crossentropy")
    m.evaluate(x, y, verbose=0)
    m.predict(x)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def _epoch_line_values(line):
    return {k: float(v) for k, v in re.findall(r"(\w+): (-?[0-9.]+(?:e[-+]?\d+)?|nan|inf)",
                                               line)}


def test_verbose_2_prints_one_line_per_epoch(capsys):
    h, out = _fit_printing(capsys, 2, epochs=3)
    lines = out.out.strip("\n").split("\n")
    assert len(lines) == 3
    for e, line in enumerate(lines):
        assert "\r" not in line
        assert line.startswith(f"Epoch {e + 1}/3")
        vals = _epoch_line_values(line)
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert vals[key] == pytest.approx(h.history[key][e], abs=5.1e-5), key


def test_verbose_1_prints_and_ends_with_the_epoch_summary(capsys):
    h, out = _fit_printing(capsys, 1, epochs=2)
    assert out.out.strip()
    last = out.out.rstrip("\n").split("\n")[-1].split("\r")[-1]
    last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", last)
    assert last.startswith("Epoch 2/2"), repr(last)
    vals = _epoch_line_values(last)
    assert vals["loss"] == pytest.approx(h.history["loss"][-1], abs=5.1e-5)
    assert vals["val_loss"] == pytest.approx(h.history["val_loss"][-1], abs=5.1e-5)
    assert "Epoch 1/2" in out.out


def test_verbose_1_with_a_live_bar_on_a_terminal(capsys, monkeypatch):
    """On a terminal (no tqdm needed) the bar is drawn with carriage returns;
    the output still ends with the epoch summary line."""
    x, y = blobs(70)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    h = model.fit(x, y, epochs=2, batch_size=16, verbose=1)
    out = capsys.readouterr().out
    monkeypatch.undo()
    last = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", out.rstrip("\n").split("\n")[-1].split("\r")[-1])
    assert last.startswith("Epoch 2/2"), repr(out[-300:])
    assert _epoch_line_values(last)["loss"] == pytest.approx(h.history["loss"][-1], abs=5.1e-5)


def test_evaluate_verbose_prints_the_values(capsys):
    x, y = blobs(30)
    m = mlp()
    m.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    capsys.readouterr()
    loss, acc = m.evaluate(x, y)
    vals = _epoch_line_values(capsys.readouterr().out)
    assert vals["loss"] == pytest.approx(loss, abs=5.1e-5)
    assert vals["accuracy"] == pytest.approx(acc, abs=5.1e-5)


# ---------------------------------------------------------------------------
# 5. save / load
# ---------------------------------------------------------------------------

def _resume_model(dtype="float32"):
    model = bn_dropout_model(seed=21, dtype=dtype)
    sched = fg.schedules.ExponentialDecay(0.02, decay_steps=5, decay_rate=0.8)
    model.compile(fg.optimizers.Adam(sched, global_clipnorm=0.5),
                  "sparse_categorical_crossentropy", ["accuracy"])
    return model


def _assert_same_model(a, b):
    assert_same_bits(a.get_weights(), b.get_weights())
    assert a.dtype == b.dtype and a.seed == b.seed and a.name == b.name
    assert [l.kind for l in a.layers] == [l.kind for l in b.layers]
    assert [l.get_config() for l in a.layers] == [l.get_config() for l in b.layers]
    if a.optimizer is None:
        assert b.optimizer is None
        return
    assert type(a.optimizer) is type(b.optimizer)
    assert a.optimizer.get_config() == b.optimizer.get_config()
    va, vb = a.optimizer.variables(), b.optimizer.variables()
    assert sorted(va) == sorted(vb)
    assert_same_bits([va[k] for k in sorted(va)], [vb[k] for k in sorted(vb)])
    assert a.optimizer.iterations == b.optimizer.iterations
    assert a.optimizer.skipped_steps == b.optimizer.skipped_steps
    assert type(a.loss) is type(b.loss) and a.loss.get_config() == b.loss.get_config()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_save_load_round_trip(tmp_path, dtype):
    x, y = blobs(60, d=5, dtype=F64 if dtype == "float64" else F32)
    model = _resume_model(dtype)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert any(np.any(v != 0) for v in model.optimizer.variables().values())
    path = tmp_path / "model.fgm"
    model.save(str(path))
    loaded = fg.load_model(str(path))
    _assert_same_model(model, loaded)
    assert loaded.get_weights()[0].dtype == np.dtype(dtype)
    p, q = model.predict(x), loaded.predict(x)
    assert p.dtype == q.dtype == np.dtype(dtype)
    assert p.tobytes() == q.tobytes()
    assert model.evaluate(x, y, verbose=0) == loaded.evaluate(x, y, verbose=0)
    # also through fg.models.load_model and a pathlib path
    _assert_same_model(model, fg.models.load_model(path))


def test_metric_objects_are_saved_with_their_configuration(tmp_path):
    x, labels = blobs(120, k=2, seed=4)
    y = labels.reshape(-1, 1).astype(F32)
    model = mlp(k=1, out_act="sigmoid", seed=1)
    model.compile(fg.optimizers.Adam(0.05), "mse",
                  metrics=[fg.metrics.BinaryAccuracy(threshold=0.9), "mae",
                           fg.metrics.MeanSquaredError()])
    model.fit(x, y, epochs=3, batch_size=32, verbose=0)
    path = tmp_path / "m.fgm"
    model.save(str(path))
    loaded = fg.load_model(str(path))
    acc = loaded.metrics[0]
    # a BinaryAccuracy with its threshold, not the accuracy the loss (mse) implies
    assert type(acc) is fg.metrics.BinaryAccuracy and acc.threshold == 0.9
    assert [type(m) for m in loaded.metrics] == [type(m) for m in model.metrics]
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
    p = model.predict(x)
    assert model.evaluate(x, y, verbose=0)[1] == pytest.approx(
        np_accuracy("binary", p, y, threshold=0.9), abs=1e-12)
    # a saved model saves the same way again
    loaded.save(str(tmp_path / "again.fgm"))
    assert fg.load_model(str(tmp_path / "again.fgm")).metrics[0].threshold == 0.9


def test_files_with_metric_names_only_still_load(tmp_path, small_file):
    """Files written before metric objects were saved with their
    configuration hold names; they load as before."""
    data, weights = small_file
    _, _, header, _ = split_file(data)
    assert header["compile"]["metrics"] == ["accuracy"]
    m = load_bytes(tmp_path, data)
    assert type(m.metrics[0]) is fg.metrics.SparseCategoricalAccuracy

    def bad(h):
        h["compile"]["metrics"] = [{"class_name": "F1Score", "config": {}}]

    with pytest.raises(ValueError, match="F1Score"):
        load_bytes(tmp_path, _edit(data, bad), "bad.fgm")

    def bad_threshold(h):
        h["compile"]["metrics"] = [{"class_name": "BinaryAccuracy",
                                    "config": {"threshold": 2.0}}]

    with pytest.raises(ValueError, match="threshold"):
        load_bytes(tmp_path, _edit(data, bad_threshold), "bad2.fgm")


def test_binary_accuracy_threshold_is_checked():
    for bad in (0.0, 1.0, -0.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="threshold"):
            fg.metrics.BinaryAccuracy(threshold=bad)


def test_save_load_uncompiled_and_overwrite(tmp_path):
    model = mlp(seed=3)
    model.build()
    path = str(tmp_path / "m.fgm")
    model.save(path)
    loaded = fg.load_model(path)
    _assert_same_model(model, loaded)
    x, y = blobs(40)
    assert model.predict(x).tobytes() == loaded.predict(x).tobytes()
    loaded.compile("adam", "sparse_categorical_crossentropy")
    loaded.fit(x, y, epochs=1, verbose=0)
    loaded.save(path)    # overwrites
    again = fg.load_model(path)
    _assert_same_model(loaded, again)
    assert not same_bits(again.get_weights(), model.get_weights())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resume_after_save_is_bit_identical(tmp_path, dtype):
    x, y = blobs(150, d=5, dtype=F64 if dtype == "float64" else F32)
    xv, yv = blobs(30, d=5, seed=4)
    straight = _resume_model(dtype)
    hs = straight.fit(x, y, epochs=4, batch_size=32, shuffle=True, verbose=0,
                      validation_data=(xv, yv))

    first = _resume_model(dtype)
    h1 = first.fit(x, y, epochs=2, batch_size=32, shuffle=True, verbose=0,
                   validation_data=(xv, yv))
    path = str(tmp_path / "half.fgm")
    first.save(path)
    resumed = fg.load_model(path)
    h2 = resumed.fit(x, y, epochs=4, initial_epoch=2, batch_size=32, shuffle=True, verbose=0,
                     validation_data=(xv, yv))
    _assert_same_model(straight, resumed)
    assert max(hs.history["clip_rate"]) > 0      # global_clipnorm did act
    for k in hs.history:
        assert hs.history[k] == h1.history[k] + h2.history[k], k
    # the test can fail: without the random state (a fresh model with the same
    # weights and optimizer state) the shuffles and dropout masks differ
    fresh = _resume_model(dtype)
    fresh.set_weights(first.get_weights())
    for k, v in fresh.optimizer.variables().items():
        v[...] = first.optimizer.variables()[k]
    fresh.optimizer.iterations = first.optimizer.iterations
    fresh.fit(x, y, epochs=2, batch_size=32, shuffle=True, verbose=0)
    assert not same_bits(fresh.get_weights(), straight.get_weights())


@pytest.mark.parametrize("opt,loss,out", [
    (lambda: fg.optimizers.SGD(0.05, momentum=0.9, nesterov=True, clipnorm=0.5), "mse", None),
    (lambda: fg.optimizers.RMSprop(0.01, momentum=0.5, centered=True, clipvalue=0.1),
     "huber", None),
    (lambda: fg.optimizers.AdamW(fg.schedules.CosineDecay(0.01, 20, warmup_target=0.02,
                                                         warmup_steps=3), amsgrad=True),
     "binary_crossentropy", "sigmoid"),
    (lambda: fg.optimizers.Adagrad(0.1, weight_decay=0.01),
     fg.losses.BinaryCrossentropy(from_logits=True), None),
    (lambda: fg.optimizers.Adam(fg.schedules.PiecewiseConstantDecay([4, 8], [0.02, 0.01, 0.005])),
     "mae", "tanh"),
])
def test_resume_across_optimizers_losses_and_weight_options(tmp_path, opt, loss, out):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((50, 4)).astype(F32)
    y = (x[:, :1] * x[:, 1:2] > 0).astype(F32)

    def make():
        m = fg.Sequential([
            Dense(6, activation="elu", input_dim=4,
                  kernel_regularizer=fg.regularizers.L1L2(l1=0.001, l2=0.01),
                  kernel_constraint=fg.constraints.MaxNorm(1.5),
                  bias_constraint=fg.constraints.NonNeg()),
            Dropout(0.2),
            Dense(1, activation=out, kernel_initializer="he_uniform"),
        ], seed=12)
        m.compile(opt(), loss, metrics=["mae"])
        return m

    straight = make()
    straight.fit(x, y, epochs=4, batch_size=16, verbose=0)
    half = make()
    half.fit(x, y, epochs=2, batch_size=16, verbose=0)
    path = str(tmp_path / "h.fgm")
    half.save(path)
    resumed = fg.load_model(path)
    _assert_same_model(half, resumed)
    resumed.fit(x, y, epochs=2, batch_size=16, verbose=0)
    _assert_same_model(straight, resumed)


def test_saving_an_unbuilt_model_raises(tmp_path):
    model = fg.Sequential([Dense(3), Dense(2)])
    model.compile("adam", "mse")
    path = tmp_path / "unbuilt.fgm"
    with pytest.raises(ValueError):
        model.save(str(path))
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------
# 6. atomic save
# ---------------------------------------------------------------------------

class _NumpyProxy:
    """Stands in for numpy inside fastgrad.saving: the arrays it returns for
    the data section fail in tobytes() on the ``fail_at``-th call."""

    def __init__(self, fail_at, exc):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc

    def __getattr__(self, name):
        return getattr(np, name)

    def ascontiguousarray(self, a, dtype=None):
        arr = np.ascontiguousarray(a, dtype=dtype)
        if dtype is None:
            return arr
        proxy = self

        class Failing:
            def __getattr__(self, name):
                return getattr(arr, name)

            def tobytes(self):
                proxy.calls += 1
                if proxy.calls >= proxy.fail_at:
                    raise proxy.exc
                return arr.tobytes()

        return Failing()


def _boom(*a, **k):
    raise OSError("simulated disk failure")


@pytest.mark.parametrize("how", ["tobytes_first", "tobytes_late", "tobytes_interrupt",
                                 "fsync", "replace"])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, how):
    x, y = blobs(64)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.fgm"
    model.save(str(path))
    old = model.get_weights()
    old_bytes = path.read_bytes()
    model.fit(x, y, epochs=2, verbose=0)
    assert not same_bits(old, model.get_weights())

    exc_type = OSError
    if how.startswith("tobytes"):
        exc_type = KeyboardInterrupt if how == "tobytes_interrupt" else OSError
        proxy = _NumpyProxy({"tobytes_first": 1, "tobytes_late": 4,
                             "tobytes_interrupt": 3}[how], exc_type("simulated"))
        monkeypatch.setattr(fastgrad.saving, "np", proxy)
    elif how == "fsync":
        monkeypatch.setattr(fastgrad.saving.os, "fsync", _boom)
    else:
        monkeypatch.setattr(fastgrad.saving.os, "replace", _boom)
    with pytest.raises(exc_type):
        model.save(str(path))
    if how.startswith("tobytes"):
        assert proxy.calls >= 1
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.fgm"]          # no temporary file left
    assert path.read_bytes() == old_bytes
    assert_same_bits(fg.load_model(str(path)).get_weights(), old)
    # and a failed save to a new name leaves nothing at all
    monkeypatch.setattr(fastgrad.saving.os, "replace", _boom)
    with pytest.raises(OSError):
        model.save(str(tmp_path / "new.fgm"))
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.fgm"]
    # a save that works replaces the file
    model.save(str(path))
    assert_same_bits(fg.load_model(str(path)).get_weights(), model.get_weights())
    assert os.listdir(tmp_path) == ["model.fgm"]


# ---------------------------------------------------------------------------
# 7. the loader against damaged and foreign files
# ---------------------------------------------------------------------------

PREFIX = struct.Struct("<8sIQ")   # magic, version, header_len (documented layout)


def split_file(data):
    magic, version, hlen = PREFIX.unpack_from(data)
    base = PREFIX.size + hlen
    return magic, version, json.loads(data[PREFIX.size:base].decode("utf-8")), data[base:]


def join_file(header, body, magic=b"FGMODEL\0", version=1, header_len=None):
    blob = json.dumps(header).encode("utf-8")
    hl = len(blob) if header_len is None else header_len
    return PREFIX.pack(magic, version, hl) + blob + body


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A small trained model with BN and Dropout, Adam with a schedule."""
    x, y = blobs(40, d=3, k=2, seed=1)
    model = fg.Sequential([Dense(4, activation="relu", input_dim=3), BatchNormalization(),
                           Dropout(0.25), Dense(2, activation="softmax")], seed=1)
    model.compile(fg.optimizers.Adam(fg.schedules.ExponentialDecay(0.01, 10, 0.9)),
                  "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path_factory.mktemp("small") / "small.fgm"
    model.save(str(path))
    return path.read_bytes(), model.get_weights()


def load_bytes(tmp_path, data, name="m.fgm"):
    p = tmp_path / name
    p.write_bytes(data)
    return fg.load_model(str(p))


def test_rebuilt_file_loads(tmp_path, small_file):
    """Control for the tests below: taking the file apart and putting it
    together again by hand gives a loadable file with the same weights."""
    data, weights = small_file
    magic, version, header, body = split_file(data)
    assert magic == b"FGMODEL\0" and version == 1
    assert_same_bits(load_bytes(tmp_path, data).get_weights(), weights)
    assert_same_bits(load_bytes(tmp_path, join_file(header, body)).get_weights(), weights)
    names = [e["name"] for e in header["arrays"]]
    assert any(n.endswith("kernel") for n in names)


def test_a_file_whose_schedule_has_no_name_loads(tmp_path, small_file):
    """Files written before schedules took Keras' name= still load."""
    data, weights = small_file

    def drop_name(h):
        del h["compile"]["optimizer"]["config"]["learning_rate"]["config"]["name"]

    m = load_bytes(tmp_path, _edit(data, drop_name))
    assert_same_bits(m.get_weights(), weights)
    assert m.optimizer.learning_rate.name == "ExponentialDecay"
    assert m.optimizer.learning_rate(7) == fg.schedules.ExponentialDecay(0.01, 10, 0.9)(7)


def test_truncated_files_raise_value_error(tmp_path, small_file):
    data, _ = small_file
    cuts = sorted(set(range(0, len(data), 7)) | {1, 8, 19, 20, len(data) - 1})
    for cut in cuts:
        with pytest.raises(ValueError):
            load_bytes(tmp_path, data[:cut])


def test_flipped_bytes_raise_value_error_or_load(tmp_path, small_file):
    data, _ = small_file
    base = len(data) - len(split_file(data)[3])
    loaded_positions = []
    for pos in range(0, len(data), 5):
        bad = bytearray(data)
        bad[pos] ^= 0xFF          # 0xFF never appears in UTF-8: a header hit must fail
        try:
            load_bytes(tmp_path, bytes(bad))
        except ValueError:
            continue
        loaded_positions.append(pos)
    assert all(p >= base for p in loaded_positions), \
        f"flips in the prefix/header loaded: {[p for p in loaded_positions if p < base]}"
    assert loaded_positions, "no flip in the array data loaded"


def test_single_bit_flips_in_the_header_raise_value_error_or_load(tmp_path, small_file):
    data, _ = small_file
    base = len(data) - len(split_file(data)[3])
    for pos in range(0, base, 3):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        try:
            load_bytes(tmp_path, bytes(bad))
        except ValueError:
            pass
        # any other exception fails the test


def _edit(data, fn):
    magic, version, header, body = split_file(data)
    header = json.loads(json.dumps(header))
    fn(header)
    return join_file(header, body)


def _array(header, suffix):
    return next(e for e in header["arrays"] if e["name"].endswith(suffix))


def _set_layer(header, i, **kw):
    header["model"]["config"]["layers"][i].update(kw)


def _swap_kernel_shape(h):
    e = _array(h, "dense/kernel")
    e["shape"] = e["shape"][::-1]


def _shrink_nbytes(h):
    _array(h, "dense/kernel")["nbytes"] -= 4


def _shape_without_nbytes(h):
    _array(h, "dense/kernel")["shape"][1] += 1


def _overlap(h):
    h["arrays"][1]["offset"] = h["arrays"][0]["offset"]


def _unknown_layer(h):
    _set_layer(h, 0, class_name="Lambda")


def _layer_with_code(h):
    h["model"]["config"]["layers"][3]["config"]["function"] = "__import__('os').system('x')"


def _dup_array_name(h):
    h["arrays"][1]["name"] = h["arrays"][0]["name"]


def _bad_dtype(h):
    _array(h, "dense/kernel")["dtype"] = "object"


def _negative_offset(h):
    h["arrays"][0]["offset"] = -64


def _float_shape(h):
    _array(h, "dense/kernel")["shape"] = [3.0, 4.0]


def _bool_shape(h):
    _array(h, "dense/bias")["shape"] = [True] * 4


def _giant_units(h):
    # claims 2**45 units: more memory than any address space
    h["model"]["config"]["layers"][0]["config"]["units"] = 2 ** 45


def _missing_weight(h):
    h["arrays"] = [e for e in h["arrays"] if not e["name"].endswith("dense/bias")]


def _bad_rng(h):
    h["rng"] = {"bit_generator": "MT19937", "state": {}}


def _rng_not_dict(h):
    h["rng"] = "PCG64"


def _bad_rng_state(h):
    h["rng"]["state"] = {"state": "zero", "inc": []}


def _bad_dropout_counter(h):
    for v in h["layers_random"].values():
        v["counter"] = -1


def _missing_layers_random(h):
    del h["layers_random"]


def _bad_optimizer(h):
    h["compile"]["optimizer"]["class_name"] = "os.system"


def _bad_loss(h):
    h["compile"]["loss"]["class_name"] = "Eval"


def _bad_lr(h):
    h["compile"]["optimizer"]["config"]["learning_rate"] = -1.0


def _bad_schedule(h):
    h["compile"]["optimizer"]["config"]["learning_rate"] = {"class_name": "Eval", "config": {}}


def _bad_iterations(h):
    h["compile"]["iterations"] = -3


def _bad_metric(h):
    h["compile"]["metrics"] = ["nope"]


def _bad_dtype_model(h):
    h["model"]["config"]["dtype"] = "float16"


def _bad_model_class(h):
    h["model"]["class_name"] = "Functional"


def _bad_format(h):
    h["format"] = "something.else"


def _layers_not_list(h):
    h["model"]["config"]["layers"] = 7


def _arrays_not_list(h):
    h["arrays"] = {"a": 1}


def _array_entry_not_dict(h):
    h["arrays"][0] = "weights"


def _bad_input_dim(h):
    h["model"]["config"]["input_dim"] = 0


def _nan_momentum(h):
    h["model"]["config"]["layers"][1]["config"]["momentum"] = float("nan")


def _extra_array(h):
    last = h["arrays"][-1]
    h["arrays"].append(dict(last, name="extra", offset=last["offset"] + 10 ** 6))


@pytest.mark.parametrize("edit", [
    _swap_kernel_shape, _shrink_nbytes, _shape_without_nbytes, _overlap, _unknown_layer,
    _layer_with_code, _dup_array_name, _bad_dtype, _negative_offset, _float_shape,
    _bool_shape, _giant_units, _missing_weight, _bad_rng, _rng_not_dict, _bad_rng_state,
    _bad_dropout_counter, _missing_layers_random, _bad_optimizer, _bad_loss, _bad_lr,
    _bad_schedule, _bad_iterations, _bad_metric, _bad_dtype_model, _bad_model_class,
    _bad_format, _layers_not_list, _arrays_not_list, _array_entry_not_dict, _bad_input_dim,
    _nan_momentum, _extra_array,
], ids=lambda f: f.__name__.strip("_"))
def test_edited_headers_raise_value_error(tmp_path, small_file, edit):
    data, _ = small_file
    with pytest.raises(ValueError):
        load_bytes(tmp_path, _edit(data, edit))


def test_swapped_same_size_arrays_of_wrong_shape(tmp_path, small_file):
    """Shapes (3, 4) and (4, 3) hold the same bytes: only the architecture
    check can catch the swap."""
    data, _ = small_file
    bad = _edit(data, _swap_kernel_shape)
    with pytest.raises(ValueError, match="kernel"):
        load_bytes(tmp_path, bad)


def test_prefix_damage(tmp_path, small_file):
    data, _ = small_file
    magic, version, hlen = PREFIX.unpack_from(data)
    rest = data[PREFIX.size:]
    cases = {
        "version 2": PREFIX.pack(magic, 2, hlen) + rest,
        "version 0": PREFIX.pack(magic, 0, hlen) + rest,
        "version max": PREFIX.pack(magic, 2 ** 32 - 1, hlen) + rest,
        "magic": PREFIX.pack(b"FGMODEL\1", version, hlen) + rest,
        "magic lower": PREFIX.pack(b"fgmodel\0", version, hlen) + rest,
        "header_len = file": PREFIX.pack(magic, version, len(data)) + rest,
        "header_len + 1": PREFIX.pack(magic, version, len(data) - PREFIX.size + 1) + rest,
        "header_len huge": PREFIX.pack(magic, version, 2 ** 64 - 1) + rest,
        "header_len short": PREFIX.pack(magic, version, hlen - 5) + rest,
        "header_len 0": PREFIX.pack(magic, version, 0) + rest,
        "trailing 1": data + b"\0",
        "trailing 64": data + b"\0" * 64,
        "trailing text": data + b"#!/bin/sh\n",
        "deep json": PREFIX.pack(magic, version, 200000) + b"[" * 200000,
        "json list": join_file([1, 2], b""),
        "json null": join_file(None, b""),
        "json empty arrays": join_file({"arrays": []}, b""),
        "not utf-8": PREFIX.pack(magic, version, 4) + b"\xff\xfe\xfd\xfc",
    }
    for name, blob in cases.items():
        with pytest.raises(ValueError):
            load_bytes(tmp_path, blob)
    with pytest.raises(ValueError, match="version"):
        load_bytes(tmp_path, cases["version 2"])


class _Touch:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_foreign_files_raise_value_error(tmp_path):
    x = np.arange(12, dtype=F32).reshape(3, 4)
    np.savez(tmp_path / "a.npz", kernel=x, bias=x[0])
    np.save(tmp_path / "a.npy", x)
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("config.json", json.dumps({"class_name": "Sequential"}))
        z.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n")
    (tmp_path / "empty.fgm").write_bytes(b"")
    (tmp_path / "text.fgm").write_text("hello, I am not a model\n")
    (tmp_path / "h5.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    (tmp_path / "json.fgm").write_text(json.dumps({"format": "fastgrad.model"}))
    (tmp_path / "zeros.fgm").write_bytes(b"\0" * 4096)
    (tmp_path / "magic_only.fgm").write_bytes(b"FGMODEL\0")
    for name in ["a.npz", "a.npy", "a.zip", "empty.fgm", "text.fgm", "h5.h5", "json.fgm",
                 "zeros.fgm", "magic_only.fgm"]:
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
    # a folder
    with pytest.raises(ValueError):
        fg.load_model(str(tmp_path))


def test_pickle_files_are_never_unpickled(tmp_path):
    # control: unpickling this payload does create its marker file
    control = tmp_path / "control-marker"
    pickle.loads(pickle.dumps(_Touch(str(control))))
    assert control.exists()
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Touch(str(marker)))
    for i, (name, blob) in enumerate([
        ("p.pkl", payload),
        ("p.fgm", payload),
        ("p2.fgm", pickle.dumps(_Touch(str(marker)), protocol=2)),
        ("magic-then-pickle.fgm", PREFIX.pack(b"FGMODEL\0", 1, len(payload)) + payload),
    ]):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
        assert not marker.exists(), name
    # a .npy / .npz holding a pickled object array
    obj = np.empty(1, dtype=object)
    obj[0] = _Touch(str(marker))
    np.save(tmp_path / "obj.npy", obj, allow_pickle=True)
    np.savez(tmp_path / "obj.npz", w=obj)
    for name in ("obj.npy", "obj.npz"):
        with pytest.raises(ValueError):
            fg.load_model(str(tmp_path / name))
        assert not marker.exists(), name


# ---------------------------------------------------------------------------
# 8. validation
# ---------------------------------------------------------------------------

def _state(model):
    opt = model.optimizer
    return (model.get_weights(), opt.iterations,
            {k: v.copy() for k, v in opt.variables().items()},
            model._rng.bit_generator.state)


def _assert_state(model, before):
    w, it, var, rng = before
    assert_same_bits(model.get_weights(), w)
    assert model.optimizer.iterations == it
    now = model.optimizer.variables()
    assert_same_bits([now[k] for k in sorted(now)], [var[k] for k in sorted(var)])
    assert model._rng.bit_generator.state == rng


@pytest.fixture
def trained():
    """A built, compiled sparse-CE model with one epoch behind it."""
    x, y = blobs(60)
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1, verbose=0)
    return model, x, y


def _nan_at(x, row, value=np.nan, col=2):
    x = x.copy()
    x[row, col] = value
    return x


X60, Y60 = blobs(60)


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda m: m.fit(X60, Y60[:59], verbose=0), ValueError, r"\by\b"),
    (lambda m: m.fit(X60[:, :3], Y60, verbose=0), ValueError, r"\bx\b.*4"),
    (lambda m: m.fit(X60[:, :1].ravel(), Y60, verbose=0), ValueError, r"\bx\b"),
    (lambda m: m.fit(X60.astype(object), Y60, verbose=0), TypeError, r"\bx\b"),
    (lambda m: m.fit(np.full((60, 4), "a"), Y60, verbose=0), TypeError, r"\bx\b"),
    (lambda m: m.fit(_nan_at(X60, 7), Y60, verbose=0), ValueError, r"\bx\b.*row 7\b"),
    (lambda m: m.fit(_nan_at(X60, 0), Y60, verbose=0), ValueError, r"row 0\b"),
    (lambda m: m.fit(_nan_at(_nan_at(X60, 42, np.inf), 50), Y60, verbose=0), ValueError,
     r"row 42\b"),
    (lambda m: m.fit(_nan_at(X60, 59, -np.inf, 0), Y60, verbose=0), ValueError, r"row 59\b"),
    (lambda m: m.fit(X60.astype(F64) * 1e300, Y60, verbose=0), ValueError, r"\bx\b"),
    (lambda m: m.fit(X60, np.where(np.arange(60) == 5, 3, Y60), verbose=0), ValueError,
     r"label 3.*row 5\b"),
    (lambda m: m.fit(X60, np.where(np.arange(60) == 9, -1, Y60), verbose=0), ValueError,
     r"label -1.*row 9\b"),
    (lambda m: m.fit(X60, Y60 + 0.5, verbose=0), ValueError, r"whole|integer"),
    (lambda m: m.fit(X60, Y60.astype(str), verbose=0), TypeError, r"y|label"),
    (lambda m: m.fit(X60, Y60, epochs=-1, verbose=0), (ValueError, TypeError), "epochs"),
    (lambda m: m.fit(X60, Y60, epochs=1.5, verbose=0), (ValueError, TypeError), "epochs"),
    (lambda m: m.fit(X60, Y60, epochs="2", verbose=0), (ValueError, TypeError), "epochs"),
    (lambda m: m.fit(X60, Y60, epochs=True, verbose=0), (ValueError, TypeError), "epochs"),
    (lambda m: m.fit(X60, Y60, batch_size=0, verbose=0), (ValueError, TypeError), "batch_size"),
    (lambda m: m.fit(X60, Y60, batch_size=-4, verbose=0), (ValueError, TypeError),
     "batch_size"),
    (lambda m: m.fit(X60, Y60, batch_size=8.0, verbose=0), (ValueError, TypeError),
     "batch_size"),
    (lambda m: m.fit(X60, Y60, batch_size=None, verbose=0), (ValueError, TypeError),
     "batch_size"),
    (lambda m: m.fit(X60, Y60, verbose=3), (ValueError, TypeError), "verbose"),
    (lambda m: m.fit(X60, Y60, verbose=-1), (ValueError, TypeError), "verbose"),
    (lambda m: m.fit(X60, Y60, verbose="loud"), (ValueError, TypeError), "verbose"),
    (lambda m: m.fit(X60, Y60, validation_split=1.0, verbose=0), (ValueError, TypeError),
     "validation_split"),
    (lambda m: m.fit(X60, Y60, validation_split=-0.1, verbose=0), (ValueError, TypeError),
     "validation_split"),
    (lambda m: m.fit(X60, Y60, validation_split=1.5, verbose=0), (ValueError, TypeError),
     "validation_split"),
    (lambda m: m.fit(X60, Y60, validation_split="0.2", verbose=0), (ValueError, TypeError),
     "validation_split"),
    (lambda m: m.fit(X60, Y60, validation_split=float("nan"), verbose=0),
     (ValueError, TypeError), "validation_split"),
    (lambda m: m.fit(X60, Y60, validation_split=0.999, verbose=0), (ValueError, TypeError),
     "validation_split"),
    (lambda m: m.fit(X60, Y60, initial_epoch=-1, verbose=0), (ValueError, TypeError),
     "initial_epoch"),
    (lambda m: m.fit(X60, Y60, validation_data=X60, verbose=0), ValueError,
     "validation_data"),
    (lambda m: m.fit(X60, Y60, validation_data=(X60[:, :3], Y60), verbose=0), ValueError,
     r"4 features"),
    (lambda m: m.fit(X60, Y60, validation_data=(X60, Y60 + 3), verbose=0), ValueError,
     r"label"),
    (lambda m: m.fit(X60, Y60, validation_data=(_nan_at(X60, 11), Y60), verbose=0),
     ValueError, r"row 11\b"),
    (lambda m: m.fit(X60[:0], Y60[:0], verbose=0), ValueError, r"\bx\b"),
    (lambda m: m.train_on_batch(_nan_at(X60, 3), Y60), ValueError, r"row 3\b"),
    (lambda m: m.train_on_batch(X60, Y60[:10]), ValueError, r"\by\b"),
    (lambda m: m.evaluate(X60[:, :2], Y60, verbose=0), ValueError, r"\bx\b"),
    (lambda m: m.evaluate(X60, Y60, batch_size=0, verbose=0), ValueError, "batch_size"),
    (lambda m: m.predict(_nan_at(X60, 13)), ValueError, r"row 13\b"),
    (lambda m: m.predict(X60, batch_size=0), ValueError, "batch_size"),
    (lambda m: m.predict(X60.astype(object)), TypeError, r"\bx\b"),
    (lambda m: m.compile("adamx", "sparse_categorical_crossentropy"), ValueError, "optimizer"),
    (lambda m: m.compile("adam", "cross_entropy_xyz"), ValueError, "loss"),
    (lambda m: m.compile("adam", "sparse_categorical_crossentropy", ["f1_xyz"]), ValueError,
     "metric"),
    (lambda m: m.compile(42, "mse"), (ValueError, TypeError), "optimizer"),
])
def test_bad_arguments_raise_naming_the_argument_and_change_nothing(trained, call, exc,
                                                                    pattern):
    model, _, _ = trained
    before = _state(model)
    opt, loss, mets = model.optimizer, model.loss, model.metrics
    with pytest.raises(exc) as info:
        call(model)
    assert re.search(pattern, str(info.value)), str(info.value)
    _assert_state(model, before)
    assert model.optimizer is opt and model.loss is loss and model.metrics is mets
    # the model still trains normally afterwards
    model.fit(X60, Y60, epochs=1, verbose=0)
    assert model.optimizer.iterations == before[1] + 2


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda m: m.compile("adamx", "sparse_categorical_crossentropy"), ValueError,
     "optimizer"),
    (lambda m: m.compile("sgd", "cross_entropy_xyz"), ValueError, "loss"),
    (lambda m: m.compile("sgd", "sparse_categorical_crossentropy", ["accuracy", "f1_xyz"]),
     ValueError, "metric"),
    (lambda m: m.compile("sgd", "sparse_categorical_crossentropy", 5), TypeError, "metrics"),
    (lambda m: m.compile("sgd", "sparse_categorical_crossentropy", [3]), TypeError,
     "metrics"),
])
@pytest.mark.parametrize("built", [False, True])
def test_a_refused_compile_leaves_the_model_as_it_was(call, exc, pattern, built):
    model = fg.Sequential([Dense(8, activation="tanh", input_dim=4),
                           Dense(3, activation="softmax")], seed=4)
    if built:
        model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
        model.fit(X60, Y60, epochs=1, verbose=0)
        before = _state(model)
    opt, loss, mets = model.optimizer, model.loss, model.metrics
    with pytest.raises(exc) as info:
        call(model)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert model.built == built
    assert model.optimizer is opt and model.loss is loss and model.metrics is mets
    if built:
        _assert_state(model, before)
        model.fit(X60, Y60, epochs=1, verbose=0)
        assert model.optimizer.iterations == before[1] + 2
    else:
        model.add(Dense(3, activation="softmax"))    # still open for layers


def test_validation_data_errors_name_validation_data():
    """A bad validation set is reported as such, not as a bad x or y."""
    model = mlp()
    model.compile("adam", "sparse_categorical_crossentropy")
    w = model.get_weights()
    for bad in [(X60[:, :3], Y60), (X60, Y60[:50]), (_nan_at(X60, 4), Y60)]:
        with pytest.raises(ValueError, match="validation"):
            model.fit(X60, Y60, validation_data=bad, verbose=0)
    assert_same_bits(model.get_weights(), w)
    assert model.optimizer.iterations == 0

def test_regression_and_categorical_target_checks():
    x, y = regression(50, 4)
    m = mlp(k=1, out_act=None)
    m.compile("adam", "mse")
    m.build()
    before = _state(m)
    for bad, exc, pat in [(y.astype(object), TypeError, r"\by\b"),
                          (_nan_at(y, 17, col=0), ValueError, r"\by\b.*row 17\b"),
                          (np.hstack([y, y]), ValueError, r"\by\b"),
                          (y[:49], ValueError, r"\by\b")]:
        with pytest.raises(exc, match=pat):
            m.fit(x, bad, verbose=0)
        _assert_state(m, before)
    xc, yc = blobs(50)
    mc = mlp()
    mc.compile("adam", "categorical_crossentropy", ["accuracy"])
    before = _state(mc)
    for width in (2, 4):
        with pytest.raises(ValueError, match=r"\by\b.*one-hot|one-hot.*\by\b"):
            mc.fit(xc, one_hot(yc, 4)[:, :width], verbose=0)
        _assert_state(mc, before)
    with pytest.raises(ValueError, match=r"\by\b"):
        mc.fit(xc, yc, verbose=0)    # integer labels for a one-hot loss
    _assert_state(mc, before)


def test_a_failed_first_fit_leaves_the_model_unbuilt():
    """fit(x.T, y) on a model without input_dim fails on y's length; it
    must not have built the model for x.T's feature count."""
    x, y = blobs(100)

    def make():
        m = fg.Sequential([Dense(8, activation="tanh"), Dense(3, activation="softmax")], seed=4)
        m.compile("adam", "sparse_categorical_crossentropy")
        return m

    m = make()
    with pytest.raises(ValueError, match=r"\by\b"):
        m.fit(x.T, y, verbose=0)
    m.fit(x, y, epochs=1, verbose=0)          # the right data now trains
    ref = make()
    ref.fit(x, y, epochs=1, verbose=0)
    assert_same_bits(m.get_weights(), ref.get_weights())


def _unbuilt_bn_model():
    m = fg.Sequential([Dense(8, activation="tanh"), BatchNormalization(),
                       Dense(3, activation="softmax")], seed=4)
    m.compile("adam", "sparse_categorical_crossentropy")
    return m


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda m: m.fit(X60, Y60, validation_data=(X60[:4], Y60[:3]), verbose=0), ValueError,
     "validation_data"),
    (lambda m: m.fit(X60, Y60, validation_data=(X60[:4], Y60[:4] + 3), verbose=0), ValueError,
     "validation_data"),
    (lambda m: m.fit(X60, Y60, validation_data=(X60[:4, :3], Y60[:4]), verbose=0), ValueError,
     r"validation_data\[0\].*4 features"),
    (lambda m: m.fit(X60, Y60, validation_split=0.999, verbose=0), ValueError,
     "validation_split"),
    (lambda m: m.fit(X60[:0], Y60[:0], verbose=0), ValueError, r"\bx\b"),
    (lambda m: m.fit(X60[:41], Y60[:41], batch_size=20, verbose=0), ValueError, "batch_size"),
    (lambda m: m.fit(X60, Y60, batch_size=1, verbose=0), ValueError, "batch_size"),
    (lambda m: m.fit(X60, Y60, callbacks=[print], verbose=0), TypeError, "callbacks"),
    (lambda m: m.fit(X60, Y60, callbacks=fg.callbacks.History(), verbose=0), TypeError,
     "callbacks"),
    (lambda m: m.train_on_batch(X60[:1], Y60[:1]), ValueError, "BatchNormalization"),
    (lambda m: m.train_on_batch(X60[:0], Y60[:0]), ValueError, r"\bx\b.*row"),
    (lambda m: m.compute_gradients(X60[:1], Y60[:1]), ValueError, "BatchNormalization"),
])
def test_a_refused_call_leaves_an_unbuilt_model_unbuilt(call, exc, pattern):
    """Every argument check runs before the first call builds the model."""
    m = _unbuilt_bn_model()
    with pytest.raises(exc) as info:
        call(m)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert not m.built
    m.add(Dense(3, activation="softmax"))      # still open for layers
    assert len(m.layers) == 4
    # and it builds as a fresh model would: the generator did not move
    m2 = _unbuilt_bn_model()
    m2.add(Dense(3, activation="softmax"))
    m.fit(X60, Y60, epochs=1, batch_size=20, verbose=0)
    m2.fit(X60, Y60, epochs=1, batch_size=20, verbose=0)
    assert_same_bits(m.get_weights(), m2.get_weights())


@pytest.mark.parametrize("call", [
    lambda m: m.fit(X60, Y60, batch_size=1, verbose=0),
    lambda m: m.fit(X60[:41], Y60[:41], batch_size=20, verbose=0),
    lambda m: m.fit(X60, Y60, validation_data=(X60[:4], Y60[:3]), verbose=0),
    lambda m: m.fit(X60, Y60, callbacks=[object()], verbose=0),
    lambda m: m.train_on_batch(X60[:1], Y60[:1]),
    lambda m: m.train_on_batch(X60[:0], Y60[:0]),
])
def test_a_refused_call_leaves_a_built_model_unchanged(call):
    m = _unbuilt_bn_model()
    m.fit(X60, Y60, epochs=1, batch_size=20, verbose=0)
    before = _state(m)
    with pytest.raises((ValueError, TypeError)):
        call(m)
    _assert_state(m, before)


def test_batch_normalization_refuses_a_one_row_batch_before_training():
    x, y = blobs(65, d=5)
    m = bn_dropout_model()
    m.compile("adam", "sparse_categorical_crossentropy")
    before = _state(m)
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(x, y, batch_size=32, verbose=0)      # 32 + 32 + 1
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(x, y, batch_size=1, verbose=0)
    with pytest.raises(ValueError, match="batch_size"):
        m.fit(x, y, batch_size=16, verbose=0)      # 16 * 4 + 1
    _assert_state(m, before)
    m.fit(x, y, batch_size=20, epochs=1, verbose=0)   # 20 * 3 + 5 is fine
    assert m.optimizer.iterations == 4

    x, y = blobs(20)
    m = mlp()
    m.build()
    w = m.get_weights()
    for call in (lambda: m.fit(x, y, verbose=0), lambda: m.evaluate(x, y, verbose=0),
                 lambda: m.train_on_batch(x, y)):
        with pytest.raises(RuntimeError, match="compile"):
            call()
    assert_same_bits(m.get_weights(), w)
    # predict works uncompiled
    assert m.predict(x).shape == (20, 3)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_int_and_other_float_inputs_are_converted(dtype):
    rng = np.random.default_rng(3)
    xi = rng.integers(-3, 4, (64, 4))
    _, y = blobs(64)
    np_dt = np.dtype(dtype)
    other = F64 if dtype == "float32" else F32

    def trained_on(x, yy):
        m = mlp(seed=9, dtype=dtype)
        m.compile("adam", "sparse_categorical_crossentropy")
        m.fit(x, yy, epochs=2, batch_size=16, verbose=0)
        return m

    ref = trained_on(xi.astype(np_dt), y)
    for x in (xi, xi.astype(np.int32), xi.astype(other), np.asfortranarray(xi.astype(np_dt)),
              np.repeat(xi.astype(np_dt), 2, axis=0)[::2]):
        m = trained_on(x, y)
        assert_same_bits(m.get_weights(), ref.get_weights())
        assert m.predict(x).dtype == np_dt
    # labels as whole floats, as (n, 1), as int32
    for yy in (y.astype(F64), y.reshape(-1, 1), y.astype(np.int32)):
        assert_same_bits(trained_on(xi.astype(np_dt), yy).get_weights(), ref.get_weights())
    # the caller's arrays are not modified
    x64 = xi.astype(F64)
    keep = x64.copy()
    trained_on(x64, y)
    assert x64.tobytes() == keep.tobytes()


# ---------------------------------------------------------------------------
# 9. predict and evaluate change nothing
# ---------------------------------------------------------------------------

def test_predict_and_evaluate_change_no_weights_or_statistics():
    x, y = blobs(90, d=5)
    model = bn_dropout_model(seed=2)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    w = model.get_weights()
    it = model.optimizer.iterations
    counters = [getattr(l, "counter", None) for l in model.layers]
    p1 = model.predict(x)
    for bs in (1, 7, 32, 200):
        model.predict(x, batch_size=bs)
        model.evaluate(x, y, batch_size=bs, verbose=0)
    model.predict(np.vstack([x, x, x]))        # a batch larger than any seen
    model.evaluate(np.vstack([x, x]), np.concatenate([y, y]), batch_size=500, verbose=0)
    model.predict(x[:1])                       # one row is fine in inference
    assert_same_bits(model.get_weights(), w)
    assert model.optimizer.iterations == it
    assert [getattr(l, "counter", None) for l in model.layers] == counters
    p2 = model.predict(x)
    assert p1.tobytes() == p2.tobytes()
    # batch size does not change predictions beyond rounding
    np.testing.assert_allclose(model.predict(x, batch_size=7), p1, rtol=1e-5, atol=1e-6)
    # inference uses the moving statistics (a NumPy forward pass agrees)
    k0, g, b, mm, mv, k1, b1, k2, b2 = [np.asarray(a, F64) for a in w]
    h = np.maximum(x @ k0, 0)
    h = g * (h - mm) / np.sqrt(mv + 1e-3) + b
    h = np.tanh(h @ k1 + b1)
    ref = _NP_ACT["softmax"](h @ k2 + b2)
    np.testing.assert_allclose(p1, ref, rtol=1e-4, atol=1e-6)
    # and training does change the statistics (the check above can fail)
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    assert not same_bits(model.get_weights()[3:5], w[3:5])


# ---------------------------------------------------------------------------
# 10. summary
# ---------------------------------------------------------------------------

def test_summary_lists_layers_shapes_and_counts(capsys):
    d = 6
    model = fg.Sequential([Dense(10, activation="relu", input_dim=d), BatchNormalization(),
                           Dropout(0.1), Dense(4, use_bias=False), Dense(2, name="head")])
    capsys.readouterr()
    model.summary()
    out = capsys.readouterr().out
    rows = {
        "dense (Dense)": ("(None, 10)", d * 10 + 10),
        "batch_normalization (BatchNormalization)": ("(None, 10)", 4 * 10),
        "dropout (Dropout)": ("(None, 10)", 0),
        "dense_1 (Dense)": ("(None, 4)", 10 * 4),
        "head (Dense)": ("(None, 2)", 4 * 2 + 2),
    }
    lines = out.splitlines()
    for name, (shape, count) in rows.items():
        line = next((l for l in lines if l.strip().startswith(name)), None)
        assert line is not None, (name, out)
        assert shape in line
        assert line.split()[-1].replace(",", "") == str(count), line
    total = sum(c for _, c in rows.values())
    non_trainable = 2 * 10
    sizes = [a.size for a in model.get_weights()]
    assert sum(sizes) == total
    nums = {k: int(v.replace(",", "")) for k, v in
            re.findall(r"(Total|Trainable|Non-trainable) params: ([\d,]+)", out)}
    assert nums == {"Total": total, "Trainable": total - non_trainable,
                    "Non-trainable": non_trainable}
    # order of the rows follows the layers
    pos = [out.index(name) for name in rows]
    assert pos == sorted(pos)
    # print_fn receives the same lines
    got = []
    model.summary(print_fn=got.append)
    assert "\n".join(got).strip() == out.strip()


def test_fused_softmax_probabilities_over_several_blocks_of_classes():
    """Metrics read the probabilities the fused softmax cross-entropy writes;
    with 1100 classes they span three blocks of 512."""
    rng = np.random.default_rng(23)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    model = fg.Sequential([Dense(1100, "softmax", input_dim=12)], seed=0)
    model.compile(fg.optimizers.SGD(0.0), "sparse_categorical_crossentropy", ["accuracy"])
    p = model.predict(x, verbose=0)
    y = p.argmax(axis=1)
    y[::2] = (y[::2] + 1) % 1100             # half the rows wrong
    want = float(np.mean(p.argmax(axis=1) == y))
    loss, acc = model.evaluate(x, y, verbose=0)
    assert acc == pytest.approx(want, abs=1e-12) and want == 0.5
    loss2, acc2 = model.train_on_batch(x, y)  # lr 0: the same probabilities
    assert acc2 == pytest.approx(want, abs=1e-12)
    ref = -np.mean(np.log(p.astype(np.float64)[np.arange(64), y]))
    assert loss == pytest.approx(ref, rel=1e-5) and loss2 == pytest.approx(ref, rel=1e-5)
