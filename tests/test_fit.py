"""Tests of fit, metrics, input validation, predict/evaluate and summary.

Every expected number comes from an independent reference: NumPy forward
passes and losses written from ``get_weights()`` (recorded by callbacks
before each optimizer step), NumPy metrics on ``predict`` output, and a
second model trained by a different route (manual ``train_on_batch`` loops).

Layout of this file:
  1. fit ............. History keys, batch weighting, partial batches,
                       validation, initial_epoch, shuffle=False, penalties
  2. metrics ......... accuracy resolution, mse/mae, metric objects
  8. validation ...... errors naming the argument, no state change
  9. inference ....... predict / evaluate change nothing
 10. summary
(sections 3 and 4 are in test_callbacks.py, 5 to 7 in test_saving.py)
"""
import math
import re

import numpy as np
import pytest
from _models import (
    F32,
    F64,
    Recorder,
    assert_model_state,
    assert_same_bits,
    batch_slices,
    blobs,
    bn_dropout_model,
    mlp,
    model_state,
    np_accuracy,
    np_forward,
    np_loss,
    one_hot,
    regression,
    running_mean,
    same_bits,
)
from _reference import ref_act, ref_bn_forward

import fastgrad as fg
import fastgrad.saving
from fastgrad.layers import BatchNormalization, Dense, Dropout

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
    # exactly Keras's keys; the gradient statistics live beside them
    assert set(h.history) == {"loss", "accuracy", "mae", "val_loss", "val_accuracy", "val_mae"}
    assert set(h.gradients) == {"grad_norm", "clip_rate"}
    assert all(len(v) == 3 for v in [*h.history.values(), *h.gradients.values()])
    assert h.epoch == [0, 1, 2]
    assert all(isinstance(v, float) and math.isfinite(v) for vs in h.history.values() for v in vs)
    assert all(0 <= v <= 1 for v in h.history["accuracy"] + h.gradients["clip_rate"])
    assert all(v > 0 for v in h.gradients["grad_norm"])

    # without validation nor metrics: only the training keys
    model2 = mlp()
    model2.compile("sgd", "categorical_crossentropy")
    h2 = model2.fit(x, y, epochs=2, verbose=0)
    assert set(h2.history) == {"loss"}
    assert set(h2.gradients) == {"grad_norm", "clip_rate"}


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
        # every batch's logs: as in Keras, the running mean since the epoch began
        # of NumPy's losses at the weights before each step
        own = []
        for i, s in enumerate(sl):
            p = np_forward(rec.weights_before[e][i], ["tanh", "softmax"], x[s])
            own.append(np_loss("sparse", p, y[s]))
            np.testing.assert_allclose(rec.preds_before[e][i], p, rtol=2e-5)
        np.testing.assert_allclose(losses, running_mean(own, sizes), rtol=2e-5)
        assert h.history["loss"][e] == pytest.approx(losses[-1], rel=1e-12, abs=1e-15)
        assert h.history["loss"][e] == pytest.approx(float(np.sum(np.array(own) * sizes) / n),
                                                     rel=2e-5)
        acc = np.array([np_accuracy("sparse", p, y[s])
                        for p, s in zip(rec.preds_before[e], sl)])
        assert h.history["accuracy"][e] == pytest.approx(float(np.sum(acc * sizes) / n),
                                                         abs=1e-12)
        if len(set(sizes)) > 1:
            # the weighting matters for this data: an unweighted mean is different
            assert abs(float(np.mean(own)) - h.history["loss"][e]) > 1e-6


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
    assert set(h.history) == {"loss"}
    np.testing.assert_allclose(h.gradients["grad_norm"], norms.mean(1), rtol=1e-4)
    assert h.gradients["clip_rate"] == [0.0] * 4
    # a clip threshold in the widest gap between the observed norms
    flat = np.sort(norms.ravel())
    gaps = flat[1:] / flat[:-1]
    j = int(np.argmax(gaps[2:-2])) + 2
    c = float(math.sqrt(flat[j] * flat[j + 1]))
    h2, norms2 = run(c)
    assert np.min(np.abs(norms2 / c - 1)) > 1e-3, "ill-posed threshold"
    np.testing.assert_allclose(h2.gradients["grad_norm"], norms2.mean(1), rtol=1e-4)
    np.testing.assert_allclose(h2.gradients["clip_rate"], (norms2 > c).mean(1), atol=1e-12)
    assert 0 < np.mean(h2.gradients["clip_rate"]) < 1
    h3, _ = run(1e-6)
    assert h3.gradients["clip_rate"] == [1.0] * 4


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
    cut = math.floor(n * (1 - split))   # Keras: floor(n * (1 - split)) training rows
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
        # fit's batch logs: the loss's running mean over the epoch, as Keras's
        total = rows = 0.0
        for s in batch_slices(n, bs):
            r = b.train_on_batch(x[s], y[s])
            total += (r if metrics is None else r[0]) * (s.stop - s.start)
            rows += s.stop - s.start
            manual.append(total / rows)
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
        np.testing.assert_allclose(rec.batch_losses[e], running_mean(expect, sizes), rtol=2e-5)
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
        own = [np_loss(kind, p, y[s]) for p, s in zip(rec.preds_before[e], sl)]
        np.testing.assert_allclose(rec.batch_losses[e], running_mean(own, sizes), rtol=2e-5)
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
    assert set(h.history) == {"loss", "mse", "mae"}
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
    _loss, acc, mae = model.evaluate(x, y, verbose=0)
    assert acc == pytest.approx(np_accuracy("binary", p, y, threshold=0.7), abs=1e-12)
    # the threshold matters on this data
    assert np_accuracy("binary", p, y, 0.7) != np_accuracy("binary", p, y, 0.5)
    assert mae == pytest.approx(np_loss("mae", p, y), rel=1e-6)
    # a model that outputs logits: as in Keras, the metric compares the
    # model's outputs (here logits) with its threshold
    m2 = mlp(k=1, out_act=None, seed=1)
    m2.compile("adam", fg.losses.BinaryCrossentropy(from_logits=True),
               metrics=[fg.metrics.BinaryAccuracy(threshold=0.7)])
    z = m2.predict(x)
    assert m2.evaluate(x, y, verbose=0)[1] == pytest.approx(
        float(np.mean((z > 0.7) == (y > 0.5))), abs=1e-12)
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
# 8. validation
# ---------------------------------------------------------------------------

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
    (lambda m: m.fit(X60, Y60, batch_size="32", verbose=0), (ValueError, TypeError),
     "batch_size"),
    (lambda m: m.fit(X60, Y60, steps_per_epoch=0, verbose=0), ValueError, "steps_per_epoch"),
    (lambda m: m.fit(X60, Y60, validation_freq=0, verbose=0), ValueError, "validation_freq"),
    (lambda m: m.fit(X60, Y60, validation_freq=[1, 0], verbose=0), ValueError,
     "validation_freq"),
    (lambda m: m.fit(X60, Y60, validation_batch_size=0, verbose=0), ValueError,
     "validation_batch_size"),
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
    before = model_state(model)
    opt, loss, mets = model.optimizer, model.loss, model.metrics
    with pytest.raises(exc) as info:
        call(model)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert_model_state(model, before)
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
        before = model_state(model)
    opt, loss, mets = model.optimizer, model.loss, model.metrics
    with pytest.raises(exc) as info:
        call(model)
    assert re.search(pattern, str(info.value)), str(info.value)
    assert model._built == built   # the weights were not allocated by the refused call
    assert model.optimizer is opt and model.loss is loss and model.metrics is mets
    if built:
        assert_model_state(model, before)
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
    before = model_state(m)
    for bad, exc, pat in [(y.astype(object), TypeError, r"\by\b"),
                          (_nan_at(y, 17, col=0), ValueError, r"\by\b.*row 17\b"),
                          (np.hstack([y, y]), ValueError, r"\by\b"),
                          (y[:49], ValueError, r"\by\b")]:
        with pytest.raises(exc, match=pat):
            m.fit(x, bad, verbose=0)
        assert_model_state(m, before)
    xc, yc = blobs(50)
    mc = mlp()
    mc.compile("adam", "categorical_crossentropy", ["accuracy"])
    before = model_state(mc)
    for width in (2, 4):
        with pytest.raises(ValueError, match=r"\by\b.*one-hot|one-hot.*\by\b"):
            mc.fit(xc, one_hot(yc, 4)[:, :width], verbose=0)
        assert_model_state(mc, before)
    with pytest.raises(ValueError, match=r"\by\b"):
        mc.fit(xc, yc, verbose=0)    # integer labels for a one-hot loss
    assert_model_state(mc, before)


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
    (lambda m: m.fit(X60, Y60, callbacks=[print], verbose=0), TypeError, "callbacks"),
    (lambda m: m.fit(X60, Y60, callbacks=fg.callbacks.History(), verbose=0), TypeError,
     "callbacks"),
    (lambda m: m.train_on_batch(X60[:0], Y60[:0]), ValueError, r"\bx\b.*row"),
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
    lambda m: m.fit(X60, Y60, validation_data=(X60[:4], Y60[:3]), verbose=0),
    lambda m: m.fit(X60, Y60, callbacks=[object()], verbose=0),
    lambda m: m.train_on_batch(X60[:0], Y60[:0]),
])
def test_a_refused_call_leaves_a_built_model_unchanged(call):
    m = _unbuilt_bn_model()
    m.fit(X60, Y60, epochs=1, batch_size=20, verbose=0)
    before = model_state(m)
    with pytest.raises((ValueError, TypeError)):
        call(m)
    assert_model_state(m, before)


def test_batch_normalization_trains_on_a_last_batch_of_one_row():
    # 65 rows at batch 32 leave a last batch of one row: Keras trains on it
    # (its variance is 0, its output beta), and so does fastgrad
    x, y = blobs(65, d=5)
    m = bn_dropout_model()
    m.compile("adam", "sparse_categorical_crossentropy")
    m.fit(x, y, batch_size=32, epochs=1, verbose=0, shuffle=False)
    assert m.optimizer.iterations == 3
    assert all(np.isfinite(w).all() for w in m.get_weights())


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
    np.testing.assert_allclose(model.predict(x, batch_size=7), p1, rtol=1e-5)
    # inference uses the moving statistics (a NumPy forward pass agrees)
    k0, g, b, mm, mv, k1, b1, k2, b2 = [np.asarray(a, F64) for a in w]
    h = ref_act("relu", x @ k0)
    h = ref_bn_forward(h, g, b, mm, mv, training=False, epsilon=1e-3)[0]
    h = ref_act("tanh", h @ k1 + b1)
    ref = ref_act("softmax", h @ k2 + b2)
    np.testing.assert_allclose(p1, ref, rtol=1e-4)
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
