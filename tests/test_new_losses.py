"""log_cosh, kl_divergence, poisson, hinge, squared_hinge, categorical_hinge,
mape, msle, the focal cross-entropies and cosine_similarity: every size
from 1 to 33 and 1029x917 against the float64 references of test_ops.py
(whose finite-difference and reference tests run over them too), memory
layouts, edge values and clipping, class names, and agreement with Keras 3
in values, gradients and training steps."""
import numpy as np
import pytest

import fastgrad as fg
from fastgrad import losses, ops
from fastgrad.layers import Dense
from keras_peer import assert_agree, keras_or_skip, precision, train_both
from _reference import ref_new_loss
from test_ops import make_loss_data

F32, F64 = np.float32, np.float64
DTYPES = [F32, F64]
IDS = ["f32", "f64"]
NEW = ["log_cosh", "kl_divergence", "poisson", "hinge", "squared_hinge", "categorical_hinge",
       "mape", "msle", "cosine_similarity", "binary_focal_crossentropy",
       "categorical_focal_crossentropy"]
CASES = [(k, False) for k in NEW] + [("binary_focal_crossentropy", True),
                                     ("categorical_focal_crossentropy", True)]
CASE_IDS = [k + ("-logits" if lg else "") for k, lg in CASES]
SETTINGS = [{}, {"alpha": 0.6, "gamma": 0.0}, {"alpha": 0.4, "gamma": 3.5,
                                                "apply_class_balancing": True}]


def _check(loss, logits, t, p, dtype, **kw):
    t, p = t.astype(dtype), p.astype(dtype)
    value, d, rows = ops.loss_forward_backward(t, p, loss, from_logits=logits, per_sample=True,
                                               **kw)
    kw.pop("apply_class_balancing", None) if "categorical" in loss else None
    bal = kw.pop("apply_class_balancing", False)
    want_rows, want_d = ref_new_loss(loss, t.astype(F64), p.astype(F64), logits,
                                     balancing=bal, **kw)
    tol = 2e-5 if dtype == F32 else 1e-12
    scale = max(1.0, float(np.abs(want_rows).max(initial=0)))
    np.testing.assert_allclose(rows, want_rows, rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(value, want_rows.mean() if len(t) else 0.0, rtol=tol,
                               atol=tol * scale)
    np.testing.assert_allclose(d, want_d, rtol=tol, atol=tol * np.abs(want_d).max(initial=1))


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("loss, logits", CASES, ids=CASE_IDS)
def test_every_size_1_to_33_and_1029_by_917(loss, logits, dtype):
    rng = np.random.default_rng([len(loss), logits])
    shapes = [(n, 4) for n in range(1, 34)] + [(3, n) for n in range(1, 34)] + [(1029, 917)]
    for shape in shapes:
        if loss == "categorical_hinge" or "focal" in loss:
            shape = (shape[0], max(shape[1], 2))
        t, p = make_loss_data(loss, logits, shape, rng)
        _check(loss, logits, t, p, dtype)


@pytest.mark.parametrize("settings", SETTINGS, ids=["default", "a0.6-g0", "a0.4-g3.5-bal"])
@pytest.mark.parametrize("loss, logits", [c for c in CASES if "focal" in c[0]],
                         ids=[i for i in CASE_IDS if "focal" in i])
def test_focal_settings(loss, logits, settings):
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        t, p = make_loss_data(loss, logits, (7, 5), rng)
        _check(loss, logits, t, p, dtype, **dict(settings))


@pytest.mark.parametrize("loss, logits", CASES, ids=CASE_IDS)
def test_every_input_layout_gives_the_same_bits(loss, logits):
    rng = np.random.default_rng(4)
    t, p = make_loss_data(loss, logits, (6, 5), rng)
    want = ops.loss_forward_backward(t, p, loss, from_logits=logits, per_sample=True)
    big = np.zeros((13, 11))
    strided = big[1::2, 1::2]
    strided[...] = p
    ro = p.copy()
    ro.flags.writeable = False
    for v in (np.asfortranarray(p), np.ascontiguousarray(p.T).T, strided, ro):
        got = ops.loss_forward_backward(np.asfortranarray(t), v, loss, from_logits=logits,
                                        per_sample=True)
        assert got[0] == want[0] and all(a.tobytes() == b.tobytes()
                                         for a, b in zip(got[1:], want[1:]))


# ---------------------------------------------------------------------------
# edge values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_clipping_where_keras_clips(dtype):
    """Probabilities at and beyond 0 and 1: finite losses, and no gradient
    through a clip (kl_divergence: p to [1e-7, 1]; focal: p or q to
    [1e-7, 1 - 1e-7]; msle: max(p, 1e-7); mape: max(|t|, 1e-7))."""
    p = np.array([[0.0, 1.0, 0.5, 1e-9], [1.2, -0.1, 0.3, 0.7]], dtype)
    t = np.array([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]], dtype)
    for loss in ("kl_divergence", "binary_focal_crossentropy", "msle", "mape"):
        with np.errstate(all="raise"):
            v, d, rows = ops.loss_forward_backward(t, p, loss, per_sample=True)
        assert np.isfinite(v) and np.all(np.isfinite(d)), loss
        with np.errstate(all="ignore"):
            want_rows, want_d = ref_new_loss(loss, t.astype(F64), p.astype(F64))
        np.testing.assert_allclose(rows, want_rows, rtol=2e-6)
        np.testing.assert_allclose(d, want_d, rtol=2e-6, atol=1e-12)
    d = ops.loss_forward_backward(t, p, "kl_divergence")[1]
    assert d[0, 0] == 0 and d[0, 1] == 0 and d[0, 3] == 0 and d[1, 0] == 0
    d = ops.loss_forward_backward(t, p, "msle")[1]
    assert d[0, 0] == 0 and d[1, 1] == 0
    # categorical focal: q = p / sum(p) clipped
    q = np.array([[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]], dtype)
    tq = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype)
    v, d = ops.loss_forward_backward(tq, q, "categorical_focal_crossentropy")
    assert np.isfinite(v) and np.all(d[0] == 0)


def test_cosine_of_zero_vectors_and_hinge_label_conversion():
    t = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    p = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    v, d, rows = ops.loss_forward_backward(t, p, "cosine_similarity", per_sample=True)
    assert np.all(rows == 0) and np.all(d[0] == 0)
    # 1 / |p| capped at 1e7, as Keras' l2 normalization: a large, finite slope
    np.testing.assert_allclose(d, ref_new_loss("cosine_similarity", t, p)[1], rtol=1e-15)
    x = np.array([[0.3, -0.4], [2.0, -1.5]])
    rows01 = losses.hinge(np.array([[1, 0], [0, 1]]), x)
    rowspm = losses.hinge(np.array([[1, -1], [-1, 1]]), x)
    np.testing.assert_array_equal(rows01, rowspm)       # {0, 1} taken as {-1, 1}
    mixed = losses.hinge(np.array([[1, 0], [0, 2]]), x)   # not all in {0, 1}: as given
    np.testing.assert_allclose(mixed, [np.mean([0.7, 1.0]), np.mean([1.0, 4.0])])


@pytest.mark.parametrize("loss, logits", CASES, ids=CASE_IDS)
def test_nan_in_predictions_reaches_the_loss(loss, logits):
    t, p = make_loss_data(loss, logits, (3, 4), np.random.default_rng(5))
    p[1, 2] = np.nan
    v, _, rows = ops.loss_forward_backward(t, p, loss, from_logits=logits, per_sample=True)
    assert np.isnan(v) and np.isnan(rows[1]) and np.all(np.isfinite(rows[[0, 2]]))


def test_arguments_are_checked():
    t, p = np.ones((2, 3)), np.full((2, 3), 0.5)
    for call, exc, match in (
            (lambda: ops.loss_forward_backward(t, p, "log_cosh", from_logits=True), ValueError,
             "^from_logits:"),
            (lambda: ops.loss_forward_backward(t, p, "binary_focal_crossentropy", gamma=-1),
             ValueError, "^gamma:"),
            (lambda: ops.loss_forward_backward(t, p, "binary_focal_crossentropy",
                                               alpha=np.inf), ValueError, "^alpha:"),
            (lambda: losses.BinaryFocalCrossentropy(alpha=1.5), ValueError, "^alpha:"),
            (lambda: losses.CategoricalFocalCrossentropy(gamma=-0.5), ValueError, "^gamma:"),
            (lambda: losses.CosineSimilarity(axis=0), ValueError, "^axis:"),
            (lambda: ops.loss_forward_backward(t[:1], p, "poisson"), ValueError, "^y_true:")):
        with pytest.raises(exc, match=match):
            call()


# ---------------------------------------------------------------------------
# names, configurations, Keras
# ---------------------------------------------------------------------------

KERAS_CLASSES = {
    "LogCosh": "log_cosh", "KLDivergence": "kl_divergence", "Poisson": "poisson",
    "Hinge": "hinge", "SquaredHinge": "squared_hinge", "CategoricalHinge": "categorical_hinge",
    "MeanAbsolutePercentageError": "mape", "MeanSquaredLogarithmicError": "msle",
    "CosineSimilarity": "cosine_similarity",
    "BinaryFocalCrossentropy": "binary_focal_crossentropy",
    "CategoricalFocalCrossentropy": "categorical_focal_crossentropy",
    "MeanSquaredError": "mse", "MeanAbsoluteError": "mae", "Huber": "huber",
}


def test_class_names_and_keras_names_resolve(tmp_path):
    for cls, kernel in KERAS_CLASSES.items():
        obj = losses.get(cls)
        assert type(obj).__name__ == cls and obj.name == kernel
        again = losses.deserialize(losses.serialize(obj))
        assert type(again) is type(obj) and again.get_config() == obj.get_config()
    for alias, cls in (("kld", "KLDivergence"), ("logcosh", "LogCosh"),
                       ("mean_absolute_percentage_error", "MeanAbsolutePercentageError"),
                       ("msle", "MeanSquaredLogarithmicError")):
        assert type(losses.get(alias)).__name__ == cls
    m = fg.Sequential([Dense(3, activation="sigmoid", input_dim=2)], seed=0)
    m.compile("sgd", losses.BinaryFocalCrossentropy(apply_class_balancing=True, alpha=0.3,
                                                    gamma=1.5), metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(8, 2))
    m.fit(x, (x[:, :1] > 0).repeat(3, 1).astype(float), epochs=1, verbose=0)
    m.save(tmp_path / "m.fgm")
    cfg = fg.load_model(tmp_path / "m.fgm").loss.get_config()
    assert cfg == {"apply_class_balancing": True, "alpha": 0.3, "gamma": 1.5,
                   "from_logits": False}
    # "accuracy" resolves from the shapes, as in Keras 3: three outputs and
    # targets of three columns give categorical accuracy, whatever the loss
    assert type(m.metrics[0]).__name__ == "CategoricalAccuracy"


def test_configurations_are_keras_ones():
    keras = keras_or_skip()
    for cls in ("BinaryFocalCrossentropy", "CategoricalFocalCrossentropy"):
        k = getattr(keras.losses, cls)().get_config()
        for key, v in losses.get(cls).get_config().items():
            assert k[key] == v, (cls, key)


# the Keras function of each case, with y_pred as it is fed to the kernel
def _keras_fn(keras, loss, logits):
    fn = {"mape": "mean_absolute_percentage_error",
          "msle": "mean_squared_logarithmic_error"}.get(loss, loss)
    f = getattr(keras.losses, fn)
    return (lambda t, p: f(t, p, from_logits=True)) if logits else f


@pytest.mark.parametrize("loss, logits", CASES, ids=CASE_IDS)
def test_values_and_gradients_agree_with_keras_functions(loss, logits):
    """Per-sample values and gradients against Keras 3's own functions in
    float64 (gradients by JAX). Keras' means over the last axis run in
    float32 accuracy (its ops.mean), so those losses agree to ~1e-7 there;
    sums are float64-exact. The focal losses from logits are computed from
    log-sigmoid / log-softmax: the same as Keras' sigmoid-then-clip away
    from the clip, which these logits stay."""
    keras = keras_or_skip()
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(6)
    t, p = make_loss_data(loss, logits, (6, 4), rng)
    if logits:
        p = np.clip(p, -8, 8)
    _, d, rows = ops.loss_forward_backward(t, p, loss, from_logits=logits, per_sample=True)
    with precision(keras, F64):
        f = _keras_fn(keras, loss, logits)
        krows = np.asarray(f(jnp.asarray(t), jnp.asarray(p)))
        kd = np.asarray(jax.grad(lambda q: jnp.mean(f(jnp.asarray(t), q)))(jnp.asarray(p)))
    sums = loss in ("kl_divergence", "categorical_hinge", "cosine_similarity",
                    "categorical_focal_crossentropy")
    tol = 1e-12 if sums else 1e-6
    np.testing.assert_allclose(rows, krows, rtol=tol, atol=tol)
    np.testing.assert_allclose(d, kd, rtol=tol, atol=tol * np.abs(kd).max())


# (fastgrad loss, Keras loss, output activation, targets)
def _targets(loss, rng, n):
    if loss in ("hinge", "squared_hinge", "binary_focal_crossentropy"):
        return (rng.random((n, 3)) < 0.5).astype(F64)
    if loss in ("categorical_hinge", "categorical_focal_crossentropy"):
        return np.eye(3)[rng.integers(0, 3, n)]
    if loss == "kl_divergence":
        e = np.exp(rng.normal(size=(n, 3)))
        return e / e.sum(axis=1, keepdims=True)
    if loss == "poisson":
        return rng.poisson(1.0, (n, 3)).astype(F64)
    if loss == "msle":
        return rng.uniform(0.0, 1.0, (n, 3))
    return rng.normal(size=(n, 3)) + np.sign(rng.normal(size=(n, 3)))


OUT_ACT = {"kl_divergence": "softmax", "categorical_focal_crossentropy": "softmax",
           "binary_focal_crossentropy": "sigmoid", "poisson": "softplus", "msle": "softplus"}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("loss", NEW)
def test_training_agrees_with_keras(loss, dtype):
    """Four SGD steps from the same weights. Losses Keras averages over the
    last axis take that mean (and its gradient) to float32 accuracy in
    Keras, so in float64 they agree to ~1e-7; the others to ~1e-11."""
    keras = keras_or_skip()
    rng = np.random.default_rng(7)
    x = rng.normal(size=(32, 4)).astype(dtype)
    y = _targets(loss, rng, 32).astype(dtype)
    act = OUT_ACT.get(loss)
    klass = keras.losses.get(loss if loss not in ("mape", "msle") else
                             {"mape": "MeanAbsolutePercentageError",
                              "msle": "MeanSquaredLogarithmicError"}[loss])
    result = train_both([Dense(5, activation="sigmoid"), Dense(3, activation=act)],
                        [keras.layers.Dense(5, activation="sigmoid"),
                         keras.layers.Dense(3, activation=act)],
                        x, y, loss, klass, dtype, learning_rate=0.05)
    sums = loss in ("kl_divergence", "categorical_hinge", "cosine_similarity",
                    "categorical_focal_crossentropy")
    assert_agree(result, dtype, (1e-10 if sums else 1e-6) if dtype == F64 else 5e-5)
