"""Data, small models, NumPy forward passes and recording callbacks shared
by test_fit.py, test_callbacks.py and test_saving.py."""
import numpy as np
from _reference import F32, F64, ref_act, ref_loss_value, same_bits
from _reference import one_hot as _one_hot

import fastgrad as fg
from fastgrad.layers import BatchNormalization, Dense, Dropout

__all__ = [
    "F32",
    "F64",
    "Inject",
    "Recorder",
    "assert_model_state",
    "assert_same_bits",
    "batch_slices",
    "blobs",
    "bn_dropout_model",
    "classifier",
    "mlp",
    "model_state",
    "np_accuracy",
    "np_forward",
    "np_loss",
    "one_hot",
    "regression",
    "same_bits",
]



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
    """float32 one-hot rows of the labels y over k classes."""
    return _one_hot(y, k, F32)


def classifier(dtype="float32", seed=7):
    """Dense(relu) -> BatchNormalization -> Dropout -> Dense(softmax), 10 to 4,
    compiled with Adam and sparse cross-entropy."""
    m = fg.Sequential([Dense(16, activation="relu", input_dim=10), BatchNormalization(),
                       Dropout(0.2), Dense(4, activation="softmax")], dtype=dtype, seed=seed)
    m.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy", ["accuracy"])
    return m


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


def assert_same_bits(a, b):
    """Two lists of arrays bit-identical (NaNs included)."""
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape
    assert same_bits(a, b), "arrays differ: max |diff| = {:g}".format(max(
        float(np.max(np.abs(np.asarray(u, F64) - np.asarray(v, F64)), initial=0))
        for u, v in zip(a, b)))


def np_forward(weights, acts, x):
    """Float64 forward pass of a Dense-only model from get_weights()."""
    h = np.asarray(x, F64)
    for i, act in enumerate(acts):
        h = ref_act(act, h @ np.asarray(weights[2 * i], F64) + np.asarray(weights[2 * i + 1], F64))
    return h


_LOSS_NAMES = {"sparse": "sparse_categorical_crossentropy",
               "categorical": "categorical_crossentropy", "binary": "binary_crossentropy",
               "bce_logits": "binary_crossentropy"}


def np_loss(kind, p, y):
    """Batch-mean loss of the reference from predictions (probabilities or
    outputs, or logits for 'bce_logits')."""
    return ref_loss_value(_LOSS_NAMES.get(kind, kind), y, p, from_logits=kind == "bce_logits")


def running_mean(values, sizes):
    """Keras's batch logs: the mean of the batches' values so far, weighted by
    their rows."""
    v, n = np.asarray(values, F64), np.asarray(sizes, F64)
    return np.cumsum(v * n) / np.cumsum(n)


def np_accuracy(kind, p, y, threshold=0.5):
    p = np.asarray(p, F64)
    if kind == "sparse":
        return float(np.mean(np.argmax(p, 1) == np.asarray(y)))
    if kind == "categorical":
        return float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
    t = np.asarray(y, F64).reshape(p.shape) > 0.5
    if kind == "binary":
        return float(np.mean((p > threshold) == t))
    if kind == "bce_logits":   # as Keras: the outputs (logits) against 0.5
        return float(np.mean((p > threshold) == t))
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


def model_state(model):
    """Weights, optimizer step and moments, and the shuffling generator's state."""
    opt = model.optimizer
    return (model.get_weights(), opt.iterations,
            {k: v.copy() for k, v in opt.variables().items()},
            model._rng.bit_generator.state)


def assert_model_state(model, before):
    """The model is as model_state() recorded it, bit for bit."""
    w, it, var, rng = before
    assert_same_bits(model.get_weights(), w)
    assert model.optimizer.iterations == it
    now = model.optimizer.variables()
    assert_same_bits([now[k] for k in sorted(now)], [var[k] for k in sorted(var)])
    assert model._rng.bit_generator.state == rng
