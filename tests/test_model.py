"""Tests of the Sequential model through its public API.

Every number is checked against an independent reference: float64 central
finite differences of the model's own loss (gradients), NumPy forward passes
and losses written from ``get_weights()`` (predict, evaluate,
train_on_batch), or the documented formulas (initializers).

Layout of this file:
  references ......... NumPy activations, forward pass and losses
  1. gradients ....... whole-model finite-difference check, every loss
  2. learning ........ classification / regression in float32 and float64
  3. allocation ...... a steady training step allocates nothing (tracemalloc)
  4. seeds ........... bit-identical reproducibility, build on first call
  5. weights ......... get_weights / set_weights order, shapes, validation
  6. inference ....... predict, evaluate, train_on_batch return values
  7. summary
  8. validation ...... errors naming the argument, no state change
  9. initializers .... sample statistics against the formulas
"""
import gc
import re
import tracemalloc
import zlib

import numpy as np
import pytest
from _reference import F32, F64, model_fd_gradients, ref_act, ref_loss_value

import fastgrad as fg
from fastgrad.layers import Activation, Dense


def make_layers(spec, input_dim, **dense_kwargs):
    """spec: list of ("dense", units, activation) or ("act", name)."""
    out = []
    for i, item in enumerate(spec):
        kw = {"input_dim": input_dim} if i == 0 else {}
        if item[0] == "dense":
            out.append(Dense(item[1], activation=item[2], **kw, **dense_kwargs))
        else:
            out.append(Activation(item[1], **kw))
    return out


def np_forward(spec, weights, x):
    """Output of the model described by spec, and the last pre-activation."""
    h = np.asarray(x, F64)
    ws = [np.asarray(w, F64) for w in weights]
    k = 0
    z = h
    for item in spec:
        if item[0] == "dense":
            z = h @ ws[k] + ws[k + 1]
            k += 2
            h = ref_act(item[2], z)
        else:
            z = h
            h = ref_act(item[1], z)
    return h, z


def np_loss(name, y, out, logits=None, from_logits=False, delta=1.0):
    """Batch-mean loss of the reference; from the logits with from_logits."""
    return ref_loss_value(name, y, logits if from_logits else out, from_logits, delta)


def blobs(n, features, classes, rng, spread=1.0):
    centers = rng.normal(0, 3.0, (classes, features))
    labels = rng.integers(0, classes, n)
    x = centers[labels] + spread * rng.normal(size=(n, features))
    return x, labels


# ---------------------------------------------------------------------------
# 1. whole-model finite differences
# ---------------------------------------------------------------------------

# (id, layer spec, loss, from_logits for the numpy reference, target kind)
GRAD_CASES = [
    ("mse", [("dense", 6, "tanh"), ("dense", 5, "sigmoid"), ("dense", 3, None)],
     "mse", False, "real"),
    ("mean_squared_error-softmax-out",
     [("dense", 6, "elu"), ("dense", 5, "gelu"), ("dense", 3, "softmax")],
     "mean_squared_error", False, "real"),
    ("mae", [("dense", 6, "gelu"), ("dense", 5, "silu"), ("dense", 3, None)],
     "mae", False, "mae"),
    ("huber", [("dense", 6, "silu"), ("dense", 5, "tanh"), ("dense", 3, None)],
     "huber", False, "huber1"),
    ("huber-delta0.5", [("dense", 6, "tanh"), ("dense", 5, "elu"), ("dense", 3, None)],
     "huber0.5", False, "huber0.5"),
    ("bce-sigmoid-fused",
     [("dense", 6, "tanh"), ("dense", 5, "gelu"), ("dense", 3, "sigmoid")],
     "binary_crossentropy", True, "binary"),
    ("bce-probabilities-unfused",
     [("dense", 6, "silu"), ("dense", 3, "sigmoid"), ("act", "linear")],
     "binary_crossentropy", False, "binary"),
    ("bce-linear-from_logits",
     [("dense", 6, "elu"), ("dense", 5, "tanh"), ("dense", 3, None)],
     "BinaryCrossentropy(from_logits=True)", True, "binary"),
    ("cce-softmax-fused",
     [("dense", 6, "tanh"), ("dense", 5, "sigmoid"), ("dense", 3, "softmax")],
     "categorical_crossentropy", True, "onehot"),
    ("cce-linear-from_logits",
     [("dense", 6, "gelu"), ("dense", 5, "elu"), ("dense", 3, None)],
     "CategoricalCrossentropy(from_logits=True)", True, "onehot"),
    ("cce-softmax-unfused",
     [("dense", 6, "silu"), ("dense", 3, "softmax"), ("act", "linear")],
     "categorical_crossentropy", False, "onehot"),
    ("sparse-cce-softmax-fused",
     [("dense", 6, "sigmoid"), ("dense", 5, "silu"), ("act", "tanh"),
      ("dense", 3, "softmax")],
     "sparse_categorical_crossentropy", True, "labels"),
    ("mse-leaky_relu-selu", [("dense", 6, "leaky_relu"), ("dense", 5, "selu"),
                             ("dense", 3, None)], "mse", False, "real"),
    ("cce-activation-layer-softmax",
     [("dense", 6, "tanh"), ("dense", 3, None), ("act", "softmax")],
     "categorical_crossentropy", True, "onehot"),
    ("bce-activation-layer-sigmoid",
     [("dense", 6, "gelu"), ("dense", 2, None), ("act", "sigmoid")],
     "binary_crossentropy", True, "binary"),
    ("cce-function-object",
     [("dense", 6, "tanh"), ("dense", 3, "softmax")],
     "fn:categorical_crossentropy", True, "onehot"),
]


def _loss_arg(loss):
    if loss == "huber0.5":
        return fg.losses.Huber(delta=0.5), "huber", 0.5
    if loss == "BinaryCrossentropy(from_logits=True)":
        return fg.losses.BinaryCrossentropy(from_logits=True), "binary_crossentropy", 1.0
    if loss == "CategoricalCrossentropy(from_logits=True)":
        return (fg.losses.CategoricalCrossentropy(from_logits=True),
                "categorical_crossentropy", 1.0)
    if loss.startswith("fn:"):
        return getattr(fg.losses, loss[3:]), loss[3:], 1.0
    name = {"mean_squared_error": "mse"}.get(loss, loss)
    return loss, name, 1.0


def _targets(kind, pred, rng):
    n, o = pred.shape
    if kind == "real":
        return rng.normal(size=(n, o))
    if kind == "mae":
        # |p - t| >= 0.3: far from the kink at 0 for a step of 1e-6
        return pred + rng.choice([-1, 1], size=(n, o)) * rng.uniform(0.3, 0.8, (n, o))
    if kind.startswith("huber"):
        d = float(kind[5:])
        # both regimes, every error at least 0.2 * delta away from |e| = delta
        mag = np.where(rng.random((n, o)) < 0.5, rng.uniform(0.1, 0.8, (n, o)),
                       rng.uniform(1.2, 2.5, (n, o))) * d
        return pred + rng.choice([-1, 1], size=(n, o)) * mag
    if kind == "binary":
        return rng.uniform(0, 1, (n, o))  # soft targets exercise t and 1 - t
    if kind == "onehot":
        return np.eye(o)[rng.integers(0, o, n)]
    if kind == "labels":
        return rng.integers(0, o, n)
    raise AssertionError(kind)


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_whole_model_gradients_match_finite_differences(case):
    _, spec, loss, from_logits, kind = case
    rng = np.random.default_rng(zlib.crc32(case[0].encode()))
    loss_arg, loss_name, delta = _loss_arg(loss)
    model = fg.Sequential(make_layers(spec, 4), dtype="float64", seed=3)
    model.compile(optimizer="sgd", loss=loss_arg)
    # spread the weights a little so every activation works in its non-linear range
    model.set_weights([w + rng.normal(0, 0.3, w.shape) for w in model.get_weights()])
    x = rng.normal(size=(7, 4))
    weights = model.get_weights()
    out, logits = np_forward(spec, weights, x)
    y = _targets(kind, out, rng)

    loss_value, grads = model.compute_gradients(x, y)
    # the loss itself against NumPy
    ref = np_loss(loss_name, y, out, logits, from_logits, delta)
    assert loss_value == pytest.approx(ref, rel=1e-12, abs=1e-15)
    # compute_gradients changes no weight
    for a, b in zip(model.get_weights(), weights):
        assert np.array_equal(a, b)

    assert model.weight_names == [f"{l.name}/{n}" for l in model.layers
                                  if isinstance(l, Dense) for n in ("kernel", "bias")]
    assert [g.shape for g in grads] == [w.shape for w in weights]
    fd = model_fd_gradients(model, x, y)
    scale = max(float(np.max(np.abs(f))) for f in fd)
    assert scale > 1e-4  # a real, non-zero gradient is being checked
    for name, g, f in zip(model.weight_names, grads, fd):
        err = float(np.max(np.abs(g - f))) / scale
        assert err < 1e-6, f"{name}: max relative error {err:.3g}"
    # evaluate (inference mode, one batch) gives the same loss for Dense-only models
    assert model.evaluate(x, y, batch_size=64, verbose=0) == pytest.approx(loss_value,
                                                                           rel=1e-12)


def test_compute_gradients_excludes_penalty_but_train_on_batch_includes_it():
    rng = np.random.default_rng(0)
    model = fg.Sequential([Dense(5, "tanh", input_dim=3,
                                 kernel_regularizer=fg.regularizers.L2(0.05)),
                           Dense(2)], dtype="float64", seed=1)
    model.compile(optimizer=fg.optimizers.SGD(0.1), loss="mse")
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 2))
    w = model.get_weights()
    out, _ = np_forward([("dense", 5, "tanh"), ("dense", 2, None)], w, x)
    data_loss = np_loss("mse", y, out)
    penalty = 0.05 * float(np.sum(w[0] ** 2))
    loss, grads = model.compute_gradients(x, y)
    assert loss == pytest.approx(data_loss, rel=1e-12)
    # the step adds the penalty's gradient 2 * l2 * w to the data gradient
    got = model.train_on_batch(x, y)
    assert got == pytest.approx(data_loss + penalty, rel=1e-12)
    after = model.get_weights()
    np.testing.assert_allclose(after[0], w[0] - 0.1 * (grads[0] + 0.1 * w[0]),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(after[2], w[2] - 0.1 * grads[2], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------
# 2. learning
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_learns_multiclass_classification(dtype):
    rng = np.random.default_rng(11)
    x, labels = blobs(300, 4, 3, rng)
    y = np.eye(3)[labels]
    model = fg.Sequential([Dense(16, "relu", input_dim=4), Dense(3, "softmax")],
                          dtype=dtype, seed=5)
    model.compile(optimizer=fg.optimizers.Adam(0.01), loss="categorical_crossentropy",
                  metrics=["accuracy"])
    loss0, _acc0 = model.evaluate(x, y, verbose=0)
    hist = model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    loss1, acc1 = model.evaluate(x, y, verbose=0)
    pred = model.predict(x)
    acc_np = float(np.mean(np.argmax(pred, 1) == labels))
    assert acc1 == pytest.approx(acc_np)
    assert acc_np > 0.9  # chance is 1/3
    assert loss1 < 0.5 * loss0
    assert len(hist.history["loss"]) == 8
    assert hist.history["loss"][-1] < hist.history["loss"][0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_learns_binary_classification(dtype):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(400, 2))
    y = (x[:, 0] ** 2 + x[:, 1] ** 2 < 1.2).astype(float)  # a disc: not linearly separable
    model = fg.Sequential([Dense(16, "tanh", input_dim=2), Dense(1, "sigmoid")],
                          dtype=dtype, seed=2)
    model.compile(optimizer=fg.optimizers.Adam(0.03), loss="binary_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=25, batch_size=32, verbose=0)
    p = model.predict(x)[:, 0]
    acc = float(np.mean((p > 0.5) == (y > 0.5)))
    assert acc > 0.9  # the majority class is about 55%
    _, acc_eval = model.evaluate(x, y, verbose=0)
    assert acc_eval == pytest.approx(acc)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_learns_regression(dtype):
    rng = np.random.default_rng(13)
    x = rng.uniform(-2, 2, (256, 3))
    y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] - x[:, 2])[:, None]
    model = fg.Sequential([Dense(32, "tanh", input_dim=3), Dense(1)], dtype=dtype, seed=4)
    model.compile(optimizer=fg.optimizers.Adam(0.01), loss="mse")
    mse0 = float(np.mean((model.predict(x).astype(F64) - y) ** 2))
    model.fit(x, y, epochs=40, batch_size=32, verbose=0)
    mse1 = float(np.mean((model.predict(x).astype(F64) - y) ** 2))
    assert model.evaluate(x, y, verbose=0) == pytest.approx(mse1, rel=1e-4)
    assert mse1 < mse0 / 10


# ---------------------------------------------------------------------------
# 3. a steady training step allocates nothing
# ---------------------------------------------------------------------------

def _traced_growth(step, n=100):
    """Bytes still allocated after n calls of step (tracemalloc)."""
    gc.collect()
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        for _ in range(3):
            step()
        gc.collect()
        before, _ = tracemalloc.get_traced_memory()
        for _ in range(n):
            step()
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
    finally:
        if started:
            tracemalloc.stop()
    return after - before


SLACK = 4096  # interpreter noise; one leaked (32, 10) float32 per step is 128 000 bytes


def _steady_model(optimizer, metrics=None, dtype="float32"):
    rng = np.random.default_rng(0)
    model = fg.Sequential([Dense(16, "relu", input_dim=10), Dense(12, "gelu"),
                           Dense(4, "softmax")], dtype=dtype, seed=0)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy", metrics=metrics)
    x = rng.normal(size=(32, 10)).astype(dtype)
    y = np.eye(4, dtype=dtype)[rng.integers(0, 4, 32)]
    return model, x, y


def test_growth_measurement_detects_a_leak():
    leaked = []
    growth = _traced_growth(lambda: leaked.append(np.empty((32, 10), F32)))
    assert growth > SLACK


@pytest.mark.parametrize("optimizer", [
    lambda: fg.optimizers.Adam(1e-3),
    lambda: fg.optimizers.SGD(1e-2, momentum=0.9, nesterov=True),
    lambda: fg.optimizers.RMSprop(1e-3, centered=True, global_clipnorm=1.0),
], ids=["adam", "sgd-nesterov", "rmsprop-centered-clip"])
def test_train_on_batch_steady_state_allocates_nothing(optimizer):
    model, x, y = _steady_model(optimizer())
    w0 = model.get_weights()
    growth = _traced_growth(lambda: model.train_on_batch(x, y))
    assert growth <= SLACK, f"{growth} bytes retained over 100 steps"
    assert model.optimizer.iterations == 103
    assert not np.array_equal(model.get_weights()[0], w0[0])


@pytest.mark.parametrize("optimizer, bn", [
    (lambda: fg.optimizers.Adam(1e-3, clipnorm=1.0), False),
    (lambda: fg.optimizers.SGD(1e-2, clipvalue=0.01), False),
    (lambda: fg.optimizers.Adam(1e-3, global_clipnorm=1.0), True),
], ids=["adam-clipnorm", "sgd-clipvalue", "adam-batchnorm"])
def test_train_on_batch_makes_no_batch_sized_temporaries(optimizer, bn):
    # hidden layers of 256 units: any (32, 256) float32 temporary is 32 KiB,
    # and one over the 70 000 parameters 280 KB
    rng = np.random.default_rng(0)
    model = fg.Sequential([Dense(256, "relu", input_dim=10)]
                          + ([fg.layers.BatchNormalization()] if bn else [])
                          + [Dense(256, "gelu"), Dense(4, "softmax")], seed=0)
    model.compile(optimizer=optimizer(), loss="categorical_crossentropy")
    x = rng.normal(size=(32, 10)).astype(F32)
    y = np.eye(4, dtype=F32)[rng.integers(0, 4, 32)]
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(3):
            model.train_on_batch(x, y)
        gc.collect()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(20):
            model.train_on_batch(x, y)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - base < 16 * 1024, f"peak {peak - base} bytes above the steady state"


@pytest.mark.parametrize("dense_only", [True, False], ids=["dense-chain", "layer-calls"])
def test_fit_steady_state_makes_no_batch_sized_temporaries(dense_only):
    """Inside fit, from the sixth step to the thirty-sixth: nothing retained,
    and no temporary near a batch's size (a (32, 784) float32 gather is
    100 KB, a (32, 256) activation 32 KiB); the batch logs a callback gets
    are the small dicts Keras's are too."""
    rng = np.random.default_rng(0)
    model = fg.Sequential([Dense(256, "relu", input_dim=784)]
                          + ([] if dense_only else [fg.layers.Dropout(0.2)])
                          + [Dense(256, "relu"), Dense(10, "softmax")], seed=0)
    model.compile(optimizer=fg.optimizers.Adam(global_clipnorm=1.0),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = rng.normal(size=(32 * 40, 784)).astype(F32)
    y = rng.integers(0, 10, 32 * 40)

    class Probe(fg.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 5:
                gc.collect()
                tracemalloc.reset_peak()
                self.base = tracemalloc.get_traced_memory()[0]

        def on_train_batch_end(self, batch, logs=None):
            if batch == 35:
                self.peak = tracemalloc.get_traced_memory()[1]
                gc.collect()
                self.growth = tracemalloc.get_traced_memory()[0] - self.base

    probe = Probe()
    model.fit(x, y, epochs=1, verbose=0)          # buffers and moments exist
    tracemalloc.start()
    try:
        model.fit(x, y, epochs=1, verbose=0, callbacks=[probe])
    finally:
        tracemalloc.stop()
    assert (model._chain is not None) == dense_only
    assert probe.growth <= SLACK, f"{probe.growth} bytes retained over 30 steps"
    assert probe.peak - probe.base < 16 * 1024, f"peak {probe.peak - probe.base} bytes"


# ---------------------------------------------------------------------------
# 4. seeds and building
# ---------------------------------------------------------------------------

def _fit_weights(seed, dtype="float32", x=None, y=None):
    model = fg.Sequential([Dense(8, "tanh"), Dense(3, "softmax")], dtype=dtype, seed=seed)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    assert not model.built
    model.fit(x, y, epochs=3, batch_size=10, shuffle=True, verbose=0)
    assert model.built
    return model.get_weights()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_gives_bit_identical_weights_after_fit(dtype):
    rng = np.random.default_rng(1)
    x, labels = blobs(45, 5, 3, rng)  # 45 rows: the last batch of 5 is partial
    a = _fit_weights(42, dtype, x, labels)
    b = _fit_weights(42, dtype, x, labels)
    c = _fit_weights(43, dtype, x, labels)
    assert [w.shape for w in a] == [(5, 8), (8,), (8, 3), (3,)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert all(w.dtype == np.dtype(dtype) for w in a)


def test_shuffle_order_follows_the_seed():
    # identical initial weights, different model seeds: only the shuffling differs
    rng = np.random.default_rng(2)
    x, labels = blobs(40, 3, 2, rng)
    weights = []
    for seed in (7, 7, 8):
        model = fg.Sequential([Dense(4, "tanh", input_dim=3), Dense(2, "softmax")],
                              dtype="float64", seed=seed)
        model.compile(optimizer=fg.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        model.set_weights([np.full(w.shape, 0.1 * (i + 1)) * np.cos(np.arange(w.size)
                                                                      ).reshape(w.shape)
                           for i, w in enumerate(model.get_weights())])
        model.fit(x, labels, epochs=2, batch_size=8, verbose=0)
        weights.append(model.get_weights())
    assert all(np.array_equal(u, v) for u, v in zip(weights[0], weights[1]))
    assert not np.array_equal(weights[0][0], weights[2][0])


def test_build_on_first_predict_and_layer_input_shape():
    model = fg.Sequential([Dense(4, "relu"), Dense(2)], seed=0)
    assert not model.built
    out = model.predict(np.ones((3, 7)))
    assert model.built and out.shape == (3, 2) and out.dtype == F32
    assert [w.shape for w in model.get_weights()] == [(7, 4), (4,), (4, 2), (2,)]
    m2 = fg.Sequential([Dense(4, input_shape=(6,)), Dense(2)])
    m2.compile(optimizer="sgd", loss="mse")
    assert m2.built
    assert m2.get_weights()[0].shape == (6, 4)


# ---------------------------------------------------------------------------
# 5. weights
# ---------------------------------------------------------------------------

def _small(dtype="float64", use_bias=True):
    model = fg.Sequential([Dense(6, "tanh", input_dim=4, use_bias=use_bias),
                           Dense(3, "softmax")], dtype=dtype, seed=9)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    return model


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_get_weights_order_shapes_and_copies(dtype):
    model = _small(dtype)
    ws = model.get_weights()
    assert [w.shape for w in ws] == [(4, 6), (6,), (6, 3), (3,)]
    assert all(w.dtype == np.dtype(dtype) for w in ws)
    assert not np.any(ws[1]) and not np.any(ws[3])  # zero biases
    assert np.any(ws[0]) and np.any(ws[2])
    assert model.weight_names == ["dense/kernel", "dense/bias", "dense_1/kernel",
                                  "dense_1/bias"]
    ws[0][...] = 123.0  # a copy: the model does not change
    assert not np.any(model.get_weights()[0] == 123.0)
    assert [w.shape for w in _small(dtype, use_bias=False).get_weights()] == \
        [(4, 6), (6, 3), (3,)]


def test_kernel_layout_is_in_by_units():
    # y = x @ kernel + bias with kernel (in, units): checked with a non-square kernel
    model = fg.Sequential([Dense(3, input_dim=2)], dtype="float64")
    k = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    b = np.array([0.5, -0.5, 1.0])
    model.set_weights([k, b])
    x = np.array([[1.0, 10.0]])
    np.testing.assert_array_equal(model.predict(x), x @ k + b)


def test_set_weights_roundtrip():
    model = _small()
    rng = np.random.default_rng(3)
    new = [rng.normal(size=w.shape) for w in model.get_weights()]
    model.set_weights(new)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), new))
    # the weights are used by the forward pass
    x = rng.normal(size=(5, 4))
    ref, _ = np_forward([("dense", 6, "tanh"), ("dense", 3, "softmax")], new, x)
    np.testing.assert_allclose(model.predict(x), ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bad", ["too_few", "too_many", "last_shape", "first_shape",
                                 "transposed", "extra_dim"])
def test_set_weights_rejects_and_leaves_weights_unchanged(bad):
    model = _small()
    before = model.get_weights()
    new = [w + 1.0 for w in before]
    if bad == "too_few":
        new = new[:-1]
    elif bad == "too_many":
        new = new + [np.zeros(3)]
    elif bad == "last_shape":
        new[-1] = np.zeros(4)
    elif bad == "first_shape":
        new[0] = np.zeros((4, 7))
    elif bad == "transposed":
        new[2] = new[2].T.copy()
    elif bad == "extra_dim":
        new[1] = new[1][None, :]
    with pytest.raises(ValueError):
        model.set_weights(new)
    for a, b in zip(model.get_weights(), before):
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------
# 6. predict, evaluate, train_on_batch
# ---------------------------------------------------------------------------

SPEC = [("dense", 6, "silu"), ("dense", 5, "elu"), ("dense", 3, "softmax")]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_dtype_shape_probabilities_and_numpy_forward(dtype):
    rng = np.random.default_rng(4)
    model = fg.Sequential(make_layers(SPEC, 4), dtype=dtype, seed=1)
    x = rng.normal(size=(37, 4))
    p = model.predict(x)
    assert p.dtype == np.dtype(dtype) and p.shape == (37, 3)
    tol = 1e-12 if dtype == "float64" else 2e-6
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=tol)
    assert np.all(p > 0)
    ref, _ = np_forward(SPEC, model.get_weights(), x.astype(dtype))
    np.testing.assert_allclose(p, ref, rtol=tol * 10, atol=tol)
    # batching does not change the result
    np.testing.assert_array_equal(model.predict(x, batch_size=5), p)
    # any numeric input dtype and layout is accepted
    np.testing.assert_array_equal(model.predict(np.asfortranarray(x.astype(dtype))), p)


@pytest.mark.parametrize("loss,kind", [("categorical_crossentropy", "onehot"),
                                       ("sparse_categorical_crossentropy", "labels"),
                                       ("mse", "real")])
def test_evaluate_matches_numpy(loss, kind):
    rng = np.random.default_rng(5)
    model = fg.Sequential(make_layers(SPEC, 4), dtype="float64", seed=2)
    model.compile(optimizer="adam", loss=loss)
    x = rng.normal(size=(23, 4))  # batches of 5: the last is partial
    out, z = np_forward(SPEC, model.get_weights(), x)
    y = _targets(kind, out, rng)
    ref = np_loss(loss, y, out, z, from_logits=(loss != "mse"))
    assert model.evaluate(x, y, batch_size=5, verbose=0) == pytest.approx(ref, rel=1e-12)
    assert model.evaluate(x, y, batch_size=100, verbose=0) == pytest.approx(ref, rel=1e-12)


def test_evaluate_adds_regularization_penalty_and_reports_accuracy():
    rng = np.random.default_rng(6)
    model = fg.Sequential([Dense(6, "tanh", input_dim=4,
                                 kernel_regularizer=fg.regularizers.L1L2(0.01, 0.02),
                                 bias_regularizer=fg.regularizers.L1(0.03)),
                           Dense(3, "softmax", kernel_regularizer=fg.regularizers.L2(0.04))],
                          dtype="float64", seed=2)
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    w = [v + rng.normal(0, 0.1, v.shape) for v in model.get_weights()]
    model.set_weights(w)
    x = rng.normal(size=(20, 4))
    labels = rng.integers(0, 3, 20)
    y = np.eye(3)[labels]
    out, z = np_forward([("dense", 6, "tanh"), ("dense", 3, "softmax")], w, x)
    penalty = (0.01 * np.abs(w[0]).sum() + 0.02 * (w[0] ** 2).sum()
               + 0.03 * np.abs(w[1]).sum() + 0.04 * (w[2] ** 2).sum())
    loss, acc = model.evaluate(x, y, batch_size=8, verbose=0)
    assert loss == pytest.approx(np_loss("categorical_crossentropy", y, out, z, True)
                                 + penalty, rel=1e-12)
    assert acc == pytest.approx(np.mean(np.argmax(out, 1) == labels))


def test_train_on_batch_return_values():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(16, 4))
    labels = rng.integers(0, 3, 16)
    y = np.eye(3)[labels]

    model = fg.Sequential(make_layers(SPEC, 4), dtype="float64", seed=3)
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    out, z = np_forward(SPEC, model.get_weights(), x)
    got = model.train_on_batch(x, y)
    assert type(got) is float
    # the loss of the batch at the weights before the step
    assert got == pytest.approx(np_loss("categorical_crossentropy", y, out, z, True),
                                rel=1e-12)

    model = fg.Sequential(make_layers(SPEC, 4), dtype="float64", seed=3)
    model.compile(optimizer="sgd", loss="categorical_crossentropy", metrics=["accuracy"])
    got = model.train_on_batch(x, y)
    assert isinstance(got, list) and len(got) == 2
    assert got[0] == pytest.approx(np_loss("categorical_crossentropy", y, out, z, True),
                                   rel=1e-12)
    assert got[1] == pytest.approx(np.mean(np.argmax(out, 1) == labels))
    # and the step moved the weights
    assert not np.array_equal(model.get_weights()[0], fg.Sequential(
        make_layers(SPEC, 4), dtype="float64", seed=3).get_weights()[0])


def test_train_on_batch_sparse_accuracy_and_float32_return():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(12, 4)).astype(F32)
    labels = rng.integers(0, 3, 12)
    model = fg.Sequential(make_layers(SPEC, 4), seed=3)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    out, z = np_forward(SPEC, model.get_weights(), x)
    loss, acc = model.train_on_batch(x, labels)
    assert type(loss) is float
    assert loss == pytest.approx(np_loss("sparse_categorical_crossentropy", labels, out, z,
                                         True), rel=1e-5)
    assert acc == pytest.approx(np.mean(np.argmax(out, 1) == labels))


# ---------------------------------------------------------------------------
# 7. summary
# ---------------------------------------------------------------------------

def test_summary_lists_layers_shapes_and_parameter_counts(capsys):
    model = fg.Sequential([Dense(1200, "relu", input_dim=30), Activation("tanh"),
                           Dense(10, "softmax")], seed=0)
    ws = model.get_weights()  # builds the model
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    counts = [ws[0].size + ws[1].size, 0, ws[2].size + ws[3].size]
    for layer, shape, count in zip(model.layers, ["(None, 1200)", "(None, 1200)",
                                                  "(None, 10)"], counts):
        row = [l for l in lines if l.strip().startswith(layer.name + " ")]
        assert len(row) == 1, (layer.name, text)
        assert shape in row[0]
        assert int(row[0].split()[-1].replace(",", "")) == count
    total = sum(w.size for w in ws)
    assert total == 37200 + 12010
    totals = [l for l in lines if "Total params" in l]
    assert len(totals) == 1
    assert int(re.findall(r"[\d,]+", totals[0])[-1].replace(",", "")) == total
    trainable = [l for l in lines if "Trainable params" in l and "Non" not in l]
    assert int(re.findall(r"[\d,]+", trainable[0])[-1].replace(",", "")) == total
    assert "Dense" in text and "Activation" in text
    # without print_fn it prints to stdout
    model.summary()
    printed = capsys.readouterr().out
    assert "dense_1" in printed and "37,200" in printed and "49,210" in printed


def test_summary_of_a_model_with_input_dim_before_any_call():
    # the first layer's input_dim fixes every shape: summary needs nothing more
    model = fg.Sequential([Dense(20, "relu", input_dim=30), Dense(10, "softmax")], seed=0)
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "(None, 20)" in text and "(None, 10)" in text, text
    assert "620" in text and "210" in text and "830" in text, text


# ---------------------------------------------------------------------------
# 8. validation
# ---------------------------------------------------------------------------

def _compiled(loss="categorical_crossentropy", out_act="softmax"):
    model = fg.Sequential([Dense(5, "relu", input_dim=4), Dense(3, out_act)], seed=0)
    model.compile(optimizer="adam", loss=loss)
    return model


def _state(model):
    return [w.copy() for w in model.get_weights()], model.optimizer.iterations


def _assert_unchanged(model, state):
    ws, it = state
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), ws))
    assert model.optimizer.iterations == it


X = np.zeros((8, 4), F32)
Y = np.eye(3, dtype=F32)[np.arange(8) % 3]


@pytest.mark.parametrize("x,y,exc,pattern", [
    (np.zeros((8, 5)), Y, ValueError, r"\bx\b"),
    (np.zeros(8), Y, ValueError, r"\bx\b"),
    (np.zeros((8, 4, 1)), Y, ValueError, r"\bx\b"),
    (X, Y[:7], ValueError, r"\b[xy]\b"),
    (np.full((8, 4), "a"), Y, TypeError, r"\bx\b"),
    (np.empty((8, 4), object), Y, TypeError, r"\bx\b"),
    (X, np.eye(4)[np.arange(8) % 4], ValueError, r"\by\b"),
    (X, np.zeros((8, 3, 1)), ValueError, r"\by\b"),
], ids=["features", "x-1d", "x-3d", "length", "x-str", "x-object", "onehot-width",
        "y-3d"])
@pytest.mark.parametrize("call", ["fit", "train_on_batch", "evaluate", "compute_gradients"])
def test_bad_inputs_raise_naming_the_argument(call, x, y, exc, pattern):
    model = _compiled()
    state = _state(model)
    kwargs = {"verbose": 0} if call in ("fit", "evaluate") else {}
    with pytest.raises(exc, match=pattern):
        getattr(model, call)(x, y, **kwargs)
    _assert_unchanged(model, state)


@pytest.mark.parametrize("labels", [np.array([0, 1, 2, 3, 0, 1, 2, 0]),
                                    np.array([0, 1, 2, -1, 0, 1, 2, 0]),
                                    np.array([0, 1, 2, 0.5, 0, 1, 2, 0]),
                                    np.array([0, 1, 2, 0, 1, 2, 0])],
                         ids=["too-large", "negative", "fractional", "length"])
def test_sparse_labels_out_of_range(labels):
    model = _compiled("sparse_categorical_crossentropy")
    state = _state(model)
    for call in ("fit", "train_on_batch", "evaluate"):
        kwargs = {"verbose": 0} if call != "train_on_batch" else {}
        with pytest.raises(ValueError, match=r"y_true|\by\b"):
            getattr(model, call)(X, labels, **kwargs)
    _assert_unchanged(model, state)


def test_predict_validates_x():
    model = _compiled()
    with pytest.raises(ValueError, match=r"\bx\b"):
        model.predict(np.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"\bx\b"):
        model.predict(np.zeros(4))
    with pytest.raises(TypeError, match=r"\bx\b"):
        model.predict(np.array([["a"] * 4]))


def test_unknown_names_raise_value_error():
    with pytest.raises(ValueError, match="optimizer"):
        fg.Sequential([Dense(2, input_dim=2)]).compile(optimizer="adamax2", loss="mse")
    with pytest.raises(ValueError, match="loss"):
        fg.Sequential([Dense(2, input_dim=2)]).compile(optimizer="adam", loss="msle2")
    with pytest.raises(ValueError, match="activation"):
        Dense(2, activation="swishy")
    with pytest.raises(ValueError, match="activation"):
        Activation("rellu")
    with pytest.raises(ValueError, match="initializer"):
        Dense(2, kernel_initializer="glorot_uniformm")
    with pytest.raises(ValueError, match="initializer"):
        Dense(2, bias_initializer="zeroes")


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="dtype"):
        fg.Sequential([Dense(2, input_dim=2)], dtype="float16")
    with pytest.raises(ValueError, match="dtype"):
        fg.Sequential(dtype="int32")
    with pytest.raises(ValueError, match="units"):
        Dense(units=0)
    with pytest.raises(ValueError, match="units"):
        Dense(units=-3)
    model = fg.Sequential([Dense(2, input_dim=2)])
    for call in ("fit", "train_on_batch", "evaluate"):
        with pytest.raises(RuntimeError):
            getattr(model, call)(np.zeros((4, 2)), np.zeros((4, 2)))


# ---------------------------------------------------------------------------
# 9. initializers
# ---------------------------------------------------------------------------

FAN_IN, FAN_OUT = 400, 300
TRUNC = 0.87962566103423978
UNIFORM = {  # name: limit
    "glorot_uniform": np.sqrt(6 / (FAN_IN + FAN_OUT)),
    "xavier_uniform": np.sqrt(6 / (FAN_IN + FAN_OUT)),
    "he_uniform": np.sqrt(6 / FAN_IN),
    "lecun_uniform": np.sqrt(3 / FAN_IN),
    "random_uniform": 0.05,
}
TRUNCATED = {  # name: target variance
    "glorot_normal": 2 / (FAN_IN + FAN_OUT),
    "xavier_normal": 2 / (FAN_IN + FAN_OUT),
    "he_normal": 2 / FAN_IN,
    "lecun_normal": 1 / FAN_IN,
}
ALL_INITIALIZERS = list(UNIFORM) + list(TRUNCATED) + ["orthogonal", "random_normal",
                                                      "zeros", "ones"]


def _kernel(name, seed=0, shape=(FAN_IN, FAN_OUT)):
    model = fg.Sequential([Dense(shape[1], kernel_initializer=name, input_dim=shape[0])],
                          dtype="float64", seed=seed)
    return model.get_weights()[0]


def _kurtosis(w):
    w = w - w.mean()
    return float(np.mean(w ** 4) / np.mean(w ** 2) ** 2)


@pytest.mark.parametrize("name", list(UNIFORM))
def test_uniform_initializers(name):
    w = _kernel(name)
    limit = UNIFORM[name]
    assert w.shape == (FAN_IN, FAN_OUT)
    assert np.max(np.abs(w)) <= limit
    assert np.max(w) > 0.995 * limit and np.min(w) < -0.995 * limit
    assert np.var(w) == pytest.approx(limit ** 2 / 3, rel=0.02)
    assert abs(np.mean(w)) < 5 * limit / np.sqrt(3 * w.size)
    assert _kurtosis(w) == pytest.approx(1.8, abs=0.05)  # uniform


@pytest.mark.parametrize("name", list(TRUNCATED))
def test_truncated_normal_initializers(name):
    w = _kernel(name)
    var = TRUNCATED[name]
    bound = 2 * np.sqrt(var) / TRUNC
    assert np.max(np.abs(w)) <= bound * (1 + 1e-12)
    assert np.max(np.abs(w)) > 0.98 * bound
    assert np.var(w) == pytest.approx(var, rel=0.03)
    assert abs(np.mean(w)) < 5 * np.sqrt(var / w.size)
    assert _kurtosis(w) == pytest.approx(2.366, abs=0.05)  # N(0,1) truncated to +-2


def test_random_normal_initializer():
    w = _kernel("random_normal")
    assert np.std(w) == pytest.approx(0.05, rel=0.02)
    assert abs(np.mean(w)) < 5 * 0.05 / np.sqrt(w.size)
    assert _kurtosis(w) == pytest.approx(3.0, abs=0.1)  # not truncated
    assert np.max(np.abs(w)) > 3 * 0.05


@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (64, 64)])
def test_orthogonal_initializer(shape):
    w = _kernel("orthogonal", shape=shape)
    assert w.shape == shape
    small = min(shape)
    gram = w.T @ w if shape[0] >= shape[1] else w @ w.T
    np.testing.assert_allclose(gram, np.eye(small), atol=1e-10)


def test_constant_initializers():
    assert np.array_equal(_kernel("zeros", shape=(40, 30)), np.zeros((40, 30)))
    assert np.array_equal(_kernel("ones", shape=(40, 30)), np.ones((40, 30)))
    model = fg.Sequential([Dense(3, bias_initializer="ones", input_dim=2)])
    assert np.array_equal(model.get_weights()[1], np.ones(3, F32))


@pytest.mark.parametrize("name", ALL_INITIALIZERS)
def test_initializer_same_seed_same_values(name):
    a = _kernel(name, seed=5, shape=(40, 30))
    b = _kernel(name, seed=5, shape=(40, 30))
    assert np.array_equal(a, b)
    if name not in ("zeros", "ones"):
        assert not np.array_equal(a, _kernel(name, seed=6, shape=(40, 30)))


@pytest.mark.parametrize("alias,name", [("xavier_uniform", "glorot_uniform"),
                                        ("xavier_normal", "glorot_normal")])
def test_initializer_aliases_are_the_same_distribution(alias, name):
    assert np.array_equal(_kernel(alias, seed=3, shape=(20, 10)),
                          _kernel(name, seed=3, shape=(20, 10)))


@pytest.mark.parametrize("cls", ["GlorotUniform", "HeNormal", "Orthogonal", "RandomNormal"])
def test_initializer_object_with_seed_is_repeatable(cls):
    init = getattr(fg.initializers, cls)(seed=11)
    a = init((30, 20), "float64")
    b = init((30, 20), "float64")
    assert a.shape == (30, 20) and a.dtype == F64
    assert np.array_equal(a, b)
    assert not np.array_equal(a, getattr(fg.initializers, cls)(seed=12)((30, 20), "float64"))
    # the same initializer object in two models gives both the same kernel
    k1 = fg.Sequential([Dense(20, kernel_initializer=init, input_dim=30)],
                       dtype="float64", seed=1).get_weights()[0]
    k2 = fg.Sequential([Dense(20, kernel_initializer=init, input_dim=30)],
                       dtype="float64", seed=2).get_weights()[0]
    assert np.array_equal(k1, a) and np.array_equal(k2, a)


# ---------------------------------------------------------------------------
# 10. the compiled Dense chain (the path of models made only of Dense layers)
# ---------------------------------------------------------------------------

CHAIN_SPECS = {
    "relu-softmax": [("dense", 24, "relu"), ("dense", 16, "tanh"), ("dense", 5, "softmax")],
    "needs-pre": [("dense", 24, "gelu"), ("dense", 16, "silu"), ("dense", 5, "sigmoid")],
    "one-layer": [("dense", 5, "linear")],
}


def _chain_model(spec, dtype, loss, use_bias=True):
    model = fg.Sequential(make_layers(CHAIN_SPECS[spec], 9, use_bias=use_bias), dtype=dtype,
                          seed=3)
    model.compile(optimizer="sgd", loss=loss)
    return model


@pytest.mark.parametrize("use_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("loss", ["categorical_crossentropy", "mse"])
@pytest.mark.parametrize("spec", CHAIN_SPECS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_dense_chain_gives_the_bits_of_the_layers_own_calls(dtype, spec, loss, use_bias):
    """One compiled call per direction runs the same kernels in the same order
    as each layer's own calls: outputs, loss and every gradient agree bit for
    bit (the fused softmax + cross-entropy included)."""
    model = _chain_model(spec, dtype, loss, use_bias)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(13, 9)).astype(dtype)
    y = np.eye(5, dtype=dtype)[rng.integers(0, 5, 13)]
    model._prepare(13)
    assert model._chain is not None
    results = []
    for compiled in (True, False):
        model.grads[...] = np.nan
        loss_value, pred = model._forward_backward(x, y, None, None, compiled=compiled)
        results.append((loss_value, pred.copy(), model.grads.copy(),
                        model._forward(x, False, False, compiled).copy()))
    (l1, p1, g1, o1), (l2, p2, g2, o2) = results
    assert l1 == l2
    assert p1.tobytes() == p2.tobytes() and o1.tobytes() == o2.tobytes()
    assert g1.tobytes() == g2.tobytes() and np.isfinite(g1).all()


def test_dense_chain_only_for_models_of_dense_layers_and_renewed_on_rebuild():
    model = _chain_model("relu-softmax", F32, "mse")
    x = np.random.default_rng(0).normal(size=(4, 9)).astype(F32)
    model(x)
    first = model._chain
    assert first is not None
    model.add(fg.layers.Dropout(0.1))             # not Dense: each layer's own calls
    out = model(x)
    assert model._chain is None
    ref = x
    for w, b, act in zip(model.get_weights()[::2], model.get_weights()[1::2],
                         ["relu", "tanh", "softmax"]):
        ref = ref_act(act, ref.astype(F64) @ w + b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
    model.fit(np.repeat(x, 4, axis=0), np.zeros((16, 5), F32), batch_size=16, verbose=0)
    ref = model(x)                                # the weights fit moved
    model.pop()
    model.add(Dense(3))                           # new weights: a new chain
    out = model(x[:2])                            # fewer rows than the kept buffers
    assert model._chain is not None and out.shape == (2, 3)
    out = model(x)
    assert model._chain is not None and model._chain is not first
    assert out.shape == (4, 3)
    h = ref.astype(F64) @ model.get_weights()[-2] + model.get_weights()[-1]
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)


def _read_only(shape):
    a = np.ones(shape, F32)
    a.setflags(write=False)
    return a


def _chain_args(dtype=F32, rows=4):
    k0, k1 = np.ones((3, 5), dtype), np.ones((5, 2), dtype)
    return [(k0, np.zeros(5, dtype), np.empty((rows, 5), dtype), None, np.empty_like(k0),
             np.empty(5, dtype), None, 1, 0.0),
            (k1, None, np.empty((rows, 2), dtype), None, np.empty_like(k1), None,
             np.empty((rows, 5), dtype), 0, 0.0)]


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a[1].__setitem__(0, np.ones((4, 2), F32)), ValueError, "expected 5 rows"),
    (lambda a: a[0].__setitem__(2, np.empty((4, 5), F64)), TypeError, "expected float32"),
    (lambda a: a[0].__setitem__(2, np.empty((4, 6), F32)), ValueError, r"out: expected shape"),
    (lambda a: a[0].__setitem__(2, np.empty((5, 4), F32).T), ValueError, "contiguous"),
    (lambda a: a[0].__setitem__(6, np.empty((4, 3), F32)), ValueError, "dx: expected None"),
    (lambda a: a[1].__setitem__(6, None), ValueError, "dx: expected None"),
    (lambda a: a[0].__setitem__(5, None), ValueError, "bias and dbias"),
    (lambda a: a[0].__setitem__(7, 99), ValueError, "activation"),
    (lambda a: a[1].__setitem__(7, 5), ValueError, "pre-activation"),   # gelu needs z
    (lambda a: a[0].__setitem__(4, _read_only((3, 5))), ValueError, "dkernel: expected a "
                                                                      "writable"),
    (lambda a: a[0].__setitem__(0, _read_only((3, 5))), None, None),   # read, never written
], ids=["rows", "dtype", "out-shape", "layout", "first-dx", "later-dx", "bias", "act",
        "pre", "read-only-output", "read-only-kernel"])
def test_dense_chain_checks_every_array(change, error, match):
    from fastgrad import _core
    args = [list(t) for t in _chain_args()]
    change(args)
    specs = [tuple(t) for t in args]
    if error is None:
        _core.DenseChain(specs, 4)
        return
    with pytest.raises(error, match=match):
        _core.DenseChain(specs, 4)


def test_dense_chain_checks_its_calls():
    from fastgrad import _core
    bare = _core.DenseChain.__new__(_core.DenseChain)          # never built
    with pytest.raises(ValueError, match="not built"):
        bare.forward(np.ones((2, 3), F32))
    with pytest.raises(ValueError, match="no forward"):
        bare.backward(np.ones((2, 2), F32))
    chain = _core.DenseChain([tuple(t) for t in _chain_args()], 4)
    with pytest.raises(ValueError, match="already built"):
        chain.__init__([tuple(t) for t in _chain_args()], 4)
    with pytest.raises(ValueError, match="no forward"):
        chain.backward(np.ones((2, 2), F32))
    with pytest.raises(ValueError, match="3 features"):
        chain.forward(np.ones((2, 4), F32))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        chain.forward(np.ones((5, 3), F32))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        chain.forward(np.ones((0, 3), F32))
    with pytest.raises(ValueError):
        chain.forward(np.ones((2, 3), F64))
    out = chain.forward(np.ones((2, 3), F32))
    np.testing.assert_array_equal(out, np.full((2, 2), 15.0, F32))   # relu(3) x 5 ones
    with pytest.raises(ValueError, match="d"):
        chain.backward(np.ones((3, 2), F32))
    chain.backward(np.ones((2, 2), F32))
    with pytest.raises(ValueError, match="dpre|d"):
        chain.backward(np.ones((2, 2), F64))
