"""Weighted losses, streaming metrics and the new callbacks, against float64
NumPy references and scikit-learn (the Keras cross-checks are in
test_keras_parity.py).

Layout of this file:
  1. weighted loss ... the compiled loss with row weights: value and
                       gradient against the unweighted kernel and NumPy
  2. metrics ......... each metric's formula in float64 NumPy, streaming
                       over batches; AUC against scikit-learn's exact AUC
  3. errors .......... bad weights, metrics and kernel shapes refused
  4. allocation ...... fit with metrics allocates nothing per step
  5. callbacks ....... BackupAndRestore resumes exactly; CallbackList
"""
import gc
import os
import tracemalloc

import numpy as np
import pytest
from _models import F32, F64, assert_same_bits, blobs, mlp

import fastgrad as fg
from fastgrad import _core, ops
from fastgrad.layers import Dense

# ---------------------------------------------------------------------------
# 1. weighted loss
# ---------------------------------------------------------------------------

_LOSS_CASES = [("mse", False), ("mae", False), ("huber", False),
               ("binary_crossentropy", False), ("binary_crossentropy", True),
               ("categorical_crossentropy", False), ("categorical_crossentropy", True),
               ("sparse_categorical_crossentropy", False),
               ("sparse_categorical_crossentropy", True)]


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("loss, logits", _LOSS_CASES)
def test_weighted_loss_is_the_weighted_sum_over_rows(loss, logits, dtype):
    rng = np.random.default_rng(0)
    b, k = 9, 4
    z = rng.normal(size=(b, k)).astype(dtype)
    if loss.startswith(("binary", "categorical")) and not logits:
        z = (np.abs(z) + 0.1).astype(dtype)
        if loss == "binary_crossentropy":
            z = (z / (z.max() + 0.1)).astype(dtype)
    if loss == "sparse_categorical_crossentropy":
        y = rng.integers(0, k, b)
    elif loss == "categorical_crossentropy":
        y = np.eye(k, dtype=dtype)[rng.integers(0, k, b)]
    elif loss == "binary_crossentropy":
        y = rng.integers(0, 2, (b, k)).astype(dtype)
    else:
        y = rng.normal(size=(b, k)).astype(dtype)
    w = rng.uniform(0, 3, b)
    w[2] = 0.0
    value, d, rows = ops.loss_forward_backward(y, z, loss, from_logits=logits, per_sample=True)
    wv, wd, wrows = ops.loss_forward_backward(y, z, loss, from_logits=logits, per_sample=True,
                                              sample_weight=w)
    wt = w.astype(dtype).astype(F64)
    tol = 1e-6 if dtype == F32 else 1e-13
    # Keras's sum_over_batch_size: divided by the rows, not by the weights' sum
    assert wv == pytest.approx(float(np.sum(wt * rows.astype(F64)) / b), rel=tol)
    assert_same_bits(wrows, rows)   # the per-row losses stay unweighted
    np.testing.assert_allclose(wd, d.astype(F64) * wt[:, None], rtol=tol, atol=1e-30)
    assert not np.any(wd[2])
    # weights of one are the unweighted loss, bit for bit
    ov, od = ops.loss_forward_backward(y, z, loss, from_logits=logits, sample_weight=np.ones(b))
    assert ov == value
    assert_same_bits(od, d)


def test_fit_with_sample_weight_equals_numpy_gradient_descent():
    """SGD on a linear model with weighted MSE: each step is w -= lr *
    (2 / rows) X^T (w_i r_i), the last batch smaller, from NumPy in float64."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(37, 3))
    y = rng.normal(size=(37, 1))
    sw = rng.uniform(0, 2, 37)
    model = fg.Sequential([Dense(1, input_dim=3)], dtype="float64")
    model.compile(fg.optimizers.SGD(0.1), "mse")
    k, b = model.get_weights()
    h = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0, sample_weight=sw)
    losses = []
    for _ in range(2):
        total = 0.0
        for s in (slice(0, 16), slice(16, 32), slice(32, 37)):
            r = x[s] @ k + b - y[s]
            n = r.shape[0]
            total += float(np.sum(sw[s] * r[:, 0] ** 2) / n) * n
            g = 2.0 / n * r * sw[s, None]
            k, b = k - 0.1 * x[s].T @ g, b - 0.1 * g.sum(0)
        losses.append(total / 37)
    np.testing.assert_allclose(h.history["loss"], losses, rtol=1e-12)
    np.testing.assert_allclose(model.get_weights()[0], k, rtol=1e-12)


def test_class_weight_is_sample_weight_by_class():
    x, labels = blobs(60, k=3)
    onehot = np.eye(3, dtype=F32)[labels]
    cw = {0: 0.5, 2: 4.0}
    sw = np.array([cw.get(int(c), 1.0) for c in labels])
    results = []
    for y, kw, loss in [(labels, {"class_weight": cw}, "sparse_categorical_crossentropy"),
                        (labels, {"sample_weight": sw}, "sparse_categorical_crossentropy"),
                        (onehot, {"class_weight": cw}, "categorical_crossentropy")]:
        m = mlp(seed=2)
        m.compile(fg.optimizers.Adam(0.01), loss)
        h = m.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, **kw)
        results.append((h.history["loss"], m.get_weights()))
    for other in results[1:]:
        np.testing.assert_allclose(other[0], results[0][0], rtol=1e-6)
        for a, b in zip(other[1], results[0][1]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    m = mlp(seed=2)
    m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    plain = m.fit(x, labels, epochs=2, batch_size=16, shuffle=False, verbose=0)
    assert abs(plain.history["loss"][0] - results[0][0][0]) > 1e-3


def test_evaluate_and_train_on_batch_take_sample_weight():
    x, labels = blobs(50, k=3)
    sw = np.random.default_rng(1).uniform(0, 2, 50)
    m = mlp(seed=3)
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    p = m.predict(x).astype(F64)
    rows = -np.log(p[np.arange(50), labels])
    loss, acc = m.evaluate(x, labels, batch_size=16, sample_weight=sw, verbose=0)
    assert loss == pytest.approx(float(np.sum(sw * rows) / 50), rel=1e-5)
    # metrics stay unweighted, as Keras's compiled metrics
    assert acc == pytest.approx(float(np.mean(np.argmax(p, 1) == labels)), abs=1e-12)
    tb = m.train_on_batch(x[:20], labels[:20], sample_weight=sw[:20])
    assert tb[0] == pytest.approx(float(np.sum(sw[:20] * rows[:20]) / 20), rel=1e-5)


# ---------------------------------------------------------------------------
# 2. metrics
# ---------------------------------------------------------------------------

def _batches(rng, sizes, make):
    return [make(rng, b) for b in sizes]


def _feed(metric, batches):
    """Results after each batch (y, p, w)."""
    out = []
    for y, p, w in batches:
        metric.update_state(y, p, sample_weight=w)
        out.append(metric.result())
    return out


def _ref_stream(batches, row_value, finish=lambda v: v):
    """Running sum_i w_i v_i / sum_i w_i over the batches, in float64."""
    tot = cnt = 0.0
    out = []
    for y, p, w in batches:
        v = row_value(np.asarray(y, F64), np.asarray(p, F64))
        w = np.ones(len(v)) if w is None else np.asarray(w, F64)
        tot, cnt = tot + float(w @ v), cnt + float(w.sum())
        out.append(finish(tot / cnt))
    return out


def _in_top_k(lab, p, k):
    return (np.sum(p > p[np.arange(len(lab)), lab][:, None], axis=1) < k).astype(F64)


_REFS = {
    "CategoricalAccuracy": lambda y, p: (np.argmax(p, 1) == np.argmax(y, 1)).astype(F64),
    "SparseCategoricalAccuracy": lambda y, p: (np.argmax(p, 1) == y).astype(F64),
    "TopKCategoricalAccuracy": lambda y, p: _in_top_k(np.argmax(y, 1), p, 2),
    "SparseTopKCategoricalAccuracy": lambda y, p: _in_top_k(y.astype(int), p, 2),
    "MeanSquaredError": lambda y, p: np.mean((y - p) ** 2, 1),
    "MeanAbsoluteError": lambda y, p: np.mean(np.abs(y - p), 1),
    "MeanAbsolutePercentageError":
        lambda y, p: 100 * np.mean(np.abs(y - p) / np.maximum(np.abs(y), 1e-7), 1),
    "RootMeanSquaredError": lambda y, p: np.mean((y - p) ** 2, 1),
    "BinaryAccuracy": lambda y, p: np.mean((p > 0.3) == y, 1),
}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("name", list(_REFS))
def test_mean_metrics_stream_as_their_formula(name, weighted):
    rng = np.random.default_rng(5)

    def make(rng, b):
        if name.startswith(("Categorical", "TopK", "Sparse")):
            lab = rng.integers(0, 4, b)
            y = lab if name.startswith("Sparse") else np.eye(4)[lab]
            p = rng.integers(0, 3, (b, 4)) / 2    # ties: the first wins argmax,
        elif name == "BinaryAccuracy":            # top-k counts them for the class
            y, p = rng.integers(0, 2, (b, 3)), rng.uniform(0, 1, (b, 3))
        else:
            y = rng.normal(size=(b, 3))
            y[0, 0] = 0.0      # MAPE's floor
            p = y + rng.normal(size=(b, 3))
        w = rng.uniform(0, 2, b) if weighted else None
        return y.astype(F32), p.astype(F32), w

    batches = _batches(rng, (5, 12, 1, 7), make)
    kw = {"threshold": 0.3} if name == "BinaryAccuracy" else \
        {"k": 2} if "TopK" in name else {}
    metric = getattr(fg.metrics, name)(**kw)
    finish = np.sqrt if name == "RootMeanSquaredError" else (lambda v: v)
    np.testing.assert_allclose(_feed(metric, batches), _ref_stream(batches, _REFS[name], finish),
                               rtol=1e-6)
    metric.reset_state()
    assert metric.result() == 0.0


def test_confusion_metrics_count_every_entry():
    rng = np.random.default_rng(6)
    # weights exact in float32, the predictions' dtype they are taken in
    batches = [(rng.integers(0, 2, (b, 2)).astype(F32), rng.uniform(0, 1, (b, 2)).astype(F32),
                rng.integers(0, 9, b) / 4) for b in (4, 9, 3)]
    t = [0.2, 0.5, 0.8]
    ms = {c: getattr(fg.metrics, c)(thresholds=t) for c in
          ("TruePositives", "FalsePositives", "TrueNegatives", "FalseNegatives", "Precision",
           "Recall")}
    for y, p, w in batches:
        for m in ms.values():
            m.update_state(y, p, sample_weight=w)
    y = np.concatenate([b[0] for b in batches]).astype(F64)
    p = np.concatenate([b[1] for b in batches]).astype(F64)
    w = np.concatenate([np.repeat(b[2][:, None], 2, 1) for b in batches])
    for i, th in enumerate(t):
        pos = p > th
        tp, fp = np.sum(w * (pos & (y == 1))), np.sum(w * (pos & (y == 0)))
        tn, fn = np.sum(w * (~pos & (y == 0))), np.sum(w * (~pos & (y == 1)))
        assert ms["TruePositives"].result()[i] == pytest.approx(tp, rel=1e-12)
        assert ms["FalsePositives"].result()[i] == pytest.approx(fp, rel=1e-12)
        assert ms["TrueNegatives"].result()[i] == pytest.approx(tn, rel=1e-12)
        assert ms["FalseNegatives"].result()[i] == pytest.approx(fn, rel=1e-12)
        assert ms["Precision"].result()[i] == pytest.approx(tp / (tp + fp), rel=1e-12)
        assert ms["Recall"].result()[i] == pytest.approx(tp / (tp + fn), rel=1e-12)
    # one threshold given as a number: a number back
    single = fg.metrics.Precision(thresholds=0.5)
    single.update_state(y, p)
    assert isinstance(single.result(), float)


@pytest.mark.parametrize("from_logits", [False, True])
def test_auc_on_a_grid_of_its_thresholds_is_the_exact_roc_auc(from_logits):
    """With predictions between the thresholds' grid points (exact in binary),
    the interpolated ROC AUC from counts at 17 thresholds is the exact
    trapezoidal AUC that scikit-learn computes; streaming over batches
    changes nothing."""
    sk = pytest.importorskip("sklearn.metrics", reason="needs scikit-learn: pip install "
                             "scikit-learn")
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, (150, 1)).astype(F32)
    # (j - 1/2) / 16, j = 1..16: each value alone between two thresholds
    j = np.clip(rng.integers(1, 13, (150, 1)) + 4 * y, 1, 16)
    p = ((j - 0.5) / 16).astype(F32)
    w = rng.uniform(0.5, 2, 150)
    auc = fg.metrics.AUC(num_thresholds=17, from_logits=from_logits)
    z = np.log(p / (1 - p)).astype(F32) if from_logits else p
    for s in (slice(0, 20), slice(20, 21), slice(21, 150)):
        auc.update_state(y[s], z[s], sample_weight=w[s])
    want = sk.roc_auc_score(y.ravel(), p.ravel(), sample_weight=w)
    assert auc.result() == pytest.approx(want, rel=1e-6)   # weights taken in float32


def test_metric_names_follow_keras():
    m = fg.Sequential([Dense(3, "softmax", input_dim=2)])
    m.compile("adam", "categorical_crossentropy",
              metrics=["acc", "mse", fg.metrics.MeanSquaredError(), fg.metrics.AUC(),
                       fg.metrics.SparseCategoricalAccuracy(name="s"),
                       fg.metrics.TruePositives(), fg.metrics.TopKCategoricalAccuracy(k=2)])
    assert [x.name for x in m.metrics] == [
        "acc", "mse", "mean_squared_error", "auc", "s", "true_positives",
        "top_k_categorical_accuracy"]
    assert type(m.metrics[0]) is fg.metrics.CategoricalAccuracy
    for name, cls in [("auc", "AUC"), ("precision", "Precision"), ("recall", "Recall"),
                      ("root_mean_squared_error", "RootMeanSquaredError"),
                      ("mape", "MeanAbsolutePercentageError"),
                      ("top_k_categorical_accuracy", "TopKCategoricalAccuracy"),
                      ("sparse_top_k_categorical_accuracy", "SparseTopKCategoricalAccuracy"),
                      ("false_negatives", "FalseNegatives"), ("binary_accuracy",
                                                              "BinaryAccuracy")]:
        got = fg.metrics.get(name)
        assert type(got).__name__ == cls and got.name == name
        back = fg.metrics.deserialize(fg.metrics.serialize(got))
        assert type(back) is type(got) and back.get_config() == got.get_config()


# ---------------------------------------------------------------------------
# 3. errors
# ---------------------------------------------------------------------------

def test_bad_weights_and_metrics_are_refused_before_anything_changes():
    x, labels = blobs(30, k=3)
    m = mlp(seed=1)
    m.compile("adam", "sparse_categorical_crossentropy")
    w0 = m.get_weights()
    cases = [
        ({"sample_weight": np.ones(29)}, ValueError, "sample_weight"),
        ({"sample_weight": np.array(["a"] * 30)}, TypeError, "sample_weight"),
        ({"sample_weight": np.full(30, np.nan)}, ValueError, "sample_weight"),
        ({"class_weight": {0: 1.0}, "sample_weight": np.ones(30)}, ValueError, "class_weight"),
        ({"class_weight": [1.0, 2.0]}, TypeError, "class_weight"),
        ({"class_weight": {"0": 1.0}}, TypeError, "class_weight"),
        ({"validation_data": (x, labels, np.ones(3))}, ValueError, r"validation_data\[2\]"),
        ({"validation_data": (x,)}, ValueError, "validation_data"),
    ]
    for kw, err, match in cases:
        with pytest.raises(err, match=match):
            m.fit(x, labels, epochs=1, verbose=0, **kw)
        assert_same_bits(m.get_weights(), w0)
    with pytest.raises(ValueError, match="sample_weight"):
        m.evaluate(x, labels, sample_weight=np.ones(3), verbose=0)
    with pytest.raises(ValueError, match="sample_weight"):
        m.train_on_batch(x, labels, sample_weight=np.ones(3))
    assert_same_bits(m.get_weights(), w0)
    with pytest.raises(ValueError, match="metrics"):
        m.compile("adam", "mse", metrics=["mse", fg.metrics.MeanSquaredError(name="mse")])
    with pytest.raises(ValueError, match="top_k"):
        fg.metrics.Precision(top_k=2)
    with pytest.raises(ValueError, match="multi_label"):
        fg.metrics.AUC(multi_label=True)
    with pytest.raises(ValueError, match="curve"):
        fg.metrics.AUC(curve="XY")
    with pytest.raises(ValueError, match="thresholds"):
        fg.metrics.Recall(thresholds=[0.5, 1.5])
    with pytest.raises(TypeError, match="name"):
        fg.metrics.BinaryAccuracy(0.7)
    with pytest.raises(ValueError, match="y_true"):
        fg.metrics.MeanSquaredError().update_state(np.ones(4), np.ones((2, 3)))
    with pytest.raises(ValueError, match="sample_weight"):
        fg.metrics.MeanSquaredError().update_state(np.ones((2, 3)), np.ones((2, 3)), [1.0])


def test_compiled_metric_kernels_check_every_size():
    p = np.zeros((4, 3), F32)
    state = np.zeros(2)
    bad = [
        lambda: _core.metric_update(0, p, np.zeros((4, 2), F32), None, None, state, 0.0),
        lambda: _core.metric_update(0, p, None, None, None, state, 0.0),
        lambda: _core.metric_update(1, p, None, np.zeros(3, np.int64), None, state, 0.0),
        lambda: _core.metric_update(3, p, p, None, np.ones(5, F32), state, 0.0),
        lambda: _core.metric_update(3, p, p, None, None, np.zeros(1), 0.0),
        lambda: _core.metric_update(9, p, p, None, None, state, 0.0),
        lambda: _core.confusion_update(p, p, None, np.zeros(2), np.zeros((4, 3))),
        lambda: _core.confusion_update(p, p[:3], None, np.zeros(2), np.zeros((4, 2))),
        lambda: _core.bucket_update(p, p, None, np.zeros((3, 5))),
        lambda: _core.bucket_update(p, p, np.ones(2, F32), np.zeros((2, 5))),
        lambda: _core.loss_forward_backward(p, p, None, None, None, None, 0, False, 1.0,
                                            weights=np.ones(3, F32)),
    ]
    for f in bad:
        with pytest.raises(ValueError):
            f()
    # labels out of range and NaN predictions count as misses, never index memory
    _core.metric_update(1, p, None, np.array([0, 7, -1, 2], np.int64), None, state, 0.0)
    _core.metric_update(7, p, None, np.array([0, 7, -1, 2], np.int64), None, state, 3.0)
    nanp = np.full((4, 3), np.nan, F32)
    hist = np.zeros((2, 5))
    _core.bucket_update(nanp, p, None, hist)
    assert hist[1, 0] == 12


# ---------------------------------------------------------------------------
# 4. allocation
# ---------------------------------------------------------------------------

class _Trace(fg.callbacks.Callback):
    """From the 5th step on: the largest peak of traced memory within a step
    above its level when the step began, and what the steps left allocated
    (after gc.collect(), which also empties the interpreter's free lists)."""

    def __init__(self):
        super().__init__()
        self.step_peak = 0

    def on_train_batch_begin(self, batch, logs=None):
        if batch >= 4:
            gc.collect()
            tracemalloc.reset_peak()
            self.begin, _ = tracemalloc.get_traced_memory()
            if batch == 4:
                self.base = self.begin

    def on_train_batch_end(self, batch, logs=None):
        if batch >= 4:
            _, peak = tracemalloc.get_traced_memory()
            self.step_peak = max(self.step_peak, peak - self.begin)
        if batch == self.params["steps"] - 1:
            gc.collect()
            self.retained = tracemalloc.get_traced_memory()[0] - self.base


@pytest.mark.parametrize("metrics", [["accuracy"], ["accuracy", "auc", "mse"]],
                         ids=["accuracy", "accuracy-auc-mse"])
def test_fit_with_metrics_allocates_nothing_per_step(metrics):
    # hidden layers of 256 units: a (32, 256) float32 temporary is 32 KiB
    rng = np.random.default_rng(0)
    model = fg.Sequential([Dense(256, "relu", input_dim=20), Dense(256, "relu"),
                           Dense(4, "softmax")], seed=0)
    model.compile(fg.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=metrics)
    x = rng.normal(size=(32 * 40, 20)).astype(F32)
    y = np.eye(4, dtype=F32)[rng.integers(0, 4, len(x))]
    model.fit(x[:64], y[:64], batch_size=32, verbose=0)   # buffers made
    trace = _Trace()
    gc.collect()
    tracemalloc.start()
    try:
        model.fit(x, y, batch_size=32, epochs=1, shuffle=True, verbose=0, callbacks=[trace])
    finally:
        tracemalloc.stop()
    assert trace.step_peak < 16 * 1024, f"a step peaked {trace.step_peak} bytes above its start"
    assert trace.retained < 4096, f"{trace.retained} bytes retained over 35 steps"


# ---------------------------------------------------------------------------
# 5. callbacks
# ---------------------------------------------------------------------------

class _Crash(fg.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def _backup_model():
    m = fg.Sequential([Dense(8, "tanh", input_dim=4), fg.layers.Dropout(0.2),
                       Dense(3, "softmax")], seed=11)
    m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    return m


def test_backup_and_restore_resumes_exactly(tmp_path):
    x, labels = blobs(70, d=4, k=3)
    straight = _backup_model()
    hs = straight.fit(x, labels, epochs=5, batch_size=16, verbose=0)
    folder = tmp_path / "backup"
    model = _backup_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, labels, epochs=5, batch_size=16, verbose=0, callbacks=[
            fg.callbacks.BackupAndRestore(folder), _Crash(3)])
    assert os.path.exists(folder)
    # a new process would start from a new model: the backup carries everything
    again = _backup_model()
    h = again.fit(x, labels, epochs=5, batch_size=16, verbose=0,
                  callbacks=[fg.callbacks.BackupAndRestore(folder)])
    assert h.epoch == [3, 4]
    assert h.history["loss"] == hs.history["loss"][3:]
    assert_same_bits(again.get_weights(), straight.get_weights())
    assert again.optimizer.iterations == straight.optimizer.iterations
    assert not os.path.exists(folder)   # deleted after a finished fit


def test_backup_every_few_batches_resumes_at_the_epoch_in_progress(tmp_path):
    """save_freq=n saves every n batches with the epoch in progress; as in
    Keras, fit resumes at the start of that epoch from the saved state."""
    x, labels = blobs(70, d=4, k=3)   # 5 batches of 16 per epoch
    folder = tmp_path / "backup"
    model = _backup_model()
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, labels, epochs=5, batch_size=16, verbose=0, callbacks=[
            fg.callbacks.BackupAndRestore(folder, save_freq=3), _Crash(3)])
    # Keras's count: saves after steps 3, 6, 9, 12 and 15, the last one in
    # epoch 2 (its last batch, before the epoch ended)
    assert fg.load_model(str(folder / "latest.fgmodel")).optimizer.iterations == 15
    again = _backup_model()
    h = again.fit(x, labels, epochs=5, batch_size=16, verbose=0,
                  callbacks=[fg.callbacks.BackupAndRestore(folder, save_freq=3)])
    assert h.epoch == [2, 3, 4]
    assert again.optimizer.iterations == 15 + 3 * 5


def test_backup_and_restore_falls_back_to_the_previous_backup(tmp_path):
    x, labels = blobs(40, d=4, k=3)
    folder = tmp_path / "b"
    model = _backup_model()
    with pytest.raises(RuntimeError):
        model.fit(x, labels, epochs=4, batch_size=16, verbose=0, callbacks=[
            fg.callbacks.BackupAndRestore(folder, double_checkpoint=True), _Crash(2)])
    (folder / "latest.fgmodel").write_bytes(b"damaged")
    again = _backup_model()
    h = again.fit(x, labels, epochs=4, batch_size=16, verbose=0, callbacks=[
        fg.callbacks.BackupAndRestore(folder, double_checkpoint=True)])
    assert h.epoch == [1, 2, 3]   # the previous backup was taken after epoch 0
    with pytest.raises(ValueError, match="save_freq"):
        fg.callbacks.BackupAndRestore(folder, save_freq=0)
    with pytest.raises(ValueError, match="backup_dir"):
        fg.callbacks.BackupAndRestore("")


def test_callback_list_takes_keras_arguments():
    m = mlp()
    m.compile("adam", "sparse_categorical_crossentropy")
    seen = []
    lam = fg.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))
    cbs = fg.callbacks.CallbackList([lam], add_history=True, add_progbar=True, model=m,
                                    verbose=2, epochs=3, steps=4)
    kinds = [type(c).__name__ for c in cbs.callbacks]
    assert kinds == ["LambdaCallback", "History", "ProgbarLogger"]
    assert cbs.history is cbs.callbacks[1]
    assert all(c.params == {"verbose": 2, "epochs": 3, "steps": 4} and c.model is m
               for c in cbs.callbacks)
    cbs.on_train_batch_end(5, {"loss": 1.0})
    assert seen == [5] and cbs.has_batch_hooks("train", "end")
    assert not cbs.has_batch_hooks("test", "end")
    with pytest.raises(ValueError, match="factor"):
        fg.callbacks.ReduceLROnPlateau(factor=1.0)
    with pytest.raises(TypeError, match="on_epoch_end"):
        fg.callbacks.LambdaCallback(on_epoch_end=3)
