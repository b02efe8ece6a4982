"""fastgrad against real Keras 3 on the same programs: the logs, metrics,
callbacks and weighted losses Keras code relies on.

Each scenario is one program (a model, its initial weights, compile
arguments and a list of calls: fit, evaluate, train_on_batch, predict)
run twice by the same runner code (``_RUNNER``): here on fastgrad, and in
a child process on Keras with the JAX backend (JAX starts threads, and a
process that has them must not fork, which other tests of the suite do).
Both start from the same weights with ``shuffle=False``. Compared:

  1. history ........ exactly Keras's keys; values to float32 rounding
  2. batch logs ..... running means since the epoch began, with metrics;
                      every hook, in order, with its logs
  3. metrics ........ streaming over batches of different sizes: accuracy
                      kinds, top-k, regression errors, confusion counts,
                      Precision/Recall, AUC (ROC, PR, Riemann sums, given
                      thresholds), with and without sample weights
  4. weights ........ sample_weight, class_weight, (x, y, w) validation,
                      a smaller last batch; fit, evaluate, train_on_batch
  5. callbacks ...... EarlyStopping(restore_best_weights) without stopping,
                      ReduceLROnPlateau, CSVLogger, LambdaCallback
"""
import csv
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest

import fastgrad as fg

# The runner, executed on both sides with ``lib`` the library's adapter:
# lib.model(d, layers, weights) -> model; lib.evaluate(model, kw, callbacks)
# -> dict; lib.Callback; the modules lib.optimizers, lib.metrics,
# lib.callbacks.
_RUNNER = r'''
import os

import numpy as np


def _float(v):
    v = np.asarray(v, np.float64)
    return float(v) if v.ndim == 0 else v.tolist()


def make_recorder(base):
    class Recorder(base):
        """Every hook with its index and a copy of its logs (outputs: shape)."""

        def __init__(self):
            super().__init__()
            self.events = []

        def _log(self, hook, index=None, logs=None):
            logs = dict(logs or {})
            if "outputs" in logs:
                logs["outputs"] = list(np.shape(logs["outputs"]))
            else:
                logs = {k: _float(v) for k, v in logs.items()}
            self.events.append([hook, index, logs])

    for hook in ("train_begin", "train_end", "test_begin", "test_end", "predict_begin",
                 "predict_end"):
        setattr(Recorder, "on_" + hook,
                lambda self, logs=None, _h=hook: self._log(_h, None, logs))
    for hook in ("epoch_begin", "epoch_end", "train_batch_begin", "train_batch_end",
                 "test_batch_begin", "test_batch_end", "predict_batch_begin",
                 "predict_batch_end"):
        setattr(Recorder, "on_" + hook,
                lambda self, i, logs=None, _h=hook: self._log(_h, i, logs))
    return Recorder


def metric(lib, spec):
    return spec if isinstance(spec, str) else getattr(lib.metrics, spec[0])(**spec[1])


def callback(lib, spec, tmp):
    name, kw = spec
    if name == "CSVLogger":
        kw = {**kw, "filename": os.path.join(tmp, "log.csv")}
    if name == "LambdaCallback":
        seen = []
        kw = {"on_epoch_end": lambda e, logs: seen.append(e)}
    return getattr(lib.callbacks, name)(**kw)


def stream(lib, sc):
    """Each metric fed the batches in turn (y_true, y_pred, sample_weight or
    None); its result after each, then after reset_state and one more."""
    out = {}
    for spec in sc["metrics"]:
        m = metric(lib, spec)
        vals = []
        for y, p, w in sc["batches"]:
            m.update_state(np.asarray(y, np.float32), np.asarray(p, np.float32),
                           None if w is None else np.asarray(w, np.float32))
            vals.append(_float(m.result()))
        m.reset_state()
        y, p, w = sc["batches"][0]
        m.update_state(np.asarray(y, np.float32), np.asarray(p, np.float32))
        vals.append(_float(m.result()))
        out[m.name] = vals
    return out


def run(lib, sc, tmp):
    if "batches" in sc:
        return stream(lib, sc)
    data = {k: np.asarray(v, np.float32) for k, v in sc["data"].items()}

    def args(kw):
        out = {}
        for k, v in kw.items():
            if isinstance(v, str) and v.startswith("$"):
                v = data[v[1:]]
            elif isinstance(v, list) and v and all(isinstance(e, str) and e.startswith("$")
                                                    for e in v):
                v = tuple(data[e[1:]] for e in v)
            elif k == "class_weight":
                v = {int(c): w for c, w in v.items()}
            out[k] = v
        return out

    model = lib.model(sc["d"], sc["layers"], [np.asarray(w, np.float32) for w in sc["weights"]])
    name, kw = sc["optimizer"]
    model.compile(optimizer=getattr(lib.optimizers, name)(**kw), loss=sc["loss"],
                  metrics=[metric(lib, m) for m in sc["metrics"]])
    Recorder = make_recorder(lib.Callback)
    results = []
    for op, kw in sc["ops"]:
        rec = Recorder()
        kw = args(kw)
        cbs = [rec] + [callback(lib, c, tmp) for c in kw.pop("callbacks", [])]
        if op == "fit":
            h = model.fit(verbose=0, shuffle=False, callbacks=cbs, **kw)
            out = {"history": {k: [_float(v) for v in vs] for k, vs in h.history.items()}}
        elif op == "evaluate":
            out = {"logs": {k: _float(v) for k, v in lib.evaluate(model, kw, cbs).items()}}
        elif op == "train_on_batch":
            out = {"value": _float(model.train_on_batch(**kw))}
        elif op == "predict":
            out = {"value": model.predict(callbacks=cbs, verbose=0, **kw).tolist()}
        out["events"] = rec.events
        out["weights"] = [w.tolist() for w in model.get_weights()]
        if op == "fit" and sc.get("csv"):
            with open(os.path.join(tmp, "log.csv")) as f:
                out["csv"] = f.read()
        results.append(out)
    return results
'''

_KERAS_SIDE = r'''
import json, os, sys, tempfile
os.environ.setdefault("KERAS_BACKEND", "jax")
import numpy as np
import keras


class Lib:
    Callback = keras.callbacks.Callback

    @staticmethod
    def model(d, layers, weights):
        m = keras.Sequential([keras.Input((d,))]
                             + [keras.layers.Dense(u, activation=a) for u, a in layers])
        m.set_weights(weights)
        return m

    optimizers, metrics, callbacks = keras.optimizers, keras.metrics, keras.callbacks

    @staticmethod
    def evaluate(model, kw, cbs):
        return model.evaluate(verbose=0, callbacks=cbs, return_dict=True, **kw)


exec(RUNNER, globals())
request = json.load(sys.stdin)
out = []
for sc in request:
    with tempfile.TemporaryDirectory() as tmp:
        out.append(run(Lib, sc, tmp))
json.dump(out, sys.stdout)
'''


class _FastgradLib:
    Callback = fg.callbacks.Callback

    @staticmethod
    def model(d, layers, weights):
        m = fg.Sequential([fg.layers.Dense(u, activation=a, **({"input_dim": d} if i == 0 else {}))
                           for i, (u, a) in enumerate(layers)])
        m.build(d)
        m.set_weights(weights)
        return m

    optimizers, metrics, callbacks = fg.optimizers, fg.metrics, fg.callbacks

    @staticmethod
    def evaluate(model, kw, cbs):
        values = model.evaluate(verbose=0, callbacks=cbs, **kw)
        values = values if isinstance(values, list) else [values]
        return dict(zip(["loss"] + [m.name for m in model.metrics], values))


_NS = {}
exec(_RUNNER, _NS)


# -- the scenarios ------------------------------------------------------------
def _data(seed, n, d, k, kind):
    """x (n, d) and targets: one-hot (k classes), labels, 0/1 column or
    regression values."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, max(k, 1)))
    z = x @ w + 0.5 * rng.normal(size=(n, max(k, 1)))
    if kind == "onehot":
        return x, np.eye(k, dtype=np.float32)[np.argmax(z, 1)]
    if kind == "labels":
        return x, np.argmax(z, 1).astype(np.float32)
    if kind == "binary":
        return x, (z[:, :1] > 0).astype(np.float32)
    return x, (z[:, :k] + 2.0).astype(np.float32)   # away from 0 for MAPE


def _weights(seed, d, layers):
    rng = np.random.default_rng(seed)
    out, fan = [], d
    for units, _ in layers:
        out += [rng.uniform(-0.8, 0.8, (fan, units)), rng.uniform(-0.1, 0.1, units)]
        fan = units
    return [w.astype(np.float32).tolist() for w in out]


def _scenario(name, kind, loss, metrics, ops, k=3, n=70, d=5, optimizer=("Adam", {
        "learning_rate": 0.01}), out_act="softmax", **extra):
    x, y = _data(1, n, d, k, kind)
    xv, yv = _data(2, 23, d, k, kind)
    rng = np.random.default_rng(3)
    layers = [[8, "tanh"], [k if kind != "binary" else 1, out_act]]
    return {"name": name, "d": d, "layers": layers, "weights": _weights(4, d, layers),
            "loss": loss, "metrics": metrics, "optimizer": list(optimizer), "ops": ops,
            "data": {"x": x.tolist(), "y": y.tolist(), "xv": xv.tolist(), "yv": yv.tolist(),
                     "sw": rng.uniform(0.0, 3.0, n).astype(np.float32).tolist(),
                     "swv": rng.uniform(0.0, 3.0, 23).astype(np.float32).tolist()},
            **extra}


_FIT = {"x": "$x", "y": "$y", "epochs": 2, "batch_size": 16}
_VAL = {**_FIT, "validation_data": ["$xv", "$yv"]}
SCENARIOS = [
    _scenario("categorical", "onehot", "categorical_crossentropy",
              ["acc", "accuracy", ["CategoricalAccuracy", {"name": "cat"}],
               ["MeanSquaredError", {}], ["TopKCategoricalAccuracy", {"k": 2}],
               # Keras numbers default names within a process (auc, auc_1, ...):
               # this is the first AUC the Keras side creates
               "categorical_accuracy", ["AUC", {}], "mse"],
              [["fit", _VAL], ["evaluate", {"x": "$xv", "y": "$yv", "batch_size": 7}],
               ["train_on_batch", {"x": "$xv", "y": "$yv"}],
               ["predict", {"x": "$xv", "batch_size": 10}]]),
    _scenario("sparse", "labels", "sparse_categorical_crossentropy",
              ["accuracy", ["SparseCategoricalAccuracy", {}],
               ["SparseTopKCategoricalAccuracy", {"k": 2}]],
              [["fit", {**_VAL, "validation_split": 0.0}],
               ["evaluate", {"x": "$x", "y": "$y", "batch_size": 32}]]),
    _scenario("binary", "binary", "binary_crossentropy",
              ["accuracy", ["BinaryAccuracy", {"threshold": 0.6, "name": "acc6"}],
               ["AUC", {"name": "roc"}], ["AUC", {"curve": "PR", "name": "pr"}],
               ["AUC", {"summation_method": "minoring", "name": "mino"}],
               ["AUC", {"curve": "PR", "summation_method": "majoring", "name": "prmaj"}],
               ["AUC", {"thresholds": [0.2, 0.45, 0.5, 0.9], "name": "auc_given"}],
               ["AUC", {"num_thresholds": 7, "name": "auc7"}],
               ["Precision", {}], ["Recall", {"thresholds": 0.3}],
               ["Precision", {"thresholds": [0.3, 0.7], "name": "p2"}],
               ["TruePositives", {}], ["FalsePositives", {"thresholds": [0.2, 0.8]}],
               ["TrueNegatives", {}], ["FalseNegatives", {}]],
              [["evaluate", {"x": "$x", "y": "$y", "batch_size": 9}],
               ["fit", {**_VAL, "epochs": 3}],
               ["evaluate", {"x": "$xv", "y": "$yv", "batch_size": 5}]], out_act="sigmoid"),
    _scenario("regression", "regression", "mse",
              [["RootMeanSquaredError", {}], ["MeanAbsolutePercentageError", {}],
               ["MeanAbsoluteError", {}], "mape", "mae"],
              [["fit", _VAL], ["evaluate", {"x": "$x", "y": "$y", "batch_size": 11}]],
              k=2, out_act=None, optimizer=("SGD", {"learning_rate": 0.01})),
    _scenario("weighted", "onehot", "categorical_crossentropy", ["acc"],
              [["fit", {**_FIT, "sample_weight": "$sw",
                        "validation_data": ["$xv", "$yv", "$swv"]}],
               ["evaluate", {"x": "$x", "y": "$y", "sample_weight": "$sw", "batch_size": 32}],
               ["train_on_batch", {"x": "$xv", "y": "$yv", "sample_weight": "$swv"}],
               ["fit", {**_FIT, "batch_size": 32, "class_weight": {"0": 0.5, "2": 3.0}}],
               ["train_on_batch", {"x": "$xv", "y": "$yv",
                                   "class_weight": {"1": 2.0, "2": 0.25}}]]),
    _scenario("weighted_sparse", "labels", "sparse_categorical_crossentropy", [],
              [["fit", {**_FIT, "class_weight": {"1": 4.0}, "validation_data": ["$xv", "$yv"]}],
               ["evaluate", {"x": "$xv", "y": "$yv", "sample_weight": "$swv", "batch_size": 8}]]),
    _scenario("weighted_binary", "binary", "binary_crossentropy",
              ["auc", "precision", "recall", "binary_accuracy"],
              [["fit", {**_FIT, "sample_weight": "$sw", "epochs": 3}],
               ["fit", {**_FIT, "class_weight": {"0": 1.0, "1": 5.0}}]], out_act="sigmoid"),
    _scenario("callbacks", "onehot", "categorical_crossentropy", ["accuracy"],
              [["fit", {**_VAL, "epochs": 6, "callbacks": [
                  ["EarlyStopping", {"monitor": "val_loss", "patience": 10,
                                     "restore_best_weights": True}],
                  ["ReduceLROnPlateau", {"monitor": "val_accuracy", "patience": 1,
                                         "factor": 0.5, "min_delta": 0.5}],
                  ["CSVLogger", {}], ["LambdaCallback", {}]]}]],
              optimizer=("Adam", {"learning_rate": 0.2}), csv=True),
]


def _stream_batches(kind, seed, sizes=(7, 16, 1, 11), k=4, weighted=False):
    """Batches of targets and predictions on a grid of 1/20 (ties, values on
    thresholds and bucket edges), some rows weighted."""
    rng = np.random.default_rng(seed)
    out = []
    for b in sizes:
        if kind == "binary":
            y = rng.integers(0, 2, (b, 2)).astype(float)
            p = rng.integers(0, 21, (b, 2)) / 20
        elif kind == "regression":
            y = rng.normal(size=(b, 3)) + 1.5
            p = y + rng.normal(size=(b, 3))
        else:
            lab = rng.integers(0, k, b)
            y = lab.astype(float) if kind == "sparse" else np.eye(k)[lab]
            p = rng.integers(0, 4, (b, k)) / 4   # many ties
        w = rng.uniform(0, 2, b).round(2).tolist() if weighted else None
        out.append([np.asarray(y, np.float32).tolist(), np.asarray(p, np.float32).tolist(), w])
    return out


_BINARY_METRICS = [
    ["BinaryAccuracy", {"threshold": 0.55}], ["BinaryAccuracy", {"name": "b5"}],
    ["AUC", {"num_thresholds": 21, "name": "roc21"}],
    ["AUC", {"num_thresholds": 21, "curve": "PR", "name": "pr21"}],
    ["AUC", {"name": "roc200"}], ["AUC", {"curve": "PR", "name": "pr200"}],
    ["AUC", {"num_thresholds": 21, "summation_method": "majoring", "name": "maj"}],
    ["AUC", {"thresholds": [0.1, 0.5, 0.55], "curve": "PR", "name": "prgiven"}],
    # named: Keras numbers default names within a process (recall, recall_1, ...)
    ["Precision", {"thresholds": [0.0, 0.5, 0.95], "name": "p"}], ["Recall", {"name": "r"}],
    ["TruePositives", {"thresholds": 0.5, "name": "tp"}], ["FalsePositives", {"name": "fp"}],
    ["TrueNegatives", {"name": "tn"}],
    ["FalseNegatives", {"thresholds": [0.25, 1.0], "name": "fn"}]]
_CLASS_METRICS = [["CategoricalAccuracy", {}], ["TopKCategoricalAccuracy", {"k": 2}],
                  ["TopKCategoricalAccuracy", {"k": 1, "name": "top1"}]]
_SPARSE_METRICS = [["SparseCategoricalAccuracy", {}],
                   ["SparseTopKCategoricalAccuracy", {"k": 3}]]
_REGRESSION_METRICS = [["MeanSquaredError", {}], ["MeanAbsoluteError", {}],
                       ["MeanAbsolutePercentageError", {}], ["RootMeanSquaredError", {}]]
STREAMS = [{"name": f"stream_{kind}{'_weighted' * w}", "metrics": metrics,
            "batches": _stream_batches(kind, 10 + i, weighted=w)}
           for i, (kind, metrics) in enumerate([
               ("binary", _BINARY_METRICS), ("categorical", _CLASS_METRICS),
               ("sparse", _SPARSE_METRICS), ("regression", _REGRESSION_METRICS)])
           for w in (False, True)]


@pytest.fixture(scope="module")
def keras_results():
    if importlib.util.find_spec("keras") is None:
        pytest.skip("needs Keras 3 with JAX, the cross-check peers: pip install '.[peers]'")
    done = subprocess.run([sys.executable, "-c", f"RUNNER = {_RUNNER!r}\n" + _KERAS_SIDE],
                          capture_output=True, text=True,
                          input=json.dumps(SCENARIOS + STREAMS), timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return dict(zip([s["name"] for s in SCENARIOS + STREAMS], json.loads(done.stdout)))


def _ours(sc, tmp_path):
    return _NS["run"](_FastgradLib, sc, str(tmp_path))


def _close(a, b, what, rtol=2e-4, atol=2e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def _same_logs(ours, theirs, what):
    assert set(ours) == set(theirs), (what, sorted(ours), sorted(theirs))
    for k in theirs:
        if k == "outputs":
            assert ours[k] == theirs[k], what
        else:
            _close(ours[k], theirs[k], f"{what}: {k}")


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s["name"] for s in SCENARIOS])
def test_same_program_same_results(keras_results, sc, tmp_path):
    theirs = keras_results[sc["name"]]
    ours = _ours(sc, tmp_path)
    for i, ((op, _), a, b) in enumerate(zip(sc["ops"], ours, theirs)):
        what = f"{sc['name']} call {i} ({op})"
        if op == "fit":
            assert list(a["history"]) and set(a["history"]) == set(b["history"]), what
            for k in b["history"]:
                _close(a["history"][k], b["history"][k], f"{what}: history {k}")
        elif op == "evaluate":
            _same_logs(a["logs"], b["logs"], what)
        else:
            _close(a["value"], b["value"], what)
        # every hook in Keras's order, with its logs
        assert [e[:2] for e in a["events"]] == [e[:2] for e in b["events"]], what
        for ea, eb in zip(a["events"], b["events"]):
            _same_logs(ea[2], eb[2], f"{what}: {ea[0]} {ea[1]}")
        for j, (wa, wb) in enumerate(zip(a["weights"], b["weights"])):
            _close(wa, wb, f"{what}: weight {j}", rtol=1e-3, atol=2e-5)
        if "csv" in b:
            ra, rb = (list(csv.reader(t.splitlines())) for t in (a["csv"], b["csv"]))
            assert ra[0] == rb[0] and len(ra) == len(rb), what
            _close([[float(v) for v in r] for r in ra[1:]],
                   [[float(v) for v in r] for r in rb[1:]], f"{what}: csv")


@pytest.mark.parametrize("sc", STREAMS, ids=[s["name"] for s in STREAMS])
def test_streaming_metrics(keras_results, sc):
    theirs = keras_results[sc["name"]]
    ours = _NS["run"](_FastgradLib, sc, None)
    assert set(ours) == set(theirs)
    for name in theirs:
        # float32 sums in Keras: counts and means agree to its rounding
        _close(ours[name], theirs[name], f"{sc['name']}: {name}", rtol=1e-5, atol=1e-6)


def test_scenarios_exercise_what_they_claim(keras_results):
    """The comparisons above are not vacuous: the weights matter, batches of
    different sizes occur, early stopping restored an earlier epoch, the
    learning rate was reduced."""
    weighted = keras_results["weighted"]
    plain = _ours({**SCENARIOS[4], "ops": [["fit", _FIT]]}, "/nonexistent")
    assert abs(weighted[0]["history"]["loss"][0] - plain[0]["history"]["loss"][0]) > 1e-3
    cb = keras_results["callbacks"][0]["history"]
    assert min(cb["learning_rate"]) < max(cb["learning_rate"])
    best = int(np.argmin(cb["val_loss"]))
    assert best < len(cb["val_loss"]) - 1, "the best epoch must not be the last"
    assert 70 % 16 and 23 % 7 and 70 % 9   # smaller last batches


def test_early_stopping_restores_the_best_epoch_without_stopping(tmp_path):
    """fastgrad alone: the restored weights are those at the end of the best
    epoch, though training ran all its epochs (Keras 3's rule)."""
    sc = SCENARIOS[-1]
    x, y = (np.asarray(sc["data"][k], np.float32) for k in ("x", "y"))
    xv, yv = (np.asarray(sc["data"][k], np.float32) for k in ("xv", "yv"))
    snap = []
    model = _FastgradLib.model(sc["d"], sc["layers"], [np.asarray(w) for w in sc["weights"]])
    model.compile(fg.optimizers.Adam(0.2), "categorical_crossentropy")
    keep = fg.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: snap.append(
        model.get_weights()))
    stop = fg.callbacks.EarlyStopping(patience=100, restore_best_weights=True)
    h = model.fit(x, y, epochs=6, batch_size=16, shuffle=False, verbose=0,
                  validation_data=(xv, yv), callbacks=[keep, stop])
    assert len(h.epoch) == 6 and stop.stopped_epoch == 0
    best = int(np.argmin(h.history["val_loss"]))
    assert best < 5
    for a, b in zip(model.get_weights(), snap[best]):
        np.testing.assert_array_equal(a, b)
