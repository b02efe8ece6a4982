"""Tests of gradient health: ``fg.diagnose``, ``GradientReport``,
``callbacks.GradientMonitor``, the optimizer's step records, the layers'
activation statistics and ``python -m fastgrad demo``.

Every number is checked against an independent reference: NumPy forward and
backward passes written from ``get_weights()``, ``model.compute_gradients``
on the same rows, weights read with ``get_weights()`` around each
``train_on_batch`` of a twin model trained on the same batches, and the
thresholds documented in ``fastgrad/diagnostics.py``.

Layout of this file:
  references ......... NumPy forward/backward, documented status rules
  1. diagnosis ....... vanishing / healthy / exploding, BatchNormalization cure
  2. no side effects . diagnose leaves weights, BN statistics, dropout and
                       optimizer state bit-identical
  3. report .......... rows, norms, statuses, dead/saturated fractions,
                       to_dict, str, suggestions
  4. GradientMonitor . norms, every=k, clipping, update ratios, non-finite steps
  5. History ......... grad_norm and clip_rate (history.gradients)
  6. plot ............ PNG with matplotlib, ImportError without
  7. zero cost ....... statistics and update tracking off unless asked
  8. demo ............ python -m fastgrad demo --epochs 1
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _reference import F64, ref_act, ref_act_vjp

import fastgrad as fg
from fastgrad import diagnostics
from fastgrad.callbacks import Callback, GradientMonitor

L = fg.layers

# documented thresholds (fastgrad/diagnostics.py docstring); the module
# constants must agree with them
EXPLODING_NORM, EXPLODING_RATIO = 1e3, 10.0
VANISHING_DROP, VANISHING_RATIO = 1e-3, 1e-7


# ---------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------

def _data(seed=0, n=128, features=16, classes=4):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, features)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((features, classes)), axis=1)
    return x, y


def _deep(kind, depth=20, width=32, features=16, classes=4, seed=0, optimizer=None):
    """The demo's four networks, smaller: depth - 1 hidden blocks and a softmax."""
    layers = []
    for i in range(depth - 1):
        first = {"input_dim": features} if i == 0 else {}
        if kind == "sigmoid":
            layers.append(L.Dense(width, activation="sigmoid", **first))
        elif kind == "relu_he":
            layers.append(L.Dense(width, activation="relu", kernel_initializer="he_normal",
                                  **first))
        elif kind == "sigmoid_bn":
            layers += [L.Dense(width, use_bias=False, **first), L.BatchNormalization(),
                       L.Activation("sigmoid")]
        elif kind == "relu_big":
            layers.append(L.Dense(width, activation="relu", **first,
                                  kernel_initializer=fg.initializers.RandomNormal(stddev=0.3)))
        else:
            raise AssertionError(kind)
    layers.append(L.Dense(classes, activation="softmax"))
    model = fg.Sequential(layers, seed=seed)
    model.compile(optimizer or fg.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


def _np_forward_backward(model, x, labels):
    """float64 forward and backward of a model made of Dense and Activation
    layers ending in a softmax Dense, with mean sparse categorical
    cross-entropy. Returns (loss, {layer name: kernel gradient},
    {layer name: (z, y)})."""
    w = dict(zip([f"{l.name}/{s.name}" for l, s in model._specs], model.get_weights()))
    h = np.asarray(x, F64)
    tape = []
    acts = {}
    for layer in model.layers:
        if layer.kind == "Dense":
            k = w[f"{layer.name}/kernel"].astype(F64)
            b = w.get(f"{layer.name}/bias")
            z = h @ k + (b.astype(F64) if b is not None else 0.0)
            y = ref_act(layer.activation, z)
            tape.append(("Dense", layer, h, k, z, y))
        elif layer.kind == "Activation":
            z = h
            y = ref_act(layer.activation, z)
            tape.append(("Activation", layer, h, None, z, y))
        else:
            raise AssertionError(layer.kind)
        acts[layer.name] = (z, y)
        h = y
    n = x.shape[0]
    p = h
    loss = -np.mean(np.log(p[np.arange(n), labels]))
    d = p.copy()
    d[np.arange(n), labels] -= 1
    d /= n                                  # d loss / d logits of the softmax layer
    grads = {}
    for i, (kind, layer, hin, k, z, y) in enumerate(reversed(tape)):
        if i > 0:
            d = ref_act_vjp(layer.activation, z, d, y=y)
        if kind == "Dense":
            grads[layer.name] = hin.T @ d
            d = d @ k.T
    return loss, grads, acts


def _kernel_grad_norms(model, x, y):
    """{layer name: L2 norm of the kernel (or gamma) gradient} from
    model.compute_gradients, and the loss."""
    loss, grads = model.compute_gradients(x, y)
    out = {}
    for name, g in zip(model.weight_names, grads):
        layer, tensor = name.split("/")
        if tensor in ("kernel", "gamma"):
            out[layer] = float(np.linalg.norm(g.astype(F64)))
    return loss, out


def _weight_norms(model):
    return {l.name: float(np.linalg.norm(w.astype(F64)))
            for (l, s), w in zip(model._specs, model.get_weights())
            if s.name in ("kernel", "gamma")}


def _ref_statuses(rows_kind, g, w):
    """The documented rules: per-row status and overall status, from
    kernel gradient norms g and weight norms w (dicts by layer name, rows in
    model order; rows_kind: list of (name, kind))."""
    dense = [n for n, k in rows_kind if k == "Dense"]
    last = g[dense[-1]]
    rows = {}
    for name, kind in rows_kind:
        ratio = g[name] / w[name] if w[name] > 0 else math.inf
        if not math.isfinite(g[name]) or g[name] > EXPLODING_NORM or ratio > EXPLODING_RATIO:
            rows[name] = "exploding"
        elif kind == "Dense" and (g[name] / last < VANISHING_DROP or ratio < VANISHING_RATIO):
            rows[name] = "vanishing"
        else:
            rows[name] = "healthy"
    if "exploding" in rows.values():
        overall = "exploding"
    elif g[dense[0]] / last < VANISHING_DROP or "vanishing" in rows.values():
        overall = "vanishing"
    else:
        overall = "healthy"
    return rows, overall


def _snapshot(model):
    """Everything diagnose must leave alone, as bytes."""
    opt = model.optimizer
    return {
        "weights": [w.tobytes() for w in model.get_weights()],
        "params": model.params.tobytes(),
        "state": model.state.tobytes(),
        "counters": [(l.name, l.counter, l._seed) for l in model.layers
                     if hasattr(l, "counter")],
        "iterations": opt.iterations,
        "skipped": opt.skipped_steps,
        "moments": {k: v.tobytes() for k, v in opt.variables().items()},
        "rng": json.dumps(model._rng.bit_generator.state, default=str),
    }


def test_documented_thresholds():
    assert diagnostics.EXPLODING_NORM == EXPLODING_NORM
    assert diagnostics.EXPLODING_RATIO == EXPLODING_RATIO
    assert diagnostics.VANISHING_DROP == VANISHING_DROP
    assert diagnostics.VANISHING_RATIO == VANISHING_RATIO


# ---------------------------------------------------------------------------
# 1. diagnosis of the four networks
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind, width, expected", [
    ("sigmoid", 32, "vanishing"),
    ("relu_he", 32, "healthy"),
    ("relu_big", 64, "exploding"),
    ("sigmoid_bn", 32, "healthy"),
])
def test_diagnosis_of_deep_networks(kind, width, expected):
    x, y = _data()
    model = _deep(kind, width=width)
    report = fg.diagnose(model, x, y)
    assert report.status == expected
    # the same verdict from independent gradient norms and the documented rules
    _, g = _kernel_grad_norms(model, x, y)
    w = _weight_norms(model)
    rows_kind = [(r.name, r.kind) for r in report.layers]
    ref_rows, ref_overall = _ref_statuses(rows_kind, g, w)
    assert ref_overall == expected
    assert {r.name: r.status for r in report.layers} == ref_rows
    dense = [n for n, k in rows_kind if k == "Dense"]
    assert len(dense) == 20
    drop = g[dense[0]] / g[dense[-1]]
    if expected == "vanishing":
        assert drop < VANISHING_DROP
        assert report.layers[0].status == "vanishing"
    elif expected == "exploding":
        assert max(g.values()) > EXPLODING_NORM
        assert all(r.status == "exploding" for r in report.layers)
    else:
        assert drop > VANISHING_DROP and max(g.values()) < EXPLODING_NORM
        assert all(r.status == "healthy" for r in report.layers)


def test_batchnorm_lifts_first_layer_gradient():
    x, y = _data()
    plain, bn = _deep("sigmoid"), _deep("sigmoid_bn")
    rp, rb = fg.diagnose(plain, x, y), fg.diagnose(bn, x, y)
    assert rp.status == "vanishing" and rb.status == "healthy"

    def drop(model, report):
        _, g = _kernel_grad_norms(model, x, y)
        d = [r for r in report.layers if r.kind == "Dense"]
        # the report's own first/last ratio agrees with the independent one
        assert d[0].grad_norm / d[-1].grad_norm == pytest.approx(
            g[d[0].name] / g[d[-1].name], rel=1e-4)
        return g[d[0].name] / g[d[-1].name]

    dp, db = drop(plain, rp), drop(bn, rb)
    assert dp < VANISHING_DROP < db
    assert db > 1e6 * dp
    assert [r.kind for r in rb.layers[:2]] == ["Dense", "BatchNormalization"]
    assert sum(r.kind == "BatchNormalization" for r in rb.layers) == 19


# ---------------------------------------------------------------------------
# 2. diagnose changes nothing
# ---------------------------------------------------------------------------

def _bn_dropout_model(seed=7):
    model = fg.Sequential([
        L.Dense(16, activation="relu", input_dim=8),
        L.BatchNormalization(),
        L.Dropout(0.5),
        L.Dense(16, use_bias=False),
        L.BatchNormalization(momentum=0.5),
        L.Activation("tanh"),
        L.Dropout(0.25, seed=11),
        L.Dense(3, activation="softmax"),
    ], seed=seed)
    model.compile(fg.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    return model


def test_diagnose_leaves_all_state_bit_identical():
    x, y = _data(1, n=96, features=8, classes=3)
    model, twin = _bn_dropout_model(), _bn_dropout_model()
    for m in (model, twin):
        m.fit(x[:64], y[:64], epochs=1, batch_size=16, verbose=0)
    assert model.optimizer.iterations == 4
    before = _snapshot(model)
    assert before == _snapshot(twin)
    # moving statistics have moved away from their initial values
    mm = model.get_weights()[2]
    assert np.any(mm != 0)

    report = fg.diagnose(model, x, y)
    assert report.status in ("healthy", "vanishing", "exploding")
    assert _snapshot(model) == before
    report = fg.diagnose(model, x, y, batch_size=10)
    assert _snapshot(model) == before
    assert all(not l.collect_stats for l in model.layers if hasattr(l, "collect_stats"))

    # and training goes on exactly as if diagnose had never run
    for m in (model, twin):
        m.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert _snapshot(model) == _snapshot(twin)


def test_diagnose_nonfinite_gradients_touch_nothing():
    x, y = _data(2, n=48, features=8, classes=3)
    model = fg.Sequential([L.Dense(16, activation="relu", input_dim=8),
                           L.Dense(3, activation="softmax")], seed=0)
    model.compile(fg.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    w = model.get_weights()
    w[0][0, :] = 1e30      # float32: x @ kernel is ~1e30, times the next kernel ~1e60 = inf
    w[2][0, :] = 1e30
    model.set_weights(w)
    before = _snapshot(model)
    report = fg.diagnose(model, x, y)
    assert report.status == "exploding"
    assert any("non-finite" in f for f in report.findings)
    assert _snapshot(model) == before
    json.dumps(report.to_dict())        # NaN/inf are still serializable
    str(report)


# ---------------------------------------------------------------------------
# 3. the report
# ---------------------------------------------------------------------------

def _stats_model(seed=5):
    """Dropout-free: relu with dead units, saturated sigmoid, a linear Dense
    followed by an Activation('tanh'), relu, softmax."""
    big = fg.initializers.RandomNormal(stddev=4.0)
    model = fg.Sequential([
        L.Dense(32, activation="relu", input_dim=16),
        L.Dense(24, activation="sigmoid", kernel_initializer=big),
        L.Dense(20, kernel_initializer=fg.initializers.RandomNormal(stddev=0.8)),
        L.Activation("tanh"),
        L.Dense(24, activation="relu", kernel_initializer="he_normal"),
        L.Dense(4, activation="softmax"),
    ], seed=seed)
    model.compile(fg.optimizers.SGD(0.05), "sparse_categorical_crossentropy")
    # biases pushing a share of the relu units below zero for every row
    rng = np.random.default_rng(seed)
    w = model.get_weights()
    w[1][...] = rng.uniform(-4.0, 0.5, w[1].shape)
    w[7][...] = rng.uniform(-3.0, 0.5, w[7].shape)
    model.set_weights(w)
    return model


def _assert_fraction(got, values, lo_hi_or_abs, margin):
    """got == fraction of entries of values beyond the thresholds; entries
    within ``margin`` of a threshold (where float32 and float64 may
    disagree) widen the tolerance by their share."""
    sat, near = lo_hi_or_abs(values, margin)
    assert abs(got - sat) <= near + 1e-12, (got, sat, near)


def _sigmoid_sat(y, margin):
    out = (y < 0.01) | (y > 0.99)
    near = (np.abs(y - 0.01) < margin) | (np.abs(y - 0.99) < margin)
    return out.mean(), near.mean()


def _tanh_sat(y, margin):
    out = np.abs(y) > 0.99
    return out.mean(), (np.abs(np.abs(y) - 0.99) < margin).mean()


def test_report_rows_match_independent_references():
    x, y = _data(3, n=64)
    model = _stats_model()
    report = fg.diagnose(model, x, y)
    loss, grads, acts = _np_forward_backward(model, x, y)
    cg_loss, g_cg = _kernel_grad_norms(model, x, y)

    assert [r.name for r in report.layers] == ["dense", "dense_1", "dense_2", "dense_3",
                                               "dense_4"]
    assert all(r.kind == "Dense" for r in report.layers)
    assert [r.activation for r in report.layers] == ["relu", "sigmoid", "tanh", "relu",
                                                     "softmax"]
    assert [r.initializer for r in report.layers] == [
        "glorot_uniform", "random_normal(stddev=4)", "random_normal(stddev=0.8)",
        "he_normal", "glorot_uniform"]
    assert report.loss == pytest.approx(loss, rel=1e-5)
    assert report.loss == pytest.approx(cg_loss, rel=1e-6)
    weights = {f"{l.name}/{s.name}": w for (l, s), w in zip(model._specs, model.get_weights())}
    for r in report.layers:
        g_np = np.linalg.norm(grads[r.name])
        assert r.grad_norm == pytest.approx(g_np, rel=1e-4), r.name
        assert r.grad_norm == pytest.approx(g_cg[r.name], rel=1e-6), r.name
        wn = np.linalg.norm(weights[f"{r.name}/kernel"].astype(F64))
        assert r.weight_norm == pytest.approx(wn, rel=1e-6), r.name
        assert r.ratio == pytest.approx(g_np / wn, rel=1e-4), r.name
        assert r.status == "healthy"

    # dead relu units: zero for every row of the batch
    for name in ("dense", "dense_3"):
        z, _ = acts[name]
        zmax = z.max(axis=0)
        assert np.min(np.abs(zmax)) > 1e-4          # no unit on the fence
        dead = float(np.mean(zmax <= 0))
        assert 0.1 < dead < 0.9                      # a real mix
        row = next(r for r in report.layers if r.name == name)
        assert row.dead_fraction == pytest.approx(dead, abs=1e-12), name
        assert row.saturated_fraction == 0.0
    # saturated sigmoid and tanh outputs
    _, ys = acts["dense_1"]
    _, yt = acts["activation"]
    rows = {r.name: r for r in report.layers}
    assert 0.1 < _sigmoid_sat(ys, 0)[0] < 0.9 and 0.1 < _tanh_sat(yt, 0)[0] < 0.9
    _assert_fraction(rows["dense_1"].saturated_fraction, ys, _sigmoid_sat, 1e-5)
    _assert_fraction(rows["dense_2"].saturated_fraction, yt, _tanh_sat, 1e-5)
    assert rows["dense_1"].dead_fraction == 0.0 and rows["dense_2"].dead_fraction == 0.0
    # the softmax output layer has no activation statistics
    assert rows["dense_4"].dead_fraction == 0.0 and rows["dense_4"].saturated_fraction == 0.0


def test_report_batch_size_uses_first_rows():
    x, y = _data(4, n=64)
    model = _stats_model()
    report = fg.diagnose(model, x, y, batch_size=20)
    loss, grads, acts = _np_forward_backward(model, x[:20], y[:20])
    assert report.loss == pytest.approx(loss, rel=1e-5)
    for r in report.layers:
        assert r.grad_norm == pytest.approx(np.linalg.norm(grads[r.name]), rel=1e-4)
    zmax = acts["dense"][0].max(axis=0)
    assert report.layers[0].dead_fraction == pytest.approx(float(np.mean(zmax <= 0)))


def test_report_batchnorm_row_is_gamma():
    x, y = _data(5, n=40, features=8, classes=3)
    model = fg.Sequential([L.Dense(12, use_bias=False, input_dim=8), L.BatchNormalization(),
                           L.Activation("relu"), L.Dense(3, activation="softmax")], seed=2)
    model.compile("sgd", "sparse_categorical_crossentropy")
    w = model.get_weights()
    w[1][...] = np.linspace(0.5, 2.0, 12)      # gamma away from ones
    model.set_weights(w)
    report = fg.diagnose(model, x, y)
    _, g = _kernel_grad_norms(model, x, y)
    assert [(r.name, r.kind) for r in report.layers] == [
        ("dense", "Dense"), ("batch_normalization", "BatchNormalization"),
        ("dense_1", "Dense")]
    bn = report.layers[1]
    assert bn.grad_norm == pytest.approx(g["batch_normalization"], rel=1e-6)
    assert bn.weight_norm == pytest.approx(np.linalg.norm(w[1].astype(F64)), rel=1e-6)
    assert report.layers[0].grad_norm == pytest.approx(g["dense"], rel=1e-6)


@pytest.mark.parametrize("separate", [False, True], ids=["dense_sigmoid", "activation_layer"])
def test_last_layer_sigmoid_saturation_is_counted(separate):
    """A sigmoid output layer trained with binary cross-entropy (fused with
    its logits) is reported with activation 'sigmoid'; its saturated_fraction
    must still be the share of its outputs outside [0.01, 0.99], and
    gathering it must not change the loss or the gradients."""
    rng = np.random.default_rng(0)
    x = (3 * rng.standard_normal((64, 8))).astype(np.float32)
    y = (rng.random((64, 1)) < 0.5).astype(np.float32)
    out_init = fg.initializers.RandomNormal(stddev=2.0)
    head = ([L.Dense(1, kernel_initializer=out_init), L.Activation("sigmoid")] if separate
            else [L.Dense(1, activation="sigmoid", kernel_initializer=out_init)])
    model = fg.Sequential([
        L.Dense(16, activation="tanh", input_dim=8,
                kernel_initializer=fg.initializers.RandomNormal(stddev=1.0)),
        *head,
    ], seed=0)
    model.compile("sgd", "binary_crossentropy")
    report = fg.diagnose(model, x, y)
    p = model.predict(x).astype(F64)
    ref, near = _sigmoid_sat(p, 1e-5)
    assert ref > 0.3 and near == 0
    row = report.layers[-1]
    assert (row.name, row.activation) == ("dense_1", "sigmoid")
    assert row.saturated_fraction == pytest.approx(ref, abs=1e-12)
    # binary cross-entropy from the same probabilities (clipped as Keras does)
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    bce = -np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))
    loss, g = _kernel_grad_norms(model, x, y)
    assert report.loss == pytest.approx(loss, rel=1e-6)
    assert report.loss == pytest.approx(bce, rel=1e-3)
    for r in report.layers:
        assert r.grad_norm == pytest.approx(g[r.name], rel=1e-6)


def test_report_serialization_and_text():
    x, y = _data()
    for kind, width in (("sigmoid", 32), ("relu_big", 64), ("relu_he", 32)):
        model = _deep(kind, depth=6 if kind != "sigmoid" else 20, width=width)
        report = fg.diagnose(model, x, y)
        d = report.to_dict()
        text = json.dumps(d, allow_nan=False)
        back = json.loads(text)
        assert back["status"] == report.status
        assert back["loss"] == pytest.approx(report.loss)
        assert [r["name"] for r in back["layers"]] == [r.name for r in report.layers]
        assert back["layers"][0]["grad_norm"] == pytest.approx(report.layers[0].grad_norm)
        assert back["suggestions"] == report.suggestions
        s = str(report)
        assert s == repr(report)
        assert report.status.upper() in s.splitlines()[0]
        body = s.splitlines()[3:3 + len(report.layers)]
        for line, r in zip(body, report.layers):
            assert line.split()[0] == r.name
            assert line.split()[-1] == r.status
        for sug in report.suggestions:
            assert sug in s


def test_suggestions_name_the_problem():
    x, y = _data()
    van = fg.diagnose(_deep("sigmoid"), x, y)
    assert van.status == "vanishing"
    text = " ".join(van.suggestions)
    assert "sigmoid" in text and "he_normal" in text and "relu" in text
    assert "dense .. dense_18" in text           # the hidden sigmoid layers
    assert "BatchNormalization" in text          # no BN in this model
    assert "Adam" in text                        # plain SGD
    assert any("gradient norm falls" in f for f in van.findings)

    exp = fg.diagnose(_deep("relu_big", depth=8, width=64), x, y)
    assert exp.status == "exploding"
    text = " ".join(exp.suggestions)
    assert "global_clipnorm" in text
    assert "random_normal(stddev=0.3)" in text and "he_normal" in text
    assert "dense .. dense_6" in text
    assert "learning rate" in text

    clipped = _deep("relu_big", depth=8, width=64,
                    optimizer=fg.optimizers.SGD(0.01, global_clipnorm=1.0))
    exp2 = fg.diagnose(clipped, x, y)
    assert exp2.status == "exploding"
    assert not any("global_clipnorm" in s for s in exp2.suggestions)
    assert any("random_normal(stddev=0.3)" in s for s in exp2.suggestions)

    ok = fg.diagnose(_deep("relu_he", depth=6), x, y)
    assert ok.status == "healthy"
    assert not any(k in " ".join(ok.suggestions) for k in ("Clip", "Replace", "clipnorm"))


def test_dead_relu_finding_and_suggestion():
    x, y = _data(6, n=64)
    model = fg.Sequential([L.Dense(32, activation="relu", input_dim=16),
                           L.Dense(4, activation="softmax")], seed=1)
    model.compile("adam", "sparse_categorical_crossentropy")
    w = model.get_weights()
    w[1][:24] = -50.0          # 24 of 32 units can never fire on these inputs
    model.set_weights(w)
    _, _, acts = _np_forward_backward(model, x, y)
    dead = float(np.mean(acts["dense"][0].max(axis=0) <= 0))
    assert dead >= 0.75
    report = fg.diagnose(model, x, y)
    assert report.layers[0].dead_fraction == pytest.approx(dead)
    assert any("dead" in f and "dense" in f for f in report.findings)
    assert any("leaky_relu" in s and "dense" in s for s in report.suggestions)


# ---------------------------------------------------------------------------
# 4. GradientMonitor
# ---------------------------------------------------------------------------

def _small(seed=3, optimizer=None, regularizer=None, middle="tanh"):
    model = fg.Sequential([
        L.Dense(16, activation="relu", input_dim=8, kernel_regularizer=regularizer),
        L.Dense(16, activation=middle),
        L.Dense(3, activation="softmax"),
    ], seed=seed)
    model.compile(optimizer or fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    return model


def _monitor_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 8)).astype(np.float32)
    y = np.argmax(x @ rng.standard_normal((8, 3)), axis=1)
    return x, y


def _trainable(model):
    """get_weights() restricted to the trainable tensors (weight_names order)."""
    return [w for (_, s), w in zip(model._specs, model.get_weights()) if s.trainable]


def _replay(model, x, y, batch_size, epochs, skip=()):
    """Train ``model`` with train_on_batch on fit's batches (shuffle=False),
    recording before each step the compute_gradients norms per tensor, and
    the update ratios from get_weights around the step."""
    n = x.shape[0]
    norms, ratios, steps = [], [], 0
    for _ in range(epochs):
        for start in range(0, n, batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            if steps in skip:
                steps += 1
                continue
            steps += 1
            _, grads = model.compute_gradients(xb, yb)
            norms.append([np.linalg.norm(g.astype(F64)) for g in grads])
            before = _trainable(model)
            model.train_on_batch(xb, yb)
            after = _trainable(model)
            ratios.append([np.linalg.norm(a.astype(F64) - b.astype(F64))
                           / np.linalg.norm(a.astype(F64)) for a, b in zip(after, before)])
    return np.array(norms), np.array(ratios)


def test_monitor_grad_norms_and_update_ratios_match_replay():
    x, y = _monitor_data()
    model, twin = _small(), _small()
    mon = GradientMonitor()
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[mon])
    steps = 2 * 6
    assert mon.names == model.weight_names == [
        "dense/kernel", "dense/bias", "dense_1/kernel", "dense_1/bias", "dense_2/kernel",
        "dense_2/bias"]
    assert mon.grad_norms.shape == (steps, 6)
    assert mon.update_ratios.shape == (steps, 6)
    assert mon.clip_scales.shape == (steps, 6)
    assert mon.global_norms.shape == mon.clipped.shape == mon.nonfinite.shape == (steps,)
    np.testing.assert_array_equal(mon.steps, np.arange(1, steps + 1))
    assert model.optimizer.iterations == steps

    norms, ratios = _replay(twin, x, y, 16, 2)
    # the twin trained step by step ends bit-identical: the rows line up
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(mon.grad_norms, norms, rtol=1e-6)
    np.testing.assert_allclose(mon.global_norms, np.sqrt((norms ** 2).sum(axis=1)), rtol=1e-6)
    np.testing.assert_allclose(mon.update_ratios, ratios, rtol=1e-6)
    assert np.all(mon.clip_scales == 1.0)
    assert not mon.clipped.any() and not mon.nonfinite.any()
    # SGD without clipping: ||update|| = lr * ||g||, so the ratios follow from the norms
    w_end = dict(zip(model.weight_names, model.get_weights()))
    last = np.array([np.linalg.norm(w_end[n].astype(F64)) for n in mon.names])
    np.testing.assert_allclose(mon.update_ratios[-1], 0.1 * mon.grad_norms[-1] / last,
                               rtol=1e-4)


def test_monitor_columns_are_the_trainable_tensors():
    x, y = _monitor_data()

    def make():
        model = fg.Sequential([
            L.Dense(16, use_bias=False, input_dim=8), L.BatchNormalization(),
            L.Activation("relu"), L.Dense(3, activation="softmax")], seed=4)
        model.compile(fg.optimizers.RMSprop(0.01), "sparse_categorical_crossentropy")
        return model

    model, twin = make(), make()
    mon = GradientMonitor()
    model.fit(x, y, epochs=1, batch_size=32, shuffle=False, verbose=0, callbacks=[mon])
    names = ["dense/kernel", "batch_normalization/gamma", "batch_normalization/beta",
             "dense_1/kernel", "dense_1/bias"]
    assert mon.names == model.weight_names == names
    assert len(model.get_weights()) == 7           # + moving mean and variance
    assert mon.grad_norms.shape == mon.update_ratios.shape == (3, 5)
    norms, ratios = _replay(twin, x, y, 32, 1)
    np.testing.assert_allclose(mon.grad_norms, norms, rtol=1e-6)
    np.testing.assert_allclose(mon.update_ratios, ratios, rtol=1e-6)


def test_monitor_grad_norms_include_regularizer_gradient():
    x, y = _monitor_data()
    reg = fg.regularizers.L2(0.05)
    model, twin = _small(regularizer=reg), _small(regularizer=reg)
    mon = GradientMonitor()
    model.fit(x[:32], y[:32], epochs=1, batch_size=16, shuffle=False, verbose=0,
              callbacks=[mon])
    for step in range(2):
        xb, yb = x[16 * step:16 * step + 16], y[16 * step:16 * step + 16]
        _, grads = twin.compute_gradients(xb, yb)
        w = twin.get_weights()
        ref = [np.linalg.norm(grads[0].astype(F64) + 2 * 0.05 * w[0].astype(F64))] + \
              [np.linalg.norm(g.astype(F64)) for g in grads[1:]]
        np.testing.assert_allclose(mon.grad_norms[step], ref, rtol=1e-5)
        twin.train_on_batch(xb, yb)


@pytest.mark.parametrize("every", [2, 5])
def test_monitor_every_k(every):
    x, y = _monitor_data()
    model = _small()
    all_steps, some = GradientMonitor(), GradientMonitor(every=every)
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0,
              callbacks=[all_steps, some])
    rows = math.ceil(12 / every)
    assert some.grad_norms.shape == (rows, 6)
    np.testing.assert_array_equal(some.steps, np.arange(1, 13, every))
    np.testing.assert_array_equal(some.grad_norms, all_steps.grad_norms[::every])
    np.testing.assert_array_equal(some.update_ratios, all_steps.update_ratios[::every])
    np.testing.assert_array_equal(some.global_norms, all_steps.global_norms[::every])
    # the sparse monitor's pauses do not starve the dense one
    assert not np.isnan(all_steps.update_ratios).any()


def test_monitor_every_k_tracks_updates_only_on_recorded_steps():
    x, y = _monitor_data()
    model = _small()
    tracked = []

    class Spy(fg.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            tracked.append(self.model.optimizer.last_step.update_ratio is not None)

    mon = GradientMonitor(every=3)
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[mon, Spy()])
    assert tracked == [k % 3 == 0 for k in range(12)]
    assert not np.isnan(mon.update_ratios).any() and mon.update_ratios.shape == (4, 6)
    assert not model.optimizer._track   # off again after fit


def test_monitor_keeps_every_row_across_fits_and_buffer_growth():
    # 3 fits of 12 steps, then 60 more: the record buffers grow past their
    # first size and keep every row, each step's row equal to its record
    x, y = _monitor_data()
    model = _small()
    mon = GradientMonitor()
    rows = []

    class Spy(fg.callbacks.Callback):
        def on_batch_end(self, batch, logs=None):
            rec = self.model.optimizer.last_step
            rows.append((rec.step, rec.grad_norms.copy(), rec.update_ratio.copy()))

    for epochs in (2, 2, 2, 10):
        model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                  callbacks=[mon, Spy()])
    assert mon.grad_norms.shape == mon.update_ratios.shape == (96, 6)
    np.testing.assert_array_equal(mon.steps, np.arange(1, 97))
    np.testing.assert_array_equal(mon.steps, [r[0] for r in rows])
    np.testing.assert_array_equal(mon.grad_norms, np.array([r[1] for r in rows]))
    np.testing.assert_array_equal(mon.update_ratios, np.array([r[2] for r in rows]))
    assert mon.clipped.dtype == bool and not mon.clipped.any()
    # what the properties return is a copy: the records cannot be edited
    mon.grad_norms[:] = 0
    assert mon.grad_norms.any()


def test_monitor_empty_and_refuses_a_model_of_another_shape():
    mon = GradientMonitor()
    assert mon.grad_norms.shape == (0, 0) and mon.steps.shape == (0,)
    x, y = _monitor_data()
    model = _small()
    model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[mon])
    other = fg.Sequential([L.Dense(3, activation="softmax", input_dim=8)], seed=0)
    other.compile(fg.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="monitor holds records of 6 tensors"):
        other.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[mon])
    assert mon.grad_norms.shape == (3, 6)


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "2"])
def test_monitor_every_validation(every):
    with pytest.raises(ValueError, match="every"):
        GradientMonitor(every=every)


def test_monitor_global_clipnorm():
    x, y = _monitor_data()
    c = 0.9
    model = _small(optimizer=fg.optimizers.SGD(0.1, global_clipnorm=c))
    twin = _small(optimizer=fg.optimizers.SGD(0.1, global_clipnorm=c))
    mon = GradientMonitor()
    model.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0, callbacks=[mon])
    # independent: the raw gradients of the twin, and its weight updates
    n = x.shape[0]
    k = 0
    for _ in range(2):
        for start in range(0, n, 16):
            xb, yb = x[start:start + 16], y[start:start + 16]
            _, grads = twin.compute_gradients(xb, yb)
            g = [a.astype(F64) for a in grads]
            norms = np.array([np.linalg.norm(a) for a in g])
            total = math.sqrt(float((norms ** 2).sum()))
            scale = min(1.0, c / total)
            before = [w.astype(F64) for w in twin.get_weights()]
            twin.train_on_batch(xb, yb)
            after = [w.astype(F64) for w in twin.get_weights()]
            # plain SGD: the step is -lr * scale * g
            for a, b, gt in zip(after, before, g):
                np.testing.assert_allclose(a - b, -0.1 * scale * gt, rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(mon.grad_norms[k], norms, rtol=1e-6)
            assert mon.global_norms[k] == pytest.approx(total, rel=1e-6)
            np.testing.assert_allclose(mon.clip_scales[k], np.full(6, scale), rtol=1e-6)
            assert mon.clipped[k] == (total > c)
            k += 1
    assert k == 12
    assert mon.clipped.any() and not mon.clipped.all()     # a mix, or the test proves little
    np.testing.assert_allclose(mon.clip_scales, np.minimum(1.0, c / mon.global_norms)[:, None]
                               * np.ones((1, 6)), rtol=1e-12)


class _Poison(Callback):
    """Before step ``at`` (0-based over the whole fit), blow two consecutive
    relu kernels up to 1e30 so the step's activations overflow in float32; after it, check the
    skipped step left every weight as it was and put the good weights back."""

    def __init__(self, at):
        super().__init__()
        self.at, self.seen, self.checked = at, 0, False

    def on_batch_begin(self, batch, logs=None):
        if self.seen == self.at:
            self.good = self.model.get_weights()
            w = [a.copy() for a in self.good]
            w[0][0, :] = 1e30
            w[2][0, :] = 1e30
            self.model.set_weights(w)
            self.poisoned = [a.copy() for a in w]
            self.moments = {k: v.copy() for k, v in self.model.optimizer.variables().items()}

    def on_batch_end(self, batch, logs=None):
        if self.seen == self.at:
            for a, b in zip(self.model.get_weights(), self.poisoned):
                assert a.tobytes() == b.tobytes()
            for k, v in self.model.optimizer.variables().items():
                assert v.tobytes() == self.moments[k].tobytes()
            self.model.set_weights(self.good)
            self.checked = True
        self.seen += 1


def test_monitor_nonfinite_step_is_recorded_and_skipped():
    x, y = _monitor_data()
    # relu -> relu: 1e30 * 1e30 overflows to inf (a tanh would bound it)
    model = _small(optimizer=fg.optimizers.SGD(0.1, momentum=0.9), middle="relu")
    twin = _small(optimizer=fg.optimizers.SGD(0.1, momentum=0.9), middle="relu")
    mon, poison = GradientMonitor(), _Poison(at=3)
    hist = model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0,
                     callbacks=[poison, mon])
    assert poison.checked
    expected = np.zeros(6, bool)
    expected[3] = True
    np.testing.assert_array_equal(mon.nonfinite, expected)
    assert not np.all(np.isfinite(mon.grad_norms[3]))
    assert np.all(np.isfinite(mon.grad_norms[~expected]))
    assert np.all(np.isnan(mon.update_ratios[3]))
    assert np.all(np.isfinite(mon.update_ratios[~expected]))
    assert not mon.clipped[3]
    assert model.optimizer.iterations == 5 and model.optimizer.skipped_steps == 1
    # the skipped step changed nothing: the twin that never saw that batch
    # ends bit-identical, moments included
    norms, _ = _replay(twin, x, y, 16, 1, skip={3})
    for a, b in zip(model.get_weights(), twin.get_weights()):
        assert a.tobytes() == b.tobytes()
    for k, v in model.optimizer.variables().items():
        assert v.tobytes() == twin.optimizer.variables()[k].tobytes()
    np.testing.assert_allclose(mon.grad_norms[~expected], norms, rtol=1e-6)
    # History: grad_norm is the mean over the applied steps only
    applied = np.sqrt((norms ** 2).sum(axis=1))
    assert hist.gradients["grad_norm"][0] == pytest.approx(applied.mean(), rel=1e-6)
    assert hist.gradients["clip_rate"] == [0.0]


def test_monitor_all_steps_nonfinite_weights_untouched():
    x, y = _monitor_data()
    model = _small(optimizer=fg.optimizers.Adam(0.01), middle="relu")
    w = model.get_weights()
    w[0][0, :] = 1e30
    w[2][0, :] = 1e30
    model.set_weights(w)
    before = _snapshot(model)
    mon = GradientMonitor()
    hist = model.fit(x[:48], y[:48], epochs=1, batch_size=16, shuffle=False, verbose=0,
                     callbacks=[mon])
    np.testing.assert_array_equal(mon.nonfinite, [True, True, True])
    assert math.isnan(hist.gradients["grad_norm"][0])      # no applied step
    assert np.all(np.isnan(mon.update_ratios))
    after = _snapshot(model)
    assert after["weights"] == before["weights"] and after["moments"] == before["moments"]
    assert model.optimizer.iterations == 0 and model.optimizer.skipped_steps == 3


# ---------------------------------------------------------------------------
# 5. History
# ---------------------------------------------------------------------------

def test_history_grad_norm_and_clip_rate():
    x, y = _monitor_data()
    c = 0.9
    model = _small(optimizer=fg.optimizers.SGD(0.1, global_clipnorm=c))
    twin = _small(optimizer=fg.optimizers.SGD(0.1, global_clipnorm=c))
    mon = GradientMonitor()
    hist = model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0, callbacks=[mon])
    norms, _ = _replay(twin, x, y, 16, 3)
    total = np.sqrt((norms ** 2).sum(axis=1)).reshape(3, 6)
    # beside the Keras logs, not in them
    assert "grad_norm" not in hist.history and "clip_rate" not in hist.history
    h = hist.gradients
    assert len(h["grad_norm"]) == len(h["clip_rate"]) == 3
    np.testing.assert_allclose(h["grad_norm"], total.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(h["grad_norm"], mon.global_norms.reshape(3, 6).mean(axis=1),
                               rtol=1e-12)
    np.testing.assert_allclose(h["clip_rate"], (total > c).mean(axis=1))
    np.testing.assert_allclose(h["clip_rate"], mon.clipped.reshape(3, 6).mean(axis=1))
    assert 0 < h["clip_rate"][0] < 1
    # without clipping nothing is clipped
    free = _small()
    h2 = free.fit(x, y, epochs=2, batch_size=32, shuffle=False, verbose=0).gradients
    assert h2["clip_rate"] == [0.0, 0.0]
    assert all(g > 0 for g in h2["grad_norm"])


# ---------------------------------------------------------------------------
# 6. plot
# ---------------------------------------------------------------------------

def _trained_monitor():
    x, y = _monitor_data()
    model = _small()
    mon = GradientMonitor()
    model.fit(x, y, epochs=1, batch_size=16, shuffle=False, verbose=0, callbacks=[mon])
    return mon


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="needs the plot extra: pip install '.[plot]'")
    mon = _trained_monitor()
    path = tmp_path / "norms.png"
    assert mon.plot(str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    all_path = tmp_path / "all.png"
    mon.plot(str(all_path), kernels_only=False)
    assert all_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    mon = _trained_monitor()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    path = tmp_path / "norms.png"
    with pytest.raises(ImportError, match="pip install") as info:
        mon.plot(str(path))
    assert "matplotlib" in str(info.value)
    assert not path.exists()


# ---------------------------------------------------------------------------
# 7. statistics cost nothing unless asked
# ---------------------------------------------------------------------------

def test_activation_stats_off_by_default():
    x, y = _data(7, n=64)
    model = _stats_model()
    stat_layers = [l for l in model.layers if l.kind in ("Dense", "Activation")]
    assert len(stat_layers) == 6
    assert all(l.collect_stats is False for l in stat_layers)
    assert all(l.activation_stats is None for l in stat_layers)
    model.fit(x, y, epochs=2, batch_size=16, verbose=0, validation_data=(x[:16], y[:16]))
    model.predict(x)
    model.evaluate(x, y, verbose=0)
    model.train_on_batch(x[:16], y[:16])
    model.compute_gradients(x[:16], y[:16])
    assert all(l.collect_stats is False for l in stat_layers)
    assert all(l.activation_stats is None for l in stat_layers)
    # the optimizer measures update ratios only while a monitor asks
    assert model.optimizer.last_step.update_ratio is None
    mon = GradientMonitor()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, callbacks=[mon])
    assert model.optimizer.last_step.update_ratio is not None
    assert all(l.activation_stats is None for l in stat_layers)
    model.train_on_batch(x[:16], y[:16])
    assert model.optimizer.last_step.update_ratio is None
    # diagnose turns the statistics on for its pass only
    fg.diagnose(model, x, y)
    assert all(l.collect_stats is False for l in stat_layers)
    assert all(l.activation_stats is not None for l in stat_layers)


# ---------------------------------------------------------------------------
# 8. the demo
# ---------------------------------------------------------------------------

@pytest.mark.slow
def test_demo_runs_and_diagnoses(tmp_path):
    env = dict(os.environ)
    # the subprocess imports the same fastgrad as this test (installed or in-place)
    home = str(Path(fg.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (home, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "fastgrad", "demo", "--epochs", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "=== summary ===" in out
    summary = out.split("=== summary ===", 1)[1].splitlines()
    expected = {
        "sigmoid + glorot_uniform": "vanishing",
        "relu + he_normal": "healthy",
        "sigmoid + BatchNormalization": "healthy",
        "relu + random_normal(0.25), no clipping": "exploding",
        "relu + random_normal(0.25), global_clipnorm=1.0": "exploding",
        "sigmoid, then LayerNormalization": "healthy",
    }
    for title, status in expected.items():
        line = next((l for l in summary if l.startswith(title + " ")), None)
        assert line is not None, (title, summary)
        assert line[len(title):].split()[0] == status, line
    for word in ("vanishing", "healthy", "exploding"):
        assert word in "\n".join(summary)
